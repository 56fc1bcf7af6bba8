"""run_batch: per-request seeds, resizing, progress per step and cancel through the step hook."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image

from kiln.config import ModelSpec, load_settings
from kiln.testing import prompt_colour
from kiln.worker.registry import ModelRegistry
from kiln.worker.requests import BatchSpec, GenerationRequest, StepProgress
from kiln.worker.runner import Cancelled, native_dims, run_batch


@pytest.fixture
def registry(tmp_path: Path) -> ModelRegistry:
    settings = load_settings(
        models={"fake": ModelSpec(path=tmp_path, loader="kiln.testing:load_fake_pipeline", native_size=32,
                                  steps=4)},
        default_model="fake",
    )
    return ModelRegistry.from_settings(settings)


def spec(**overrides: object) -> BatchSpec:
    return BatchSpec(**{"model": "fake", "width": 32, "height": 32, "steps": 4, "guidance_scale": 1.0,
                        **overrides})


def test_each_request_gets_its_own_seeds_and_prompt(registry: ModelRegistry) -> None:
    requests = [
        GenerationRequest(request_id="a", prompt="a red circle", seed=7, n=2),
        GenerationRequest(request_id="b", prompt="a blue square", seed=7),
    ]
    images = run_batch(registry, spec(), requests)
    assert [img.getpixel((0, 0)) for img in images["a"]] == [
        prompt_colour("a red circle", 7), prompt_colour("a red circle", 8)
    ]
    assert images["b"][0].getpixel((0, 0)) == prompt_colour("a blue square", 7)


def test_larger_sizes_are_drawn_natively_then_resized(registry: ModelRegistry) -> None:
    info = registry.info("fake")
    assert native_dims(info, 1536, 1024) == (48, 32)
    images = run_batch(registry, spec(width=1536, height=1024),
                       [GenerationRequest(request_id="a", prompt="p", seed=1)])
    assert images["a"][0].size == (1536, 1024)
    assert registry.pipeline("fake").calls[-1]["prompt"] == ["p"]


def test_progress_is_reported_for_every_step(registry: ModelRegistry) -> None:
    seen: list[StepProgress] = []
    run_batch(registry, spec(steps=5), [GenerationRequest(request_id="a", prompt="p", seed=1)],
              on_progress=seen.append)
    assert [(p.step, p.total) for p in seen] == [(i, 5) for i in range(1, 6)]


def test_cancel_stops_between_steps(registry: ModelRegistry) -> None:
    seen: list[int] = []

    def on_progress(update: StepProgress) -> None:
        seen.append(update.step)

    with pytest.raises(Cancelled):
        run_batch(registry, spec(steps=10), [GenerationRequest(request_id="a", prompt="p", seed=1)],
                  on_progress=on_progress, should_cancel=lambda: len(seen) >= 3)
    assert seen == [1, 2, 3, 4]  # the request to stop lands at a step boundary


def test_edits_use_the_edit_pipeline_at_the_image_size(registry: ModelRegistry) -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (40, 24), (1, 2, 3)).save(buffer, "PNG")
    request = GenerationRequest(request_id="e", prompt="make it red", seed=3, init_image=buffer.getvalue())
    images = run_batch(registry, spec(task="edit", width=40, height=24), [request])
    assert images["e"][0].size == (40, 24)
