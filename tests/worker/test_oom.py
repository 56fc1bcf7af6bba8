"""Out of GPU memory: a batch is halved and retried down to one image before anything fails, with
memory released between tries; progress and cancel keep working through the splits. The OOM comes
from fakes (torch.OutOfMemoryError raised for too many images): nothing here ran on a GPU."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest

from kiln.config import ModelSpec, load_settings
from kiln.testing import prompt_colour
from kiln.worker.oom import is_oom, run_in_chunks
from kiln.worker.registry import ModelRegistry
from kiln.worker.requests import BatchSpec, GenerationRequest, StepProgress
from kiln.worker.runner import Cancelled, run_batch


def oom_above(limit: int, error: type[Exception] | None = None):
    import torch

    sizes: list[int] = []

    def call(chunk: Sequence[int], done: int) -> list[int]:
        sizes.append(len(chunk))
        if len(chunk) > limit:
            raise (error or torch.OutOfMemoryError)("CUDA out of memory. Tried to allocate 2.00 GiB")
        return [item * 10 for item in chunk]

    return call, sizes


def test_a_batch_is_halved_until_it_fits_and_the_rest_keeps_that_size() -> None:
    call, sizes = oom_above(2)
    releases: list[int] = []
    split = run_in_chunks(list(range(8)), call, release=lambda: releases.append(1))
    assert split.results == [i * 10 for i in range(8)]
    assert sizes == [8, 4, 2, 2, 2, 2]
    assert split.fit == 2
    assert len(releases) == 2  # empty_cache between every try


def test_no_split_reports_no_fit_and_a_start_size_is_honoured() -> None:
    call, sizes = oom_above(8)
    assert run_in_chunks(list(range(8)), call).fit is None
    call, sizes = oom_above(8)
    split = run_in_chunks(list(range(8)), call, start=3)
    assert sizes == [3, 3, 2] and split.fit == 3


def test_a_runtime_error_saying_out_of_memory_counts_and_one_image_that_does_not_fit_fails() -> None:
    assert is_oom(RuntimeError("CUDA error: out of memory"))
    assert not is_oom(RuntimeError("shape mismatch"))
    call, sizes = oom_above(1, RuntimeError)
    assert run_in_chunks(list(range(3)), call, release=lambda: None).fit == 1
    call, _ = oom_above(0)
    with pytest.raises(Exception, match="out of memory"):
        run_in_chunks(list(range(4)), call, release=lambda: None)


def test_other_errors_are_not_retried() -> None:
    calls: list[int] = []

    def call(chunk: Sequence[int], done: int) -> list[int]:
        calls.append(len(chunk))
        raise ValueError("bad prompt")

    with pytest.raises(ValueError):
        run_in_chunks(list(range(4)), call, release=lambda: None)
    assert calls == [4]


@pytest.fixture
def registry(tmp_path: Path) -> ModelRegistry:
    model = ModelSpec(path=tmp_path, loader="kiln.testing:load_fake_pipeline", native_size=32, steps=4,
                      options={"oom_above": 3})
    return ModelRegistry.from_settings(load_settings(models={"fake": model}, default_model="fake"))


def spec(steps: int = 4) -> BatchSpec:
    return BatchSpec(model="fake", width=32, height=32, steps=steps, guidance_scale=1.0)


def test_run_batch_splits_keeps_seeds_and_reports_the_fit(registry: ModelRegistry) -> None:
    requests = [GenerationRequest("a", "a red circle", seed=7, n=5),
                GenerationRequest("b", "blue", seed=3, n=3)]
    fits: list[int] = []
    progress: list[StepProgress] = []
    images = run_batch(registry, spec(), requests, on_fit=fits.append, on_progress=progress.append)
    colours = {rid: [img.getpixel((0, 0)) for img in imgs] for rid, imgs in images.items()}
    assert colours["a"] == [prompt_colour("a red circle", 7 + i) for i in range(5)]
    assert colours["b"] == [prompt_colour("blue", 3 + i) for i in range(3)]
    assert [len(call["prompt"]) for call in registry.pipeline("fake").calls] == [8, 4, 2, 2, 2, 2]
    assert fits == [2]
    steps = [p.step for p in progress]
    assert steps == sorted(steps) and steps[-1] == 4 and {p.total for p in progress} == {4}


def test_a_known_fit_starts_there_without_running_out_first(registry: ModelRegistry) -> None:
    fits: list[int] = []
    run_batch(registry, spec(), [GenerationRequest("a", "p", seed=1, n=6)], max_images=3, on_fit=fits.append)
    assert [len(call["prompt"]) for call in registry.pipeline("fake").calls] == [3, 3]
    assert fits == [3]


def test_cancel_works_in_a_later_half(registry: ModelRegistry) -> None:
    progress: list[StepProgress] = []
    with pytest.raises(Cancelled):
        run_batch(registry, spec(steps=4), [GenerationRequest("a", "p", seed=1, n=8)],
                  on_progress=progress.append, should_cancel=lambda: len(progress) >= 6)
    calls = registry.pipeline("fake").calls
    assert [len(call["prompt"]) for call in calls] == [8, 4, 2, 2]  # stopped in the second half that fit
