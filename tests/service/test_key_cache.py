"""The API processes' key cache: a key made a moment ago is known the first time it is used, however
soon after the last look, and a flood of unknown keys still costs one read per catch-up window."""

from __future__ import annotations

import asyncio
import secrets

from kiln.errors import AuthenticationFailed
from kiln.service import accounts
from kiln.service.key_cache import KeyCache


def test_a_key_made_right_after_a_catch_up_is_accepted_at_once(db, make_user):
    first = make_user("ann")

    async def scenario() -> None:
        cache = KeyCache(db, catch_up_s=0.5)  # a long window: the second key lands inside it
        await cache.start()
        try:
            accounts.create_user(db, "bob", "free")
            bob_key, _ = accounts.create_key(db, "bob")
            assert (await cache.authenticate(bob_key)).name == "bob"  # caught up: window opens
            accounts.create_user(db, "carl", "free")
            carl_key, _ = accounts.create_key(db, "carl")
            account = await cache.authenticate(carl_key)  # within the window of bob's read
            assert account.name == "carl"
            assert (await cache.authenticate(first.key)).name == "ann"
        finally:
            await cache.stop()

    asyncio.run(scenario())


def test_a_flood_of_unknown_keys_shares_one_read_per_window(db):
    async def scenario() -> None:
        cache = KeyCache(db, catch_up_s=0.2)
        await cache.start()
        try:
            reads = cache.reads
            keys = [f"kiln-{secrets.token_urlsafe(24)}" for _ in range(200)]
            results = await asyncio.gather(*(cache.authenticate(k) for k in keys), return_exceptions=True)
            assert all(isinstance(r, AuthenticationFailed) for r in results)
            assert cache.reads - reads <= 2
        finally:
            await cache.stop()

    asyncio.run(scenario())
