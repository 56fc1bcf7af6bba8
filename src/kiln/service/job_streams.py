"""Job events as Redis Streams, so that any replica can follow any job: the scheduler (the one process
that knows each event, so the one writer) appends every `JobUpdate` to the job's stream, and each API
process follows the streams its SSE clients ask for.

A job's stream holds what `JobLog` holds: the events in order, numbered 1, 2, … per job (the entry id
is `<n>-0`, so SSE's Last-Event-ID `n` is where XREAD resumes), and of consecutive progress events only
the latest (carrying the latest preview seen, for replays). It is trimmed to `job_events_maxlen`, and
expires `job_events_ttl_s` after its terminal event (a day after its last event while it is live).

One connection per API process reads every followed stream (one XREAD BLOCK over all their keys) and
hands each follower its events, so ten thousand followers cost one connection; a new follower replays
the history with XRANGE on the command pool and joins the shared read, which is woken with CLIENT
UNBLOCK to include it.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aredis

from kiln.service.job_events import TERMINAL_EVENTS, JobEvent
from kiln.service.messages import JobUpdate
from kiln.service.redis_bus import connect

log = logging.getLogger(__name__)

LIVE_TTL_S = 24 * 3600
"""A stream without a terminal event yet expires this long after its last event."""
BLOCK_MS = 500
"""The shared read's longest block (a follower that joins meanwhile waits at most this long if the
wake-up misses it)."""
BATCH = 256

_APPEND = """
local n = redis.call('INCR', KEYS[2])
local carried = ''
if ARGV[1] == 'progress' then
  local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
  if #last > 0 then
    local f, fields = last[1][2], {}
    for i = 1, #f, 2 do fields[f[i]] = f[i + 1] end
    if fields['e'] == 'progress' then
      if ARGV[3] == '' then carried = fields['p'] or fields['c'] or '' end
      redis.call('XDEL', KEYS[1], last[1][1])
    end
  end
end
local entry = {'e', ARGV[1], 'd', ARGV[2]}
if ARGV[3] ~= '' then entry[#entry + 1] = 'p'; entry[#entry + 1] = ARGV[3] end
if carried ~= '' then entry[#entry + 1] = 'c'; entry[#entry + 1] = carried end
redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[5], n .. '-0', unpack(entry))
local ttl = ARGV[4]
if ttl == '0' then ttl = ARGV[6] end
redis.call('EXPIRE', KEYS[1], ttl)
redis.call('EXPIRE', KEYS[2], ttl)
return n
"""


def stream_key(prefix: str, job_id: str) -> str:
    return f"{prefix}job:{{{job_id}}}:events"


def _counter_key(prefix: str, job_id: str) -> str:
    return f"{prefix}job:{{{job_id}}}:seq"


def _event(entry_id: bytes | str, fields: dict[bytes, bytes], *, replay: bool) -> JobEvent:
    """An entry as clients see it; a replay gets the preview carried over collapsed progress."""
    number = int((entry_id.decode() if isinstance(entry_id, bytes) else entry_id).split("-", 1)[0])
    data = json.loads(fields[b"d"])
    preview = fields.get(b"p") or (fields.get(b"c") if replay else None)
    if preview:
        data["preview"] = preview.decode()
    return JobEvent(number, fields[b"e"].decode(), data)


class JobStreamWriter:
    """The scheduler's end: `append` (sync, from its event loop) queues an update; one task writes
    them in order, a pipeline per burst."""

    def __init__(self, url: str, prefix: str, *, ttl_s: int, maxlen: int) -> None:
        self.prefix = prefix
        self.ttl_s = ttl_s
        self.maxlen = maxlen
        self.redis = connect(url)
        self._script = self.redis.register_script(_APPEND)
        self._queue: asyncio.Queue[JobUpdate] | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._task = asyncio.create_task(self._write(), name="kiln-job-streams")

    async def stop(self, timeout_s: float = 5.0) -> None:
        """Write what is queued (for a while), then close."""
        if self._task is not None:
            assert self._queue is not None
            try:
                await asyncio.wait_for(self._queue.join(), timeout_s)
            except TimeoutError:
                log.warning("%d job event(s) not written to Redis", self._queue.qsize())
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self.redis.aclose()

    def append(self, update: JobUpdate) -> None:
        if self._queue is not None:
            self._queue.put_nowait(update)

    async def _write(self) -> None:
        assert self._queue is not None
        while True:
            batch = [await self._queue.get()]
            while len(batch) < BATCH and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            try:
                async with self.redis.pipeline(transaction=False) as pipe:
                    for update in batch:
                        await self._queue_append(pipe, update)
                    await pipe.execute()
            except Exception:  # noqa: BLE001 - followers still learn each job's end from its row
                log.exception("writing %d job event(s) to Redis failed", len(batch))
            finally:
                for _ in batch:
                    self._queue.task_done()

    async def _queue_append(self, pipe: Any, update: JobUpdate) -> None:
        """Queue the append on the pipeline (the script is loaded on the way if Redis lacks it)."""
        data = dict(update.data)
        preview = data.pop("preview", "") or ""
        terminal = update.name in TERMINAL_EVENTS
        await self._script(
            keys=[stream_key(self.prefix, update.job_id), _counter_key(self.prefix, update.job_id)],
            args=[update.name, json.dumps(data), preview, self.ttl_s if terminal else 0, self.maxlen, LIVE_TTL_S],
            client=pipe,
        )


def job_stream_writer(settings: Any) -> JobStreamWriter | None:
    """The scheduler's writer for `kiln.config.Settings` (None without `redis_url`)."""
    if not settings.redis_url:
        return None
    return JobStreamWriter(settings.redis_url, settings.redis_prefix, ttl_s=settings.job_events_ttl_s,
                           maxlen=settings.job_events_maxlen)


@dataclass(eq=False)
class _Follower:
    position: int
    queue: asyncio.Queue[JobEvent] = field(default_factory=asyncio.Queue)


class JobStreamReader:
    """An API process's end: `history` replays a job's stream, `subscribe` follows it live through
    the one shared read."""

    def __init__(self, url: str, prefix: str, commands: aredis.Redis) -> None:
        self.url = url
        self.prefix = prefix
        self.redis = commands
        self._followers: dict[str, list[_Follower]] = {}
        self._reader: aredis.Redis | None = None
        self._reader_id: int | None = None
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._waking: asyncio.Task[None] | None = None

    async def start(self) -> None:
        # its own connection: a read that blocks must never hold one that requests share
        self._reader = connect(self.url, single_connection_client=True, socket_timeout=BLOCK_MS / 1000 + 5)
        self._task = asyncio.create_task(self._read(), name="kiln-job-stream-reader")

    async def stop(self) -> None:
        for task in (self._task, self._waking):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if self._reader is not None:
            await self._reader.aclose()

    async def history(self, job_id: str, after: int = 0) -> list[JobEvent]:
        entries = await self.redis.xrange(stream_key(self.prefix, job_id), f"({after}-0", "+")
        return [_event(entry_id, fields, replay=True) for entry_id, fields in entries]

    async def last(self, job_id: str, count: int = 1) -> list[JobEvent]:
        """The job's latest `count` events, newest first."""
        entries = await self.redis.xrevrange(stream_key(self.prefix, job_id), "+", "-", count=count)
        return [_event(entry_id, fields, replay=True) for entry_id, fields in entries]

    def subscribe(self, job_id: str, after: int) -> _Follower:
        """Live events numbered above `after`, put on the follower's queue; `unsubscribe` when done."""
        follower = _Follower(after)
        self._followers.setdefault(stream_key(self.prefix, job_id), []).append(follower)
        self._changed.set()
        if self._reader_id is not None and self._waking is None:  # wake the shared read to include it
            self._waking = asyncio.ensure_future(self._wake(self._reader_id))
        return follower

    def unsubscribe(self, job_id: str, follower: _Follower) -> None:
        key = stream_key(self.prefix, job_id)
        followers = self._followers.get(key, [])
        if follower in followers:
            followers.remove(follower)
        if not followers:
            self._followers.pop(key, None)

    async def _wake(self, reader_id: int) -> None:
        """One CLIENT UNBLOCK for every follower that joined meanwhile."""
        try:
            await self.redis.client_unblock(reader_id)
        except Exception:  # noqa: BLE001 - the read's block ends on its own soon
            log.debug("waking the stream reader failed", exc_info=True)
        finally:
            self._waking = None

    async def _read(self) -> None:
        assert self._reader is not None
        while True:
            if not self._followers:
                self._changed.clear()
                await self._changed.wait()
                continue
            try:
                if self._reader_id is None:
                    self._reader_id = int(await self._reader.client_id())
                self._changed.clear()
                streams = {key: f"{min(f.position for f in followers)}-0"
                           for key, followers in self._followers.items()}
                reply = await self._reader.xread(streams, count=BATCH, block=BLOCK_MS)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - followers also watch the database; read again soon
                log.warning("reading job streams failed; reading again", exc_info=True)
                self._reader_id = None
                await asyncio.sleep(0.5)
                continue
            for key, entries in reply or ():
                name = key.decode() if isinstance(key, bytes) else key
                for entry_id, fields in entries:
                    event = _event(entry_id, fields, replay=False)
                    for follower in self._followers.get(name, ()):
                        if event.id > follower.position:
                            follower.position = event.id
                            follower.queue.put_nowait(event)
