"""Train Kiln's embedded text-to-image model from scratch, in seeded, resumable stages:

1. autoencoder (64x64x3 <-> 32x32x4) on procedural scenes (shapes, shapes with words, signs,
   words), edges and object pixels weighted up; then its decoder alone polished on the cached
   latents;
2. text encoder, grounded by small heads (training only, not saved) that must read the scene's
   kind, object colour, background colour, shape, position, size and every letter of the quoted
   word from every caption;
3. UNet on cached latents, the text encoder learning beside it at a lower rate, v-prediction,
   the loss weighted up on letter strokes and outlines, and classifier-free dropout.

`python -m kiln.embedded.train` writes checkpoints under var/embedded-train/ and the best pipeline so
far into src/kiln/embedded/model/; `--smoke` runs a few steps of a tiny config into a temp dir.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from kiln.embedded import components
from kiln.embedded.analyze import ATTRIBUTES, read_image, score
from kiln.embedded.ocr import letter_accuracy, read_word
from kiln.embedded.scenes import NATIVE_SIZE, PALETTE, Scene, sample_scene, sample_text_scene, scene_batch
from kiln.embedded.scenes import layout, scene_batch_with_layouts
from kiln.embedded.text_captions import HELD_OUT_WORDS, describe, is_training_word
from kiln.embedded.train_kit import (
    Budget,
    init_part,
    load_checkpoint,
    log,
    resume,
    save_checkpoint,
    step_rng,
    training_scenes,
)
from kiln.embedded.train_attention import install_recorders, letter_attention_accuracy
from kiln.embedded.train_attention import letter_attention_loss
from kiln.embedded.train_text import LetterSlotHeads, letter_slot_loss, letter_slot_targets, tokenize, train_text

MODEL_DIR = Path(__file__).parent / "model"
WORK_DIR = Path("var/embedded-train")

@dataclass(frozen=True)
class Recipe:
    """Everything that decides the trained weights; saved next to them."""

    sizes: components.Sizes = field(default_factory=lambda: components.FULL)
    seed: int = 1234
    dataset_size: int = 30_000
    vae_steps: int = 1_200
    vae_batch: int = 16
    vae_lr: float = 1e-3
    decoder_steps: int = 300
    decoder_lr: float = 3e-4
    text_steps: int = 300
    text_batch: int = 128
    text_lr: float = 1e-3
    unet_steps: int = 6_000
    vae_minutes: float = 10.0
    decoder_minutes: float = 3.0
    text_minutes: float = 3.0
    unet_batch: int = 48
    unet_lr: float = 5e-4
    unet_text_lr: float = 1e-4
    """The text encoder keeps learning beside the UNet, at this rate: the letters' own hidden states
    are what the UNet's cross-attention reads to put each letter in its place."""
    unet_slot_weight: float = 0.02
    """Weight of the letter-slot heads' loss on the text encoder in the UNet stage (`LetterSlotHeads`)."""
    unet_attention_weight: float = 0.01
    attention_resolutions: tuple[int, ...] = (16, 8)
    """One head of each cross-attention layer at these latent resolutions is taught to attend, at
    each letter's cells, to that letter's token (`train_attention`), with this weight (at 0.05 it
    stayed a third of the loss long after the head had learnt its job, inside one gradient clip
    with the denoising loss)."""
    letter_losses_at: float = 0.9
    letter_losses_by: int = 1_600
    """The letter-slot and letter-attention losses switch on at the first eval where colour and
    background both read at least `letter_losses_at`, or at step `letter_losses_by` at the latest.
    With both on from the first step (stop 19) the backgrounds stayed at chance for 2,000 steps;
    without them the same UNet read 54 % of backgrounds by step 400, and the only run that learnt
    colours (stop 17) had no attention loss and the slot heads only from step 1,852."""
    unet_object_weight: float = 2.0
    unet_edge_weight: float = 4.0
    """The UNet's loss, like the autoencoder's, weights object pixels and pixels near an edge
    (letter strokes, outlines) up, per latent cell, so the letters are not drowned by flat colour."""
    unet_warmup: int = 200
    ema_decay: float = 0.998
    cond_dropout: float = 0.1
    min_snr: float = 5.0
    eval_every: int = 400
    eval_prompts: int = 40
    sample_steps: int = 6
    guidance_scale: float = 3.0
    checkpoint_every_s: float = 240.0
    init_from: str | None = None
    """A pipeline directory whose VAE, text encoder (its rows of the vocabulary and positions)
    and UNet start the training, instead of random weights."""


SMOKE = Recipe(
    sizes=components.TINY,
    dataset_size=16,
    vae_steps=2,
    vae_batch=4,
    decoder_steps=2,
    text_steps=2,
    text_batch=8,
    unet_steps=3,
    unet_batch=4,
    unet_warmup=1,
    eval_every=3,
    eval_prompts=2,
    sample_steps=2,
    checkpoint_every_s=0.0,
    letter_losses_by=2,
)


FINETUNE = Recipe(
    seed=1235,
    vae_steps=0,
    decoder_steps=0,
    text_steps=0,
    unet_steps=7_000,
    unet_batch=32,
    unet_lr=3e-4,
    unet_text_lr=6e-5,
    unet_warmup=100,
    letter_losses_by=0,
)
"""Going on training a shipped pipeline of this recipe's architecture (`--init`): its autoencoder
stays exactly as it is (the UNet has learnt its latents, and they keep its latent scale), the
text encoder goes on learning only beside the UNet, the letter losses are on from the first step,
and the UNet draws a fresh 30,000 scenes (another seed) at a lower peak rate with its own warm-up."""


# --- stage 1: autoencoder -------------------------------------------------------------------


def train_vae(recipe: Recipe, work: Path):
    vae = init_part(recipe, "vae", components.build_vae(recipe.sizes))
    opt = torch.optim.AdamW(vae.parameters(), lr=recipe.vae_lr, weight_decay=0.0)
    path, last_save = work / "vae.pt", time.time()
    step, spent = resume(path, opt, model=vae)
    budget = Budget(recipe.vae_steps, recipe.vae_minutes, spent)
    start = time.time()
    while not budget.done(step):
        rng, gen = step_rng(recipe, "vae", step)
        scenes = training_scenes(rng, recipe.vae_batch)
        images = torch.from_numpy(scene_batch(scenes, rng))
        for group in opt.param_groups:
            group["lr"] = recipe.vae_lr * 0.5 * (1 + np.cos(np.pi * budget.progress(step)))
        posterior = vae.encode(images).latent_dist
        recon = vae.decode(posterior.sample(generator=gen)).sample
        kl = posterior.kl().mean() / posterior.mean[0].numel()
        loss = weighted_loss(recon, images, scenes) + 1e-4 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if step % 100 == 0 or budget.done(step):
            log(work, f"vae step {step} loss {loss.item():.4f} ({time.time() - start:.0f}s)")
        if budget.done(step) or time.time() - last_save > recipe.checkpoint_every_s:
            state = {"model": vae.state_dict(), "opt": opt.state_dict(), "step": step, "spent": budget.spent()}
            if budget.done(step):
                state["spent"] = recipe.vae_minutes * 60  # finished: a resumed run trains no more
            save_checkpoint(path, state)
            last_save = time.time()
    return vae.eval().requires_grad_(False)


def encode_dataset(recipe: Recipe, work: Path, vae) -> dict:
    """Render the UNet's training scenes once and cache their latents, the latent scale, the
    UNet's per-cell loss weights and where each word was drawn."""
    path = work / "latents.pt"
    if (cached := load_checkpoint(path)) is not None:
        if "word_boxes" not in cached:  # a cache from before the boxes were kept
            cached["word_boxes"] = dataset_word_boxes(recipe)
        return cached
    rng, scenes = dataset_scenes(recipe)
    latents, weights, boxes = [], [], []
    with torch.no_grad():
        for i in range(0, len(scenes), 256):
            chunk = scenes[i : i + 256]
            array, layouts = scene_batch_with_layouts(chunk, rng)
            batch = torch.from_numpy(array)
            boxes += [where.word_box for where in layouts]
            latents.append(vae.encode(batch).latent_dist.mean)
            w = pixel_weights(batch, chunk, recipe.unet_object_weight, recipe.unet_edge_weight)
            weights.append(F.max_pool2d(w, components.LATENT_FACTOR).half())
    latents = torch.cat(latents)
    data = {
        "latents": latents,
        "weights": torch.cat(weights),
        "scenes": [asdict(s) for s in scenes],
        "word_boxes": boxes,
        "scaling_factor": init_scaling_factor(recipe) or float(1.0 / latents.std()),
    }
    save_checkpoint(path, data)
    log(work, f"encoded {len(scenes)} scenes; latent std {latents.std():.3f}")
    return data


def init_scaling_factor(recipe: Recipe) -> float | None:
    """The latent scale of the pipeline a run goes on from (its UNet learnt latents at that scale)."""
    if recipe.init_from is None:
        return None
    return float(json.loads((Path(recipe.init_from) / "vae" / "config.json").read_text())["scaling_factor"])


def dataset_scenes(recipe: Recipe) -> tuple[random.Random, list[Scene]]:
    """The UNet's training scenes, and the generator `encode_dataset` goes on to lay them out with."""
    rng = random.Random(f"{recipe.seed}-dataset")
    return rng, training_scenes(rng, recipe.dataset_size)


def dataset_word_boxes(recipe: Recipe) -> list[tuple[int, int, int, int] | None]:
    """Where `encode_dataset` drew each scene's word, laid out again from the same seed (the drawing
    itself draws nothing from the generator, so the layouts come out the same without it)."""
    rng, scenes = dataset_scenes(recipe)
    return [layout(scene, rng).word_box for scene in scenes]


def pixel_weights(images: torch.Tensor, scenes: list[Scene], weight: float, edge: float) -> torch.Tensor:
    """Per-pixel loss weights: `weight` on the object (pixels unlike the background) and `edge`
    more near any edge (of a shape, a sign or a letter stroke), 1 elsewhere, so the few pixels
    that carry shape, colour and letters are not drowned by the flat background."""
    bg = torch.tensor([PALETTE[s.background] for s in scenes], dtype=torch.float32) / 127.5 - 1.0
    far = (images - bg[:, :, None, None]).abs().amax(dim=1, keepdim=True) > 0.1
    dx = (images[..., :, 1:] - images[..., :, :-1]).abs().amax(dim=1, keepdim=True)
    dy = (images[..., 1:, :] - images[..., :-1, :]).abs().amax(dim=1, keepdim=True)
    edges = F.pad(dx, (0, 1, 0, 0)).maximum(F.pad(dy, (0, 0, 0, 1))) > 0.1
    edges = F.max_pool2d(edges.float(), 3, stride=1, padding=1)
    return 1.0 + (weight - 1.0) * far.float() + edge * edges


def weighted_loss(recon: torch.Tensor, images: torch.Tensor, scenes: list[Scene]) -> torch.Tensor:
    w = pixel_weights(images, scenes, 4.0, 8.0)
    return (w * ((recon - images) ** 2 + 0.5 * (recon - images).abs())).mean() / w.mean()


def polish_decoder(recipe: Recipe, work: Path, vae):
    """Fine-tune the decoder alone on the encoder's mean latents (what the UNet learns to make),
    weighting object pixels. The encoder, and so the cached latents, stay exactly as they are."""
    path, last_save = work / "decoder.pt", time.time()
    opt = torch.optim.AdamW(vae.decoder.parameters(), lr=recipe.decoder_lr, weight_decay=0.0)
    step, spent = resume(path, opt, model=vae.decoder)
    budget = Budget(recipe.decoder_steps, recipe.decoder_minutes, spent)
    vae.decoder.requires_grad_(True)
    start = time.time()
    while not budget.done(step):
        rng, _ = step_rng(recipe, "decoder", step)
        scenes = training_scenes(rng, recipe.vae_batch)
        images = torch.from_numpy(scene_batch(scenes, rng))
        for group in opt.param_groups:
            group["lr"] = recipe.decoder_lr * 0.5 * (1 + np.cos(np.pi * budget.progress(step)))
        with torch.no_grad():
            latents = vae.encode(images).latent_dist.mean
        recon = vae.decode(latents).sample
        loss = weighted_loss(recon, images, scenes)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if step % 100 == 0 or budget.done(step):
            log(work, f"decoder step {step} loss {loss.item():.4f} ({time.time() - start:.0f}s)")
        if budget.done(step) or time.time() - last_save > recipe.checkpoint_every_s:
            spent = recipe.decoder_minutes * 60 if budget.done(step) else budget.spent()
            state = {"model": vae.decoder.state_dict(), "opt": opt.state_dict(), "step": step, "spent": spent}
            save_checkpoint(path, state)
            last_save = time.time()
    return vae.eval().requires_grad_(False)


# --- stage 3: UNet --------------------------------------------------------------------------


def evaluate(recipe: Recipe, pipe, prompts_scenes) -> dict[str, float]:
    """Sample held-out prompts as the server would; score the shapes' pixels and read the words."""
    prompts = [p for p, _ in prompts_scenes]
    images = pipe(
        prompts,
        num_inference_steps=recipe.sample_steps,
        guidance_scale=recipe.guidance_scale,
        generator=torch.Generator().manual_seed(0),
        output_type="pil",
    ).images
    hits = {name: 0 for name in ATTRIBUTES}
    shapes, words, letters, exact = 0, 0, 0.0, 0
    for image, (_, scene) in zip(images, prompts_scenes):
        if scene.kind == "shape":
            shapes += 1
            for name, ok in score(read_image(image), scene).items():
                hits[name] += ok
        else:
            read = read_word(image, scene)
            words += 1
            letters += letter_accuracy(read, scene.word)
            exact += read == scene.word
    out = {name: hits[name] / max(shapes, 1) for name in ATTRIBUTES}
    return out | {"letters": letters / max(words, 1), "words": exact / max(words, 1)}


def held_out_prompts(recipe: Recipe, n: int, salt: str = "eval") -> list[tuple[str, Scene]]:
    """Half plain shapes in held-out phrasings, half held-out words in training phrasings."""
    rng = random.Random(f"{recipe.seed}-{salt}")
    out = []
    for i in range(n):
        if i % 2:
            scene = sample_scene(rng)
            out.append((describe(scene, rng, "held_out"), scene))
        else:
            scene = sample_text_scene(rng, HELD_OUT_WORDS[rng.randrange(len(HELD_OUT_WORDS))])
            out.append((describe(scene, rng, "train"), scene))
    return out


def preview_projection(vae) -> dict:
    """A least-squares latent -> RGB map (for the server's step previews), fitted on flat-colour
    cells in the space the pipeline's latents live in."""
    gen = torch.Generator().manual_seed(0)
    colours = torch.rand(4, 3, 8, 8, generator=gen) * 1.6 - 0.8
    pixels = colours.repeat_interleave(32, 2).repeat_interleave(32, 3)
    with torch.no_grad():
        latents = vae.encode(pixels.to(next(vae.parameters()).dtype)).latent_dist.mean.float()
    latents = latents * vae.config.scaling_factor
    target = F.adaptive_avg_pool2d(pixels, latents.shape[-2:])
    x = latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1])
    y = target.permute(0, 2, 3, 1).reshape(-1, 3)
    solution = torch.linalg.lstsq(torch.cat([x, torch.ones(len(x), 1)], dim=1), y).solution
    return {
        "latent_rgb_factors": [[round(float(v), 4) for v in row] for row in solution[:-1]],
        "latent_rgb_bias": [round(float(v), 4) for v in solution[-1]],
    }


def save_pipeline(out: Path, vae, text_encoder, tokenizer, unet, recipe: Recipe, summary: dict) -> None:
    """Write the pipeline (UNet and VAE in fp16, the small text encoder in fp32 so that every part
    loads as fp32 by default) and its serving defaults, replacing `out` in one rename."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe = components.assemble_pipeline(
        copy.deepcopy(vae).half(), text_encoder, tokenizer, copy.deepcopy(unet).half()
    )
    pipe.save_pretrained(tmp, safe_serialization=True)
    defaults = {
        "native_size": NATIVE_SIZE,
        "steps": recipe.sample_steps,
        "guidance_scale": recipe.guidance_scale,
        "scheduler": type(pipe.scheduler).__name__,
    } | preview_projection(vae)
    (tmp / "kiln.json").write_text(json.dumps(defaults, indent=2) + "\n")
    (tmp / "training.json").write_text(json.dumps(summary, indent=2) + "\n")
    old = out.with_name(out.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def repackage(recipe: Recipe, out: Path, vae) -> None:
    """Re-save the pipeline in `out` with the autoencoder `vae` (e.g. after more decoder polishing),
    keeping its UNet, text encoder, serving defaults and training summary."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(out), local_files_only=True)
    summary = json.loads((out / "training.json").read_text())
    summary["recipe"]["decoder_steps"] = recipe.decoder_steps
    defaults = json.loads((out / "kiln.json").read_text())
    vae.register_to_config(scaling_factor=pipe.vae.config.scaling_factor)
    recipe = replace(recipe, sample_steps=defaults["steps"], guidance_scale=defaults["guidance_scale"])
    save_pipeline(out, vae, pipe.text_encoder, pipe.tokenizer, pipe.unet, recipe, summary)


def eval_and_keep_best(
    recipe: Recipe,
    work: Path,
    out: Path,
    parts,
    eval_set,
    step: int,
    best: float,
    seconds: float,
    summary: dict,
) -> float:
    """Score the EMA UNet on held-out prompts (and how often its supervised attention head looks at
    the right letter); save the pipeline if it is the best so far."""
    vae, text_encoder, tokenizer, ema = parts
    pipe = components.assemble_pipeline(vae, text_encoder, tokenizer, ema)
    pipe.set_progress_bar_config(disable=True)
    accs = evaluate(recipe, pipe, eval_set)
    accs["letter_attention"] = letter_attention_accuracy(
        ema, vae, text_encoder, tokenizer, eval_set, recipe.attention_resolutions
    )
    mean = float(np.mean([accs[name] for name in ATTRIBUTES]) + accs["letters"]) / 2
    log(
        work,
        f"eval step {step}: "
        + " ".join(f"{k} {v:.2f}" for k, v in accs.items())
        + f" mean {mean:.3f} (best {best:.3f}, {seconds / 60:.1f} min)",
    )
    if mean >= best:
        summary.update(unet_steps_done=step, unet_seconds=seconds, eval=accs)
        save_pipeline(out, vae, text_encoder, tokenizer, ema, recipe, summary)
        log(work, f"saved pipeline to {out}")
        best = mean
    return best, accs


def letter_losses_due(recipe: Recipe, step: int, accs: dict[str, float] | None) -> bool:
    """Whether the letter losses switch on now: the colours are learnt (`accs`, the eval just
    run, if any) or the step is `letter_losses_by`."""
    learnt = accs is not None and min(accs["color"], accs["background"]) >= recipe.letter_losses_at
    return learnt or step >= recipe.letter_losses_by


def ema_update(ema, model, decay: float) -> None:
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters()):
            e.lerp_(p, 1.0 - decay)


def train_unet(
    recipe: Recipe,
    work: Path,
    out: Path,
    vae,
    text_encoder,
    tokenizer,
    data: dict,
    deadline: float | None,
    summary: dict,
) -> None:
    """The UNet, and the text encoder with it at a lower rate; EMA copies of both are what ship."""
    vae.register_to_config(scaling_factor=data["scaling_factor"])
    unet = init_part(recipe, "unet", components.build_unet(recipe.sizes))
    text_encoder.requires_grad_(True).train()
    ema, ema_text = (copy.deepcopy(m).requires_grad_(False).eval() for m in (unet, text_encoder))
    opt = torch.optim.AdamW(
        [
            {"params": list(unet.parameters()), "base_lr": recipe.unet_lr},
            {"params": list(text_encoder.parameters()), "base_lr": recipe.unet_text_lr},
        ],
        lr=recipe.unet_lr,
        weight_decay=0.0,
    )
    heads = LetterSlotHeads(recipe.sizes.text_hidden)
    heads_group = {"params": list(heads.parameters()), "base_lr": recipe.unet_lr}
    path, step, best = work / "unet.pt", 0, -1.0
    if (state := load_checkpoint(path)) is not None:
        unet.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        text_encoder.load_state_dict(state["text"])
        ema_text.load_state_dict(state["ema_text"])
        if "heads" in state:  # a checkpoint from before the heads (the shipped run) has none
            heads.load_state_dict(state["heads"])
            opt.add_param_group(heads_group)
        opt.load_state_dict(state["opt"])
        step, best = state["step"], state["best"]
        summary["unet_seconds"] = state.get("seconds", 0.0)
        summary.setdefault("slot_heads_from_step", state.get("slot_heads_from_step", step))
        # a checkpoint written before letter_losses_from_step existed had the letter losses on from step 0
        summary.setdefault("letter_losses_from_step", state.get("letter_losses_from_step", 0))
    if len(opt.param_groups) == 2:
        opt.add_param_group(heads_group)
        summary.setdefault("slot_heads_from_step", step)
    noise_scheduler = components.build_train_scheduler()
    alphas = noise_scheduler.alphas_cumprod
    snr = alphas / (1 - alphas)
    # Only scenes whose word is a training word (a cache from an older word list may hold others).
    scenes = [Scene(**s) for s in data["scenes"]]
    keep = [i for i, s in enumerate(scenes) if s.word is None or is_training_word(s.word)]
    latents = data["latents"][keep] * data["scaling_factor"]
    cell_weights = data["weights"][keep].float()
    scenes = [scenes[i] for i in keep]
    word_boxes = [data["word_boxes"][i] for i in keep]
    letters_on = summary.get("letter_losses_from_step") is not None
    recorders = install_recorders(unet) if letters_on else []
    eval_set = held_out_prompts(recipe, recipe.eval_prompts)
    last_save = time.time()
    seconds = summary.setdefault("unet_seconds", 0.0)
    mark = time.time()
    parts = (vae, ema_text, tokenizer, ema)

    def unet_state(spent_s: float) -> dict:
        return {"model": unet.state_dict(), "ema": ema.state_dict(), "text": text_encoder.state_dict(),
                "ema_text": ema_text.state_dict(), "heads": heads.state_dict(), "opt": opt.state_dict(),
                "step": step, "best": best, "seconds": spent_s,
                "slot_heads_from_step": summary["slot_heads_from_step"],
                "letter_losses_from_step": summary.get("letter_losses_from_step")}

    left_s = (deadline - time.time()) if deadline is not None else None
    budget = Budget(recipe.unet_steps, (seconds + left_s) / 60 if left_s else None, seconds)
    if not letters_on and letter_losses_due(recipe, step, None):  # letter_losses_by 0: from the start
        letters_on, recorders = True, install_recorders(unet)
        summary["letter_losses_from_step"] = step
    while not budget.done(step):
        rng, gen = step_rng(recipe, "unet", step)
        torch.manual_seed(rng.getrandbits(63))  # dropout inside the text encoder
        idx = torch.randint(0, len(scenes), (recipe.unet_batch,), generator=gen)
        drop = (torch.rand(len(idx), generator=gen) < recipe.cond_dropout).tolist()
        texts = ["" if dropped else describe(scenes[i], rng) for i, dropped in zip(idx.tolist(), drop)]
        ids = tokenize(tokenizer, texts)
        cond = text_encoder(ids).last_hidden_state
        x0 = latents[idx]
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, len(alphas), (len(x0),), generator=gen)
        noisy = noise_scheduler.add_noise(x0, noise, t)
        target = noise_scheduler.get_velocity(x0, noise, t)
        lr_scale = min(1.0, (step + 1) / recipe.unet_warmup)
        for group in opt.param_groups:
            group["lr"] = (
                group["base_lr"] * lr_scale * (0.1 + 0.45 * (1 + np.cos(np.pi * budget.progress(step))))
            )
        pred = unet(noisy, t, cond).sample
        w = cell_weights[idx]
        per_image = (w * (pred - target) ** 2).sum(dim=(1, 2, 3)) / (w.sum(dim=(1, 2, 3)) * pred.shape[1])
        weight = torch.clamp(snr[t], max=recipe.min_snr) / (snr[t] + 1)
        loss = (weight * per_image).mean()
        slot_loss = attn_loss = torch.zeros(())
        if letters_on:
            letters = letter_slot_targets(tokenizer, ids)
            slot_loss = letter_slot_loss(heads, cond, letters)
            boxes = [word_boxes[i] for i in idx.tolist()]
            attn_loss = letter_attention_loss(recorders, boxes, letters[0], recipe.attention_resolutions)
            loss = loss + recipe.unet_slot_weight * slot_loss + recipe.unet_attention_weight * attn_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 1.0)
        opt.step()
        decay = min(recipe.ema_decay, (1 + step) / (10 + step))
        ema_update(ema, unet, decay)
        ema_update(ema_text, text_encoder, decay)
        step += 1
        if step % 50 == 0:
            log(work, f"unet step {step} loss {loss.item():.4f} slots {slot_loss.item():.3f} "
                f"letter attention {attn_loss.item():.3f} lr {opt.param_groups[0]['lr']:.2e}")
        accs = None
        if step % recipe.eval_every == 0 or step == recipe.unet_steps:
            seconds += time.time() - mark
            best, accs = eval_and_keep_best(recipe, work, out, parts, eval_set, step, best, seconds, summary)
            mark = time.time()
        if not letters_on and letter_losses_due(recipe, step, accs):
            letters_on, recorders = True, install_recorders(unet)
            summary["letter_losses_from_step"] = step
            log(work, f"unet step {step}: the letter-slot and letter-attention losses switch on")
        if time.time() - last_save > recipe.checkpoint_every_s or step == recipe.unet_steps:
            save_checkpoint(path, unet_state(seconds + time.time() - mark))
            last_save = time.time()
    seconds += time.time() - mark
    if step % recipe.eval_every != 0 and step < recipe.unet_steps:  # stopped by the deadline
        best, _ = eval_and_keep_best(recipe, work, out, parts, eval_set, step, best, seconds, summary)
    save_checkpoint(path, unet_state(seconds))


def run(recipe: Recipe, work: Path, out: Path, deadline: float | None = None, stage: str = "all") -> None:
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(recipe.seed)
    summary = {"recipe": asdict(recipe)}
    if recipe.init_from is not None and (before := Path(recipe.init_from) / "training.json").exists():
        summary["continued_from"] = json.loads(before.read_text())  # how the starting weights were trained
    tokenizer = components.build_tokenizer()
    t0 = time.time()
    vae = train_vae(recipe, work)
    data = encode_dataset(recipe, work, vae)
    if stage in ("decoder", "package"):
        vae = polish_decoder(recipe, work, vae)
        if stage == "package":
            repackage(recipe, out, vae)
        return
    vae = polish_decoder(recipe, work, vae)
    t1 = time.time()
    text_encoder = train_text(recipe, work, tokenizer)
    t2 = time.time()
    summary.update(vae_and_data_seconds=t1 - t0, text_seconds=t2 - t1)
    train_unet(recipe, work, out, vae, text_encoder, tokenizer, data, deadline, summary)
    log(work, f"done in {time.time() - t0:.0f}s (this session)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny config, a few steps, temp dirs")
    parser.add_argument("--work", type=Path, default=WORK_DIR, help="checkpoints and logs")
    parser.add_argument("--out", type=Path, default=MODEL_DIR, help="where the pipeline is saved")
    parser.add_argument("--unet-steps", type=int, default=None)
    parser.add_argument("--unet-batch", type=int, default=None)
    parser.add_argument(
        "--minutes", type=float, default=None,
        help="a wall-clock deadline for the whole run, from its start: the UNet stage ends by then",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--init", type=Path, default=None, help="fine-tune this pipeline (FINETUNE recipe)")
    parser.add_argument(
        "--stage",
        choices=("all", "decoder", "package"),
        default="all",
        help="'decoder': stop after polishing the decoder; 'package': also re-save the "
        "pipeline in --out with it",
    )
    parser.add_argument("--decoder-steps", type=int, default=None)
    parser.add_argument("--vae-minutes", type=float, default=None, help="the autoencoder stage's time limit")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    recipe = SMOKE if args.smoke else FINETUNE if args.init else Recipe()
    if args.init:
        recipe = replace(recipe, init_from=str(args.init))
    if args.decoder_steps is not None:
        recipe = replace(recipe, decoder_steps=args.decoder_steps)
    if args.vae_minutes is not None:
        recipe = replace(recipe, vae_minutes=args.vae_minutes)
    if args.unet_steps is not None:
        recipe = replace(recipe, unet_steps=args.unet_steps)
    if args.unet_batch is not None:
        recipe = replace(recipe, unet_batch=args.unet_batch)
    deadline = time.time() + args.minutes * 60 if args.minutes is not None else None
    if args.smoke and args.work == WORK_DIR:
        with tempfile.TemporaryDirectory() as tmp:
            out = args.out if args.out != MODEL_DIR else Path(tmp) / "model"
            run(recipe, Path(tmp) / "work", out, deadline)
        return
    run(recipe, args.work, args.out, deadline, args.stage)


if __name__ == "__main__":
    main()
