"""Out of GPU memory is a batch too big for this worker, not a failure: split it in halves and try
again, down to one image, freeing cached memory between tries. Only a single image that does not fit
fails the batch (as `out_of_memory`). Torch is imported only to free memory.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


def is_oom(exc: BaseException) -> bool:
    """torch.OutOfMemoryError (torch.cuda's is the same class), or a RuntimeError saying so (what
    older kernels and cuDNN/cuBLAS raise)."""
    return type(exc).__name__ == "OutOfMemoryError" or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()
    )


def release_memory() -> None:
    """Give cached blocks back between tries, so the half-size call starts from a clean allocator."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@dataclass(frozen=True)
class Split(Generic[Result]):
    results: list[Result]
    """One per item, in order."""
    fit: int | None
    """The largest chunk that ran after an out-of-memory split; None when nothing had to be split."""


def run_in_chunks(
    items: Sequence[Item],
    call: Callable[[Sequence[Item], int], list[Result]],
    *,
    start: int | None = None,
    release: Callable[[], None] = release_memory,
) -> Split[Result]:
    """`call(chunk, done)` over consecutive chunks (`done`: items finished before it), all of them at
    first (or `start`); on out of memory the failing chunk is halved and retried, and the chunks after
    it keep the size that fit. Any other error, or out of memory on one item, is raised."""
    size = max(1, min(len(items), start or len(items)))
    split = size < len(items)
    results: list[Result] = []
    fit = 0
    while len(results) < len(items):
        chunk = items[len(results) : len(results) + size]
        try:
            out = call(chunk, len(results))
        except Exception as exc:
            if not is_oom(exc) or len(chunk) == 1:
                raise
            out = None
        if out is None:  # outside the except: its traceback (and the tensors it holds) is gone by now
            release()
            size = max(1, len(chunk) // 2)
            split = True
            continue
        results.extend(out)
        fit = max(fit, len(chunk))
    return Split(results, fit if split else None)
