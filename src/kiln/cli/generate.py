"""`kiln generate`: one image from a sentence, no server, with a progress bar per denoising step."""

from __future__ import annotations

import re
import secrets
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from kiln.errors import InvalidRequest

_SIZE_RE = re.compile(r"^(\d{1,5})x(\d{1,5})$")
MAX_SIDE = 2048


def parse_size(value: str | None, native: int) -> tuple[int, int]:
    """'WxH' (8–2048 each) or 'auto' (the model's native size)."""
    if value is None or value == "auto":
        return native, native
    match = _SIZE_RE.match(value.strip().lower())
    if not match:
        raise InvalidRequest(f"size must look like 512x512 or be 'auto', not {value!r}", param="size")
    width, height = int(match[1]), int(match[2])
    if not (8 <= width <= MAX_SIDE and 8 <= height <= MAX_SIDE):
        raise InvalidRequest(f"size sides must be between 8 and {MAX_SIDE} pixels, not {value}", param="size")
    return width, height


def output_paths(output: Path, n: int) -> list[Path]:
    if n == 1:
        return [output]
    return [output.with_name(f"{output.stem}-{i + 1}{output.suffix}") for i in range(n)]


def generate(
    ctx: typer.Context,
    prompt: Annotated[str, typer.Argument(help="What to draw.")],
    n: Annotated[int, typer.Option("-n", "--n", min=1, max=10, help="Number of images.")] = 1,
    size: Annotated[str | None, typer.Option(help="WxH, e.g. 256x256 (default: the model's own).")] = None,
    steps: Annotated[int | None, typer.Option(min=1, max=200, help="Denoising steps.")] = None,
    seed: Annotated[int | None, typer.Option(min=0, max=2**31 - 1, help="Seed (default: random).")] = None,
    model: Annotated[str | None, typer.Option(help="Model name or alias.")] = None,
    output: Annotated[Path, typer.Option("-o", "--output", help="File to write (.png, .jpg, .webp).")] = Path(
        "kiln.png"
    ),
) -> None:
    """Generate images from a sentence with a local model, without a server."""
    from kiln.worker.registry import ModelRegistry
    from kiln.worker.requests import BatchSpec, GenerationRequest, StepProgress
    from kiln.worker.runner import run_batch

    err = Console(stderr=True)
    if not prompt.strip():
        raise InvalidRequest("the prompt is empty", param="prompt")
    if output.suffix.lower() not in (".png", ".jpg", ".jpeg", ".webp"):
        raise InvalidRequest(f"output must end in .png, .jpg or .webp, not {output.name!r}", param="output")
    if not output.parent.exists():
        raise InvalidRequest(f"output directory {output.parent} does not exist", param="output")
    settings = ctx.obj.settings()
    registry = ModelRegistry.from_settings(settings)
    info = registry.info(model)
    width, height = parse_size(size, info.native_size)
    spec = BatchSpec(
        model=info.name, width=width, height=height, steps=steps or info.steps,
        guidance_scale=info.guidance_scale,
    )
    request = GenerationRequest(request_id="cli", prompt=prompt, seed=seed if seed is not None else
                                secrets.randbelow(2**31), n=n)
    import torch

    torch.set_num_threads(settings.torch_threads)
    started = time.perf_counter()
    with Progress(
        TextColumn("[bold]denoising"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=err, transient=False,
    ) as progress:
        task = progress.add_task("steps", total=spec.steps)
        registry.pipeline(info.name)

        def on_progress(update: StepProgress) -> None:
            progress.update(task, completed=update.step)

        images = run_batch(registry, spec, [request], on_progress=on_progress)["cli"]
    for i, (path, image) in enumerate(zip(output_paths(output, n), images, strict=True)):
        image.save(path)
        err.print(f"wrote {path} ({width}x{height}, seed {request.seed + i})")
    err.print(f"[dim]{time.perf_counter() - started:.2f} s with model {info.name}[/]")
