"""Score the committed embedded model and write docs/embedded-model.md and docs/embedded-samples.png.

`python -m kiln.embedded.scorecard` loads the model exactly as the server does (plain
`DiffusionPipeline.from_pretrained`), generates at its serving defaults and reads every image back:
shapes by pixel analysis (`analyze.py`), words with Tesseract (`ocr.py`). It never trains and never
looks at the captions when scoring; the word reader is told only the colours the letters should
have and lie on, and is calibrated on true drawings first.
"""

from __future__ import annotations

import argparse
import json
import random
import textwrap
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from kiln.embedded.analyze import ATTRIBUTES, read_image, score
from kiln.embedded.captions import phrasings
from kiln.embedded.ocr import letter_accuracy, read_word
from kiln.embedded.scenes import KINDS, Scene, draw_scene, sample_scene, sample_text_scene, scene_batch
from kiln.embedded.text_captions import HELD_OUT_WORDS, TRAINING_WORDS, describe

MODEL_DIR = Path(__file__).parent / "model"
DOCS = Path("docs")
TARGET_ACCURACY = 0.90
TARGET_WORDS = 0.80
TARGET_LETTERS = 0.95
TARGET_SECONDS = 0.3
TARGET_MB = 30.0
TEXT_KINDS = KINDS[1:]
COMPOSER_PROMPTS = (
    ('a sign that says "KILN" on a green background', Scene("white", "sign", "centre", "large", "green", "KILN", "black", "sign")),
    ('a red sign that says "OPEN" on a blue background', Scene("red", "sign", "centre", "large", "blue", "OPEN", "white", "sign")),
    ('the word "HELLO" in black on a yellow background', Scene("black", "text", "centre", "large", "yellow", "HELLO", "black", "word")),
    (
        'a large white circle on the centre with the word "STOP" on it, on a red background',
        Scene("white", "circle", "centre", "large", "red", "STOP", "black", "shape_word"),
    ),
    ('a small blue square on the left on a orange background', Scene("blue", "square", "left", "small", "orange")),
)
"""The prompt composer's canonical phrasings (all in the training split), as the demo row."""


def load(model_dir: Path = MODEL_DIR):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(model_dir), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    defaults = json.loads((model_dir / "kiln.json").read_text())
    return pipe, defaults


def prompts(split: str, n: int, seed: int) -> list[tuple[str, Scene]]:
    """`n` plain-shape scenes with captions in phrasings of `split`, drawn from `seed`."""
    rng = random.Random(f"scorecard-{split}-{seed}")
    return [(describe(scene, rng, split), scene) for scene in (sample_scene(rng) for _ in range(n))]


def word_cases(words, seed: int, split: str = "train") -> list[tuple[str, Scene]]:
    """One scene a word, the kinds taking turns (sign, word alone, word on a shape)."""
    rng = random.Random(f"scorecard-words-{seed}")
    out = []
    for i, word in enumerate(words):
        scene = sample_text_scene(rng, word, TEXT_KINDS[i % len(TEXT_KINDS)])
        out.append((describe(scene, rng, split), scene))
    return out


def generate(pipe, texts: list[str], steps: int, guidance: float, seed: int, batch: int = 16):
    images = []
    for i in range(0, len(texts), batch):
        gen = torch.Generator().manual_seed(seed + i)
        images += pipe(
            texts[i : i + batch], num_inference_steps=steps, guidance_scale=guidance, generator=gen
        ).images
    return images


def accuracy(images, cases) -> dict[str, float]:
    hits = {name: 0 for name in ATTRIBUTES}
    for image, (_, scene) in zip(images, cases):
        for name, ok in score(read_image(image), scene).items():
            hits[name] += ok
    return {name: hits[name] / len(cases) for name in ATTRIBUTES}


def all_right(images, cases) -> float:
    """Share of images with every attribute right."""
    return float(np.mean([all(score(read_image(i), s).values()) for i, (_, s) in zip(images, cases)]))


def word_accuracy(images, cases) -> dict:
    """Exact-word and letter accuracy of what the reader reads, overall and by kind of scene."""
    reads = [(read_word(image, scene), scene) for image, (_, scene) in zip(images, cases)]
    def summary(rows):
        return {
            "words": float(np.mean([r == s.word for r, s in rows])) if rows else 0.0,
            "letters": float(np.mean([letter_accuracy(r, s.word) for r, s in rows])) if rows else 0.0,
            "n": len(rows),
        }
    out = summary(reads)
    out["by_kind"] = {kind: summary([(r, s) for r, s in reads if s.kind == kind]) for kind in TEXT_KINDS}
    out["examples"] = [(s.word, r) for r, s in reads[:12]]
    return out


def true_drawings(cases) -> list[Image.Image]:
    rng = random.Random("scorecard-true")
    return [draw_scene(scene, rng) for _, scene in cases]


def vae_reconstructions(pipe, cases) -> list[np.ndarray]:
    """The autoencoder's own reconstructions of true drawings: what the model could at best make."""
    rng = random.Random("scorecard-true")
    out = []
    for i in range(0, len(cases), 16):
        with torch.no_grad():
            images = torch.from_numpy(scene_batch([s for _, s in cases[i : i + 16]], rng))
            recon = pipe.vae.decode(pipe.vae.encode(images).latent_dist.mean).sample
        out += list(((recon.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy())
    return out


def seconds_per_image(pipe, steps: int, guidance: float, batch: int, repeats: int) -> tuple[float, float]:
    """Wall seconds per image, and CPU seconds per image / threads: what the wall time would be
    with the threads' cores to itself (the cores here are shared with other work)."""
    texts = [p for p, _ in word_cases(HELD_OUT_WORDS[:batch], seed=99)]
    pipe(texts, num_inference_steps=steps, guidance_scale=guidance)  # warm-up
    start, cpu = time.perf_counter(), time.process_time()
    for r in range(repeats):
        pipe(texts, num_inference_steps=steps, guidance_scale=guidance, generator=torch.Generator().manual_seed(r))
    n = repeats * batch
    return (time.perf_counter() - start) / n, (time.process_time() - cpu) / n / torch.get_num_threads()


def one_thread(measure):
    """Run `measure` with torch on one thread: on shared cores its CPU time is not inflated by
    threads spinning while they wait for each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return measure()
    finally:
        torch.set_num_threads(threads)


def sample_grid(images, texts, path: Path, cell: int = 256, cols: int = 4) -> None:
    font = ImageFont.load_default(size=13)
    text_h = 60
    rows = (len(images) + cols - 1) // cols
    grid = Image.new("RGB", (cols * cell, rows * (cell + text_h)), "white")
    draw = ImageDraw.Draw(grid)
    for i, (image, text) in enumerate(zip(images, texts)):
        x, y = (i % cols) * cell, (i // cols) * (cell + text_h)
        grid.paste(image.resize((cell - 8, cell - 8), Image.Resampling.NEAREST), (x + 4, y + 4))
        for j, line in enumerate(textwrap.wrap(text, 36)[:4]):
            draw.text((x + 4, y + cell + j * 14), line, fill="black", font=font)
    grid.save(path)


def disk_mb(model_dir: Path) -> float:
    return sum(f.stat().st_size for f in model_dir.rglob("*") if f.is_file()) / 1e6


def parameters(pipe) -> dict[str, int]:
    return {
        name: sum(p.numel() for p in getattr(pipe, name).parameters())
        for name in ("unet", "vae", "text_encoder")
    }


def sweep(pipe, n: int) -> list[tuple[int, float, dict]]:
    """Held-out words and held-out shape phrasings across step counts and guidance scales."""
    shapes = prompts("held_out", n, seed=7)
    words = word_cases(HELD_OUT_WORDS[:n], seed=7)
    out = []
    for steps in (5, 6, 10):
        for guidance in (2.0, 3.0, 4.0, 5.0):
            attrs = accuracy(generate(pipe, [p for p, _ in shapes], steps, guidance, 0), shapes)
            read = word_accuracy(generate(pipe, [p for p, _ in words], steps, guidance, 0), words)
            out.append((steps, guidance, attrs | {"words": read["words"], "letters": read["letters"]}))
    return out


def measure(pipe, defaults: dict, model_dir: Path, n: int, sweep_n: int, n_words: int | None = None) -> dict:
    steps, guidance = defaults["steps"], defaults["guidance_scale"]
    held = prompts("held_out", n, seed=0)
    train = prompts("train", n // 2, seed=0)
    held_words = word_cases(HELD_OUT_WORDS[:n_words], seed=0)
    train_words = word_cases(TRAINING_WORDS[: n_words or 60], seed=1)
    held_images = generate(pipe, [p for p, _ in held], steps, guidance, seed=0)
    train_images = generate(pipe, [p for p, _ in train], steps, guidance, seed=0)
    held_word_images = generate(pipe, [p for p, _ in held_words], steps, guidance, seed=0)
    train_word_images = generate(pipe, [p for p, _ in train_words], steps, guidance, seed=0)
    demo_images = generate(pipe, [p for p, _ in COMPOSER_PROMPTS], steps, guidance, seed=0)
    result = {
        "defaults": defaults,
        "held_out": accuracy(held_images, held),
        "train": accuracy(train_images, train),
        "all_held_out": all_right(held_images, held),
        "all_train": all_right(train_images, train),
        "n_held_out": len(held),
        "n_train": len(train),
        "words_held_out": word_accuracy(held_word_images, held_words),
        "words_train": word_accuracy(train_word_images, train_words),
        "reader_on_true": word_accuracy(true_drawings(held_words), held_words),
        "reader_on_vae": word_accuracy(vae_reconstructions(pipe, held_words[:60]), held_words[:60]),
        "shape_reader_on_vae": accuracy(vae_reconstructions(pipe, held), held),
        "demo": [(p, read_word(i, s) if s.word else "") for i, (p, s) in zip(demo_images, COMPOSER_PROMPTS)],
        "s_batch1": seconds_per_image(pipe, steps, guidance, 1, 10),
        "s_batch16": seconds_per_image(pipe, steps, guidance, 16, 1),
        "s_batch1_one_thread": one_thread(lambda: seconds_per_image(pipe, steps, guidance, 1, 5)),
        "disk_mb": disk_mb(model_dir),
        "parameters": parameters(pipe),
        "n_phrasings": len(phrasings("train")) + len(phrasings("held_out")),
        "n_phrasings_held_out": len(phrasings("held_out")),
        "machine": f"{torch.get_num_threads()} CPU threads, torch {torch.__version__}",
    }
    if sweep_n:
        result["sweep"], result["sweep_n"] = sweep(pipe, sweep_n), sweep_n
    grid = demo_images[:4] + held_word_images[:8] + held_images[:4]
    texts = [p for p, _ in COMPOSER_PROMPTS[:4]] + [p for p, _ in held_words[:8]] + [p for p, _ in held[:4]]
    return result, grid, texts


def main(argv: list[str] | None = None) -> None:
    from kiln.embedded.scorecard_doc import write_doc

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=MODEL_DIR)
    parser.add_argument("--n", type=int, default=160, help="held-out shape prompts to score")
    parser.add_argument("--words", type=int, default=None, help="score only the first N words of each list")
    parser.add_argument("--sweep", type=int, default=0, help="also sweep steps x guidance on N prompts")
    parser.add_argument("--docs", type=Path, default=DOCS)
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument("--analysis", type=Path, default=None, help="markdown to add under 'What falls short'")
    parser.add_argument("--from-json", type=Path, default=None, help="rewrite the doc from a saved result")
    parser.add_argument("--set-steps", type=int, default=None, help="change the serving default first")
    parser.add_argument("--set-guidance", type=float, default=None, help="change the serving default first")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    if args.set_steps is not None or args.set_guidance is not None:
        path = args.model / "kiln.json"
        defaults = json.loads(path.read_text())
        defaults["steps"] = args.set_steps if args.set_steps is not None else defaults["steps"]
        defaults["guidance_scale"] = (
            args.set_guidance if args.set_guidance is not None else defaults["guidance_scale"]
        )
        path.write_text(json.dumps(defaults, indent=2) + "\n")
    analysis = "\n" + args.analysis.read_text() if args.analysis else ""
    if args.from_json:
        write_doc(args.docs / "embedded-model.md", json.loads(args.from_json.read_text()), analysis)
        return
    pipe, defaults = load(args.model)
    result, grid, texts = measure(pipe, defaults, args.model, args.n, args.sweep, args.words)
    training = args.model / "training.json"
    if training.exists():
        result["training"] = json.loads(training.read_text())
    print(json.dumps({k: v for k, v in result.items() if k != "training"}, indent=1))
    if not args.no_write:
        args.docs.mkdir(exist_ok=True)
        sample_grid(grid, texts, args.docs / "embedded-samples.png")
        (args.docs / "embedded-scorecard.json").write_text(json.dumps(result, indent=1) + "\n")
        write_doc(args.docs / "embedded-model.md", result, analysis)


if __name__ == "__main__":
    main()
