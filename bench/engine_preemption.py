"""Compare the engine's ways of keeping paying work from waiting behind long free batches.

A discrete-event run of the real EngineCore over a simulated GPU (fake clock, no processes): a
flood of free users keeps the queue full while plus users arrive at random. Every mode sees the
same arrivals. Usage: `python bench/engine_preemption.py [--minutes 20] [--gpus 1]`.

GPU cost model: one denoising step of a batch of b images at 512×512 takes a + b·c seconds
(a = fixed per-step cost, c = per image), so big batches are cheaper per image — the reason
the batcher exists and the reason a big free batch is long.
"""

from __future__ import annotations

import argparse
import heapq
import math
import random
import statistics
from dataclasses import dataclass, field

from kiln.engine import BatchKey, EngineConfig, EngineCore, EngineRequest, Started
from kiln.engine.types import Completed
from kiln.executor.base import BatchCancelled, BatchCompleted, BatchProgress, ExecBatch

STEP_FIXED_S = 0.02
STEP_PER_IMAGE_S = 0.03
KEY = BatchKey("sd", "generate", 512, 512, 30, 7.5)


class Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


@dataclass
class _Run:
    batch: ExecBatch
    start: float
    step_s: float
    steps: int
    stop_at_step: int | None = None
    reported: int = 0

    def end(self) -> float:
        return self.start + self.step_s * (self.stop_at_step or self.steps)


@dataclass
class SimGpu:
    clock: Clock
    slots: int = 1
    runs: dict[str, _Run] = field(default_factory=dict)
    wasted_s: float = 0.0
    busy_s: float = 0.0

    def free_slots(self) -> int:
        return self.slots - len(self.runs)

    def total_slots(self) -> int:
        return self.slots

    def submit(self, batch: ExecBatch) -> None:
        images = sum(r.n for r in batch.requests)
        step_s = STEP_FIXED_S + STEP_PER_IMAGE_S * images
        self.runs[batch.batch_id] = _Run(batch, self.clock.now, step_s, batch.spec.steps)

    def cancel(self, batch_id: str) -> None:
        run = self.runs.get(batch_id)
        if run and run.stop_at_step is None:
            run.stop_at_step = min(run.steps, math.floor((self.clock.now - run.start) / run.step_s) + 1)

    def set_notify(self, notify) -> None:
        pass

    def next_event(self) -> float | None:
        return min((r.end() for r in self.runs.values()), default=None)

    def poll(self):
        outputs = []
        for batch_id, run in list(self.runs.items()):
            step = min(run.steps, int((self.clock.now - run.start) / run.step_s + 1e-9))
            if step > run.reported and step < (run.stop_at_step or run.steps):
                outputs.append(BatchProgress(batch_id, step, run.steps))
                run.reported = step
            if self.clock.now + 1e-9 >= run.end():
                del self.runs[batch_id]
                spent = run.end() - run.start
                self.busy_s += spent
                if run.stop_at_step is not None and run.stop_at_step < run.steps:
                    self.wasted_s += spent
                    outputs.append(BatchCancelled(batch_id))
                else:
                    images = {r.request_id: (b"",) * r.n for r in run.batch.requests}
                    outputs.append(BatchCompleted(batch_id, images, spent))
        return outputs


def workload(minutes: float, seed: int) -> list[tuple[float, str, str]]:
    """(time, plan, user): 40 free users always re-submitting is modelled as a deep free backlog
    topped up every second; plus users arrive as a Poisson process, one every 20 s on average."""
    rng = random.Random(seed)
    arrivals = []
    horizon = minutes * 60
    t = 0.0
    while t < horizon:
        arrivals.append((t, "free", f"free-{rng.randrange(40)}"))
        t += rng.expovariate(1 / 0.9)
    t = 5.0
    while t < horizon:
        arrivals.append((t, "plus", f"plus-{rng.randrange(10)}"))
        t += rng.expovariate(1 / 20)
    return sorted(arrivals)


def run(mode: str, arrivals: list[tuple[float, str, str]], gpus: int, minutes: float) -> dict[str, float]:
    clock = Clock()
    gpu = SimGpu(clock, gpus)
    config = EngineConfig(max_batch_images=8, max_batch_wait_s=0.05, preemption=mode)  # type: ignore[arg-type]
    engine = EngineCore(gpu, config, clock=clock)
    weights = {"free": 1, "plus": 4}
    queued_at: dict[str, float] = {}
    started: dict[str, float] = {}
    done: dict[str, float] = {}
    plan_of: dict[str, str] = {}
    pending = list(arrivals)
    heapq.heapify(pending)
    horizon = minutes * 60
    serial = 0
    while clock.now < horizon:
        while pending and pending[0][0] <= clock.now:
            _, plan, user = heapq.heappop(pending)
            serial += 1
            job = f"{plan}-{serial}"
            plan_of[job], queued_at[job] = plan, clock.now
            engine.add_request(EngineRequest(job, user, plan, KEY, f"p{serial}", serial, weight=weights[plan]))
        for event in engine.step():
            if isinstance(event, Started):
                started.setdefault(event.job_id, clock.now)
            elif isinstance(event, Completed):
                done[event.job_id] = clock.now
        candidates = [t for t in (gpu.next_event(), engine.next_wake_at, pending[0][0] if pending else None)
                      if t is not None and t > clock.now]
        if gpu.free_slots() and engine.has_work() and not gpu.runs and engine.next_wake_at is None:
            candidates.append(clock.now + 0.001)
        clock.now = min(candidates, default=horizon)
    paid_wait = [started[j] - queued_at[j] for j in started if plan_of[j] == "plus"]
    paid_latency = [done[j] - queued_at[j] for j in done if plan_of[j] == "plus"]
    return {
        "plus wait p50 s": statistics.median(paid_wait),
        "plus wait p95 s": _p95(paid_wait),
        "plus done p95 s": _p95(paid_latency),
        "free images/s": sum(1 for j in done if plan_of[j] == "free") / horizon,
        "all images/s": len(done) / horizon,
        "GPU time wasted %": 100 * gpu.wasted_s / max(gpu.busy_s, 1e-9),
    }


def _p95(values: list[float]) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(0.95 * len(values)))] if values else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--minutes", type=float, default=20)
    parser.add_argument("--gpus", type=int, default=1)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    arrivals = workload(args.minutes, args.seed)
    results = {mode: run(mode, arrivals, args.gpus, args.minutes) for mode in ("off", "bound", "preempt", "both")}
    metrics = list(results["off"])
    print(f"{args.minutes:g} simulated minutes, {args.gpus} GPU(s), same arrivals for every mode\n")
    print("| mode | " + " | ".join(metrics) + " |")
    print("|---|" + "---|" * len(metrics))
    for mode, row in results.items():
        print(f"| {mode} | " + " | ".join(f"{row[m]:.2f}" for m in metrics) + " |")


if __name__ == "__main__":
    main()
