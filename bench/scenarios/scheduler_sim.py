"""cluster-sim: the scheduler at scale, in simulation — Kiln's own EngineCore with a fake executor of 64
GPU slots and a fake clock, 10,000 users, 100,000 queued requests.

What is measured is the engine alone: the CPU seconds spent inside `EngineCore.step()` and
`add_request()` (on one core; the simulation's own bookkeeping is outside the timer) divided into the
scheduling decisions it made — a decision is one queued job placed into a batch. Over the simulated
run the GPU-seconds each plan received are compared with its weight's share (free 1, plus 4,
enterprise 8: every plan stays backlogged, so stride scheduling should give 1/13, 4/13, 8/13), and
enterprise jobs, arriving as a Poisson stream well inside their share, must start within their
15 s wait target at p99 even with 100,000 free and plus jobs ahead of them in the queue.

Run alone: `python -m bench.run --only cluster-sim` (`--quick`: a tenth of the users and queue).
"""

from __future__ import annotations

import heapq
import random
import time
from dataclasses import dataclass, field

from bench.harness import Context, Section
from kiln.engine import BatchKey, EngineConfig, EngineCore, EngineRequest
from kiln.engine.types import Started
from kiln.executor.base import BatchCompleted, ExecBatch, ExecutorOutput

KEY = BatchKey("sim", "generate", 512, 512, 20, 5.0)
WEIGHTS = {"free": 1, "plus": 4, "enterprise": 8}
TARGETS = {"free": 120.0, "plus": 30.0, "enterprise": 15.0}
SECONDS_PER_IMAGE = 0.25
"""Simulated GPU time per image in a batch (a 512×512, 20-step image on a fast GPU, batched)."""
BATCH_OVERHEAD_S = 0.5
"""Simulated fixed cost of one pipeline call (text encoders, VAE, launch)."""


class SimClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@dataclass
class SimExecutor:
    """GPU slots; a batch finishes BATCH_OVERHEAD_S + images × SECONDS_PER_IMAGE (± 20 %) after it
    starts."""

    clock: SimClock
    slots: int
    rng: random.Random
    running: dict[str, tuple[ExecBatch, float]] = field(default_factory=dict)
    finishing: list[tuple[float, str]] = field(default_factory=list)
    outputs: list[ExecutorOutput] = field(default_factory=list)
    gpu_s_by_plan: dict[str, float] = field(default_factory=dict)
    plan_of: dict[str, str] = field(default_factory=dict)

    def free_slots(self) -> int:
        return self.slots - len(self.running)

    def total_slots(self) -> int:
        return self.slots

    def submit(self, batch: ExecBatch) -> None:
        images = sum(r.n for r in batch.requests)
        duration = (BATCH_OVERHEAD_S + images * SECONDS_PER_IMAGE) * self.rng.uniform(0.8, 1.2)
        self.running[batch.batch_id] = (batch, duration)
        heapq.heappush(self.finishing, (self.clock.now + duration, batch.batch_id))
        for r in batch.requests:  # GPU time split over the batch's images
            plan = self.plan_of[r.request_id]
            self.gpu_s_by_plan[plan] = self.gpu_s_by_plan.get(plan, 0.0) + duration * r.n / images

    def cancel(self, batch_id: str) -> None:
        pass

    def poll(self) -> list[ExecutorOutput]:
        outputs, self.outputs = self.outputs, []
        return outputs

    def set_notify(self, notify: object) -> None:
        pass

    def next_finish(self) -> float | None:
        return self.finishing[0][0] if self.finishing else None

    def finish_due(self) -> None:
        while self.finishing and self.finishing[0][0] <= self.clock.now:
            _, batch_id = heapq.heappop(self.finishing)
            batch, duration = self.running.pop(batch_id)
            images = {r.request_id: (b"",) * r.n for r in batch.requests}
            self.outputs.append(BatchCompleted(batch_id, images, duration))


def _request(number: int, user: str, plan: str) -> EngineRequest:
    return EngineRequest(
        job_id=f"j{number}", user_id=user, plan=plan, key=KEY, prompt=f"prompt {number}", seed=number,
        n=1, weight=WEIGHTS[plan], wait_target_s=TARGETS[plan],
    )


def simulate(*, gpus: int, users: int, queued: dict[str, int], sim_s: float,
             arrivals: dict[str, float] | None = None, seed: int = 0) -> dict:
    """Run the engine over `sim_s` simulated seconds. `queued`: jobs per plan queued at the start and
    topped up whenever a plan's queue falls under half of it (those plans stay backlogged);
    `arrivals`: Poisson jobs/s per plan on top."""
    rng = random.Random(seed)
    clock = SimClock()
    executor = SimExecutor(clock, gpus, rng)
    config = EngineConfig(max_batch_images=8, preemption="bound")  # Kiln's defaults otherwise
    engine = EngineCore(executor, config, clock=clock)  # type: ignore[arg-type]
    positions_s = 0.0
    emit_changed = engine._positions.emit_changed

    def timed_positions(now: float, emit) -> None:  # noqa: ANN001 - the engine's own callback
        nonlocal positions_s
        t0 = time.process_time()
        emit_changed(now, emit)
        positions_s += time.process_time() - t0

    engine._positions.emit_changed = timed_positions  # type: ignore[method-assign]

    shares_of_users = {"free": 0.85, "plus": 0.13, "enterprise": 0.02}
    pools = {plan: [f"{plan}-{i}" for i in range(max(1, int(users * share)))]
             for plan, share in shares_of_users.items()}
    numbers = iter(range(1, 10**9))
    engine_s = 0.0
    enqueued_at: dict[str, float] = {}
    in_queue = dict.fromkeys(WEIGHTS, 0)

    def add(plan: str) -> None:
        nonlocal engine_s
        number = next(numbers)
        request = _request(number, rng.choice(pools[plan]), plan)
        executor.plan_of[request.job_id] = plan
        enqueued_at[request.job_id] = clock.now
        in_queue[plan] += 1
        t0 = time.process_time()
        engine.add_request(request)
        engine_s += time.process_time() - t0

    # The backlog, queued before the clock starts (its cost is reported, not counted in the rate).
    for plan, count in queued.items():
        for _ in range(count):
            add(plan)
    backlog_add_s = engine_s

    arrivals = arrivals or {}
    next_arrival = {plan: rng.expovariate(rate) for plan, rate in arrivals.items()}
    waits: dict[str, list[float]] = {plan: [] for plan in WEIGHTS}
    decisions = steps = 0
    while clock.now < sim_s:
        t0 = time.process_time()
        events = engine.step()
        engine_s += time.process_time() - t0
        steps += 1
        for event in events:
            if isinstance(event, Started):
                decisions += 1
                plan = executor.plan_of[event.job_id]
                in_queue[plan] -= 1
                waits[plan].append(clock.now - enqueued_at.pop(event.job_id))
        for plan, count in queued.items():
            if in_queue[plan] < count // 2:
                for _ in range(count // 10):
                    add(plan)
        # Advance to the next thing that happens: a batch finishing, an arrival, a held batch due.
        upcoming = [t for t in (executor.next_finish(), engine.next_wake_at, *next_arrival.values())
                    if t is not None]
        clock.now = max(clock.now, min(upcoming, default=sim_s))
        for plan in next_arrival:
            while next_arrival[plan] <= clock.now:
                add(plan)
                next_arrival[plan] += rng.expovariate(arrivals[plan])
        executor.finish_due()

    total_gpu = sum(executor.gpu_s_by_plan.values())
    weight_sum = sum(WEIGHTS.values())
    scheduling_s = engine_s - backlog_add_s - positions_s
    return {
        "decisions": decisions, "steps": steps, "backlog_add_s": backlog_add_s,
        "scheduling_s": scheduling_s, "positions_s": positions_s,
        "decisions_per_s": decisions / max(scheduling_s, 1e-9),
        "shares": {p: executor.gpu_s_by_plan.get(p, 0.0) / total_gpu for p in WEIGHTS},
        "weights": {p: w / weight_sum for p, w in WEIGHTS.items()},
        "waits": waits, "sim_s": clock.now, "queued_end": len(engine.queue),
    }


def _p(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def run(ctx: Context) -> Section:
    scale = 10 if ctx.quick else 1
    gpus, users, sim_s = 64, 10_000 // scale, 120.0
    # Shares: every plan backlogged (100,000 queued, topped up), so each should get its weight's share.
    shares = simulate(gpus=gpus, users=users, sim_s=sim_s,
                      queued={"free": 70_000 // scale, "plus": 20_000 // scale, "enterprise": 10_000 // scale})
    # Latency: 100,000 free and plus jobs queued (the crowd), enterprise arriving as a Poisson stream of
    # 40 jobs/s — a third of what its share of 64 GPUs could start — so its waits show what the
    # scheduler adds, with the whole backlog ahead of it in arrival order.
    flood = simulate(gpus=gpus, users=users, sim_s=sim_s,
                     queued={"free": 80_000 // scale, "plus": 20_000 // scale}, arrivals={"enterprise": 40.0})
    rows = []
    for plan in WEIGHTS:
        share, want = shares["shares"][plan], shares["weights"][plan]
        rows.append({
            "plan": plan, "weight share": f"{want:.3f}", "GPU-time share (all backlogged)": f"{share:.3f}",
            "off by": f"{(share - want) / want * 100:+.2f} %",
            "p50 wait s (flood)": round(_p(flood["waits"][plan], 0.50), 2),
            "p99 wait s (flood)": round(_p(flood["waits"][plan], 0.99), 2),
            "target s": TARGETS[plan],
        })
    off = max(abs(shares["shares"][p] - shares["weights"][p]) / shares["weights"][p] for p in WEIGHTS)
    ent_p99 = _p(flood["waits"]["enterprise"], 0.99)
    rate = min(shares["decisions_per_s"], flood["decisions_per_s"])
    positions_share = max(r["positions_s"] / r["sim_s"] for r in (shares, flood))
    summary = (
        f"{gpus} simulated GPUs, {users:,} users, {100_000 // scale:,} requests queued (and kept "
        f"backlogged): **{rate:,.0f} scheduling decisions/s** of "
        f"engine CPU on one core (goal ≥ 10,000); each plan's GPU-time share within **{off * 100:.2f} %** "
        f"of its weight (goal 5 %); enterprise p99 wait under the flood **{ent_p99:.2f} s** (target "
        f"{TARGETS['enterprise']:.0f} s). Telling 100,000 queued jobs their place costs "
        f"{positions_share * 100:.1f} % of a core."
    )
    return Section(
        "cluster-sim", summary, rows, [_plot_shares(ctx, shares)],
        notes=[
            "Kiln's own EngineCore (defaults: batches of 8, `bound` on) with a fake executor and a fake "
            f"clock; a batch takes {BATCH_OVERHEAD_S} s + {SECONDS_PER_IMAGE} s an image (± 20 %) of "
            "simulated GPU time. A decision = one queued job placed into a batch; the rate's timer "
            "(time.process_time) covers EngineCore.step() and add_request() for arrivals, not the "
            "simulation's own work, not the first 100,000 enqueues "
            f"({shares['backlog_add_s']:.2f} s: {100_000 // scale / shares['backlog_add_s']:,.0f} enqueues/s), "
            "and not the Position rounds, reported apart as a share of a core at real-time pacing.",
            f"Decisions: {shares['decisions']:,} (backlogged) and {flood['decisions']:,} (flood) in "
            f"{sim_s:.0f} simulated seconds each; scheduling CPU {shares['scheduling_s']:.2f} s and "
            f"{flood['scheduling_s']:.2f} s.",
            "Free and plus waits under the flood are the age of a backlog queued before the clock started "
            "(admission would have refused most of it); only enterprise arrives live.",
            "On main before this change: 841 decisions/s at a tenth of this size (1,000 users, 10,000 "
            "queued; the engine sorted every user on each pick and scanned the whole queue to fill a "
            "bounded batch); with bounding on, backlogged "
            "shares were 0.75 / 0.20 / 0.05 for weights 8 : 4 : 1 (bounding capped lower plans at 2 "
            "images a batch however many workers there were).",
        ],
        data={"backlogged": {k: v for k, v in shares.items() if k != "waits"},
              "flood": {k: v for k, v in flood.items() if k != "waits"}},
    )


def _plot_shares(ctx: Context, result: dict) -> str:
    from bench.plots import plt  # matplotlib is the bench extra's; the simulation itself needs none

    plans = list(WEIGHTS)
    xs = range(len(plans))
    fig, ax = plt.subplots(figsize=(6.4, 3.8), dpi=110)
    ax.bar([x - 0.2 for x in xs], [result["weights"][p] for p in plans], 0.4, label="weight share")
    ax.bar([x + 0.2 for x in xs], [result["shares"][p] for p in plans], 0.4, label="GPU-time share")
    ax.set_xticks(list(xs), plans)
    ax.set_ylabel("share of GPU time")
    ax.set_title("64 GPUs, every plan backlogged: GPU time by plan")
    ax.grid(alpha=0.3, axis="y")
    ax.legend()
    fig.tight_layout()
    fig.savefig(ctx.out / "cluster-sim-shares.png")
    plt.close(fig)
    return "cluster-sim-shares.png"
