"""The thermal guard's parts: the JSON-lines telemetry file, hot/cool hysteresis (fake clock), the
policy's temporary plan limits (held on the audit list, lifted without clobbering an operator), and
the guard driving a worker slot's capacity from a file."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from kiln.engine.capacity import Capacity
from kiln.service import audit, thermal_policy
from kiln.service.plans import get_plan, update_plan
from kiln.service.thermal import ThermalGuard, ThermalStates
from kiln.worker.telemetry import FileSource, GpuReading, parse_line


def write(path: Path, *readings: dict, mode: str = "a") -> None:
    with open(path, mode) as file:
        for reading in readings:
            file.write(json.dumps(reading) + "\n")


def test_the_file_source_keeps_the_latest_line_per_gpu_and_follows_the_file(tmp_path: Path) -> None:
    path = tmp_path / "gpus.jsonl"
    source = FileSource(path)
    assert source.read() == []  # not written yet
    write(path, {"gpu": 0, "temp_c": 60, "util": 10}, {"gpu": 1, "temp_c": 61})
    with open(path, "a") as file:
        file.write('not json\n{"gpu": true}\n{"gpu": 0, "temp_c": 90, "clocks_event_reasons": 64}\n{"gpu": 1, "te')
    readings = source.read()
    assert [(r.gpu, r.temp_c) for r in readings] == [(0, 90.0), (1, 61.0)]
    assert readings[0].throttle_reasons == ["hw_thermal_slowdown"]
    with open(path, "a") as file:  # the half line completes
        file.write('mp_c": 70, "power_w": 300}\n')
    assert [(r.gpu, r.temp_c, r.power_w) for r in source.read()][1] == (1, 70.0, 300.0)
    replaced = tmp_path / "new.jsonl"  # rotated: a new file under the same name is read from its start
    write(replaced, {"gpu": 0, "temp_c": 50})
    os.replace(replaced, path)
    assert source.read()[0].temp_c == 50.0
    assert parse_line(b'{"gpu": 2, "temp_c": "hot"}') is None


def test_hot_at_the_limit_or_on_a_throttle_reason_and_cool_only_after_a_cool_spell() -> None:
    states = ThermalStates(limit_c=85, cool_c=78, cool_s=30, throttle_mask=0xE8)
    assert states.observe(GpuReading(0, temp_c=84, clocks_event_reasons=0x4), 0) is None  # power cap alone: ok
    assert states.observe(GpuReading(0, temp_c=85), 1) == "hot"
    assert states.observe(GpuReading(1, temp_c=60, clocks_event_reasons=0x20), 1) == "hot"  # sw thermal slowdown
    assert states.gpus[1].why == ("sw_thermal_slowdown",)
    assert states.observe(GpuReading(0, temp_c=77), 2) is None  # cool reading starts the spell
    assert states.observe(GpuReading(0, temp_c=80), 20) is None  # between cool and limit: the spell restarts
    assert states.observe(GpuReading(0, temp_c=70), 21) is None
    assert states.observe(GpuReading(0, temp_c=70), 50) is None
    assert states.observe(GpuReading(0, temp_c=70), 51) == "cool"
    assert states.observe(GpuReading(1, temp_c=60), 60) is None
    assert states.observe(GpuReading(1, temp_c=60, clocks_event_reasons=0x40), 70) is None  # throttling again
    assert states.observe(GpuReading(1, temp_c=60), 99) is None
    assert states.observe(GpuReading(1, temp_c=60), 129) == "cool"


def test_policy_limits_hold_on_the_audit_list_and_lift_without_clobbering_an_operator(db) -> None:
    update_plan(db, "plus", actor="cli:ops", max_n=3)
    policy = {"free": {"images_per_day": 1, "max_n": 1}, "plus": {"images_per_day": 50, "max_concurrent": 1},
              "nope": {"max_n": 1}}
    done = thermal_policy.apply(db, policy, {})
    assert done == {"free": {"images_per_day": {"from": 3, "to": 1}},  # max_n 1 is already as strict
                    "plus": {"images_per_day": {"from": 200, "to": 50}, "max_concurrent": {"from": 3, "to": 1}}}
    assert get_plan(db, "free").images_per_day == 1
    assert thermal_policy.apply(db, policy, {}) == {}  # already held (a restart, a second guard): no-op
    assert set(thermal_policy.open_holds(db)) == {"free", "plus"}
    # meanwhile operators change held fields: plus's quota, and free's to 2 and back to the guard's 1
    update_plan(db, "plus", actor="admin:ann", images_per_day=60)
    update_plan(db, "free", actor="admin:ann", images_per_day=2)
    update_plan(db, "free", actor="cli:bob", images_per_day=1, max_n=2)
    assert sorted(thermal_policy.lift(db, {})) == ["free", "plus"]
    free, plus = get_plan(db, "free"), get_plan(db, "plus")
    assert (free.images_per_day, free.max_n) == (1, 2)  # the operators' values stay
    assert (plus.images_per_day, plus.max_concurrent, plus.max_n) == (60, 3, 3)  # max_concurrent given back
    assert thermal_policy.open_holds(db) == {}
    entries = audit.list_events(db, limit=20)
    lifts = {e.target: e.details for e in entries if e.action == "thermal.lift"}
    assert lifts["plus"] == {"restored": {"max_concurrent": 3}, "kept": {"images_per_day": 60},
                             "reason": "the fleet is cool"}
    assert lifts["free"]["kept"] == {"images_per_day": 1} and lifts["free"]["restored"] == {}
    assert [(e.actor, e.action, e.target) for e in entries[::-1]] == [
        ("cli:ops", "plan.update", "plus"), ("thermal-guard", "thermal.limit", "free"),
        ("thermal-guard", "thermal.limit", "plus"), ("admin:ann", "plan.update", "plus"),
        ("admin:ann", "plan.update", "free"), ("cli:bob", "plan.update", "free"),
        ("thermal-guard", "thermal.lift", "free"), ("thermal-guard", "thermal.lift", "plus"),
    ]
    assert audit.describe(entries[-1]) == "max_n 4 → 3"
    assert audit.describe(entries[0]) == "restored max_concurrent → 3; kept the operator's images_per_day = 60"


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def fake_engine(clock: FakeClock, slots: int) -> SimpleNamespace:
    """What the guard uses of the engine: capacity, the executor's slot count, plan caps, wake."""
    woken: list[bool] = []
    capacity = Capacity(clock)
    core = SimpleNamespace(capacity=capacity, set_capacity=capacity.set_factor,
                           executor=SimpleNamespace(total_slots=lambda: slots), plan_caps={"plus": 8})
    return SimpleNamespace(core=core, wake=lambda: woken.append(True), woken=woken)


def test_the_guard_lowers_the_hot_gpus_worker_and_holds_limits_until_it_is_cool(db, settings, tmp_path) -> None:
    path = tmp_path / "gpus.jsonl"
    settings = settings.model_copy(update={
        "telemetry_source": "file", "telemetry_file": path, "thermal_cool_s": 10.0, "telemetry_poll_s": 60.0,
        "thermal_gpu_of_worker": [1, 0],  # worker 0 runs on GPU 1
        "thermal_policy": {"free": {"images_per_day": 1, "max_running_images": 2}, "plus": {"max_running_images": 4}},
    })
    clock = FakeClock()
    engine = fake_engine(clock, slots=2)
    guard = ThermalGuard(settings, engine, db, clock=clock)

    async def scenario() -> None:
        await guard.start()
        try:
            write(path, {"gpu": 0, "temp_c": 60}, {"gpu": 1, "temp_c": 90, "power_w": 650, "clocks_event_reasons": 64})
            await guard.poll_once()
            assert engine.core.capacity.factors() == {0: 0.5}
            assert engine.core.plan_caps == {"plus": 4, "free": 2}
            assert get_plan(db, "free").images_per_day == 1
            snap = {g["gpu"]: g for g in guard.snapshot()["gpus"]}
            assert (snap[1]["state"], snap[1]["workers"], snap[1]["capacity_factor"]) == ("hot", [0], 0.5)
            assert snap[0]["state"] == "ok" and guard.snapshot()["limits_held"]
            write(path, {"gpu": 1, "temp_c": 70})
            await guard.poll_once()
            assert guard.snapshot()["gpus"][1]["cooling"] and engine.core.capacity.factors() == {0: 0.5}
            clock.now += 10
            await guard.poll_once()
            assert engine.core.capacity.factors() == {} and engine.woken
            assert engine.core.plan_caps == {"plus": 8}
            assert get_plan(db, "free").images_per_day == 3 and not guard.snapshot()["limits_held"]
        finally:
            await guard.stop()

    asyncio.run(scenario())
    actions = [(e.action, e.target) for e in audit.list_events(db, action="thermal.")][::-1]
    assert actions == [("thermal.hot", "gpu:1"), ("thermal.limit", "free"), ("thermal.limit", "plus"),
                       ("thermal.cool", "gpu:1"), ("thermal.lift", "free"), ("thermal.lift", "plus")]
    hot = audit.list_events(db, action="thermal.hot")[0]
    assert hot.details["workers"] == [0] and audit.describe(hot) == "90 °C; temperature 90 °C ≥ 85 °C, hw_thermal_slowdown; capacity × 0.5"


@pytest.mark.parametrize("empty_database_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize("source", ["file", "off"])
def test_a_guard_restarted_while_limits_are_held_lifts_them_once_cool(db, settings, tmp_path, source) -> None:
    path = tmp_path / "gpus.jsonl"  # "off": no telemetry at all, so nothing is hot
    settings = settings.model_copy(update={"telemetry_source": source, "telemetry_file": path,
                                           "thermal_cool_s": 0.0, "telemetry_poll_s": 60.0,
                                           "thermal_policy": {"free": {"images_per_day": 0}}})
    thermal_policy.apply(db, settings.thermal_policy, {})  # the previous life made it hot and died
    clock = FakeClock()
    guard = ThermalGuard(settings, fake_engine(clock, slots=1), db, clock=clock)
    write(path, {"gpu": 0, "temp_c": 50})

    async def scenario() -> None:
        await guard.start()
        try:
            assert guard.holding
            await guard.poll_once()
        finally:
            await guard.stop()

    asyncio.run(scenario())
    assert get_plan(db, "free").images_per_day == 3 and thermal_policy.open_holds(db) == {}


@pytest.mark.parametrize("empty_database_url", ["sqlite"], indirect=True)
def test_a_worker_maps_to_the_gpu_its_executor_pinned_it_to(db, settings) -> None:
    clock = FakeClock()
    engine = fake_engine(clock, slots=2)
    guard = ThermalGuard(settings, engine, db, clock=clock)
    assert guard.slot_gpus() == {0: 0, 1: 1}  # nothing said: slot i is GPU i
    engine.core.executor.worker_gpus = lambda: ["3", "1,2"]  # CUDA_VISIBLE_DEVICES per worker
    assert guard.slot_gpus() == {0: 3, 1: 1}
    engine.core.executor.worker_gpus = lambda: ["3"]  # one worker not ready yet: cannot tell
    assert guard.slot_gpus() == {0: 0, 1: 1}
    guard.settings = settings.model_copy(update={"thermal_gpu_of_worker": [5, 4]})  # the operator's word wins
    assert guard.slot_gpus() == {0: 5, 1: 4}

