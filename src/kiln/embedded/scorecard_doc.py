"""Write docs/embedded-model.md from a scorecard result (see scorecard.py)."""

from __future__ import annotations

from pathlib import Path

from kiln.embedded.analyze import ATTRIBUTES
from kiln.embedded.captions import POSITION_FORMS, SIZE_WORDS
from kiln.embedded.components import LATENT_CHANNELS, LATENT_FACTOR, MAX_TOKENS
from kiln.embedded.scenes import COLORS, FONT_SIZE, KIND_WEIGHTS, LETTER_PITCH, WORD_GRID, POSITIONS, SHAPES, SIZES
from kiln.embedded.scorecard import (
    TARGET_ACCURACY,
    TARGET_LETTERS,
    TARGET_MB,
    TARGET_SECONDS,
    TARGET_WORDS,
)
from kiln.embedded.text_captions import HELD_OUT_WORDS, SIGN_FORMS, TRAINING_WORDS, WORD_CLAUSES, WORD_FORMS


def _pct(x: float) -> str:
    return f"{100 * x:.1f} %"


def _yes(ok: bool) -> str:
    return "yes" if ok else "**NO**"


def _word_rows(result: dict) -> str:
    rows = []
    for label, key in (("held-out words", "words_held_out"), ("training words", "words_train"),
                       ("reader on true drawings (held-out words)", "reader_on_true"),
                       ("reader on the autoencoder's reconstructions", "reader_on_vae")):
        r = result[key]
        kinds = " | ".join(f"{_pct(r['by_kind'][k]['words'])} / {_pct(r['by_kind'][k]['letters'])}"
                           for k in ("sign", "word", "shape_word"))
        rows.append(f"| {label} | {r['n']} | {_pct(r['words'])} | {_pct(r['letters'])} | {kinds} |")
    return "\n".join(rows)


def continued_line(training: dict) -> str:
    """How a run that went on from earlier weights (`--init`) got its starting point."""
    before, steps = training.get("continued_from"), 0
    if before is None:
        return "The shipped weights were fine-tuned from an earlier model."
    while before is not None:  # every run the weights went through, back to the first
        steps, before = steps + before.get("unet_steps_done", 0), before.get("continued_from")
    recipe = training["recipe"]
    return (
        f"The shipped weights went on from the model shipped before them (its autoencoder unchanged, its "
        f"UNet then trained {steps:,} steps) for {training.get('unet_steps_done', 0):,} more UNet steps at a "
        f"peak rate of {recipe['unet_lr']:g}, on a fresh {recipe['dataset_size']:,} scenes (seed {recipe['seed']})."
    )


def shortfalls(result: dict) -> list[str]:
    held, words = result["held_out"], result["words_held_out"]
    out = [f"{name} accuracy {_pct(held[name])} < 90 %" for name in ATTRIBUTES if held[name] < TARGET_ACCURACY]
    if words["words"] < TARGET_WORDS:
        out.append(f"held-out words read back exactly {_pct(words['words'])} < {_pct(TARGET_WORDS)}")
    if words["letters"] < TARGET_LETTERS:
        out.append(f"held-out letters read back {_pct(words['letters'])} < {_pct(TARGET_LETTERS)}")
    wall = result["s_batch1"][0]
    if wall >= TARGET_SECONDS:
        out.append(f"{wall:.3f} s per image at batch 1 on 2 threads is over {TARGET_SECONDS} s")
    if result["disk_mb"] > TARGET_MB:
        out.append(f"{result['disk_mb']:.1f} MB on disk is over {TARGET_MB} MB")
    return out


def write_doc(path: Path, result: dict, analysis: str = "") -> None:
    held, train = result["held_out"], result["train"]
    vae = result["shape_reader_on_vae"]
    rows = "\n".join(
        f"| {n} | {_pct(held[n])} | {_pct(train[n])} | {_pct(vae[n])} | {_yes(held[n] >= TARGET_ACCURACY)} |"
        for n in ATTRIBUTES
    )
    params = result["parameters"]
    tr = result.get("training", {})
    recipe = tr.get("recipe", {})
    sizes = recipe.get("sizes", {})
    d = result["defaults"]
    wh = result["words_held_out"]
    short = "\n".join(f"- {s}" for s in shortfalls(result)) or "- Nothing: every target is met."
    sweep_rows = "\n".join(
        f"| {s} | {g} | {_pct(a['words'])} | {_pct(a['letters'])} | "
        + " | ".join(_pct(a[n]) for n in ATTRIBUTES) + " |"
        for s, g, a in result.get("sweep", [])
    )
    sweep_block = (
        f"\n### Steps and guidance ({result.get('sweep_n', 0)} held-out words and {result.get('sweep_n', 0)} "
        "held-out shape phrasings each)\n\n| steps | guidance | words | letters | "
        + " | ".join(ATTRIBUTES) + " |\n|---|---|---|---|" + "---|" * len(ATTRIBUTES) + "\n" + sweep_rows + "\n"
        if sweep_rows else ""
    )
    demo = "\n".join(f"| `{p}` | {r or '–'} |" for p, r in result["demo"])
    examples = ", ".join(f"{w} → {r or '∅'}" for w, r in wh["examples"])
    notes = "".join(f"- {n}\n" for n in tr.get("notes", []))
    stages = ", ".join(f"{k.replace('_', ' ')} {v} min" for k, v in tr.get("stage_minutes", {}).items()) or (
        f"autoencoder, latents and decoder {tr.get('vae_and_data_seconds', 0) / 60:.0f} min, text encoder "
        f"{tr.get('text_seconds', 0) / 60:.0f} min, UNet {tr.get('unet_seconds', 0) / 60:.0f} min"
    )
    centre = POSITION_FORMS["centre"]
    if wh["words"] >= TARGET_WORDS:
        legible = ""
    elif wh["letters"] >= 0.5:
        legible = (
            f"**The words are only partly legible**: {_pct(wh['words'])} of held-out words read back exactly "
            f"and {_pct(wh['letters'])} of their letters (see the scorecard), short of the "
            f"{_pct(TARGET_WORDS)} asked for.\n\n"
        )
    else:
        legible = (
            f"**The words are not legible yet**: {_pct(wh['words'])} of held-out words read back (see the "
            "scorecard). The model draws the sign, or the band of text, in the right place and colours, "
            "without readable letters.\n\n"
        )
    attention_line = (
        f"one head of each cross-attention layer at {' and '.join(f'{r}x{r}' for r in recipe['attention_resolutions'])} "
        "latent cells is taught where each letter goes: at the cells a letter covers it must attend to that "
        f"letter's token (soft cross-entropy, weight {recipe.get('unet_attention_weight')}; `train_attention.py`);"
        if recipe.get("unet_attention_weight") else ""
    )
    if recipe.get("letter_losses_by") == 0:
        attention_line += " the letter-slot and letter-attention losses were on from this run's first step;"
    elif (switched := tr.get("letter_losses_from_step")) is not None and recipe.get("letter_losses_at"):
        attention_line += (
            f" the letter-slot and letter-attention losses waited for the colours: on from step {switched} "
            f"(the first eval reading colour and background at {_pct(recipe['letter_losses_at'])}, or step "
            f"{recipe.get('letter_losses_by')} at the latest);"
        )
    init_line = continued_line(tr) if recipe.get("init_from") else ""
    path.write_text(f"""# Kiln's embedded model

A tiny text-to-image model that Kiln trains itself and ships in the repository
(`src/kiln/embedded/model/`), so `kiln serve` and the tests work offline with no downloads. It draws
one of four kinds of picture, always on a flat background of one of **8 colours**
({", ".join(COLORS)}):

- one flat-coloured **{", ".join(SHAPES)}**, **{" or ".join(SIZES)}**, on the **{", ".join(POSITIONS)}**;
- the same shape **with a word on it** (white letters on dark shapes, black on light ones);
- a **sign that says** a word (a white sign unless a colour is given);
- a **word alone** in a given colour.

{legible}A word is **2–6 capital letters A–Z in double quotes** (`"KILN"`); the tokenizer spells it letter by
letter, so any such word can be asked for, including words never seen in training. Any other words
map to an unknown token and are ignored.

The phrasings it is trained on include these (the prompt composer's canonical ones):

```
a {{size}} {{color}} {{shape}} on the {{position}} on a {{background}} background
a {{size}} {{color}} {{shape}} on the {{position}} with the word "{{WORD}}" on it, on a {{background}} background
a sign that says "{{WORD}}" on a {{background}} background
a {{color}} sign that says "{{WORD}}" on a {{background}} background
the word "{{WORD}}" in {{text_color}} on a {{background}} background
```

with size ∈ {{{", ".join(w for ws in SIZE_WORDS.values() for w in ws)}}}, colours as above (also
scarlet, violet), shape ∈ {{circle, disc, disk, dot, square, box, block, triangle, ...}}, position ∈
{{{", ".join(POSITIONS)}}} (`on the centre` is accepted as written; the grammar's own centre forms
are {", ".join(f"`{c}`" for c in centre[:-1])}). The word may also be introduced as
{", ".join(f"`{c.format(w='...')}`" for c in WORD_CLAUSES[:6])}, a sign as
{", ".join(f"`{f[0].format(a='a', w='...')}`" for f in SIGN_FORMS[:5])}, a word alone as
{", ".join(f"`{f.format(w='...', t='red')}`" for f in WORD_FORMS[:5])}, and more.

It is a plain diffusers `StableDiffusionPipeline` (VAE, CLIP text encoder, word-level tokenizer
that spells quoted words, UNet, {d["scheduler"]}); no custom code is needed to load it:

```python
from diffusers import DiffusionPipeline, StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline
pipe = DiffusionPipeline.from_pretrained("src/kiln/embedded/model", local_files_only=True)
image = pipe('a sign that says "KILN" on a green background', num_inference_steps={d["steps"]},
             guidance_scale={d["guidance_scale"]}).images[0]
edit = StableDiffusionImg2ImgPipeline(**pipe.components)     # edits without a mask
inpaint = StableDiffusionInpaintPipeline(**pipe.components)  # {LATENT_CHANNELS}-channel UNet: legacy inpainting
```

Serving defaults are in `model/kiln.json`: native size {d["native_size"]}x{d["native_size"]},
{d["steps"]} steps, guidance {d["guidance_scale"]}. Larger sizes are served by generating at
{d["native_size"]}x{d["native_size"]} and resizing the image (the server does this).

## Scorecard

`python -m kiln.embedded.scorecard` (default steps and guidance, seed 0; the model loaded as the
server loads it).

**Words** are read back with Tesseract (`ocr.py`): the image is upscaled 6x (bicubic), binarised
by the letter colour the scene calls for against the colours it may lie on, and read as one line
(`--psm 7`, whitelist A–Z). Exact = the whole word right; letters = 1 − edit distance / length.
Held-out words are {len(HELD_OUT_WORDS)} real words never drawn in training (`HELD_OUT_WORDS`);
training words are {result["words_train"]["n"]} of the {len(TRAINING_WORDS)} real words drawn in training beside random
strings (`TRAINING_WORDS`). Each word is asked for once, the kinds taking turns, in training phrasings.
The first rows score the model; the last two score the reader, on true drawings and on the
autoencoder's reconstructions of them (an upper bound for the model).

| words | n | exact | letters | sign (exact / letters) | word alone | on a shape |
|---|---|---|---|---|---|---|
{_word_rows(result)}

Held-out examples (asked → read): {examples}.

**Shapes** are read back by pixel analysis (`analyze.py`: background = median border colour,
object = pixels far from it, colour = nearest palette colour of their median, position = nearest
place of the centroid, shape = the best-overlapping circle, square or triangle template of that
area, size = that template's radius; 100 % right on true drawings), on {result["n_held_out"]}
prompts in held-out phrasings (sentence structures the training split never produced) and
{result["n_train"]} in training phrasings.

| attribute | held-out phrasings | training phrasings | reader on the autoencoder's reconstructions | ≥ 90 % |
|---|---|---|---|---|
{rows}
| all five right | {_pct(result["all_held_out"])} | {_pct(result["all_train"])} | | |

The composer's phrasings (seed 0), read back:

| prompt | read |
|---|---|
{demo}

| measure | value | target |
|---|---|---|
| held-out words read exactly | {_pct(wh["words"])} | ≥ {_pct(TARGET_WORDS)} |
| held-out letters read | {_pct(wh["letters"])} | ≥ {_pct(TARGET_LETTERS)} |
| seconds per image, batch 1 ({d["steps"]} steps, guidance {d["guidance_scale"]}), 2 threads: wall time (CPU time / 2 threads) | {result["s_batch1"][0]:.3f} s ({result["s_batch1"][1]:.3f} s) | < {TARGET_SECONDS} s |
| seconds per image, batch 1, 1 thread: wall time (CPU time) | {result.get("s_batch1_one_thread", [0, 0])[0]:.3f} s ({result.get("s_batch1_one_thread", [0, 0])[1]:.3f} s) | |
| seconds per image, batch 16: CPU time / 2 threads (wall time) | {result["s_batch16"][1]:.3f} s ({result["s_batch16"][0]:.3f} s) | |
| size on disk | {result["disk_mb"]:.1f} MB | ≤ {TARGET_MB:.0f} MB |
| parameters | {sum(params.values()) / 1e6:.2f} M (UNet {params["unet"] / 1e6:.2f} M, VAE {params["vae"] / 1e6:.2f} M, text encoder {params["text_encoder"] / 1e6:.2f} M) | |

Measured on {result["machine"]}, with nothing else running on the 2 cores.
{sweep_block}
### What falls short

{short}
{analysis}
![samples](embedded-samples.png)

`embedded-samples.png`: the composer's phrasings, then held-out words, then held-out shape
phrasings, with the images the model made for them (seed 0, serving defaults), upscaled 4x with
nearest-neighbour. The numbers behind this page are in `embedded-scorecard.json`.

## How it is trained

`python -m kiln.embedded.train --init DIR` fine-tunes a pipeline (the `FINETUNE` recipe; without
`--init` the `Recipe` defaults train from scratch). Seeded and resumable; checkpoints and
`train.log` in `var/embedded-train/`; `--minutes` is a wall-clock deadline for the whole run;
`--smoke` runs a tiny config in a temp dir, which the tests do. {init_line}

- **Data**: `scenes.py` draws scenes procedurally at {d["native_size"]}x{d["native_size"]} (4x supersampled): {KIND_WEIGHTS[0] * 100:.0f} % plain
  shapes, {KIND_WEIGHTS[1] * 100:.0f} % shapes with a word, {KIND_WEIGHTS[2] * 100:.0f} % signs, {KIND_WEIGHTS[3] * 100:.0f} % words alone. Letters are Pillow's default
  font at size {FONT_SIZE}, a little emboldened, one to a {LETTER_PITCH}-pixel cell, the word's box on a
  {WORD_GRID}-pixel grid (one cell of the UNet's 8x8 level a letter), centred on the shape or the picture. Training words are random 2–6
  letter strings (75 %) and the real `TRAINING_WORDS` (25 %), never a held-out word.
  `captions.py` describes shapes from a compositional grammar ({result["n_phrasings"]} phrasings,
  {result["n_phrasings_held_out"]} of them held out by a stable hash); `text_captions.py` adds the
  word clauses, sign and word forms and frames, held out the same way (the composer's phrasings
  are always in training).
- **Tokenizer**: word-level over the grammar's vocabulary plus the letters a–z and `"` (the shape
  words keep their old ids); a pre-tokenizer isolates `"..."` and splits its letters, so `"KILN"`
  is `" k i l n "` ({MAX_TOKENS} tokens at most, `PreTrainedTokenizerFast`).
- **Autoencoder**: `AutoencoderKL` {d["native_size"]}x{d["native_size"]}x3 → {d["native_size"] // LATENT_FACTOR}x{d["native_size"] // LATENT_FACTOR}x{LATENT_CHANNELS}, channels
  {tuple(sizes.get("vae_channels", ()))} (one downsampling: a letter is {LETTER_PITCH / LATENT_FACTOR} latent cells wide), no attention; batch {recipe.get("vae_batch")}, lr {recipe.get("vae_lr")}, MSE + L1 with object
  pixels weighted 4x and pixels near any edge (shape outlines, letter strokes) 8x more, + a small
  KL; `scaling_factor` = 1 / latent std; latents of {recipe.get("dataset_size")} scenes cached once;
  then the decoder alone polished on those mean latents with the same weights.
- **Text encoder**: `CLIPTextModel` ({sizes.get("text_layers")} layers, width {sizes.get("text_hidden")}; new token rows
  random, positions 32–47 copied from 31), trained with linear heads that read the kind of
  scene, the five attributes and each of the word's six letters from the `<eos>` position and
  every pad after it; the heads are thrown away, and the encoder then keeps learning with the
  UNet at lr {recipe.get("unet_text_lr")} (its EMA ships), so each letter's hidden state says what the
  UNet's cross-attention needs to put that letter in its place; small letter-slot heads (weight
  {recipe.get("unet_slot_weight")}) make each letter's hidden state say which letter it is and its place in the word.
- **UNet**: `UNet2DConditionModel` channels {tuple(sizes.get("unet_channels", ()))}, on {d["native_size"] // LATENT_FACTOR}x{d["native_size"] // LATENT_FACTOR} latents,
  cross-attention at every level below the first (a letter is about two cells at the next),
  the caption also pooled into the time embedding (`addition_embed_type="text"`); v-prediction,
  linear betas, min-SNR-{recipe.get("min_snr")} weighting, the loss per latent cell weighted like the
  autoencoder's (object {recipe.get("unet_object_weight")}x, near an edge {recipe.get("unet_edge_weight")}x more: letter strokes and outlines), AdamW {recipe.get("unet_lr")}, batch {recipe.get("unet_batch")},
  {recipe.get("cond_dropout", 0) * 100:.0f} % empty captions, EMA {recipe.get("ema_decay")} of the weights ships;
  {attention_line}
  {tr.get("unet_steps_done", "?")} steps. Every {recipe.get("eval_every")} steps the EMA model draws {recipe.get("eval_prompts")} held-out prompts
  (half held-out words) and the best so far is saved.
- Each stage runs to its planned steps or its minutes, whichever comes first, its learning rate
  following the larger of the two fractions, so a busy machine shortens a stage instead of
  cutting it off at full learning rate.
- **Time**: {stages}. UNet and VAE saved in fp16 (they load as fp32), the text encoder in fp32.
{notes}""")
