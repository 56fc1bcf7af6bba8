"""ceiling: the raw diffusers pipeline, no server, at batch sizes 1…16 → its best images/s."""

from __future__ import annotations

import json
import time

from bench.harness import Context, Section
from bench.plots import line_plot

BATCH_SIZES = (1, 2, 4, 8, 16)


def raw_images_per_s(ctx: Context, batch_sizes: tuple[int, ...] = BATCH_SIZES) -> dict[int, float]:
    import torch
    from diffusers import DiffusionPipeline

    torch.set_num_threads(ctx.threads)
    defaults = json.loads((ctx.model_path / "kiln.json").read_text())
    pipe = DiffusionPipeline.from_pretrained(str(ctx.model_path), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    steps, guidance = int(defaults["steps"]), float(defaults["guidance_scale"])
    size = int(defaults["native_size"])
    budget_s = 3.0 if ctx.quick else 8.0
    rates: dict[int, float] = {}
    with torch.inference_mode():
        for batch in batch_sizes:
            prompts = ["a red circle on the left on a blue background"] * batch
            pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, height=size, width=size)  # warm
            images, start = 0, time.perf_counter()
            while time.perf_counter() - start < budget_s or images < 2 * batch:
                generators = [torch.Generator().manual_seed(images + i) for i in range(batch)]
                pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, height=size, width=size,
                     generator=generators)
                images += batch
            rates[batch] = images / (time.perf_counter() - start)
    return rates


def run(ctx: Context) -> Section:
    rates = raw_images_per_s(ctx)
    best_batch = max(rates, key=rates.get)
    plot = line_plot(ctx.out / "ceiling.png", "Raw pipeline throughput by batch size",
                     "batch size (images per pipeline call)", "images/s",
                     {"raw diffusers pipeline": (list(rates), list(rates.values()))}, logx=True)
    section = Section(
        name="ceiling",
        summary=(f"The raw diffusers pipeline (no server) peaks at **{rates[best_batch]:.2f} images/s** at "
                 f"batch {best_batch}; batch 1 gives {rates[1]:.2f} images/s "
                 f"({rates[best_batch] / rates[1]:.2f}× from batching)."),
        table=[{"batch": b, "images/s": r, "× batch 1": r / rates[1]} for b, r in rates.items()],
        plots=[plot],
        data={"rates": rates, "best": rates[best_batch], "best_batch": best_batch},
    )
    return section
