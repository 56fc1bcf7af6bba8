"""Run one pipeline call for a batch of requests: per-request seeds, progress and cancel via the
pipeline's own `callback_on_step_end` / `interrupt` hooks, resizing to the requested size.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from typing import Any

from PIL import Image

from kiln.worker import placement
from kiln.worker.lora import apply_loras
from kiln.worker.oom import run_in_chunks
from kiln.worker.registry import ModelInfo, ModelRegistry
from kiln.worker.requests import BatchSpec, GenerationRequest, StepProgress

ProgressFn = Callable[[StepProgress], None]
CancelFn = Callable[[], bool]
FitFn = Callable[[int], None]


class Cancelled(Exception):
    """The batch was stopped between denoising steps because every request in it was cancelled."""


def native_dims(info: ModelInfo, width: int, height: int) -> tuple[int, int]:
    """The size the model draws at for a requested size: its native side on the short edge."""
    if max(width, height) <= info.native_size:
        return _round8(width), _round8(height)
    scale = info.native_size / min(width, height)
    return _round8(width * scale), _round8(height * scale)


def _round8(value: float) -> int:
    return max(8, int(round(value / 8)) * 8)


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


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
        nonlocal interrupted
        chunk_owners = [owners[i] for i in chunk]

        def step_end(pipeline: Any, step: int, _timestep: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
            nonlocal interrupted, reported
            if should_cancel is not None and should_cancel():
                pipeline._interrupt = True  # diffusers' documented way to stop between steps
                interrupted = True
            if on_progress is not None:
                previews: dict[str, bytes] = {}
                if preview_every and (step + 1) % preview_every == 0 and "latents" in kwargs:
                    previews = _previews(pipeline, kwargs["latents"], chunk_owners)
                # steps of the whole batch: a split batch's later halves carry on from the earlier ones
                reported = max(reported, (done * spec.steps + (step + 1) * len(chunk)) // len(owners))
                on_progress(StepProgress(step=reported, total=spec.steps, previews=previews))
            return {}

        call: dict[str, Any] = dict(
            prompt=[prompts[i] for i in chunk],
            negative_prompt=[negatives[i] for i in chunk] if any(negatives) else None,
            num_inference_steps=spec.steps,
            guidance_scale=spec.guidance_scale,
            generator=[torch.Generator(device).manual_seed(seeds[i]) for i in chunk],  # a retry starts afresh
            callback_on_step_end=step_end,
            output_type="pil",
        )
        if spec.task == "generate":
            call.update(height=gen_h, width=gen_w)
        else:
            call.update({name: [value[i] for i in chunk] if isinstance(value, list) else value
                         for name, value in edits.items()})
            if spec.task == "inpaint":
                call.update(height=gen_h, width=gen_w)
        placement.configure_vae(pipe, info.placement, gen_w, gen_h, len(chunk))
        with torch.inference_mode():
            result = pipe(**call)
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


def _previews(pipeline: Any, latents: Any, owners: list[str]) -> dict[str, bytes]:
    """A small PNG of the first image of each request, decoded from the current latents."""
    import torch

    vae = getattr(pipeline, "vae", None)
    if vae is None:
        return {}
    first: dict[str, int] = {}
    for index, owner in enumerate(owners):
        first.setdefault(owner, index)
    with torch.inference_mode():
        picked = latents[list(first.values())]
        decoded = vae.decode(picked / vae.config.scaling_factor).sample
    decoded = ((decoded.clamp(-1, 1) + 1) * 127.5).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return {owner: png_bytes(Image.fromarray(decoded[i])) for i, owner in enumerate(first)}
