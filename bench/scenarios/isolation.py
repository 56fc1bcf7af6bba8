"""isolation: an enterprise user's latency alone, and again under a free-plan flood of 5× capacity; on the
embedded model (which needs the CPU the server also needs) and on a GPU-shaped fake (which needs none)."""

from __future__ import annotations

import asyncio
from collections import Counter

from bench.harness import Context, KilnServer, Result, Section, closed_loop, open_loop, percentile
from bench.plots import cdf_plot

BODY = {"prompt": "a green triangle at the top on a white background", "size": "64x64",
        "response_format": "b64_json"}
FREE_USERS = 100
# The GPU-shaped worker (as in flood): 8 steps of 0.05 s, batches of 8, so 20 images/s and no CPU.
GPU_STEP_S, GPU_BATCH, GPU_CEILING = 0.05, 8, 20.0


async def flood(url: str, enterprise: dict[str, str], free: dict[str, str], rate: float,
                duration_s: float) -> tuple[list[Result], list[Result]]:
    paid, crowd = await asyncio.gather(
        closed_loop(url, enterprise, BODY, 1, duration_s),
        open_loop(url, free, BODY, rate, duration_s),
    )
    return paid, crowd


def measure(ctx: Context, capacity: float, preemption: str | None, gpu_shaped: bool = False) -> dict:
    duration = 15.0 if ctx.quick else 40.0
    settings: dict = {"preemption": preemption} if preemption else {}
    if gpu_shaped:
        settings["max_batch_size"] = GPU_BATCH
    model, fake_step_s = (None, GPU_STEP_S) if gpu_shaped else (ctx.model_path, None)
    with KilnServer(model, settings, fake_step_s=fake_step_s, threads=ctx.threads) as server:
        server.set_plan("free", "--images-per-day", "1000000")
        enterprise = {"ent": server.user("ent", "enterprise")}
        free = server.users([f"free{i}" for i in range(FREE_USERS)], "free")
        asyncio.run(closed_loop(server.url, enterprise, BODY, 1, 3.0))  # warm the worker
        alone = asyncio.run(closed_loop(server.url, enterprise, BODY, 1, duration))
        paid, crowd = asyncio.run(flood(server.url, enterprise, free, 5 * capacity, duration))
    alone_s = [r.latency_s for r in alone if r.status == 200]
    paid_s = [r.latency_s for r in paid if r.status == 200]
    refusals = [r for r in crowd if r.status in (429, 503)]
    errors = [r for r in alone + paid + crowd if r.status not in (200, 429, 503)]
    codes = Counter(r.status for r in crowd)
    return {
        "alone": alone_s, "flooded": paid_s, "refusal_s": [r.latency_s for r in refusals],
        "free_ok": codes.get(200, 0), "free_429": codes.get(429, 0), "free_503": codes.get(503, 0),
        "errors": len(errors), "error_samples": [e.error for e in errors[:3]],
        "retry_after_missing": sum(1 for r in refusals if not r.retry_after),
        "paid_refused": sum(1 for r in paid if r.status != 200),
    }


def _num(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def run(ctx: Context) -> Section:
    capacity = ctx.results["saturation"].data["served"]
    rows, series, verdicts = [], {}, []
    runs = [("embedded model (CPU)", mode, capacity, False) for mode in ("bound", "both")]
    # The same crowd (5× the embedded model's capacity) so the server's HTTP work is the same and only
    # the worker differs: what the CPU rows lose beyond this row is the worker's share of the cores.
    runs.append((f"GPU-shaped fake ({GPU_CEILING:.0f} images/s, no CPU)", "both", capacity, True))
    for worker, mode, cap, gpu_shaped in runs:
        m = measure(ctx, cap, mode, gpu_shaped)
        p50a, p99a = percentile(m["alone"], 50), percentile(m["alone"], 99)
        p50f, p99f = percentile(m["flooded"], 50), percentile(m["flooded"], 99)
        ratio = (p99f / p99a) if p99a and p99f else None
        refusal_p99_ms = (percentile(m["refusal_s"], 99) or 0) * 1000
        rows.append({
            "worker": worker, "preemption": mode, "flood req/s": 5 * cap,
            "enterprise p50 alone s": p50a, "p99 alone s": p99a,
            "p50 flooded s": p50f, "p99 flooded s": p99f, "p99 ratio": ratio,
            "free 200": m["free_ok"], "free 429": m["free_429"], "free 503": m["free_503"],
            "refusal p99 ms": refusal_p99_ms, "errors": m["errors"],
            "refusals without Retry-After": m["retry_after_missing"],
        })
        label = f"{mode}, GPU-shaped" if gpu_shaped else mode
        series[f"{label}: alone"] = m["alone"]
        series[f"{label}: under flood"] = m["flooded"]
        if gpu_shaped:
            gpu = (ratio, refusal_p99_ms, m["errors"])
        else:
            verdicts.append((mode, ratio, refusal_p99_ms, m["errors"]))
    best = min(verdicts, key=lambda v: v[1] or 99)
    plot = cdf_plot(ctx.out / "isolation.png", "Enterprise latency, alone vs under a 5× free flood",
                    "latency per image (s)", series)
    return Section(
        name="isolation",
        summary=(f"Free users flood at 5× capacity ({5 * capacity:.1f} requests/s from {FREE_USERS} users) "
                 f"while one enterprise user keeps generating. Best mode **{best[0]}**: enterprise p99 "
                 f"ratio **{best[1]:.2f}** (goal ≤ 1.3), refusal p99 **{best[2]:.1f} ms** (goal ≤ 5 ms), "
                 f"errors {best[3]} (goal 0). With the GPU-shaped worker (`both`, the same crowd, "
                 f"{GPU_CEILING:.0f} images/s of capacity that needs no CPU) the ratio is "
                 f"**{_num(gpu[0])}**, "
                 f"refusal p99 {gpu[1]:.1f} ms, "
                 f"errors {gpu[2]}: what is left there is what scheduling and the server cost, not the "
                 f"shared CPU cores."),
        table=rows,
        plots=[plot],
        data={"rows": rows},
        notes=[
            "The GPU-shaped row runs `kiln.testing:load_fake_pipeline` (step_s 0.05, 8 steps, batches of 8) "
            "under the same load (one enterprise caller back to back, the same Python open-loop free crowd "
            f"at 5× the embedded model's capacity, {5 * capacity / GPU_CEILING:.1f}× the fake's); the fake "
            "sleeps instead of computing, so the cores are left to the server and the load generator.",
            "Latencies are measured by the client, on the same 2-core machine as the server and its "
            "worker; refusals include the client's own time.",
            "Why the ratio misses 1.3: under the flood even the fastest enterprise image takes about twice "
            "its idle time. The two cores are shared by the worker (one torch thread), the server answering "
            "the crowd and the Python load generator itself; and a paying request may ride in a batch with "
            "up to `bound_batch_images` (2) free images or wait for one to finish (`both` also stops a "
            "running free batch at its next step, hence its lower p50). On a GPU host the server's CPU work "
            "no longer competes with the denoising.",
            "Why refusals take ~45 ms at p99 and not 5: each is a full HTTP request through auth (a database "
            "read), the usage read for the x-ratelimit headers and, unless this server alone already holds "
            "the user's jobs, the admission transaction — on a Python server whose two cores are saturated.",
        ],
    )
