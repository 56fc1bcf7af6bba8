"""saturation and batching: Kiln served over HTTP at saturation, with dynamic batching on and off,
against the raw pipeline's ceiling measured in the same run."""

from __future__ import annotations

import asyncio

from bench.harness import Context, KilnServer, Section, closed_loop, percentile, throughput
from bench.plots import bar_plot

BODY = {"prompt": "a red circle on the left on a blue background", "size": "64x64",
        "response_format": "b64_json"}


def served_images_per_s(ctx: Context, max_batch_size: int, concurrency: int, duration_s: float) -> dict:
    settings = {"max_batch_size": max_batch_size, "max_batch_wait_s": 0.05}
    with KilnServer(ctx.model_path, settings, threads=ctx.threads) as server:
        server.set_plan("enterprise", "--wait-target-s", "3600", "--max-concurrent", "1000")
        users = server.users([f"ent{i}" for i in range(4)], "enterprise")
        asyncio.run(closed_loop(server.url, users, BODY, concurrency, min(5.0, duration_s / 4)))  # warm
        results = asyncio.run(closed_loop(server.url, users, BODY, concurrency, duration_s))
    ok = [r for r in results if r.status == 200]
    return {
        "images/s": throughput(results),
        "requests": len(results),
        "errors": len(results) - len(ok),
        "p50 s": percentile([r.latency_s for r in ok], 50),
        "p99 s": percentile([r.latency_s for r in ok], 99),
    }


def run(ctx: Context) -> tuple[Section, Section]:
    ceiling = ctx.results["ceiling"].data
    duration = 15.0 if ctx.quick else 45.0
    batched = served_images_per_s(ctx, 16, 32, duration)
    single = served_images_per_s(ctx, 1, 32, duration)
    ratio = batched["images/s"] / ceiling["best"]
    saturation = Section(
        name="saturation",
        summary=(f"Kiln over HTTP at saturation (32 callers, 4 enterprise users, batches up to 16) serves "
                 f"**{batched['images/s']:.2f} images/s**, against the raw pipeline's best "
                 f"{ceiling['best']:.2f} images/s: **ratio {ratio:.2f}** (goal ≥ 0.95)."),
        table=[{"what": "raw pipeline, best batch", "images/s": ceiling["best"], "ratio": 1.0},
               {"what": "Kiln served, HTTP", "images/s": batched["images/s"], "ratio": ratio,
                "p50 s": batched["p50 s"], "p99 s": batched["p99 s"], "errors": batched["errors"]}],
        data={"ratio": ratio, "served": batched["images/s"]},
    )
    saturation.plots.append(bar_plot(ctx.out / "saturation.png", "Served vs raw throughput", "images/s",
                                     {"raw pipeline (best batch)": ceiling["best"],
                                      "Kiln over HTTP": batched["images/s"]}))
    raw_gain = ceiling["rates"][16] / ceiling["rates"][1]
    kiln_gain = batched["images/s"] / single["images/s"] if single["images/s"] else 0.0
    batching = Section(
        name="batching",
        summary=(f"Dynamic batching multiplies Kiln's served throughput by **{kiln_gain:.2f}×** (max batch 16 "
                 f"vs 1, same load); the raw pipeline gains {raw_gain:.2f}× from batch 1 to 16: "
                 f"**ratio {kiln_gain / raw_gain:.2f}** (goal ≥ 0.9)."),
        table=[
            {"what": "raw pipeline", "batch 1 images/s": ceiling["rates"][1],
             "batch 16 images/s": ceiling["rates"][16], "gain": raw_gain},
            {"what": "Kiln served", "batch 1 images/s": single["images/s"],
             "batch 16 images/s": batched["images/s"], "gain": kiln_gain},
        ],
        data={"ratio": kiln_gain / raw_gain},
    )
    batching.plots.append(bar_plot(ctx.out / "batching.png", "Gain from batching (16 vs 1)", "× throughput",
                                   {"raw pipeline": raw_gain, "Kiln served": kiln_gain}))
    return saturation, batching
