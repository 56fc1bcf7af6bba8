"""Many SSE followers on one replica: Kiln's shared stream read (one XREAD BLOCK connection for every
followed job) against one blocking XREAD connection per follower, side by side on one Redis.

    KILN_BENCH_REDIS_URL=redis://127.0.0.1:6379/0 python -m bench.redis_fanout [--followers 400]

Reports, for each way, the Redis connections it held and the delay from an event's append to its
delivery to a follower (median and p99). Keys live under a random prefix and are deleted afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
import uuid

import redis.asyncio as aredis

from kiln.service.job_streams import JobStreamReader, JobStreamWriter, stream_key
from kiln.service.messages import JobUpdate
from kiln.service.redis_bus import connect


async def _publish(writer: JobStreamWriter, jobs: list[str], events: int, every_s: float) -> None:
    for step in range(events):
        for job in jobs:
            writer.append(JobUpdate(job, "u", "position" if step < events - 1 else "completed",
                                    {"queue_position": step, "sent": time.time()}))
        await asyncio.sleep(every_s)


async def _shared(url: str, prefix: str, jobs: list[str], per_job: int, events: int) -> tuple[int, list[float]]:
    commands = connect(url)
    reader = JobStreamReader(url, prefix, commands)
    writer = JobStreamWriter(url, prefix, ttl_s=60, maxlen=1000)
    await reader.start()
    await writer.start()
    delays: list[float] = []

    async def follow(job: str) -> None:
        follower = reader.subscribe(job, 0)
        while True:
            event = await follower.queue.get()
            delays.append(time.time() - event.data["sent"])
            if event.terminal:
                break
        reader.unsubscribe(job, follower)

    followers = [asyncio.ensure_future(follow(job)) for job in jobs for _ in range(per_job)]
    await asyncio.sleep(0.6)
    await _publish(writer, jobs, events, 0.05)
    await asyncio.wait_for(asyncio.gather(*followers), 60)
    connections = 1 + len(commands.connection_pool._in_use_connections) + len(
        commands.connection_pool._available_connections)
    await writer.stop()
    await reader.stop()
    await commands.aclose()
    return connections, delays


async def _one_each(url: str, prefix: str, jobs: list[str], per_job: int, events: int) -> tuple[int, list[float]]:
    writer = JobStreamWriter(url, prefix, ttl_s=60, maxlen=1000)
    await writer.start()
    delays: list[float] = []
    clients = [aredis.Redis.from_url(url, single_connection_client=True) for _ in jobs for _ in range(per_job)]

    async def follow(client: aredis.Redis, job: str) -> None:
        last = "0-0"
        while True:
            reply = await client.xread({stream_key(prefix, job): last}, block=500)
            for _key, entries in reply or ():
                for entry_id, fields in entries:
                    last = entry_id
                    delays.append(time.time() - json.loads(fields[b"d"])["sent"])
                    if fields[b"e"] == b"completed":
                        return

    followers = [asyncio.ensure_future(follow(client, job))
                 for client, job in zip(clients, [j for j in jobs for _ in range(per_job)], strict=True)]
    await asyncio.sleep(0.6)
    await _publish(writer, jobs, events, 0.05)
    await asyncio.wait_for(asyncio.gather(*followers), 60)
    await writer.stop()
    for client in clients:
        await client.aclose()
    return len(clients), delays


def _summary(name: str, connections: int, delays: list[float]) -> str:
    ordered = sorted(delays)
    p99 = ordered[int(len(ordered) * 0.99) - 1]
    return (f"{name:<28} {connections:>6} connections  {len(delays):>6} deliveries  "
            f"median {statistics.median(ordered) * 1000:6.1f} ms  p99 {p99 * 1000:6.1f} ms")


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--followers", type=int, default=400)
    parser.add_argument("--per-job", type=int, default=4)
    parser.add_argument("--events", type=int, default=20)
    args = parser.parse_args()
    url = os.environ.get("KILN_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
    prefix = f"kiln-bench-{uuid.uuid4().hex[:8]}:"
    jobs = [f"job-{i}" for i in range(args.followers // args.per_job)]
    try:
        shared = await _shared(url, prefix + "a:", jobs, args.per_job, args.events)
        each = await _one_each(url, prefix + "b:", jobs, args.per_job, args.events)
        print(_summary("shared read (Kiln)", *shared), "(+ the command pool for replays)")
        print(_summary("one connection per follower", *each))
    finally:
        client = aredis.Redis.from_url(url)
        async for key in client.scan_iter(match=f"{prefix}*", count=500):
            await client.delete(key)
        await client.aclose()


if __name__ == "__main__":
    asyncio.run(main())
