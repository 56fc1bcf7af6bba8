"""The thermal guard, in the scheduler process: it reads every GPU's telemetry each `telemetry_poll_s`,
and a GPU that throttles (a reason in `thermal_throttle_mask`) or reaches `thermal_limit_c` turns hot
at once; it turns cool again only after reading below `thermal_cool_c`, unthrottled, for
`thermal_cool_s` (hysteresis, so a GPU at the edge does not flap).

A hot GPU's worker slot gets `thermal_capacity_factor` (engine `Capacity`: it rests between batches,
and admission counts it as that much of a worker at once, so free work degrades and is refused
before paid work misses its target). While any worker's GPU is hot, `thermal_policy`'s temporary plan
limits hold (`kiln.service.thermal_policy`); each change goes on the audit list. It never blocks the
loop: reads and writes run in threads, and a failed write is tried again at the next reading.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy.orm import Session, sessionmaker

from kiln.service import audit, thermal_policy
from kiln.worker.telemetry import GpuReading, TelemetrySource, make_source

log = logging.getLogger(__name__)


@dataclass
class GpuThermal:
    """One GPU's latest reading and its hot/cool state (with the hysteresis that leaves hot)."""

    gpu: int
    reading: GpuReading
    hot: bool = False
    why: tuple[str, ...] = ()
    cool_since: float | None = None
    since: float = 0.0


class ThermalStates:
    """Pure: readings in, transitions out (a fake clock tests it)."""

    def __init__(self, *, limit_c: float, cool_c: float, cool_s: float, throttle_mask: int) -> None:
        self.limit_c, self.cool_c, self.cool_s, self.mask = limit_c, cool_c, cool_s, throttle_mask
        self.gpus: dict[int, GpuThermal] = {}

    def why_hot(self, reading: GpuReading) -> tuple[str, ...]:
        """Why this reading is hot (empty: it is not)."""
        why = []
        if reading.temp_c is not None and reading.temp_c >= self.limit_c:
            why.append(f"temperature {reading.temp_c:g} °C ≥ {self.limit_c:g} °C")
        throttled = reading.clocks_event_reasons & self.mask
        if throttled:
            names = GpuReading(reading.gpu, clocks_event_reasons=throttled).throttle_reasons
            why.extend(names or [hex(throttled)])
        return tuple(why)

    def observe(self, reading: GpuReading, now: float) -> str | None:
        """Take a reading; "hot" or "cool" when the GPU's state changes, else None."""
        state = self.gpus.get(reading.gpu)
        if state is None:
            state = self.gpus[reading.gpu] = GpuThermal(reading.gpu, reading, since=now)
        state.reading = reading
        why = self.why_hot(reading)
        if why:
            state.cool_since = None
            state.why = why
            if not state.hot:
                state.hot, state.since = True, now
                return "hot"
            return None
        if not state.hot:
            return None
        if reading.temp_c is not None and reading.temp_c >= self.cool_c:
            state.cool_since = None  # under the limit but not yet cool: stays hot
            return None
        if state.cool_since is None:
            state.cool_since = now
        if now - state.cool_since >= self.cool_s:
            state.hot, state.why, state.cool_since, state.since = False, (), None, now
            return "cool"
        return None


class ThermalGuard:
    def __init__(
        self,
        settings: Any,
        engine: Any,
        db: sessionmaker[Session],
        *,
        source: TelemetrySource | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.db = db
        self.source = source
        self.clock = clock
        self.states = ThermalStates(
            limit_c=settings.thermal_limit_c, cool_c=settings.thermal_cool_c, cool_s=settings.thermal_cool_s,
            throttle_mask=settings.thermal_throttle_mask)
        self.policy: dict[str, dict[str, int]] = dict(settings.thermal_policy)
        self.holding = False
        """Whether the policy's limits are in force (as written; `wanted` is what the fleet asks)."""
        self._audits: list[tuple[str, str, dict[str, Any]]] = []
        self._task: asyncio.Task[None] | None = None
        self._polling = asyncio.Lock()

    @classmethod
    def from_settings(cls, settings: Any, engine: Any, db: sessionmaker[Session],
                      registry: CollectorRegistry | None = None) -> ThermalGuard:
        """The source is looked for at start. With `telemetry_source = "off"` (or no GPU) the guard
        reads nothing; it still lifts limits an earlier run left held, since nothing is hot."""
        guard = cls(settings, engine, db)
        if registry is not None:
            registry.register(ThermalCollector(guard))
        return guard

    # ---- lifecycle

    async def start(self) -> None:
        if self.source is None:
            self.source = await asyncio.to_thread(
                make_source, self.settings.telemetry_source, self.settings.telemetry_file)
        if self.source is None and self.settings.telemetry_source != "off":
            log.info("thermal guard: no GPU telemetry (NVML found no GPU); the guard is idle")
        try:
            self.holding = bool(await asyncio.to_thread(thermal_policy.open_holds, self.db))
        except Exception:  # noqa: BLE001 - the next reading reconciles
            log.exception("thermal guard: reading the held limits failed")
        self._task = asyncio.create_task(self._run(), name="kiln-thermal-guard")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self.source is not None:
            self.source.close()

    async def _run(self) -> None:
        while True:
            try:
                await self.poll_once()
            except Exception:  # noqa: BLE001 - a bad reading or a failed write must not stop the guard
                log.exception("thermal guard: a reading failed")
            await asyncio.sleep(self.settings.telemetry_poll_s)

    async def poll_once(self) -> None:
        """Read every GPU, act on what changed, and bring the policy's limits in line."""
        async with self._polling:  # one reading at a time, its writes in order
            readings = await asyncio.to_thread(self.source.read) if self.source is not None else []
            self.observe(readings)
            await self._write_audits()
            await self._reconcile_policy()

    # ---- what a reading changes (on the loop, at once)

    def slot_gpus(self) -> dict[int, int]:
        """Worker slot → its GPU index: `thermal_gpu_of_worker` where set, else the GPU the executor
        pinned the slot to (`worker_gpus()`, when it names one index per slot), else the slot's own
        number."""
        executor = self.engine.core.executor
        slots = int(executor.total_slots())
        mapping = list(self.settings.thermal_gpu_of_worker) or _pinned_gpus(executor, slots)
        return {slot: mapping[slot] if slot < len(mapping) else slot for slot in range(slots)}

    def observe(self, readings: list[GpuReading]) -> None:
        now = self.clock()
        changed = False
        for reading in readings:
            transition = self.states.observe(reading, now)
            if transition is None:
                continue
            changed = True
            state = self.states.gpus[reading.gpu]
            factor = self.settings.thermal_capacity_factor if state.hot else 1.0
            log.warning("GPU %d is %s%s", reading.gpu, transition,
                        f": {', '.join(state.why)}" if state.why else "")
            self._audits.append((f"thermal.{transition}", f"gpu:{reading.gpu}", {
                "temp_c": reading.temp_c, "reasons": list(state.why) if state.hot else [],
                "capacity_factor": factor, "workers": self.workers_of(reading.gpu),
            }))
        if changed or readings:
            self._apply_capacity()

    def _apply_capacity(self) -> None:
        core = self.engine.core
        changed = False
        for slot, gpu in self.slot_gpus().items():
            state = self.states.gpus.get(gpu)
            factor = self.settings.thermal_capacity_factor if state is not None and state.hot else 1.0
            if core.capacity.factor(slot) != factor:
                core.set_capacity(slot, factor)
                changed = True
        if changed:
            self.engine.wake()  # new ETAs for the queue; a slot that stopped resting can take work

    def workers_of(self, gpu: int) -> list[int]:
        return [slot for slot, g in self.slot_gpus().items() if g == gpu]

    @property
    def wanted(self) -> bool:
        """The policy should hold: a GPU that a worker uses is hot."""
        used = set(self.slot_gpus().values())
        return any(s.hot for g, s in self.states.gpus.items() if g in used)

    # ---- what is written (in threads; tried again at the next reading if it fails)

    async def _write_audits(self) -> None:
        while self._audits:
            action, target, details = self._audits[0]
            await asyncio.to_thread(audit.record, self.db, audit.GUARD, action, target, **details)
            self._audits.pop(0)

    async def _reconcile_policy(self) -> None:
        wanted = self.wanted
        if wanted == self.holding or (not self.policy and not self.holding):
            return
        if wanted:
            engine_changes = self._tighten_engine_caps()
            try:
                changed = bool(await asyncio.to_thread(thermal_policy.apply, self.db, self.policy, engine_changes))
            except BaseException:
                self._restore_engine_caps({p: (0, c) for p, c in engine_changes.items()})
                raise
        else:
            holds = await asyncio.to_thread(thermal_policy.open_holds, self.db)
            results = self._restore_engine_caps(holds)
            changed = bool(await asyncio.to_thread(thermal_policy.lift, self.db, results))
        self.holding = wanted
        if changed:
            await self._announce_plans()

    async def _announce_plans(self) -> None:
        """Tell every API replica that plans changed (`redis_url`: a `PlansChanged` notice, in force
        within a second), as `kiln plans set` does; without Redis they read them at their next poll."""
        if not getattr(self.settings, "redis_url", None):
            return
        from kiln.service.redis_bus import PlansChanged, announce_once

        try:
            await asyncio.to_thread(announce_once, self.settings.redis_url, self.settings.redis_prefix,
                                    PlansChanged())
        except Exception:  # noqa: BLE001 - the replicas' poll still brings the change
            log.warning("thermal guard: announcing the plan change over Redis failed; the replicas "
                        "read it at their next poll", exc_info=True)

    def _tighten_engine_caps(self) -> dict[str, thermal_policy.Changes]:
        caps = self.engine.core.plan_caps
        changes: dict[str, thermal_policy.Changes] = {}
        for plan, limits in self.policy.items():
            if "max_running_images" not in limits:
                continue
            was = caps.get(plan)
            new = thermal_policy.tighter(was, limits["max_running_images"])
            if new != was:
                caps[plan] = new
                changes[plan] = {"max_running_images": {"from": was, "to": new}}
        return changes

    def _restore_engine_caps(self, holds: dict[str, tuple[int, thermal_policy.Changes]]) -> dict[str, Any]:
        caps = self.engine.core.plan_caps
        results: dict[str, Any] = {}
        for plan, (_, changes) in holds.items():
            change = changes.get("max_running_images")
            if change is None:
                continue
            if caps.get(plan) == change["to"]:
                if change["from"] is None:
                    caps.pop(plan, None)
                else:
                    caps[plan] = change["from"]
                results[plan] = {"restored": {"max_running_images": change["from"]}}
            else:  # a restart began from the configured cap: nothing of ours to give back
                results[plan] = {"restored": {"max_running_images": caps.get(plan)}}
        if results:
            self.engine.wake()
        return results

    # ---- what operators see

    def snapshot(self) -> dict[str, Any]:
        """For the heartbeat (the dashboard) and /metrics: every GPU seen, its worker(s) and state."""
        capacity = self.engine.core.capacity
        gpus = []
        for gpu, state in sorted(self.states.gpus.items()):
            workers = self.workers_of(gpu)
            gpus.append({
                **state.reading.as_dict(), "workers": workers, "state": "hot" if state.hot else "ok",
                "why": list(state.why),
                "capacity_factor": min((capacity.factor(s) for s in workers), default=1.0),
                "cooling": state.hot and state.cool_since is not None,
            })
        return {"gpus": gpus, "limits_held": self.holding, "policy": self.policy,
                "limit_c": self.settings.thermal_limit_c, "cool_c": self.settings.thermal_cool_c}


def _pinned_gpus(executor: Any, slots: int) -> list[int]:
    """The GPU index of each slot as the executor reports it (CUDA_VISIBLE_DEVICES entries); [] when
    it cannot say for every slot (no such call, a worker not ready, a UUID rather than an index)."""
    try:
        gpus = list(executor.worker_gpus()) if hasattr(executor, "worker_gpus") else []
    except Exception:  # noqa: BLE001 - an executor that cannot tell: the slot numbers stand
        return []
    first = [str(g).split(",")[0].strip() if g is not None else "" for g in gpus]
    return [int(g) for g in first] if len(first) == slots and all(g.isdigit() for g in first) else []


class ThermalCollector(Collector):
    """DCGM exporter's names for the readings, plus Kiln's capacity factor and thermal state."""

    GAUGES = (
        ("DCGM_FI_DEV_GPU_TEMP", "GPU temperature (in C).", "temp_c"),
        ("DCGM_FI_DEV_POWER_USAGE", "Power draw (in W).", "power_w"),
        ("DCGM_FI_DEV_SM_CLOCK", "SM clock frequency (in MHz).", "sm_clock_mhz"),
        ("DCGM_FI_DEV_GPU_UTIL", "GPU utilization (in %).", "util"),
        ("DCGM_FI_DEV_CLOCK_THROTTLE_REASONS", "Clocks-event (throttle) reasons, NVML's bit mask.",
         "clocks_event_reasons"),
    )

    def __init__(self, guard: ThermalGuard) -> None:
        self.guard = guard

    def collect(self) -> Iterator[GaugeMetricFamily]:
        snapshot = self.guard.snapshot()
        labels = ["gpu", "worker"]
        families = {key: GaugeMetricFamily(name, text, labels=labels) for name, text, key in self.GAUGES}
        factor = GaugeMetricFamily(
            "kiln_gpu_capacity_factor", "Share of time the GPU's worker may run (1: full; lower while hot).",
            labels=labels)
        state = GaugeMetricFamily(
            "kiln_thermal_state", "1 while the GPU is hot (throttling or over its limit).", labels=labels)
        for gpu in snapshot["gpus"]:
            label = [str(gpu["gpu"]), ",".join(str(w) for w in gpu["workers"])]
            for key, family in families.items():
                if gpu.get(key) is not None:
                    family.add_metric(label, float(gpu[key]))
            factor.add_metric(label, float(gpu["capacity_factor"]))
            state.add_metric(label, 1.0 if gpu["state"] == "hot" else 0.0)
        held = GaugeMetricFamily("kiln_thermal_limits_held", "1 while the thermal policy's plan limits hold.")
        held.add_metric([], 1.0 if snapshot["limits_held"] else 0.0)
        yield from (*families.values(), factor, state, held)
