"""The GPU paths on a real CUDA device, skipped where there is none (so everywhere but a GPU machine):
placement (fp16 for a UNet, SDPA, cuda generators), reproducible seeds, a real allocator OOM split in
halves, memory reporting, and a LoRA in fp16. Run on a GPU machine with
`pytest -q tests/worker/test_cuda.py`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from kiln.config import ModelSpec, load_settings
from kiln.worker import placement
from kiln.worker.registry import ModelInfo, ModelRegistry, load_diffusers_pipeline
from kiln.worker.requests import BatchSpec, GenerationRequest
from kiln.worker.runner import run_batch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from tiny_sd import save_tiny_lora, save_tiny_sd

    root = tmp_path_factory.mktemp("cuda")
    model = save_tiny_sd(root / "model")
    return model, save_tiny_lora(model, root / "style")


def registry_for(model: Path, lora: Path | None = None, loader: str | None = None) -> ModelRegistry:
    spec = ModelSpec(path=model, native_size=64, steps=3, loras={"style": lora} if lora else {},
                     **({"loader": loader} if loader else {}))
    return ModelRegistry.from_settings(load_settings(models={"tiny": spec}, default_model="tiny"))


def test_a_unet_pipeline_loads_in_fp16_on_the_gpu_with_sdpa(tiny: tuple[Path, Path]) -> None:
    before = placement.memory_bytes("cuda")
    registry = registry_for(tiny[0])
    pipe = registry.pipeline("tiny")
    assert pipe.device.type == "cuda" and pipe.unet.dtype == torch.float16
    assert {type(p).__name__ for p in pipe.unet.attn_processors.values()} == {"AttnProcessor2_0"}
    assert placement.generator_device(pipe).type == "cuda"
    assert placement.memory_bytes("cuda") > before


def test_the_same_seed_gives_the_same_image_on_the_gpu(tiny: tuple[Path, Path]) -> None:
    registry = registry_for(tiny[0])
    spec = BatchSpec("tiny", 64, 64, 3, 7.5)
    first = run_batch(registry, spec, [GenerationRequest("a", "a red circle", seed=11, n=2)])["a"]
    again = run_batch(registry, spec, [GenerationRequest("a", "a red circle", seed=11, n=2)])["a"]
    assert [img.tobytes() for img in first] == [img.tobytes() for img in again]
    assert first[0].tobytes() != first[1].tobytes()  # seed + 1 is another image


class MemoryHungry:
    """The tiny pipeline, after first taking a quarter of the GPU per image: 4 images cannot fit."""

    def __init__(self, pipe: Any) -> None:
        self.pipe = pipe
        self.sizes: list[int] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.pipe, name)

    def __call__(self, **kwargs: Any) -> Any:
        self.sizes.append(len(kwargs["prompt"]))
        quarter = torch.cuda.get_device_properties(0).total_memory // 4
        hold = torch.empty(len(kwargs["prompt"]) * quarter, dtype=torch.uint8, device="cuda")  # may OOM
        try:
            return self.pipe(**kwargs)
        finally:
            del hold


def load_hungry(info: ModelInfo) -> MemoryHungry:
    return MemoryHungry(load_diffusers_pipeline(info))


def test_a_real_out_of_memory_is_split_in_halves(tiny: tuple[Path, Path]) -> None:
    registry = registry_for(tiny[0], loader="test_cuda:load_hungry")
    fits: list[int] = []
    images = run_batch(registry, BatchSpec("tiny", 64, 64, 3, 7.5),
                       [GenerationRequest("a", "owls", seed=1, n=8)], on_fit=fits.append)
    assert len(images["a"]) == 8
    assert registry.pipeline("tiny").sizes == [8, 4, 2, 2, 2, 2]
    assert fits == [2]
    assert torch.cuda.memory_allocated() < torch.cuda.get_device_properties(0).total_memory // 4
    torch.cuda.empty_cache()  # hand the halves' cached blocks back for the tests after this one


def test_a_lora_changes_the_image_in_fp16(tiny: tuple[Path, Path]) -> None:
    registry = registry_for(*tiny)
    plain = BatchSpec("tiny", 64, 64, 3, 7.5)
    styled = BatchSpec("tiny", 64, 64, 3, 7.5, loras=(("style", 1.0),))
    request = [GenerationRequest("a", "a red circle", seed=5)]
    base = run_batch(registry, plain, request)["a"][0].tobytes()
    with_lora = run_batch(registry, styled, request)["a"][0].tobytes()
    assert with_lora != base
    assert run_batch(registry, styled, request)["a"][0].tobytes() == with_lora
    assert run_batch(registry, plain, request)["a"][0].tobytes() == base
