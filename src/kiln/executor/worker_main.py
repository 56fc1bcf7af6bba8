"""The body of one worker process: pin it to its GPU, load the registry, run batches sent down a pipe.

Runs only in a spawned child; this is where torch gets imported (after the pinning, so CUDA sees
only this worker's GPU), never in the parent. Cancel arrives on the same pipe and is read between
denoising steps. Messages both ways are the dataclasses of `kiln.executor.messages`; the batch
itself runs in `kiln.executor.batch_runner`, as it does on a Ray actor.
"""

from __future__ import annotations

from collections import deque
from multiprocessing.connection import Connection

from kiln.executor.batch_runner import BatchRunner, pin_to_gpu, visible_devices
from kiln.executor.messages import CancelBatch, RunBatch, Stop, ToWorker, WorkerReady
from kiln.worker.registry import ModelInfo, ModelRegistry


def worker_main(
    worker_id: str,
    inbox: Connection,
    outbox: Connection,
    models: dict[str, ModelInfo],
    aliases: dict[str, str],
    default: str,
    torch_threads: int,
    gpu: str | None = None,
) -> None:
    pin_to_gpu(gpu)  # before torch: CUDA reads the variable when it starts
    import torch

    torch.set_num_threads(torch_threads)
    runner = BatchRunner(worker_id, ModelRegistry(models, aliases, default), outbox.send)
    outbox.send(WorkerReady(worker_id, runner.load_default(), visible_devices()))
    pending: deque[ToWorker] = deque()
    while True:
        try:
            message = pending.popleft() if pending else inbox.recv()
        except (EOFError, OSError):
            return
        if isinstance(message, Stop):
            return
        if isinstance(message, RunBatch):
            runner.run(message.batch, _cancel_reader(message.batch.batch_id, inbox, pending))
        # a CancelBatch for a batch that already finished is stale: drop it


def _cancel_reader(batch_id: str, inbox: Connection, pending: deque[ToWorker]):  # type: ignore[no-untyped-def]
    """`should_cancel` for one batch: reads the pipe between steps, keeping what is not a cancel."""
    cancelled = False

    def should_cancel() -> bool:
        nonlocal cancelled
        while inbox.poll():
            message = inbox.recv()
            if isinstance(message, CancelBatch):
                cancelled = cancelled or message.batch_id == batch_id
            else:
                pending.append(message)
        return cancelled

    return should_cancel
