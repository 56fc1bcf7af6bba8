"""Slows down password guessing: after a few wrong passwords for one name, or from one address, the
sign-in form refuses for a while. Per process and in memory; argon2 already makes each guess slow.
"""

from __future__ import annotations

import time
from collections import defaultdict, deque
from collections.abc import Callable


class SignInThrottle:
    """Keys are `name:…` (one account) or `addr:…` (one client address, which may be a proxy that
    many people share: hence its higher limit)."""

    def __init__(
        self,
        max_failures: int = 5,
        window_s: float = 300.0,
        max_failures_per_address: int = 50,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_failures = max_failures
        self.max_failures_per_address = max_failures_per_address
        self.window_s = window_s
        self._clock = clock
        self._failures: dict[str, deque[float]] = defaultdict(deque)

    def _recent(self, key: str) -> deque[float]:
        failures = self._failures[key]
        while failures and self._clock() - failures[0] > self.window_s:
            failures.popleft()
        if not failures:
            del self._failures[key]  # keep the table as small as the attack
            return deque()
        return failures

    def retry_after_s(self, *keys: str) -> float:
        """Seconds until another try is allowed for all of `keys` (0: allowed now)."""
        wait = 0.0
        for key in keys:
            failures = self._recent(key)
            limit = self.max_failures_per_address if key.startswith("addr:") else self.max_failures
            if len(failures) >= limit:
                wait = max(wait, failures[-limit] + self.window_s - self._clock())
        return wait

    def failed(self, *keys: str) -> None:
        for key in keys:
            self._failures[key].append(self._clock())

    def succeeded(self, name_key: str) -> None:
        self._failures.pop(name_key, None)
