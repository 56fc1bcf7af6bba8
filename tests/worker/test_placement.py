"""Placement on a real (tiny, random) diffusers pipeline: dtype `auto`, SDPA attention, channels-last
and compile switches, VAE tiling/slicing per call, generators on the pipeline's device.

There is no GPU here: the CUDA branches are checked through their inputs (device names, a bf16
answer passed in), never by running on one.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from kiln.config import ModelSpec
from kiln.testing import FakePipeline
from kiln.worker import placement
from kiln.worker.placement import Placement
from kiln.worker.registry import load_diffusers_pipeline, read_model_info


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tiny_sd import save_tiny_sd

    return save_tiny_sd(tmp_path_factory.mktemp("tiny-sd"))


def _index(path: Path, **components: object) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "model_index.json").write_text(json.dumps({"_class_name": "X", **components}))
    return path


def test_auto_dtype_is_float32_on_cpu_and_per_family_on_cuda(tmp_path: Path) -> None:
    flux = _index(tmp_path / "flux", transformer=["diffusers", "FluxTransformer2DModel"])
    sdxl = _index(tmp_path / "sdxl", unet=["diffusers", "UNet2DConditionModel"])
    assert placement.resolve_dtype("auto", flux, "cpu") == "float32"
    assert placement.resolve_dtype("auto", flux, "cuda", bf16_supported=lambda: True) == "bfloat16"
    assert placement.resolve_dtype("auto", flux, "cuda", bf16_supported=lambda: False) == "float16"
    assert placement.resolve_dtype("auto", sdxl, "cuda", bf16_supported=lambda: True) == "float16"
    assert placement.resolve_dtype("bfloat16", sdxl, "cpu") == "bfloat16"  # an explicit choice stands
    assert placement.denoiser_kind(tmp_path / "missing") == "unet"


def test_spec_defaults_to_auto_and_carries_the_switches(tmp_path: Path) -> None:
    _index(tmp_path, unet=["diffusers", "UNet2DConditionModel"])
    spec = ModelSpec(path=tmp_path, compile=True, channels_last=True, vae_tiling_above=512)
    info = read_model_info("m", spec)
    assert info.dtype == "auto"
    assert info.placement == Placement(compile=True, channels_last=True, vae_tiling_above=512,
                                       vae_slicing_above=4)


def test_loaded_pipeline_is_float32_with_sdpa_attention_on_cpu(tiny_model: Path) -> None:
    import torch

    pipe = load_diffusers_pipeline(read_model_info("tiny", ModelSpec(path=tiny_model)))
    assert pipe.unet.dtype == torch.float32
    assert pipe.device.type == "cpu"
    kinds = {type(p).__name__ for p in pipe.unet.attn_processors.values()}
    assert kinds == {"AttnProcessor2_0"}


def test_classic_attention_processors_are_swapped_for_sdpa() -> None:
    from diffusers.models.attention_processor import AttnProcessor
    from tiny_sd import build_tiny_sd

    pipe = build_tiny_sd()
    pipe.unet.set_attn_processor(AttnProcessor())  # the slow, non-SDPA path
    layers = placement.use_sdpa(pipe)
    assert layers == len(pipe.unet.attn_processors) + len(pipe.vae.attn_processors)
    assert {type(p).__name__ for p in pipe.unet.attn_processors.values()} == {"AttnProcessor2_0"}


def test_channels_last_and_compile_are_applied_when_asked() -> None:
    import torch
    from tiny_sd import build_tiny_sd

    plain = placement.place(build_tiny_sd(), Placement(), "cpu")
    assert plain.unet._compiled_call_impl is None
    pipe = placement.place(build_tiny_sd(), Placement(compile=True, channels_last=True), "cpu")
    assert pipe.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert pipe.vae.encoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert pipe.unet._compiled_call_impl is not None  # compiled in place, compiled lazily on first call
    assert type(pipe.unet).__name__ == "UNet2DConditionModel"


def test_vae_tiles_large_images_and_slices_large_batches() -> None:
    from tiny_sd import build_tiny_sd

    pipe = build_tiny_sd()
    switches = Placement(vae_tiling_above=1024, vae_slicing_above=4)
    placement.configure_vae(pipe, switches, 1536, 1024, 8)
    assert (pipe.vae.use_tiling, pipe.vae.use_slicing) == (True, True)
    placement.configure_vae(pipe, switches, 1024, 1024, 4)
    assert (pipe.vae.use_tiling, pipe.vae.use_slicing) == (False, False)
    placement.configure_vae(FakePipeline(), switches, 4096, 4096, 64)  # no such switches: left alone


def test_generators_live_on_the_pipelines_device() -> None:
    import torch

    assert placement.generator_device(FakePipeline()) == "cpu"
    assert placement.generator_device(SimpleNamespace(device=torch.device("cpu"))) == "cpu"
    on_gpu = SimpleNamespace(device=torch.device("cuda", 0))
    assert placement.generator_device(on_gpu) == torch.device("cuda", 0)


def test_memory_is_measured_on_cpu() -> None:
    assert placement.memory_bytes("cpu") > 10 * 2**20  # a Python process with torch holds more than this
