"""The body of one worker process: load the registry, run batches sent down a pipe, report back.

Runs only in a spawned child; this is where torch gets imported (through `run_batch`), never in
the parent. Cancel arrives on the same pipe and is read between denoising steps.
"""

from __future__ import annotations

import time
from collections import deque
from multiprocessing.connection import Connection
from typing import Any

from kiln.worker.registry import ModelInfo, ModelRegistry


def worker_main(
    worker_id: str,
    inbox: Connection,
    outbox: Connection,
    models: dict[str, ModelInfo],
    aliases: dict[str, str],
    default: str,
    torch_threads: int,
) -> None:
    import torch

    torch.set_num_threads(torch_threads)
    registry = ModelRegistry(models, aliases, default)
    try:  # load the default model now, so a restarted worker is warm before its first batch
        registry.pipeline(default)
    except Exception:  # noqa: BLE001 - a model that cannot load fails its batches, with the reason
        pass
    outbox.send(("ready", worker_id))
    pending: deque[Any] = deque()
    while True:
        try:
            message = pending.popleft() if pending else inbox.recv()
        except (EOFError, OSError):
            return
        if message[0] == "stop":
            return
        if message[0] == "run":
            _run(registry, message[1], inbox, outbox, pending)
        # a "cancel" for a batch that already finished is stale: drop it


def _run(registry: ModelRegistry, batch: Any, inbox: Connection, outbox: Connection, pending: deque) -> None:
    from kiln.worker.requests import StepProgress
    from kiln.worker.runner import Cancelled, png_bytes, run_batch

    batch_id = batch.batch_id
    cancelled = False

    def should_cancel() -> bool:
        nonlocal cancelled
        while inbox.poll():
            message = inbox.recv()
            if message[0] == "cancel":
                cancelled = cancelled or message[1] == batch_id
            else:
                pending.append(message)
        return cancelled

    def on_progress(progress: StepProgress) -> None:
        outbox.send(("progress", batch_id, progress.step, progress.total, progress.previews))

    outbox.send(("started", batch_id))
    started = time.perf_counter()
    try:
        images = run_batch(
            registry,
            batch.spec,
            batch.requests,
            on_progress=on_progress,
            should_cancel=should_cancel,
            preview_every=batch.preview_every,
        )
    except Cancelled:
        outbox.send(("cancelled", batch_id))
        return
    except Exception as exc:  # noqa: BLE001 - every pipeline failure is reported, the worker lives on
        outbox.send(("failed", batch_id, _failure_code(exc), f"{type(exc).__name__}: {exc}"[:500]))
        _release_memory()
        return
    duration_s = time.perf_counter() - started
    pngs = {rid: tuple(png_bytes(image) for image in imgs) for rid, imgs in images.items()}
    outbox.send(("completed", batch_id, pngs, duration_s))


def _failure_code(exc: BaseException) -> str:
    if type(exc).__name__ == "OutOfMemoryError" or "out of memory" in str(exc).lower():
        return "out_of_memory"
    return "generation_failed"


def _release_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
