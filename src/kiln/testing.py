"""Fakes for tests and benchmarks (like httpx's MockTransport): a pipeline with the diffusers call
interface that draws a known image after a controllable delay, loadable by name in worker processes.

Select it with a model spec whose loader is `kiln.testing:load_fake_pipeline`.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image


@dataclass
class _Output:
    images: list[Image.Image]


def prompt_colour(prompt: str, seed: int) -> tuple[int, int, int]:
    """The colour the fake draws for a prompt and seed: deterministic, so tests can check it."""
    digest = hashlib.sha256(f"{prompt}|{seed}".encode()).digest()
    return digest[0], digest[1], digest[2]


class FakePipeline:
    """Draws a flat image whose colour is a hash of (prompt, seed), sleeping `step_s` per step.

    Failure hooks for tests: a prompt containing `fail_marker` raises RuntimeError; one containing
    `oom_marker` raises an out-of-memory error; one containing `crash_marker` kills the process
    (os._exit), as a segfaulting CUDA kernel would. When `crash_once_dir` is set, a crash prompt kills
    the process only the first time (a marker file remembers it). Its step callback gets `latents`
    (8×8, fading in the final colour) that already hold RGB in [-1, 1]: its preview projection
    (`latent_rgb_factors`) is the identity, so step previews work as with diffusers.
    With `oom_above` set, a call for more images than that runs out of (fake) GPU memory.
    """

    fail_marker = "[[fail]]"
    oom_marker = "[[oom]]"
    crash_marker = "[[crash]]"
    latent_rgb_factors = ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0))

    def __init__(
        self, step_s: float = 0.0, task: str = "generate", crash_once_dir: str = "", oom_above: int = 0
    ) -> None:
        self.step_s = step_s
        self.task = task
        self.crash_once_dir = crash_once_dir
        self.oom_above = oom_above
        self._interrupt = False
        self.calls: list[dict[str, Any]] = []

    @property
    def interrupt(self) -> bool:
        return self._interrupt

    def derive(self, task: str) -> FakePipeline:
        return type(self)(self.step_s, task, self.crash_once_dir, self.oom_above)

    def set_progress_bar_config(self, **_: Any) -> None:
        pass

    def __call__(
        self,
        prompt: list[str],
        num_inference_steps: int,
        generator: list[Any],
        callback_on_step_end: Any = None,
        height: int = 64,
        width: int = 64,
        image: list[Image.Image] | None = None,
        **kwargs: Any,
    ) -> _Output:
        self._interrupt = False
        self.calls.append({"prompt": list(prompt), "steps": num_inference_steps, **kwargs})
        for text in prompt:
            self._maybe_fail(text)
        if self.oom_above and len(prompt) > self.oom_above:
            import torch

            raise torch.OutOfMemoryError(f"CUDA out of memory (fake): {len(prompt)} > {self.oom_above}")
        if image is not None:
            width, height = image[0].size
        for step in range(num_inference_steps):
            if self._interrupt:
                break
            if self.step_s:
                time.sleep(self.step_s)
            if callback_on_step_end is not None:
                callback_on_step_end(self, step, 1000 - step, {"latents": _latents(prompt, generator, step,
                                                                                    num_inference_steps)})
        images = [
            Image.new("RGB", (width, height), prompt_colour(text, gen.initial_seed()))
            for text, gen in zip(prompt, generator, strict=True)
        ]
        return _Output(images=images)

    def _maybe_fail(self, text: str) -> None:
        if self.fail_marker in text:
            raise RuntimeError("fake pipeline failure")
        if self.oom_marker in text:
            import torch

            raise torch.OutOfMemoryError("CUDA out of memory (fake)")
        if self.crash_marker in text:
            marker = Path(self.crash_once_dir) / hashlib.sha1(text.encode()).hexdigest()
            if self.crash_once_dir and marker.exists():
                return
            if self.crash_once_dir:
                marker.touch()
            os._exit(137)


def _latents(prompt: list[str], generator: list[Any], step: int, steps: int) -> Any:
    import torch

    share = (step + 1) / steps
    colours = [prompt_colour(text, gen.initial_seed()) for text, gen in zip(prompt, generator, strict=True)]
    values = torch.tensor(colours, dtype=torch.float32) * share / 127.5 - 1.0
    return values[:, :, None, None].expand(-1, -1, 8, 8)


def load_fake_pipeline(
    info: Any, step_s: float = 0.0, crash_once_dir: str = "", hold_until: str = "", oom_above: int = 0
) -> FakePipeline:
    """`hold_until`: a path; loading waits until it exists, so a worker stays not ready and every job
    stays queued until a test creates the file. `oom_above`: see FakePipeline."""
    while hold_until and not Path(hold_until).exists():
        time.sleep(0.02)
    return FakePipeline(step_s=float(step_s), crash_once_dir=str(crash_once_dir), oom_above=int(oom_above))
