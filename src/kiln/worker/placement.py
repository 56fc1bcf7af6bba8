"""Where and how a worker holds its pipeline: device, dtype, attention, compile, memory format, and
the VAE's tiling and slicing per call. The one module that decides which device a worker uses.

Torch is imported inside functions only. The `auto` dtype is read from the model's files, never by
loading it; nothing here changes what a pipeline draws on CPU (float32, SDPA, no tiling below the size).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SDPA_FALLBACK = {"AttnProcessor": "AttnProcessor2_0", "AttnAddedKVProcessor": "AttnAddedKVProcessor2_0"}
"""Diffusers' classic attention processors and their PyTorch-SDPA twins (same maths, fused kernel)."""


@dataclass(frozen=True)
class Placement:
    """A model's serving switches (from its ModelSpec); the device is the worker's, not the model's."""

    compile: bool = False
    channels_last: bool = False
    vae_tiling_above: int = 1536
    vae_slicing_above: int = 4

    @classmethod
    def from_spec(cls, spec: Any) -> Placement:
        return cls(spec.compile, spec.channels_last, spec.vae_tiling_above, spec.vae_slicing_above)


def worker_device() -> str:
    """This worker's device: `cuda` is device 0 of the GPUs the executor made visible to the process
    (CUDA_VISIBLE_DEVICES), so each worker lands on its own GPU; `cpu` where there is none."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(
    dtype: str, model_path: str | Path, device: str, *, bf16_supported: Callable[[], bool] | None = None
) -> str:
    """The torch dtype name to load in. `auto`: float32 on CPU; on CUDA bfloat16 for pipelines whose
    denoiser is a transformer (FLUX, SD3, Qwen-Image, Sana, …: trained in bf16, overflow in fp16) and
    float16 for UNet ones (SD1, SDXL), or float16 everywhere on GPUs without bf16."""
    if dtype != "auto":
        return dtype
    if not device.startswith("cuda"):
        return "float32"
    if denoiser_kind(model_path) == "transformer" and (bf16_supported or _bf16_supported)():
        return "bfloat16"
    return "float16"


def denoiser_kind(model_path: str | Path) -> str:
    """`transformer` or `unet`, from the pipeline's model_index.json (`unet` when it cannot tell)."""
    try:
        index = json.loads((Path(model_path) / "model_index.json").read_text())
    except (OSError, ValueError):
        return "unet"
    return "transformer" if "transformer" in index else "unet"


def _bf16_supported() -> bool:
    import torch

    return bool(torch.cuda.is_bf16_supported())


def place(pipe: Any, placement: Placement, device: str) -> Any:
    """Move a loaded pipeline onto the worker's device and apply the model's switches."""
    import torch

    if device != "cpu":
        pipe = pipe.to(device)
    use_sdpa(pipe)
    unet, vae = getattr(pipe, "unet", None), getattr(pipe, "vae", None)
    if placement.channels_last:
        for module in (unet, vae):
            if module is not None:
                module.to(memory_format=torch.channels_last)
    if placement.compile:
        denoiser(pipe).compile()  # in place: the pipeline keeps its component, its type and its config
    return pipe


def denoiser(pipe: Any) -> Any:
    """The network run at every step: the UNet, or the transformer of DiT families."""
    module = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
    if module is None:
        raise ValueError(f"{type(pipe).__name__} has neither a unet nor a transformer")
    return module


def use_sdpa(pipe: Any) -> int:
    """Swap any classic attention processor for its PyTorch SDPA twin in every component (diffusers
    picks SDPA by default, but a checkpoint or an earlier call may have set the slow one); processors
    of other kinds (FLUX's, SD3's joint attention) already call SDPA and are left alone. Returns how
    many attention layers use SDPA processors afterwards."""
    from diffusers.models import attention_processor

    sdpa = 0
    for module in _components(pipe):
        processors = getattr(module, "attn_processors", None)
        if not processors or not hasattr(module, "set_attn_processor"):
            continue
        swapped = {}
        for name, processor in processors.items():
            twin = SDPA_FALLBACK.get(type(processor).__name__)
            swapped[name] = getattr(attention_processor, twin)() if twin else processor
        if any(swapped[name] is not processors[name] for name in processors):
            module.set_attn_processor(dict(swapped))  # diffusers pops from the dict it is given
        sdpa += sum(1 for p in swapped.values() if type(p).__name__ not in SDPA_FALLBACK)
    return sdpa


def _components(pipe: Any) -> list[Any]:
    components = getattr(pipe, "components", None)
    return list(components.values()) if isinstance(components, dict) else []


def configure_vae(pipe: Any, placement: Placement, width: int, height: int, images: int) -> None:
    """Tiled decoding for large images and sliced decoding for large batches, per call: small work
    keeps the exact untiled decode. A VAE without these switches is left as it is."""
    _switch(pipe, "tiling", max(width, height) > placement.vae_tiling_above)
    _switch(pipe, "slicing", images > placement.vae_slicing_above)


def _switch(pipe: Any, feature: str, on: bool) -> None:
    """The VAE's own switch (diffusers 0.42), else the pipeline's older `enable_vae_*` one."""
    verb = "enable" if on else "disable"
    vae = getattr(pipe, "vae", None)
    if hasattr(vae, f"{verb}_{feature}"):
        if getattr(vae, f"use_{feature}", None) != on:
            getattr(vae, f"{verb}_{feature}")()
    elif hasattr(pipe, f"{verb}_vae_{feature}"):
        getattr(pipe, f"{verb}_vae_{feature}")()


def generator_device(pipe: Any) -> Any:
    """Where per-request generators live: the pipeline's own device (seeds reproduce per device)."""
    device = getattr(pipe, "device", None)
    return device if getattr(device, "type", None) == "cuda" else "cpu"


def memory_bytes(device: str) -> int:
    """Memory the worker holds: allocated CUDA memory on a GPU, the process's resident set on CPU."""
    import torch

    if device.startswith("cuda"):
        return int(torch.cuda.memory_allocated())
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # peak, in KiB on Linux
