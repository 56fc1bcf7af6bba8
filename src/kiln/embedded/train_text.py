"""Stage 2 of training the embedded model: the text encoder, grounded by small heads (training
only, not saved) that read the scene's kind, attributes and every letter of the quoted word."""

from __future__ import annotations

import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from kiln.embedded import components
from kiln.embedded.scenes import COLORS, KINDS, LETTERS, POSITIONS, SHAPES, SIZES, WORD_LENGTHS, Scene
from kiln.embedded.scenes import sample_scene, sample_text_scene
from kiln.embedded.text_captions import HELD_OUT_WORDS, describe
from kiln.embedded.train_kit import Budget, init_part, log, resume, save_checkpoint, step_rng
from kiln.embedded.train_kit import training_scenes

ATTRIBUTE_VALUES = {
    "kind": KINDS,
    "color": COLORS,
    "background": COLORS,
    "shape": SHAPES,
    "position": POSITIONS,
    "size": SIZES,
}
SLOTS = WORD_LENGTHS[1]
"""Letter heads of the text encoder's grounding: one per letter of the word, 27 classes (A-Z, none)."""


class AttributeHeads(torch.nn.Module):
    """Linear read-outs of each scene attribute, and of each letter of the word, from a text hidden
    state; training only."""

    def __init__(self, hidden: int):
        super().__init__()
        heads = {name: torch.nn.Linear(hidden, len(values)) for name, values in ATTRIBUTE_VALUES.items()}
        heads |= {f"letter{i}": torch.nn.Linear(hidden, len(LETTERS) + 1) for i in range(SLOTS)}
        self.heads = torch.nn.ModuleDict(heads)

    def forward(self, hidden: torch.Tensor) -> dict[str, torch.Tensor]:
        return {name: head(hidden) for name, head in self.heads.items()}


def tokenize(tokenizer, texts: list[str]) -> torch.Tensor:
    return tokenizer(
        texts,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids


def _target(scene: Scene, name: str, values) -> int:
    if name in ("shape", "position", "size") and scene.kind in ("sign", "word"):
        return -100  # not said by the caption
    return values.index(getattr(scene, name))


def attribute_targets(scenes: list[Scene]) -> dict[str, torch.Tensor]:
    out = {
        name: torch.tensor([_target(s, name, values) for s in scenes]) for name, values in ATTRIBUTE_VALUES.items()
    }
    for i in range(SLOTS):
        out[f"letter{i}"] = torch.tensor(
            [LETTERS.index(s.word[i]) if s.word and i < len(s.word) else len(LETTERS) for s in scenes]
        )
    return out


def text_batch(recipe, tokenizer, rng, split, n):
    if split == "train":
        scenes = training_scenes(rng, n)
    else:  # held-out phrasings, and held-out words for the text kinds
        scenes = [
            sample_scene(rng) if i % 2 else sample_text_scene(rng, rng.choice(HELD_OUT_WORDS)) for i in range(n)
        ]
    ids = tokenize(tokenizer, [describe(s, rng, split) for s in scenes])
    return scenes, ids


def attribute_loss(text_encoder, heads, ids, scenes, eos_id):
    """Cross-entropy of every attribute at <eos> and every pad after it: under CLIP's causal mask
    those are the positions that have read the whole caption, and the UNet attends to all of them."""
    hidden = text_encoder(ids).last_hidden_state
    eos_pos = (ids == eos_id).int().argmax(dim=1)
    full = torch.arange(ids.shape[1])[None, :] >= eos_pos[:, None]
    logits = heads(hidden[full])
    counts = full.sum(dim=1)
    loss, correct = 0.0, {}
    for name, target in attribute_targets(scenes).items():
        loss = loss + F.cross_entropy(logits[name], target.repeat_interleave(counts), ignore_index=-100)
        at_eos = heads.heads[name](hidden[torch.arange(len(ids)), eos_pos])
        known = target != -100
        correct[name] = (at_eos.argmax(dim=1) == target)[known].float().mean().item()
    return loss, correct


def train_text(recipe: Recipe, work: Path, tokenizer):
    text_encoder = init_part(recipe, "text_encoder", components.build_text_encoder(tokenizer, recipe.sizes))
    heads = AttributeHeads(recipe.sizes.text_hidden)
    params = list(text_encoder.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=recipe.text_lr, weight_decay=0.01)
    path, last_save = work / "text.pt", time.time()
    step, spent = resume(path, opt, model=text_encoder, heads=heads)
    budget = Budget(recipe.text_steps, recipe.text_minutes, spent)
    start = time.time()
    while not budget.done(step):
        rng, _ = step_rng(recipe, "text", step)
        torch.manual_seed(rng.getrandbits(63))  # dropout inside the encoder
        scenes, ids = text_batch(recipe, tokenizer, rng, "train", recipe.text_batch)
        for group in opt.param_groups:
            group["lr"] = (
                recipe.text_lr * min(1.0, (step + 1) / 50) * 0.5 * (1 + np.cos(np.pi * budget.progress(step)))
            )
        loss, _ = attribute_loss(text_encoder, heads, ids, scenes, tokenizer.eos_token_id)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if step % 100 == 0 or budget.done(step):
            with torch.no_grad():
                rng = random.Random(f"{recipe.seed}-text-eval")
                scenes, ids = text_batch(recipe, tokenizer, rng, "held_out", 512)
                _, held = attribute_loss(text_encoder, heads, ids, scenes, tokenizer.eos_token_id)
            accs = " ".join(f"{k} {v:.2f}" for k, v in held.items())
            log(work, f"text step {step} loss {loss.item():.4f} held-out {accs} ({time.time() - start:.0f}s)")
        if budget.done(step) or time.time() - last_save > recipe.checkpoint_every_s:
            save_checkpoint(
                path,
                {
                    "model": text_encoder.state_dict(),
                    "heads": heads.state_dict(),
                    "opt": opt.state_dict(),
                    "step": step,
                    "spent": recipe.text_minutes * 60 if budget.done(step) else budget.spent(),
                },
            )
            last_save = time.time()
    return text_encoder.eval().requires_grad_(False)


class LetterSlotHeads(torch.nn.Module):
    """Linear read-outs from each letter of a quoted word: which letter it is and its place in the
    word (first, second, …); from the closing quote: how long the word is. Under CLIP's causal
    mask a letter sees the opening quote and the letters before it, not the word's length, so its
    place is counted from the start. Without this the letters' hidden states do not say their
    place (a linear probe read it for 34 % of letters), and the UNet's cross-attention cannot
    tell the first letter from the third; training only, not saved."""

    def __init__(self, hidden: int):
        super().__init__()
        self.letter = torch.nn.Linear(hidden, len(LETTERS))
        self.slot = torch.nn.Linear(hidden, SLOTS)
        self.length = torch.nn.Linear(hidden, SLOTS)


def letter_slot_targets(tokenizer, ids: torch.Tensor):
    """(batch, position, letter, slot) of every letter token between a pair of quotes, and
    (batch, position, length) of every closing quote."""
    quote = tokenizer.convert_tokens_to_ids('"')
    letter_of = {tokenizer.convert_tokens_to_ids(c.lower()): i for i, c in enumerate(LETTERS)}
    letters, closings = [], []
    for b, row in enumerate(ids.tolist()):
        quotes = [i for i, t in enumerate(row) if t == quote]
        for start, end in zip(quotes[::2], quotes[1::2]):
            span = row[start + 1 : end]
            if not span or len(span) > SLOTS or any(t not in letter_of for t in span):
                continue
            letters += [(b, start + 1 + k, letter_of[t], k) for k, t in enumerate(span)]
            closings.append((b, end, len(span) - 1))
    return torch.tensor(letters, dtype=torch.long).reshape(-1, 4), torch.tensor(closings, dtype=torch.long).reshape(-1, 3)


def letter_slot_loss(heads: LetterSlotHeads, hidden: torch.Tensor, targets) -> torch.Tensor:
    letters, closings = targets
    if not len(letters):
        return hidden.sum() * 0.0
    at = hidden[letters[:, 0], letters[:, 1]]
    loss = F.cross_entropy(heads.letter(at), letters[:, 2]) + F.cross_entropy(heads.slot(at), letters[:, 3])
    return loss + F.cross_entropy(heads.length(hidden[closings[:, 0], closings[:, 1]]), closings[:, 2])
