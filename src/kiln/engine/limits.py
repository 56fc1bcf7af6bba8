"""How many images fit in one pipeline call, learned per batch key from the workers.

A worker that runs out of GPU memory splits its batch and reports the largest part that fit; from
then on the batcher forms batches of that key no larger than that (a single request bigger than it
still runs alone, and its worker splits it). It only ever lowers a limit, and never imports torch.
"""

from __future__ import annotations

from kiln.engine.types import BatchKey


class BatchLimits:
    def __init__(self) -> None:
        self._fit: dict[BatchKey, int] = {}

    def learn(self, key: BatchKey, fit_images: int | None) -> None:
        """A batch of `key` had to be split: `fit_images` was the most one call managed (None: no split)."""
        if fit_images is not None and fit_images >= 1:
            self._fit[key] = min(fit_images, self._fit.get(key, fit_images))

    def cap(self, key: BatchKey, max_images: int) -> int:
        """Most images a new batch of `key` may hold: the configured maximum, or less once learned."""
        return min(max_images, self._fit.get(key, max_images))

    def learned(self) -> dict[BatchKey, int]:
        return dict(self._fit)
