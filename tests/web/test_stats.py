"""The dashboard's JSON snapshot: read from the engine's Prometheus metrics where they exist."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from kiln.web import stats


def engine_like_registry() -> CollectorRegistry:
    """The metric names the engine exports (kiln.engine.metrics), filled with known values."""
    registry = CollectorRegistry()
    Gauge("kiln_queue_depth", "", ["plan"], registry=registry).labels("free").set(7)
    wait = Histogram("kiln_queue_wait_seconds", "", ["plan"], buckets=(1, 2, 5, 10), registry=registry)
    for value in (0.5, 1.5, 1.5, 4, 8):
        wait.labels("free").observe(value)
    Counter("kiln_images_generated", "", registry=registry).inc(42)
    Gauge("kiln_images_per_second", "", registry=registry).set(1.5)
    refusals = Counter("kiln_admission_refusals", "", ["plan", "reason"], registry=registry)
    refusals.labels("free", "quota_exceeded").inc(3)
    refusals.labels("plus", "quota_exceeded").inc(1)
    refusals.labels("free", "overloaded").inc(2)
    Counter("kiln_gpu_seconds", "", ["plan"], registry=registry).labels("free").inc(9)
    Gauge("kiln_gpu_temperature_celsius", "", ["gpu"], registry=registry).labels("0").set(61)
    Gauge("kiln_gpu_utilization_ratio", "", ["gpu"], registry=registry).labels("0").set(0.87)
    return registry


def test_engine_metrics_are_read_into_the_snapshot(db: Any) -> None:
    registry = engine_like_registry()
    app = SimpleNamespace(
        state=SimpleNamespace(kiln=SimpleNamespace(db=db, metrics=SimpleNamespace(registry=registry)))
    )
    assert stats.find_registry(app) is registry  # type: ignore[arg-type]
    snapshot = stats.snapshot(app)  # type: ignore[arg-type]
    assert snapshot["queue_depth"] == {"free": 7}
    assert snapshot["images_total"] == 42
    assert snapshot["images_per_s"] == 1.5
    assert snapshot["refusals_total"] == {"quota_exceeded": 4, "overloaded": 2}
    assert snapshot["gpus"] == [{"name": "0", "temperature_c": 61, "utilization": 87}]
    assert 1 <= snapshot["wait_s"]["free"]["p50"] <= 2 and 5 <= snapshot["wait_s"]["free"]["p95"] <= 10


def test_without_metrics_the_database_answers_and_the_rest_is_absent(db: Any) -> None:
    app = SimpleNamespace(
        state=SimpleNamespace(kiln=SimpleNamespace(db=db), metrics_registry=CollectorRegistry())
    )
    snapshot = stats.snapshot(app)  # type: ignore[arg-type]
    assert snapshot["queue_depth"] == {} and snapshot["images_total"] == 0
    assert snapshot["refusals_total"] == {} and snapshot["gpus"] == []
