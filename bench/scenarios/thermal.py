"""thermal: one enterprise caller and a free crowd on a GPU-shaped worker, first with its GPU reading
cool, then reported at 90 °C with thermal slowdown (the telemetry file). The guard halves the GPU's
capacity: the free crowd is degraded and refused; the enterprise caller's p99 should hold."""

from __future__ import annotations

import asyncio
import json
import re
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx

from bench.harness import (Context, KilnServer, Result, Section, closed_loop, free_port, open_loop, percentile,
                           throughput)

BODY = {"prompt": "a green triangle at the top on a white background", "size": "64x64",
        "response_format": "b64_json"}
FREE_USERS = 100
# As isolation's GPU-shaped worker: 8 steps of 0.05 s, batches of 8 → 20 images/s, no CPU.
STEP_S, BATCH, CEILING = 0.05, 8, 20.0
CROWD_X = 0.75
"""The free crowd's rate as a share of the served capacity measured cool: 1.5× what is left while hot."""
FREE_TARGET_S = 2.0
"""Free's wait target in this run (degrade over 2 s, refuse over 4 s), so a 30 s phase reaches it."""


def _report(path: Path, temp_c: float, reasons: int) -> None:
    with open(path, "a") as file:
        file.write(json.dumps({"gpu": 0, "temp_c": temp_c, "power_w": 650 if reasons else 400,
                               "sm_clock_mhz": 1500 if reasons else 1980, "util": 99,
                               "clocks_event_reasons": reasons}) + "\n")


def _metric(url: str, pattern: str) -> float:
    text = httpx.get(url + "/metrics", timeout=10).text
    return sum(float(m.group(1)) for m in re.finditer(pattern + r"\S* ([0-9.e+-]+)", text))


def _wait_for(url: str, pattern: str, value: float, timeout_s: float = 30.0) -> float:
    started = time.monotonic()
    while _metric(url, pattern) != value:
        if time.monotonic() - started > timeout_s:
            raise RuntimeError(f"{pattern} never read {value}")
        time.sleep(0.1)
    return time.monotonic() - started


async def _phase(url: str, enterprise: dict[str, str], free: dict[str, str], rate: float,
                 duration_s: float) -> tuple[list[Result], list[Result]]:
    paid, crowd = await asyncio.gather(closed_loop(url, enterprise, BODY, 1, duration_s),
                                       open_loop(url, free, BODY, rate, duration_s))
    return paid, crowd


def run(ctx: Context) -> Section:
    duration = 12.0 if ctx.quick else 30.0
    telemetry = Path(tempfile.mkdtemp(prefix="kiln-thermal-")) / "gpus.jsonl"
    _report(telemetry, 62, 0)
    settings = {"max_batch_size": BATCH, "preemption": "both", "telemetry_source": "file",
                "telemetry_file": str(telemetry), "telemetry_poll_s": 0.2, "thermal_cool_s": 2.0,
                # free ports of its own: another server on this machine may hold the default 8001/8002
                "scheduler_url": f"tcp://127.0.0.1:{free_port()}",
                "scheduler_events_url": f"tcp://127.0.0.1:{free_port()}"}
    rows, phases = [], {}
    with KilnServer(None, settings, fake_step_s=STEP_S, threads=ctx.threads) as server:
        server.set_plan("free", "--images-per-day", "1000000", "--max-concurrent", "50",
                        "--wait-target-s", str(FREE_TARGET_S))
        enterprise = {"ent": server.user("ent", "enterprise")}
        free = server.users([f"free{i}" for i in range(FREE_USERS)], "free")
        asyncio.run(closed_loop(server.url, enterprise, BODY, 1, 3.0))  # warm the worker
        # What this machine serves end to end (the worker sleeps; HTTP, encoding and storing cost CPU).
        served = throughput(asyncio.run(closed_loop(server.url, free, BODY, 2 * BATCH, 8.0 if ctx.quick else 15.0)))
        rate = CROWD_X * min(served, CEILING)
        for name, temp_c, reasons in (("cool", 62, 0), ("hot", 90, 0x40)):
            _report(telemetry, temp_c, reasons)
            reacted_s = _wait_for(server.url, r"kiln_thermal_state\{", 1.0 if reasons else 0.0)
            degraded_before = _metric(server.url, r'kiln_admission_degraded_total\{plan="free"\}')
            paid, crowd = asyncio.run(_phase(server.url, enterprise, free, rate, duration))
            degraded = _metric(server.url, r'kiln_admission_degraded_total\{plan="free"\}') - degraded_before
            paid_s = [r.latency_s for r in paid if r.status == 200]
            codes = Counter(r.status for r in crowd)
            phases[name] = paid_s
            rows.append({
                "GPU 0": f"{temp_c} °C" + (", hw thermal slowdown" if reasons else ""),
                "guard reacted s": reacted_s if reasons else None,
                "enterprise images": len(paid_s), "enterprise p50 s": percentile(paid_s, 50),
                "enterprise p99 s": percentile(paid_s, 99),
                "enterprise refused": sum(1 for r in paid if r.status != 200),
                "free sent": len(crowd), "free 200": codes.get(200, 0), "free degraded": int(degraded),
                "free 503": codes.get(503, 0), "free 429": codes.get(429, 0),
                "free p50 s": percentile([r.latency_s for r in crowd if r.status == 200], 50),
                "refusals without Retry-After": sum(1 for r in crowd if r.status in (429, 503) and not r.retry_after),
            })
    cool99, hot99 = percentile(phases["cool"], 99), percentile(phases["hot"], 99)
    ratio = hot99 / cool99 if cool99 and hot99 else None
    return Section(
        name="thermal",
        summary=(f"One enterprise caller back to back and a free crowd at {rate:.1f} requests/s "
                 f"({CROWD_X:.2f}× the {served:.1f} images/s served end to end by a GPU-shaped worker of "
                 f"{CEILING:.0f} images/s) for {duration:.0f} s with "
                 f"the GPU reading cool, then again with it reported at 90 °C and thermal slowdown. The guard "
                 f"halves the GPU's capacity: free work is degraded and refused, while enterprise p99 goes "
                 f"from {cool99 or 0:.2f} s to {hot99 or 0:.2f} s (ratio **{ratio or 0:.2f}**; its target "
                 f"is 15 s)."),
        table=rows,
        data={"rows": rows, "p99_ratio": ratio, "served": served, "rate": rate},
        notes=[
            f"Free's wait target is set to {FREE_TARGET_S:g} s for this run (degrade over it, refuse over "
            f"twice it), so the queue reaches it within a phase; enterprise keeps its default 15 s.",
            "A hot worker rests after each batch as long as the batch took (capacity 0.5), so an "
            "enterprise request that arrives during a rest waits up to one batch longer: that is the "
            "price of running the GPU half the time, and what the ratio shows.",
            "Latencies are measured by the client on the same shared 2-core machine as the server; the fake "
            "worker sleeps instead of computing.",
        ],
    )
