"""The moderation hook: a configurable word blocklist checked before anything is reserved.

It must stay cheap and deterministic; a refused prompt never costs the user quota.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from kiln.errors import ModerationBlocked


class Moderation:
    def __init__(self, blocklist: Iterable[str]) -> None:
        words = [w.strip() for w in blocklist if w.strip()]
        self._pattern = (
            re.compile(r"\b(" + "|".join(re.escape(w) for w in words) + r")\b", re.IGNORECASE)
            if words
            else None
        )

    def blocked(self, prompt: str) -> bool:
        return bool(self._pattern and self._pattern.search(prompt))

    def check(self, prompt: str) -> None:
        """Raise ModerationBlocked (400 image_generation_user_error) for a prompt on the blocklist."""
        if self.blocked(prompt):
            raise ModerationBlocked(
                "Your request was rejected as a result of our safety system.", param="prompt"
            )
