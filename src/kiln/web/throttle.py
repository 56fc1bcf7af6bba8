"""Slows down password guessing: after a few wrong passwords for one name, or from one address, the
sign-in form refuses for a while. Counted by `limits` in the storage that `throttle_storage_url` names
(`memory://`: this process; `redis://…`: every replica that shares the Redis). argon2 already makes
each guess slow. The calls are blocking I/O on a networked storage: make them off the event loop.
"""

from __future__ import annotations

import time

from limits import RateLimitItem, RateLimitItemPerSecond
from limits.storage import MovingWindowSupport, SlidingWindowCounterSupport, Storage, storage_from_string
from limits.strategies import (
    FixedWindowRateLimiter,
    MovingWindowRateLimiter,
    RateLimiter,
    SlidingWindowCounterRateLimiter,
)

NAMESPACE = "kiln-sign-in"
"""The first part of every key this throttle writes (so a shared Redis keeps it apart)."""


def _limiter(storage: Storage) -> RateLimiter:
    """The exact moving window where the storage has one (memory, Redis, MongoDB), else the
    closest it offers (a sliding-window counter on Memcached), so any `limits` URI works."""
    if isinstance(storage, MovingWindowSupport):
        return MovingWindowRateLimiter(storage)
    if isinstance(storage, SlidingWindowCounterSupport):
        return SlidingWindowCounterRateLimiter(storage)
    return FixedWindowRateLimiter(storage)


class SignInThrottle:
    """Keys are `name:…` (one account) or `addr:…` (one client address, which may be a proxy that
    many people share: hence its higher limit). Each counts wrong passwords in a window of
    `window_s`; at its limit, every try for that key waits until the oldest failure leaves it."""

    def __init__(
        self,
        storage_url: str = "memory://",
        max_failures: int = 5,
        window_s: int = 300,
        max_failures_per_address: int = 50,
        namespace: str = NAMESPACE,
    ) -> None:
        if window_s < 1 or max_failures < 1 or max_failures_per_address < 1:
            raise ValueError("the throttle's window and limits are at least 1")
        if storage_url.startswith("async+"):
            raise ValueError(f"the sign-in throttle needs a synchronous storage, not {storage_url!r}")
        self.storage = storage_from_string(storage_url)
        self._limiter = _limiter(self.storage)
        self.namespace = namespace
        self._per_name = RateLimitItemPerSecond(max_failures, window_s, namespace=namespace)
        self._per_address = RateLimitItemPerSecond(max_failures_per_address, window_s, namespace=namespace)

    def _item(self, key: str) -> RateLimitItem:
        return self._per_address if key.startswith("addr:") else self._per_name

    def retry_after_s(self, *keys: str) -> float:
        """Seconds until another try is allowed for all of `keys` (0: allowed now)."""
        wait = 0.0
        for key in keys:
            item = self._item(key)
            stats = self._limiter.get_window_stats(item, key)
            if stats.remaining <= 0:
                wait = max(wait, stats.reset_time - time.time())
        return wait

    def failed(self, *keys: str) -> None:
        for key in keys:
            self._limiter.hit(self._item(key), key)

    def succeeded(self, name_key: str) -> None:
        self._limiter.clear(self._item(name_key), name_key)

    def reachable(self) -> bool:
        """Whether the storage answers (always, for memory://)."""
        return bool(self.storage.check())
