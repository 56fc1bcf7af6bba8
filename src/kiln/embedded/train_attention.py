"""Teaching the UNet's cross-attention where each letter goes (training only).

The first from-scratch run of the words recipe learnt the layout (the sign, the band of text, its
length and colours) but not which letter goes where: each spot of the band must read *its* letter
token, and nothing told the cross-attention which one that is. The scene drawer knows exactly
where every letter lands, so here one head of each cross-attention layer at the letter-sized
resolutions is told: at the cells a letter covers, attend to that letter's token (a soft
cross-entropy against the letter cells' coverage of each latent cell). The other heads stay free
to read colours and everything else. This is the character-level attention supervision of
text-rendering models (TextDiffuser's character-aware loss, GLIGEN-style grounding), done with the
stock attention of a stock UNet: the weights it trains load into a plain diffusers pipeline.
"""

from __future__ import annotations

import math
import random

import numpy as np
import torch

from kiln.embedded.components import build_train_scheduler
from kiln.embedded.scenes import NATIVE_SIZE, letter_boxes, scene_batch_with_layouts
from kiln.embedded.train_text import letter_slot_targets, tokenize

SUPERVISED_HEAD = 0
MIN_COVERAGE = 0.5
"""A latent cell is supervised when letter cells cover at least this much of it."""


class RecordingCrossAttention:
    """diffusers' plain attention processor, keeping the log attention of one head (the
    supervised one) for the loss of the current step."""

    def __init__(self):
        self.log_probs: torch.Tensor | None = None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        batch, tokens, _ = hidden_states.shape
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        key = attn.head_to_batch_dim(attn.to_k(context))
        value = attn.head_to_batch_dim(attn.to_v(context))
        mask = attn.prepare_attention_mask(attention_mask, context.shape[1], batch)
        probs = attn.get_attention_scores(query, key, mask)
        self.log_probs = probs.view(batch, attn.heads, tokens, -1)[:, SUPERVISED_HEAD].clamp_min(1e-9).log()
        out = attn.batch_to_head_dim(torch.bmm(probs, value))
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor


def install_recorders(unet) -> list[RecordingCrossAttention]:
    """Put a recorder on every cross-attention layer (`attn2`) of `unet`; the others keep theirs."""
    processors, recorders = {}, []
    for name, processor in unet.attn_processors.items():
        if ".attn2." in name:
            recorder = RecordingCrossAttention()
            recorders.append(recorder)
            processors[name] = recorder
        else:
            processors[name] = processor
    unet.set_attn_processor(processors)
    return recorders


def letter_targets(
    word_boxes: list[tuple[int, int, int, int] | None],
    letter_tokens: torch.Tensor,
    resolution: int,
    sequence: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Soft targets (batch, resolution², sequence) and the cells they apply to (batch, resolution²).

    `letter_tokens` are rows (batch index, token position, letter, slot), as
    `train_text.letter_slot_targets` gives them; a latent cell's target is the share of it that
    each letter's cell covers, over that letter's token."""
    targets = np.zeros((len(word_boxes), resolution * resolution, sequence), dtype=np.float32)
    cell = NATIVE_SIZE / resolution
    edges = np.arange(resolution) * cell
    by_item: dict[int, list[tuple[int, int]]] = {}
    for b, position, _, slot in letter_tokens.tolist():
        by_item.setdefault(b, []).append((slot, position))
    for b, letters in by_item.items():
        box = word_boxes[b]
        if box is None:
            continue
        cells = letter_boxes(box, len(letters))
        for slot, position in letters:
            x0, y0, x1, y1 = cells[slot]
            ox = np.clip(np.minimum(x1, edges + cell) - np.maximum(x0, edges), 0, None) / cell
            oy = np.clip(np.minimum(y1, edges + cell) - np.maximum(y0, edges), 0, None) / cell
            targets[b, :, position] += np.outer(oy, ox).reshape(-1)
    targets = torch.from_numpy(targets)
    covered = targets.sum(dim=2)
    mask = covered >= MIN_COVERAGE
    return targets / covered.clamp_min(1e-6)[..., None], mask


def _supervised_layers(recorders, word_boxes, letter_tokens, resolutions):
    """(log attention, targets, mask) of each recorded layer at `resolutions`, the targets built once
    a resolution; each recording is consumed, so the next forward pass starts clean."""
    cache = {}
    for recorder in recorders:
        log_probs, recorder.log_probs = recorder.log_probs, None
        if log_probs is None:
            continue
        resolution = math.isqrt(log_probs.shape[1])
        if resolution not in resolutions:
            continue
        if resolution not in cache:
            cache[resolution] = letter_targets(word_boxes, letter_tokens, resolution, log_probs.shape[2])
        yield (log_probs, *cache[resolution])


def letter_attention_loss(
    recorders: list[RecordingCrossAttention],
    word_boxes: list[tuple[int, int, int, int] | None],
    letter_tokens: torch.Tensor,
    resolutions: tuple[int, ...],
) -> torch.Tensor:
    """Mean soft cross-entropy of the supervised head's attention against the letter targets, over
    the recorded layers at `resolutions` (zero when the batch has no letters)."""
    losses = [
        -(targets[mask] * log_probs[mask]).sum(dim=1).mean()
        for log_probs, targets, mask in _supervised_layers(recorders, word_boxes, letter_tokens, resolutions)
        if mask.any()
    ]
    if not losses:
        return torch.zeros(())
    return torch.stack(losses).mean()


def letter_attention_accuracy(
    unet, vae, text_encoder, tokenizer, prompts_scenes, resolutions: tuple[int, ...], timestep: int = 500
) -> float:
    """How often the supervised head looks at the right letter: the share of letter cells (at
    `resolutions`) where its strongest attention is on the token of the letter covering most of
    the cell, with the true drawing noised to `timestep` and the caption as the condition. The
    scenes without a word are skipped; `unet` keeps its own attention processors."""
    cases = [(p, s) for p, s in prompts_scenes if s.word]
    if not cases:
        return 0.0
    array, layouts = scene_batch_with_layouts([s for _, s in cases], random.Random(0))
    saved = unet.attn_processors
    recorders = install_recorders(unet)
    try:
        with torch.no_grad():
            images = torch.from_numpy(array).to(next(vae.parameters()).dtype)
            latents = vae.encode(images).latent_dist.mean * vae.config.scaling_factor
            noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(0), dtype=latents.dtype)
            t = torch.full((len(cases),), timestep)
            noisy = build_train_scheduler().add_noise(latents, noise, t)
            ids = tokenize(tokenizer, [p for p, _ in cases])
            unet(noisy, t, text_encoder(ids).last_hidden_state).sample
    finally:
        unet.set_attn_processor(saved)
    letters, _ = letter_slot_targets(tokenizer, ids)
    boxes = [where.word_box for where in layouts]
    hits, total = 0, 0
    for log_probs, targets, mask in _supervised_layers(recorders, boxes, letters, resolutions):
        hits += int((log_probs.argmax(dim=2) == targets.argmax(dim=2))[mask].sum())
        total += int(mask.sum())
    return hits / max(total, 1)
