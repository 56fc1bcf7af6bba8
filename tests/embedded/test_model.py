"""The committed embedded model loads as a stock diffusers pipeline and behaves."""

import json
from pathlib import Path

import numpy as np
import pytest

import kiln.embedded

MODEL = Path(kiln.embedded.__file__).parent / "model"


@pytest.fixture(scope="module")
def pipe():
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(MODEL), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _generate(pipe, prompt, seed=0, **kw):
    import torch

    kw.setdefault("num_inference_steps", 3)
    return pipe(prompt, generator=torch.Generator().manual_seed(seed), output_type="np", **kw).images


def test_is_a_plain_stable_diffusion_pipeline(pipe):
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    assert pipe.safety_checker is None and pipe.feature_extractor is None
    assert {p.dtype for p in pipe.unet.parameters()} == {p.dtype for p in pipe.text_encoder.parameters()}


def test_serving_defaults_and_size_on_disk():
    defaults = json.loads((MODEL / "kiln.json").read_text())
    assert defaults["native_size"] == 64
    assert 1 <= defaults["steps"] <= 50 and defaults["guidance_scale"] >= 1.0
    assert defaults["scheduler"]
    size = sum(f.stat().st_size for f in MODEL.rglob("*") if f.is_file())
    assert size <= 30e6
    assert list(MODEL.rglob("*.safetensors"))


def test_generates_native_size_deterministically(pipe):
    prompt = ["a large yellow square at the top on a purple background", "a small blue circle, left"]
    first = _generate(pipe, prompt, seed=3)
    again = _generate(pipe, prompt, seed=3)
    assert first.shape == (2, 64, 64, 3)
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first[0], _generate(pipe, prompt[:1], seed=4)[0])


def test_unknown_words_and_empty_prompts_do_not_crash(pipe):
    images = _generate(
        pipe,
        "a photorealistic astronaut riding a horse, 8k, trending!!",
        guidance_scale=3.0,
        negative_prompt="",
    )
    assert images.shape == (1, 64, 64, 3) and np.isfinite(images).all()
    assert _generate(pipe, "", num_inference_steps=2).shape == (1, 64, 64, 3)
    long = " ".join(['a sign that says "ABCDEF" on the left'] * 20)  # longer than the tokenizer's window
    assert _generate(pipe, long, num_inference_steps=2).shape == (1, 64, 64, 3)


def test_edit_pipelines_share_its_components(pipe):
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline
    from PIL import Image

    start = Image.new("RGB", (64, 64), (30, 70, 220))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    img2img = StableDiffusionImg2ImgPipeline(**pipe.components)
    out = img2img("a red circle", image=start, strength=0.6, num_inference_steps=4, output_type="np").images
    assert out.shape == (1, 64, 64, 3)
    inpaint = StableDiffusionInpaintPipeline(**pipe.components)
    out = inpaint(
        "a red circle",
        image=start,
        mask_image=mask,
        num_inference_steps=3,
        height=64,
        width=64,
        output_type="np",
    ).images
    assert out.shape == (1, 64, 64, 3)
