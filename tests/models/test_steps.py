"""Each family's pipeline run by the worker's `run_batch` in this process: progress on every step,
a preview per step projected from the latents (never a VAE decode), and cancel between steps."""

from __future__ import annotations

import io
from typing import Any

import pytest
from PIL import Image

from kiln.config import load_settings
from kiln.worker.registry import ModelRegistry
from kiln.worker.requests import BatchSpec, GenerationRequest, StepProgress
from kiln.worker.runner import Cancelled, run_batch
from models.conftest import FAMILIES, model_name, tiny_spec


@pytest.fixture(scope="module")
def registry(tiny_paths) -> ModelRegistry:
    models = {model_name(f): tiny_spec(f, p) for f, p in tiny_paths.items()}
    return ModelRegistry.from_settings(
        load_settings(models=models, default_model=model_name("sd"), model_aliases={})
    )


class CountingDecode:
    """Counts VAE decodes (the pipeline's final one is the only one allowed)."""

    def __init__(self, vae: Any) -> None:
        self.vae, self.original, self.calls = vae, vae.decode, 0

    def __enter__(self) -> CountingDecode:
        def decode(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            return self.original(*args, **kwargs)

        self.vae.decode = decode
        return self

    def __exit__(self, *_: object) -> None:
        del self.vae.decode


@pytest.mark.parametrize("family", FAMILIES)
def test_progress_previews_and_cancel_between_steps(registry: ModelRegistry, family: str) -> None:
    name = model_name(family)
    info = registry.info(name)
    pipe = registry.pipeline(name)
    spec = BatchSpec(name, 32, 32, 6, info.guidance_scale)
    requests = [GenerationRequest("a", "a red circle", seed=1, n=2), GenerationRequest("b", "a cat", seed=5)]
    seen: list[StepProgress] = []
    with CountingDecode(pipe.vae) as decodes, pytest.raises(Cancelled):
        run_batch(
            registry,
            spec,
            requests,
            on_progress=seen.append,
            should_cancel=lambda: len(seen) >= 2,
            preview_every=1,
        )
    assert [p.step for p in seen] == [1, 2, 3]  # the stop lands at the next step boundary
    assert all(p.total == 6 for p in seen)
    for progress in seen:
        assert set(progress.previews) == {"a", "b"}  # one per request (its first image)
        preview = Image.open(io.BytesIO(progress.previews["a"]))
        assert preview.format == "PNG" and preview.width >= 16
    assert decodes.calls <= 1  # at most the pipeline's own final decode (some decode after an interrupt)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_finished_batch_returns_every_image_at_the_requested_size(
    registry: ModelRegistry, family: str
) -> None:
    name = model_name(family)
    info = registry.info(name)
    images = run_batch(
        registry,
        BatchSpec(name, 64, 32, 1, info.guidance_scale),
        [GenerationRequest("a", "a red circle", seed=1, n=2)],
    )
    assert [image.size for image in images["a"]] == [(64, 32), (64, 32)]
