"""Run one pipeline call for a batch of requests: per-request seeds, progress and cancel via the
pipeline's own `callback_on_step_end` / `interrupt` hooks, resizing to the requested size.
"""

from __future__ import annotations

import functools
import inspect
import io
from collections.abc import Callable, Sequence
from typing import Any

from PIL import Image

from kiln.worker import placement
from kiln.worker.lora import apply_loras
from kiln.worker.oom import run_in_chunks
from kiln.worker.previews import preview_pngs
from kiln.worker.registry import ModelInfo, ModelRegistry
from kiln.worker.requests import BatchSpec, GenerationRequest, StepProgress

ProgressFn = Callable[[StepProgress], None]
CancelFn = Callable[[], bool]
FitFn = Callable[[int], None]


class Cancelled(Exception):
    """The batch was stopped between denoising steps because every request in it was cancelled."""


def native_dims(info: ModelInfo, width: int, height: int) -> tuple[int, int]:
    """The size the model draws at for a requested size: as asked where it draws that natively (and
    up to its native side), else its native side on the short edge; multiples of its latent factor."""
    factor = info.latent_factor
    if max(width, height) <= info.native_size or info.draws_natively(width, height):
        return _round(width, factor), _round(height, factor)
    scale = info.native_size / min(width, height)
    return _round(width * scale, factor), _round(height * scale, factor)


def _round(value: float, factor: int) -> int:
    step = max(8, factor)
    return max(step, int(round(value / step)) * step)


def run_batch(
    registry: ModelRegistry,
    spec: BatchSpec,
    requests: Sequence[GenerationRequest],
    *,
    on_progress: ProgressFn | None = None,
    should_cancel: CancelFn | None = None,
    preview_every: int = 0,
    max_images: int | None = None,
    on_fit: FitFn | None = None,
) -> dict[str, list[Image.Image]]:
    """Images per request id, each at the requested size. Raises Cancelled if stopped early.

    Out of GPU memory, the images are drawn in halves (down to one at a time); `on_fit` then hears
    the largest number of images one call managed. `max_images` starts there instead of all at once.
    """
    import torch

    info = registry.info(spec.model)
    pipe = registry.pipeline(spec.model, spec.task)
    apply_loras(pipe, info, spec.loras)
    gen_w, gen_h = native_dims(info, spec.width, spec.height)
    device = placement.generator_device(pipe)
    prompts: list[str] = []
    negatives: list[str] = []
    seeds: list[int] = []
    owners: list[str] = []
    for request in requests:
        for i in range(request.n):
            prompts.append(request.prompt)
            negatives.append(request.negative_prompt)
            seeds.append(request.seed + i)
            owners.append(request.request_id)
    edits = _edit_inputs(requests, gen_w, gen_h) if spec.task != "generate" else {}

    interrupted = False
    reported = 0

    def call_chunk(chunk: Sequence[int], done: int) -> list[Image.Image]:
        first: dict[str, int] = {}  # each request's first image in this chunk: its preview
        for position, index in enumerate(chunk):
            first.setdefault(owners[index], position)

        def on_step(pipeline: Any, step: int, latents: Any) -> None:
            nonlocal interrupted, reported
            if interrupted:  # a pipeline that does not honour `interrupt` stops here, between steps
                raise Cancelled()
            if should_cancel is not None and should_cancel():
                pipeline._interrupt = True  # diffusers' documented way to stop between steps
                interrupted = True
            if on_progress is not None:
                previews: dict[str, bytes] = {}
                if preview_every and (step + 1) % preview_every == 0 and latents is not None:
                    previews = preview_pngs(pipeline, info, latents, first, gen_w, gen_h)
                # steps of the whole batch: a split batch's later halves carry on from the earlier ones
                reported = max(reported, (done * spec.steps + (step + 1) * len(chunk)) // len(owners))
                on_progress(StepProgress(step=reported, total=spec.steps, previews=previews))

        def step_end(pipeline: Any, step: int, _timestep: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
            on_step(pipeline, step, kwargs.get("latents"))
            return {}

        def legacy_step(step: int, _timestep: Any, latents: Any) -> None:  # PixArt's `callback`
            on_step(pipe, step, latents)

        call: dict[str, Any] = dict(
            prompt=[prompts[i] for i in chunk],
            num_inference_steps=spec.steps,
            generator=[torch.Generator(device).manual_seed(seeds[i]) for i in chunk],  # a retry starts afresh
            callback_on_step_end=step_end,
            callback=legacy_step,
            callback_steps=1,
            output_type="pil",
            use_resolution_binning=False,  # Kiln picks the size; Sana/PixArt would snap it to their bins
            clean_caption=False,  # needs bs4 + ftfy, which Kiln does not ship
        )
        call.update(guidance_inputs(pipe, spec.guidance_scale, [negatives[i] for i in chunk]))
        if spec.steps != 2:  # Sana-Sprint's SCM sampler has an intermediate timestep only at 2 steps
            call["intermediate_timesteps"] = None
        call.update(height=gen_h, width=gen_w)  # edits too: some img2img pipelines default to 1024
        call.update({name: [value[i] for i in chunk] if isinstance(value, list) else value
                     for name, value in edits.items()})
        placement.configure_vae(pipe, info.placement, gen_w, gen_h, len(chunk))
        with torch.inference_mode():
            result = pipe(**_accepted(pipe, call))
        if interrupted:
            raise Cancelled()
        return list(result.images)

    split = run_in_chunks(range(len(owners)), call_chunk, start=max_images)
    if split.fit is not None and on_fit is not None:
        on_fit(split.fit)
    images: dict[str, list[Image.Image]] = {r.request_id: [] for r in requests}
    for owner, image in zip(owners, split.results, strict=True):
        if image.size != (spec.width, spec.height):
            image = image.resize((spec.width, spec.height), Image.Resampling.LANCZOS)
        images[owner].append(image)
    return images


def _accepted(pipe: Any, call: dict[str, Any]) -> dict[str, Any]:
    """The call's arguments this pipeline takes: the step hook it knows (`callback_on_step_end`, else
    the legacy `callback`), and nothing its __call__ does not name."""
    accepted = call_parameters(pipe)
    if accepted is None or "callback_on_step_end" in accepted:
        call = {k: v for k, v in call.items() if k not in ("callback", "callback_steps")}
    if accepted is not None:
        call = {k: v for k, v in call.items() if k in accepted}
    return call


def call_parameters(pipe: Any) -> set[str] | None:
    """The keyword arguments the pipeline's __call__ names, which are all Kiln passes it; None for a
    non-diffusers pipeline that takes any keyword (fakes, custom loaders)."""
    return _named_parameters(type(pipe))


@functools.cache
def _named_parameters(cls: type) -> set[str] | None:
    parameters = inspect.signature(cls.__call__).parameters
    open_ended = any(p.kind is p.VAR_KEYWORD for p in parameters.values())
    if open_ended and not cls.__module__.startswith("diffusers."):
        return None
    return {name for name, p in parameters.items() if p.kind is not p.VAR_KEYWORD and name != "self"}


def guidance_inputs(pipe: Any, guidance_scale: float, negatives: list[str]) -> dict[str, Any]:
    """Guidance under the pipeline's own name: Qwen-Image's true CFG (`true_cfg_scale`, which only
    acts with a negative prompt) or `guidance_scale`; negative prompts only where accepted."""
    accepted = call_parameters(pipe)
    if accepted is None:
        return {"guidance_scale": guidance_scale, "negative_prompt": negatives if any(negatives) else None}
    out: dict[str, Any] = {}
    if "true_cfg_scale" in accepted and type(pipe).__name__.startswith("QwenImage"):
        out["true_cfg_scale"] = guidance_scale
        if guidance_scale > 1 and not any(negatives):
            negatives = [" "] * len(negatives)
    elif "guidance_scale" in accepted:
        out["guidance_scale"] = guidance_scale
    if any(negatives) and "negative_prompt" in accepted:
        out["negative_prompt"] = negatives
    return out


def _edit_inputs(requests: Sequence[GenerationRequest], width: int, height: int) -> dict[str, Any]:
    """Init images (and masks) repeated per image, at the size the model draws at."""
    images: list[Image.Image] = []
    masks: list[Image.Image] = []
    for request in requests:
        if request.init_image is None:
            raise ValueError(f"request {request.request_id} is an edit without an image")
        init = Image.open(io.BytesIO(request.init_image)).convert("RGB").resize((width, height))
        mask = None
        if request.mask_image is not None:
            mask = Image.open(io.BytesIO(request.mask_image)).convert("L").resize((width, height))
        for _ in range(request.n):
            images.append(init)
            if mask is not None:
                masks.append(mask)
    inputs: dict[str, Any] = {"image": images, "strength": requests[0].strength}
    if masks:
        inputs["mask_image"] = masks
    return inputs
