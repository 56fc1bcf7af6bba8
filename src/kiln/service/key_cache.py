"""API keys looked up in memory: a key's account is read once, then answered from here; a revocation
made by any process is learned within `refresh_s` (a poll of the keys revoked since the last one),
and the account behind a key (its plan) is read again in the background every `ttl_s`.

Unknown keys are remembered as unknown for `ttl_s` (bounded), so a flood of one bad key costs no
read; a flood of random keys costs one indexed read each, off the event loop.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from kiln.db.models import ApiKey, User, utcnow
from kiln.errors import AuthenticationFailed
from kiln.service.accounts import KEY_PREFIX, Account, hash_key

log = logging.getLogger(__name__)

MAX_UNKNOWN = 100_000


@dataclass
class _Entry:
    account: Account | None
    """None: no such key, or revoked."""
    loaded_at: float
    prefix: str = ""


def _lookup(db: sessionmaker[Session], key_hash: str) -> tuple[Account | None, str]:
    with db() as session:
        row = session.execute(
            select(User.id, User.name, User.plan_name, User.is_admin, ApiKey.revoked_at, ApiKey.prefix)
            .join(User, User.id == ApiKey.user_id).where(ApiKey.key_hash == key_hash)
        ).first()
    if row is None or row.revoked_at is not None:
        return None, ""
    return Account(user_id=row.id, name=row.name, plan_name=row.plan_name, is_admin=row.is_admin), row.prefix


def _revoked_since(db: sessionmaker[Session], since: dt.datetime) -> list[str]:
    with db() as session:
        return list(session.scalars(select(ApiKey.key_hash).where(ApiKey.revoked_at >= since)))


class KeyCache:
    def __init__(
        self,
        db: sessionmaker[Session],
        *,
        refresh_s: float = 0.5,
        ttl_s: float = 10.0,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.db = db
        self.refresh_s = refresh_s
        self.ttl_s = ttl_s
        self._monotonic = monotonic
        self._known: dict[str, _Entry] = {}
        self._unknown: OrderedDict[str, float] = OrderedDict()
        self._refreshing: set[str] = set()
        self._task: asyncio.Task[None] | None = None
        self._since = utcnow()
        self.reads = 0

    async def start(self) -> None:
        self._since = utcnow() - dt.timedelta(seconds=5)
        self._task = asyncio.create_task(self._watch_revocations(), name="kiln-key-revocations")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def authenticate(self, key: str) -> Account:
        """The key's account, or AuthenticationFailed (unknown, malformed or revoked)."""
        if not key.startswith(KEY_PREFIX):
            raise AuthenticationFailed("Incorrect API key provided. Kiln keys start with 'kiln-'.")
        key_hash = hash_key(key)
        now = self._monotonic()
        entry = self._known.get(key_hash)
        if entry is None:
            seen = self._unknown.get(key_hash)
            if seen is not None and now - seen < self.ttl_s:
                raise _refused()
            self.reads += 1
            account, prefix = await asyncio.to_thread(_lookup, self.db, key_hash)
            self._remember(key_hash, account, now, prefix)
            if account is None:
                raise _refused()
            return account
        if now - entry.loaded_at > self.ttl_s and key_hash not in self._refreshing:
            self._refreshing.add(key_hash)  # answer from memory; learn plan changes in the background
            asyncio.get_running_loop().create_task(self._refresh(key_hash))
        if entry.account is None:
            raise _refused()
        return entry.account

    def forget(self, key_hash: str) -> None:
        """A revoked key: refused from now on."""
        self._known[key_hash] = _Entry(None, self._monotonic())

    def forget_prefix(self, prefix: str) -> None:
        """A key revoked through this process (known by its prefix): refused at once."""
        for key_hash in [h for h, e in self._known.items() if e.prefix == prefix]:
            self.forget(key_hash)

    def _remember(self, key_hash: str, account: Account | None, now: float, prefix: str = "") -> None:
        if account is None:
            self._known.pop(key_hash, None)
            self._unknown[key_hash] = now
            self._unknown.move_to_end(key_hash)
            while len(self._unknown) > MAX_UNKNOWN:
                self._unknown.popitem(last=False)
        else:
            self._unknown.pop(key_hash, None)
            self._known[key_hash] = _Entry(account, now, prefix)

    async def _refresh(self, key_hash: str) -> None:
        try:
            self.reads += 1
            account, prefix = await asyncio.to_thread(_lookup, self.db, key_hash)
            self._remember(key_hash, account, self._monotonic(), prefix)
        except Exception:  # noqa: BLE001 - keep the cached answer; try again next time
            log.exception("re-reading an API key failed")
        finally:
            self._refreshing.discard(key_hash)

    async def _watch_revocations(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_s)
            try:
                # Overlap the windows by a second: a revocation committed late with an earlier
                # timestamp is still seen (forgetting twice is harmless).
                started = utcnow() - dt.timedelta(seconds=1)
                for key_hash in await asyncio.to_thread(_revoked_since, self.db, self._since):
                    if key_hash in self._known:
                        self.forget(key_hash)
                self._since = started
            except Exception:  # noqa: BLE001 - a database hiccup must not end the watch
                log.exception("reading key revocations failed")


def _refused() -> AuthenticationFailed:
    return AuthenticationFailed("Incorrect API key provided, or the key was revoked.")
