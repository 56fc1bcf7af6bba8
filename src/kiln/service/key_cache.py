"""API keys answered from memory: every live key's account is loaded at start, keys created since are
picked up the first time they are used (one shared read catches up on all new keys, at most every
`catch_up_s`), a revocation made by any process is learned within `refresh_s`, and the account behind
a key (its plan) is read again in the background every `ttl_s`.

So a flood of bad keys, random ones included, costs at most one small read per `catch_up_s`, and a
flood of one good key none at all. Memory: one entry per live key (about 300 bytes).

With Redis (`announce` set), a key revoked through any replica is announced and refused by every
other within a second; `resync` (after a lost subscription) reads the revocations again at once.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import Select, select
from sqlalchemy.orm import Session, sessionmaker

from kiln.db.models import ApiKey, User, utcnow
from kiln.errors import AuthenticationFailed
from kiln.service.accounts import KEY_PREFIX, Account, hash_key

log = logging.getLogger(__name__)

OVERLAP = dt.timedelta(seconds=2)
"""Windows of "since the last look" overlap by this much: a row committed late with an earlier
timestamp is still seen (seeing one twice is harmless)."""


@dataclass
class _Entry:
    account: Account | None
    """None: revoked."""
    loaded_at: float
    prefix: str = ""


def _keys() -> Select:
    return (select(ApiKey.key_hash, ApiKey.prefix, ApiKey.revoked_at, User.id, User.name, User.plan_name,
                   User.is_admin).join(User, User.id == ApiKey.user_id))


def _account(row) -> Account | None:  # type: ignore[no-untyped-def]
    if row.revoked_at is not None:
        return None
    return Account(user_id=row.id, name=row.name, plan_name=row.plan_name, is_admin=row.is_admin)


def _read(db: sessionmaker[Session], query: Select) -> list:  # type: ignore[type-arg]
    with db() as session:
        return list(session.execute(query))


class KeyCache:
    def __init__(
        self,
        db: sessionmaker[Session],
        *,
        refresh_s: float = 0.5,
        ttl_s: float = 10.0,
        catch_up_s: float = 0.05,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.db = db
        self.refresh_s = refresh_s
        self.ttl_s = ttl_s
        self.catch_up_s = catch_up_s
        self._monotonic = monotonic
        self._known: dict[str, _Entry] = {}
        self._refreshing: set[str] = set()
        self._task: asyncio.Task[None] | None = None
        self._revoked_since = utcnow()
        self._created_since = utcnow()
        self._caught_up_at = float("-inf")
        self._read_started_at = float("-inf")
        """When the latest read of new keys began: a key is known once a read began after it was used."""
        self._catching: asyncio.Future[None] | None = None
        self._poke = asyncio.Event()
        self.reads = 0
        self.announce: Callable[[str], None] | None = None
        """Tells the other replicas of a key revoked here (by its prefix); None: no one to tell."""

    async def start(self) -> None:
        started = utcnow() - OVERLAP
        self._read_started_at = self._monotonic()
        rows = await asyncio.to_thread(_read, self.db, _keys().where(ApiKey.revoked_at.is_(None)))
        now = self._monotonic()
        for row in rows:
            self._known[row.key_hash] = _Entry(_account(row), now, row.prefix)
        self._revoked_since = self._created_since = started
        self._caught_up_at = now
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
        entry = self._known.get(key_hash)
        if entry is None:  # perhaps a key made since the last look: catch up on all new ones
            await self._catch_up(after=self._monotonic())
            entry = self._known.get(key_hash)
            if entry is None:
                raise _refused()
        elif self._monotonic() - entry.loaded_at > self.ttl_s and key_hash not in self._refreshing:
            self._refreshing.add(key_hash)  # answer from memory; learn plan changes in the background
            asyncio.get_running_loop().create_task(self._refresh(key_hash))
        if entry.account is None:
            raise _refused()
        return entry.account

    def forget(self, key_hash: str) -> None:
        """A revoked key: refused from now on."""
        entry = self._known.get(key_hash)
        self._known[key_hash] = _Entry(None, self._monotonic(), entry.prefix if entry else "")

    def forget_prefix(self, prefix: str) -> None:
        """A key revoked through this process (known by its prefix): refused at once, and by the
        other replicas as soon as they hear. Safe from the thread pool (the web UI's handlers): the
        scan copies the entries first."""
        self.revoked_elsewhere(prefix)
        if self.announce is not None:
            self.announce(prefix)

    def revoked_elsewhere(self, prefix: str) -> None:
        """A key revoked through another replica or the CLI: refused from now on."""
        for key_hash in [h for h, e in list(self._known.items()) if e.prefix == prefix]:
            self.forget(key_hash)

    def resync(self) -> None:
        """Read the revocations now (a notice may have been missed)."""
        self._poke.set()

    async def _catch_up(self, after: float) -> None:
        """Until a read of the keys created since the last look has begun after `after` (when the
        unknown key was used): one read, shared by every request that waits on it, and at most one
        per `catch_up_s` however many unknown keys arrive (a request early in the window waits for
        it: a key made a moment ago is never refused)."""
        while self._read_started_at < after:
            if self._catching is None:
                wait_s = self.catch_up_s - (self._monotonic() - self._caught_up_at)
                catching = self._catching = asyncio.ensure_future(self._read_new_keys(max(0.0, wait_s)))
                catching.add_done_callback(self._caught_up)
            await asyncio.shield(self._catching)

    def _caught_up(self, catching: asyncio.Future[None]) -> None:
        if self._catching is catching:
            self._catching = None

    async def _read_new_keys(self, delay_s: float) -> None:
        if delay_s > 0:
            await asyncio.sleep(delay_s)
        since, started = self._created_since, utcnow() - OVERLAP
        self._read_started_at = self._monotonic()
        self.reads += 1
        try:
            rows = await asyncio.to_thread(_read, self.db, _keys().where(ApiKey.created_at >= since))
        finally:
            self._caught_up_at = self._monotonic()
        now = self._monotonic()
        for row in rows:
            if row.key_hash not in self._known:
                self._known[row.key_hash] = _Entry(_account(row), now, row.prefix)
        self._created_since = started

    async def _refresh(self, key_hash: str) -> None:
        try:
            self.reads += 1
            rows = await asyncio.to_thread(_read, self.db, _keys().where(ApiKey.key_hash == key_hash))
            if rows:
                self._known[key_hash] = _Entry(_account(rows[0]), self._monotonic(), rows[0].prefix)
            else:
                self._known.pop(key_hash, None)
        except Exception:  # noqa: BLE001 - keep the cached answer; try again next time
            log.exception("re-reading an API key failed")
        finally:
            self._refreshing.discard(key_hash)

    async def _watch_revocations(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._poke.wait(), self.refresh_s)
            except TimeoutError:
                pass
            self._poke.clear()
            try:
                started = utcnow() - OVERLAP
                revoked = await asyncio.to_thread(
                    _read, self.db, select(ApiKey.key_hash).where(ApiKey.revoked_at >= self._revoked_since))
                for (key_hash,) in revoked:
                    if key_hash in self._known:
                        self.forget(key_hash)
                self._revoked_since = started
            except Exception:  # noqa: BLE001 - a database hiccup must not end the watch
                log.exception("reading key revocations failed")


def _refused() -> AuthenticationFailed:
    return AuthenticationFailed("Incorrect API key provided, or the key was revoked.")
