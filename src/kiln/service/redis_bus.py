"""The Redis every replica shares (`redis_url`): one command pool, and the notices that keep the
replicas' memories in step — a key revoked, plans changed, a user's usage after an admission — so each
replica applies what another did within a second.

Notices go over pub/sub, which is at most once: a replica that was away misses them. So every
(re)subscription first runs the `on_resync` handlers, which re-read from the database what a missed
notice could have said (revocations since the last look, plans) or forget what memory holds (usage),
and the database polls keep running underneath as the floor.

Cancellation: a request cancelled in the middle of a command must never leave a pooled connection one
reply out of step (redis-py #2624, the March 2023 ChatGPT incident). redis-py 8.1 (pinned) disconnects
a connection whose command was interrupted by any BaseException, cancellation included, before it goes
back to the pool; the subscription has a connection of its own (`PubSub`), and stream followers read
on theirs (`job_streams`). tests/cluster/test_replicas.py checks it under load.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import uuid
from collections.abc import Callable
from typing import Any

import msgspec
import redis
import redis.asyncio as aredis

log = logging.getLogger(__name__)

NOTICES = "notices"
"""The pub/sub channel's name after the prefix."""
RETRY_S = 0.5
"""How soon a lost subscription is tried again."""



class KeyRevoked(msgspec.Struct, frozen=True, tag=True):
    prefix: str
    """The revoked key's display prefix (what `KeyCache` knows keys by, besides their hash)."""


class PlansChanged(msgspec.Struct, frozen=True, tag=True):
    """Some plan's limits changed in the database: read them again."""


class UsageCounted(msgspec.Struct, frozen=True, tag=True):
    """An admission's result: the user's images on `day` after it (the transaction's own total)."""

    user_id: str
    day: dt.date
    used: int


Notice = KeyRevoked | PlansChanged | UsageCounted


class _Envelope(msgspec.Struct, frozen=True):
    origin: str
    """The replica that sent it ("cli" for the command line)."""
    notice: Notice


_decode = msgspec.msgpack.Decoder(_Envelope).decode
_encode = msgspec.msgpack.Encoder().encode
Handler = Callable[[Any], None]


def connect(url: str, *, max_connections: int = 64, **options: Any) -> aredis.Redis:
    """An asyncio client with short timeouts (a Redis that is away must never hang a request) and a
    bounded pool: past `max_connections` in use, a call waits for one rather than opening more."""
    options = {"socket_connect_timeout": 2.0, "socket_timeout": 5.0, **options}
    single = bool(options.pop("single_connection_client", False))
    pool = aredis.BlockingConnectionPool.from_url(url, max_connections=max_connections, timeout=5.0, **options)
    client = aredis.Redis.from_pool(pool)
    if single:
        client = aredis.Redis(connection_pool=pool, single_connection_client=True)
        client.auto_close_connection_pool = True
    return client


def announce_once(url: str, prefix: str, notice: Notice) -> None:
    """Announce from outside a server (the CLI): `kiln plans set`, `kiln keys revoke`."""
    client = redis.Redis.from_url(url, socket_connect_timeout=2.0, socket_timeout=5.0)
    try:
        client.publish(prefix + NOTICES, _encode(_Envelope("cli", notice)))
    finally:
        client.close()


class RedisBus:
    """One replica's end: `redis` for commands, `announce` to tell the others, `on` for what they
    tell. Notices this replica sent are not handed back to it (it applied them already)."""

    def __init__(self, url: str, prefix: str) -> None:
        self.url = url
        self.prefix = prefix
        self.redis = connect(url)
        self.origin = uuid.uuid4().hex
        self.subscriber_name = f"kiln-notices-{self.origin[:12]}"
        """The subscription connection's CLIENT SETNAME (it has one of its own)."""
        self._subscriber = connect(url, max_connections=1, socket_timeout=None, client_name=self.subscriber_name)
        self.channel = prefix + NOTICES
        self.subscribed = asyncio.Event()
        self._handlers: dict[type, list[Handler]] = {}
        self._resync: list[Callable[[], None]] = []
        self._outbox: asyncio.Queue[bytes] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: list[asyncio.Task[None]] = []

    def key(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    def on(self, kind: type, handler: Handler) -> None:
        """Call `handler(notice)` for every notice of type `kind` another replica sends."""
        self._handlers.setdefault(kind, []).append(handler)

    def on_resync(self, handler: Callable[[], None]) -> None:
        """Run after every (re)subscription: re-read what a missed notice could have said."""
        self._resync.append(handler)

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._outbox = asyncio.Queue()
        self._tasks = [asyncio.create_task(self._listen(), name="kiln-redis-notices"),
                       asyncio.create_task(self._send(), name="kiln-redis-announce")]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        await self._subscriber.aclose()
        await self.redis.aclose()

    async def ping(self, timeout_s: float = 2.0) -> bool:
        try:
            return bool(await asyncio.wait_for(self.redis.ping(), timeout_s))
        except Exception:  # noqa: BLE001 - reachability is the answer
            return False

    def announce(self, notice: Notice) -> None:
        """Tell every other replica (in order, soon). Safe from any thread: the web UI's handlers
        run in the thread pool."""
        if self._loop is None or self._outbox is None:
            return
        self._loop.call_soon_threadsafe(self._outbox.put_nowait, _encode(_Envelope(self.origin, notice)))

    async def _send(self) -> None:
        assert self._outbox is not None
        while True:
            payload = await self._outbox.get()
            try:
                await self.redis.publish(self.channel, payload)
            except Exception:  # noqa: BLE001 - the others' database polls still catch up
                log.exception("announcing to the other replicas failed")

    async def _listen(self) -> None:
        while True:
            pubsub = self._subscriber.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self.channel)
                for resync in self._resync:
                    resync()
                self.subscribed.set()
                async for message in pubsub.listen():
                    if message.get("type") == "message":
                        self._dispatch(message["data"])
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - resubscribe (and resync) after a pause
                log.warning("the Redis subscription was lost; subscribing again", exc_info=True)
            finally:
                self.subscribed.clear()
                await asyncio.shield(pubsub.aclose())
            await asyncio.sleep(RETRY_S)

    def _dispatch(self, data: bytes) -> None:
        try:
            envelope = _decode(data)
            if envelope.origin == self.origin:
                return
            for handler in self._handlers.get(type(envelope.notice), ()):
                handler(envelope.notice)
        except Exception:  # noqa: BLE001 - one bad notice must not end the subscription
            log.exception("handling a notice from another replica failed")
