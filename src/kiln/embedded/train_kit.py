"""Helpers the embedded model's training stages share: logging, per-step randomness, checkpoints,
time budgets, starting from a saved pipeline, and the training scenes."""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

import torch

from kiln.embedded.scenes import Scene, sample_any_scene
from kiln.embedded.text_captions import training_word


def init_part(recipe: Recipe, name: str, model):
    """Load part `name` of recipe.init_from into `model` (fp16 weights load as fp32); a text
    encoder with a larger vocabulary or more positions keeps the old rows and fills the new
    ones (new tokens: small random; new positions: copies of the last old one)."""
    if recipe.init_from is None:
        return model
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    cls = {"vae": AutoencoderKL, "unet": UNet2DConditionModel, "text_encoder": CLIPTextModel}[name]
    old = cls.from_pretrained(str(Path(recipe.init_from) / name)).float().state_dict()
    new = model.state_dict()
    for key, value in old.items():
        if new[key].shape != value.shape:
            grown = new[key].clone()
            grown[: value.shape[0]] = value
            if "position_embedding" in key:
                grown[value.shape[0] :] = value[-1]
            old[key] = grown
    model.load_state_dict(old)
    return model


def log(work: Path, message: str) -> None:
    line = f"{time.strftime('%H:%M:%S')} {message}"
    print(line, flush=True)
    with open(work / "train.log", "a") as f:
        f.write(line + "\n")


def step_rng(recipe: Recipe, stage: str, step: int) -> tuple[random.Random, torch.Generator]:
    """Per-step randomness derived from (seed, stage, step), so a resumed run draws the same data."""
    rng = random.Random(f"{recipe.seed}-{stage}-{step}")
    return rng, torch.Generator().manual_seed(rng.getrandbits(63))


class Budget:
    """A stage's progress in [0, 1]: the larger of steps done / planned and minutes spent /
    allowed, so a stage on a busy machine ends on time with its learning rate run down. Time
    spent is kept in the checkpoint, so a resumed stage keeps its clock."""

    def __init__(self, steps: int, minutes: float | None, spent_s: float = 0.0):
        self.steps, self.budget_s, self.spent_s, self.mark = steps, (minutes or 0) * 60, spent_s, time.time()

    def spent(self) -> float:
        return self.spent_s + time.time() - self.mark

    def progress(self, step: int) -> float:
        if self.steps <= 0:  # a stage of no steps (one a continuation skips) is done from the start
            return 1.0
        by_time = self.spent() / self.budget_s if self.budget_s else 0.0
        return min(1.0, max(step / self.steps, by_time))

    def done(self, step: int) -> bool:
        return self.progress(step) >= 1.0


def save_checkpoint(path: Path, state: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict | None:
    return torch.load(path, weights_only=False) if path.exists() else None


def resume(path: Path, opt, **parts) -> tuple[int, float]:
    """Restore a stage from its checkpoint at `path`, if there is one: each module in `parts` from
    the entry of its name, and `opt`. Returns (steps done, seconds spent), (0, 0.0) for a new stage."""
    if (state := load_checkpoint(path)) is None:
        return 0, 0.0
    for key, module in parts.items():
        module.load_state_dict(state[key])
    opt.load_state_dict(state["opt"])
    return state["step"], state["spent"]


def training_scenes(rng: random.Random, n: int) -> list[Scene]:
    """Scenes of every kind; the words are training words (never a held-out one)."""
    return [sample_any_scene(rng, training_word) for _ in range(n)]
