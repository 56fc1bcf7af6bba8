"""Metrics on a registry of the test's own; GPU gauges only where NVML finds a GPU."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from kiln.engine import EngineConfig, EngineCore, EngineMetrics
from kiln.errors import Overloaded

from .conftest import req


def test_metrics_follow_the_engine(executor, clock):
    registry = CollectorRegistry()
    metrics = EngineMetrics(registry)
    engine = EngineCore(executor, EngineConfig(max_batch_wait_s=0, throughput_prior_units_per_s=1e-4),
                        clock=clock, metrics=metrics)
    for i in range(3):
        engine.add_request(req(f"u{i}", "plus"))
    with pytest.raises(Overloaded):
        engine.admit(req("late", "free"))
    engine.step()
    clock.advance(2.0)
    executor.complete(executor.only().batch_id, duration_s=2.0)
    engine.step()
    value = registry.get_sample_value
    assert value("kiln_batch_images_count") == 1
    assert value("kiln_batch_images_sum") == 3
    assert value("kiln_images_generated_total") == 3
    assert value("kiln_images_per_second") == pytest.approx(1.5)
    assert value("kiln_gpu_seconds_total", {"plan": "plus"}) == pytest.approx(2.0)
    assert value("kiln_admission_refusals_total", {"plan": "free", "reason": "overloaded"}) == 1
    assert value("kiln_queue_wait_seconds_count", {"plan": "plus"}) == 3
    assert value("kiln_queue_depth", {"plan": "plus"}) == 0


def test_two_engines_two_registries(executor, clock):
    EngineMetrics(CollectorRegistry())
    EngineMetrics(CollectorRegistry())  # no duplicate-timeseries error: nothing global


def test_gpu_metrics_absent_without_a_gpu():
    registry = CollectorRegistry()
    metrics = EngineMetrics(registry)
    text = generate_latest(registry).decode()
    if metrics.gpu_collector is None:
        assert "kiln_gpu_temperature_celsius" not in text
    else:  # on a machine with a GPU the readings are real
        assert "kiln_gpu_temperature_celsius{" in text
