"""flood: what a refusal, a read and an admission cost, and whether a GPU-shaped worker keeps its pace
while a crowd is refused (issue 10). `kiln serve` runs pinned to one core, wrk on the other.

`kiln serve` is a black box here: plans come from its config, users from its CLI code, everything else
over HTTP, so the scenario measures whatever processes `kiln serve` starts (children inherit the pin).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import statistics
import time
from typing import Any

import httpx

from bench.harness import (
    Context,
    KilnServer,
    Section,
    Wrk,
    WrkRequest,
    WrkRun,
    median_run,
    pinning,
    postgres_schema,
    spread,
)
from bench.plots import grouped_bar_plot

STEP_S, STEPS, BATCH = 0.05, 8, 8
CEILING = BATCH / (STEPS * STEP_S)  # images/s of the GPU-shaped worker: 20, and no CPU spent on it
PAID_CALLERS = 16
SPENT_USERS = 8  # free users who have used the day's images
READ_USERS = 16
ADMISSION_USERS = 256  # × max_concurrent 1000: no admission run reaches the per-user cap
JOB = json.dumps({"prompt": "a blue square in the centre on a yellow background", "size": "64x64"})

# The plans, set in each fresh server's config (a fresh database seeds them from there): the defaults,
# with enterprise widened so that neither its concurrency cap nor its wait target refuses anything.
PLANS: dict[str, dict[str, Any]] = {
    "free": {"images_per_day": 3, "priority_weight": 1, "max_concurrent": 1, "max_n": 1,
             "wait_target_s": 120.0},
    "plus": {"images_per_day": 200, "priority_weight": 4, "max_concurrent": 3, "max_n": 4,
             "wait_target_s": 30.0},
    "enterprise": {"priority_weight": 8, "max_concurrent": 1000, "max_n": 10, "wait_target_s": 1e7},
}

# Issue 10's figures for main at the time it was filed (2 cores, server on core 0, wrk on core 1).
TODAY = {
    "healthz": "5,960/s",
    "quota 429": "67–193/s, p50 158–472 ms (32 conns)",
    "usage": "150–290/s",
    "admission sqlite": "125/s",
    "admission postgres": "42/s, p50 737 ms",
}
GOALS = {
    "refusals": "≥ 3,000/s, p99 ≤ 5 ms",
    "reads": "≥ 3,000/s",
    "admission": "≥ 1,500/s (3,000 aimed)",
}


def _settings(database_url: str | None = None) -> dict[str, Any]:
    settings: dict[str, Any] = {"max_batch_size": BATCH, "plans": PLANS}
    if database_url:
        settings["database_url"] = database_url
    return settings


def _gen_body(i: int) -> str:
    # A prompt per caller (seeds are random anyway), so no two requests could ever share one drawing.
    return json.dumps({"prompt": f"a red circle on the left on a blue background, caller {i}",
                       "size": "64x64", "response_format": "b64_json"})


# ------------------------------------------------------------------------------------------ set-up


async def _spend(url: str, keys: dict[str, str]) -> None:
    """Each user generates until GET /v1/usage says nothing remains; then a submit must be refused 429."""
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:

        async def spend_one(key: str) -> None:
            auth = {"Authorization": f"Bearer {key}"}
            for _ in range(100):
                usage = (await client.get("/v1/usage", headers=auth)).json()
                if usage.get("remaining") == 0:
                    break
                r = await client.post("/v1/images/generations", headers=auth,
                                      json=json.loads(_gen_body(0)))
                if r.status_code != 200:
                    raise RuntimeError(f"spending a free user's quota: {r.status_code} {r.text[:200]}")
            r = await client.post("/v1/jobs", headers={**auth, "Content-Type": "application/json"},
                                  content=JOB)
            if r.status_code != 429 or "retry-after" not in r.headers:
                raise RuntimeError(f"a used-up free user was not refused 429 with Retry-After: "
                                   f"{r.status_code}")

        await asyncio.gather(*(spend_one(k) for k in keys.values()))


async def _finished_jobs(url: str, keys: dict[str, str], per_user: int) -> list[tuple[str, str]]:
    """(key, job id) pairs of completed jobs, for GET /v1/jobs/{id}."""
    pairs: list[tuple[str, str]] = []
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        for key in keys.values():
            for _ in range(per_user):
                r = await client.post("/v1/jobs", content=JOB, headers={"Authorization": f"Bearer {key}",
                                                                       "Content-Type": "application/json"})
                if r.status_code != 202:
                    raise RuntimeError(f"POST /v1/jobs for the reads: {r.status_code} {r.text[:200]}")
                pairs.append((key, r.json()["id"]))
        deadline = time.time() + 120
        for key, job_id in pairs:
            while True:
                status = (await client.get(f"/v1/jobs/{job_id}",
                                           headers={"Authorization": f"Bearer {key}"})).json().get("status")
                if status == "succeeded":
                    break
                if status in ("failed", "cancelled") or time.time() > deadline:
                    raise RuntimeError(f"job {job_id} for the reads ended {status}")
                await asyncio.sleep(0.1)
    return pairs


# --------------------------------------------------------------------------------------- measuring


class Bench:
    """Repeated wrk runs of one kind against one server; the median run is the one reported."""

    def __init__(self, ctx: Context, server: KilnServer, load_cpu: str | None) -> None:
        self.server, self.load_cpu = server, load_cpu
        self.duration_s = 3.0 if ctx.quick else 10.0
        self.repeats = 1 if ctx.quick else 3

    def wrk(self, requests: list[WrkRequest], connections: int, duration_s: float) -> Wrk:
        return Wrk(self.server.url, requests, connections=connections, duration_s=duration_s,
                   cpu=self.load_cpu, folder=self.server.dir, server=self.server)

    def measure(self, requests: list[WrkRequest], connections: int) -> list[WrkRun]:
        self.wrk(requests, connections, 2).run()  # warm: caches, connection pools, the JIT-less rest
        return [self.wrk(requests, connections, self.duration_s).run() for _ in range(self.repeats)]


def _row(what: str, connections: int, runs: list[WrkRun], ok: tuple[int, ...], today: str | None,
         goal: str | None) -> dict[str, Any]:
    best = median_run(runs)
    return {
        "what": what, "conns": connections, "requests/s": spread([r.rate for r in runs]),
        "p50 ms": best.p50_ms, "p99 ms": best.p99_ms, "status mix": best.mix(),
        "server CPU ms/req": best.cpu_ms_per_request, "req/s per server core": best.per_core_s,
        "server's core share": best.core_share, "others' share of its core": best.others_share,
        "expected share": best.share(*ok),
        "no Retry-After": sum(r.retry_after_missing for r in runs),
        "today (issue)": today, "goal": goal,
        "_rate": statistics.median(r.rate for r in runs),
        "_per_core": statistics.median(r.per_core_s or 0.0 for r in runs),
        "_runs": [r.__dict__ for r in runs],
    }


def measure_fast_paths(ctx: Context, server_cpu: str | None, load_cpu: str | None) -> dict[str, Any]:
    """healthz, refusals and reads, then the GPU-shaped worker alone and under a refusal flood: one
    server, the GPU-shaped worker idle until its own part."""
    with KilnServer(None, _settings(), fake_step_s=STEP_S, cpu=server_cpu, threads=1) as server:
        paid = server.users([f"ent{i}" for i in range(max(PAID_CALLERS, READ_USERS))], "enterprise")
        spent = server.users([f"free{i}" for i in range(SPENT_USERS)], "free")
        asyncio.run(_spend(server.url, spent))
        jobs = asyncio.run(_finished_jobs(server.url, dict(list(paid.items())[:READ_USERS]), 2))
        bench = Bench(ctx, server, load_cpu)

        healthz = [WrkRequest("GET", "/healthz")]
        quota = [WrkRequest("POST", "/v1/jobs", k, JOB) for k in spent.values()]
        bad_key = [WrkRequest("POST", "/v1/jobs", "@random", JOB),
                   WrkRequest("POST", "/v1/jobs", "kiln-this-key-was-never-issued-0000000000000000", JOB)]
        mix = [r for pair in zip(quota, bad_key * (len(quota) // 2), strict=True) for r in pair]
        usage = [WrkRequest("GET", "/v1/usage", k) for k in paid.values()]
        job = [WrkRequest("GET", f"/v1/jobs/{job_id}", k) for k, job_id in jobs]

        rows = [
            _row("GET /healthz (reference)", 64, bench.measure(healthz, 64), (200,), TODAY["healthz"], None),
            _row("refusals: 429 used-up quota + 401 bad keys, 1:1", 64, bench.measure(mix, 64), (401, 429),
                 None, GOALS["refusals"]),
            _row("refusals: 429 used-up quota", 32, bench.measure(quota, 32), (429,), TODAY["quota 429"],
                 None),
            _row("refusals: 429 used-up quota", 64, bench.measure(quota, 64), (429,), None,
                 GOALS["refusals"]),
            _row("refusals: 401 bad keys (random and fixed)", 64, bench.measure(bad_key, 64), (401,), None,
                 GOALS["refusals"]),
            _row("read: GET /v1/usage", 64, bench.measure(usage, 64), (200,), TODAY["usage"], GOALS["reads"]),
            _row("read: GET /v1/jobs/{id}", 64, bench.measure(job, 64), (200,), None, GOALS["reads"]),
        ]
        gpu = measure_gpu_shaped(ctx, bench, paid, quota)
    return {"rows": rows, "gpu": gpu}


def measure_gpu_shaped(ctx: Context, bench: Bench, paid: dict[str, str], quota: list[WrkRequest]) -> dict:
    """16 enterprise callers (a second wrk: sync generations back to back) alone, then while the first
    wrk floods used-up free users' refusals as fast as the server answers them."""
    keys = list(paid.values())[:PAID_CALLERS]
    callers = [WrkRequest("POST", "/v1/images/generations", k, _gen_body(i)) for i, k in enumerate(keys)]
    duration = 8.0 if ctx.quick else 15.0
    bench.wrk(callers, PAID_CALLERS, 3).run()  # warm
    alone, flooded, floods = [], [], []
    for _ in range(bench.repeats):
        alone.append(bench.wrk(callers, PAID_CALLERS, duration).run())
        flood = bench.wrk(quota, 64, duration + 3).start()
        time.sleep(1.0)  # the flood at full pace before the paid callers' window opens
        flooded.append(bench.wrk(callers, PAID_CALLERS, duration).run())
        floods.append(flood.result())
    return {"alone": [r.__dict__ for r in alone], "flooded": [r.__dict__ for r in flooded],
            "floods": [r.__dict__ for r in floods]}


def measure_admission(ctx: Context, server_cpu: str | None, load_cpu: str | None,
                      database_url: str | None) -> list[WrkRun]:
    """POST /v1/jobs for many enterprise users; the fake worker takes 30 s a step, so nothing finishes
    during the run and only admission is measured."""
    with KilnServer(None, _settings(database_url), fake_step_s=30.0, cpu=server_cpu, threads=1) as server:
        keys = server.users([f"adm{i}" for i in range(ADMISSION_USERS)], "enterprise")
        bench = Bench(ctx, server, load_cpu)
        return bench.measure([WrkRequest("POST", "/v1/jobs", k, JOB) for k in keys.values()], 64)


# ----------------------------------------------------------------------------------------- report


def _gpu_rows(gpu: dict[str, list[dict]]) -> tuple[list[dict[str, Any]], dict[str, float]]:
    alone = [WrkRun(**r) for r in gpu["alone"]]
    flooded = [WrkRun(**r) for r in gpu["flooded"]]
    floods = [WrkRun(**r) for r in gpu["floods"]]
    served_alone = statistics.median(r.closed_loop_rate(200) for r in alone)
    served_flooded = statistics.median(r.closed_loop_rate(200) for r in flooded)
    p99_alone = statistics.median(r.p99_ms for r in alone) / 1000
    p99_flooded = statistics.median(r.p99_ms for r in flooded) / 1000
    flood_rate = statistics.median(r.rate_of(429) for r in floods)
    flood = median_run(floods)
    figures = {
        "served_alone": served_alone, "served_flooded": served_flooded, "p99_alone": p99_alone,
        "p99_flooded": p99_flooded, "flood_rate": flood_rate,
        "alone_vs_ceiling": served_alone / CEILING,
        "flooded_vs_alone": served_flooded / served_alone if served_alone else 0.0,
        "p99_vs_alone": p99_flooded / p99_alone if p99_alone else 0.0,
    }
    rows = [
        {"what": f"{PAID_CALLERS} enterprise callers alone", "images/s": served_alone,
         "images/s counted": statistics.median(r.rate_of(200) for r in alone),
         "p50 s": median_run(alone, "p50_ms").p50_ms / 1000, "p99 s": p99_alone,
         "ratio": f"served ÷ ceiling {figures['alone_vs_ceiling']:.2f}",
         "server's core share": median_run(alone).core_share,
         "others' share of its core": median_run(alone).others_share,
         "today (issue)": "19.2 images/s, p99 1.08 s", "goal": "served ÷ ceiling ≥ 0.95",
         "paid status mix": median_run(alone).mix()},
        {"what": f"same, under a refusal flood of {flood_rate:,.0f}/s (64 conns)", "images/s": served_flooded,
         "images/s counted": statistics.median(r.rate_of(200) for r in flooded),
         "p50 s": median_run(flooded, "p50_ms").p50_ms / 1000, "p99 s": p99_flooded,
         "ratio": (f"served ÷ alone {figures['flooded_vs_alone']:.2f}, "
                   f"p99 ÷ alone {figures['p99_vs_alone']:.2f}"),
         "server's core share": flood.core_share, "others' share of its core": flood.others_share,
         "today (issue)": "6.2 images/s under 119/s, p99 4.11 s",
         "goal": "under ≥ 2,000/s: served ÷ alone ≥ 0.95, p99 ÷ alone ≤ 1.2",
         "paid status mix": median_run(flooded).mix()},
        {"what": "the flood's refusals themselves", "images/s": None,
         "p50 s": flood.p50_ms / 1000, "p99 s": flood.p99_ms / 1000,
         "ratio": f"{flood_rate:,.0f} refusals/s, mix {flood.mix()}, "
                  f"{sum(r.retry_after_missing for r in floods)} without Retry-After",
         "today (issue)": "119/s, p99 1.1 s", "goal": "≥ 2,000/s"},
    ]
    return rows, figures


def admission_rows(ctx: Context, server_cpu: str | None, load_cpu: str | None) -> list[dict[str, Any]]:
    """One row per database; a database that fails (PostgreSQL not running) is a row that says so."""
    rows = []
    for db in ("sqlite", "postgres"):
        what = f"admission: POST /v1/jobs, {db}"
        try:
            if db == "sqlite":
                runs = measure_admission(ctx, server_cpu, load_cpu, None)
            else:
                with postgres_schema() as url:
                    runs = measure_admission(ctx, server_cpu, load_cpu, url)
        except Exception as exc:  # noqa: BLE001 - reported in the table; the other rows still count
            message = " ".join(f"{type(exc).__name__}: {exc}".split()).replace("|", "/")[:160]
            rows.append({"what": what, "conns": 64, "requests/s": f"failed: {message}",
                         "today (issue)": TODAY[f"admission {db}"], "goal": GOALS["admission"], "_rate": 0.0})
            continue
        row = _row(what, 64, runs, (202,), TODAY[f"admission {db}"], GOALS["admission"])
        row["202/s"] = statistics.median(r.rate_of(202) for r in runs)
        rows.append(row)
    return rows


def run(ctx: Context) -> tuple[Section, Section] | Section:
    if not shutil.which("wrk"):
        return Section("flood", "wrk is not installed (`apt-get install wrk`; `make bench` does it); "
                                "skipped.")
    server_cpu, load_cpu = pinning()
    fast = measure_fast_paths(ctx, server_cpu, load_cpu)
    rows = fast["rows"]
    rows += admission_rows(ctx, server_cpu, load_cpu)
    gpu_rows, gpu = _gpu_rows(fast["gpu"])

    def rate(prefix: str, conns: int = 64, key: str = "_rate") -> float:
        found = (r.get(key, 0.0) for r in rows if r["what"].startswith(prefix) and r["conns"] == conns)
        return next(found, 0.0)

    def bars(prefix: str, conns: int = 64, **others: float) -> dict[str, float]:
        return {"measured": rate(prefix, conns),
                "measured, per server core": rate(prefix, conns, "_per_core"), **others}

    def admitted(db: str) -> str:
        row = next(r for r in rows if r["what"] == f"admission: POST /v1/jobs, {db}")
        return f"{row['_rate']:,.0f}/s" if "_runs" in row else "failed (see the table)"

    mix_row = next(r for r in rows if r["what"].startswith("refusals: 429 used-up quota + 401"))
    missing = sum(r.get("no Retry-After", 0) or 0 for r in rows)
    plot = grouped_bar_plot(
        ctx.out / "flood.png", "Answers per second, kiln serve on one core (wrk on the other)", "requests/s",
        {"healthz": bars("GET /healthz", **{"issue: main": 5960}),
         "refusals mix": bars("refusals: 429 used-up quota + 401", goal=3000),
         "429 (32 conns)": bars("refusals: 429 used-up quota", 32, **{"issue: main": 193}),
         "usage": bars("read: GET /v1/usage", **{"issue: main": 290}, goal=3000),
         "job read": bars("read: GET /v1/jobs/{id}", goal=3000),
         "admit sqlite": bars("admission: POST /v1/jobs, sqlite", **{"issue: main": 125}, goal=1500),
         "admit postgres": bars("admission: POST /v1/jobs, postgres", **{"issue: main": 42}, goal=1500)},
        log=True)
    gpu_plot = grouped_bar_plot(
        ctx.out / "flood-gpu.png", "GPU-shaped worker (ceiling 20 images/s): paid callers' images/s",
        "images/s",
        {"alone": {"measured": gpu["served_alone"], "issue: main": 19.2},
         "under flood": {"measured": gpu["served_flooded"], "issue: main": 6.2}},
        hline=(CEILING, "ceiling"))
    pinned_note = (f"`kiln serve` (its whole process tree) pinned to core {server_cpu} with taskset, "
                   f"every wrk on core {load_cpu}." if server_cpu else
                   "**This machine offers one core: server and wrk ran unpinned, sharing it.**")
    public = [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]
    gpu_section = Section(
        name="flood-gpu",
        summary=(f"The GPU-shaped worker (ceiling {CEILING:.0f} images/s, no CPU) with {PAID_CALLERS} "
                 f"enterprise callers: served ÷ ceiling **{gpu['alone_vs_ceiling']:.2f}** alone "
                 f"(goal ≥ 0.95); under "
                 f"{gpu['flood_rate']:,.0f} refusals/s served ÷ alone **{gpu['flooded_vs_alone']:.2f}** and "
                 f"paid p99 ÷ alone **{gpu['p99_vs_alone']:.2f}** (goals, under ≥ 2,000/s: ≥ 0.95 and "
                 f"≤ 1.2)."),
        table=gpu_rows,
        plots=[gpu_plot],
        data={"gpu": gpu, "runs": fast["gpu"], "pinning": [server_cpu, load_cpu]},
        notes=[
            f"`kiln.testing:load_fake_pipeline`, step_s {STEP_S}, {STEPS} steps, batches of {BATCH}, on the "
            f"same server as the refusals above. The {PAID_CALLERS} callers are a second wrk on the load "
            "core sending sync `POST /v1/images/generations` (64×64, b64_json) back to back, each its own "
            "enterprise user: no Python load generator competes with the server.",
            "images/s is Little's law (callers ÷ mean latency) × the share of 200s; `images/s counted` "
            "(completions inside the window ÷ its length) undercounts by up to one latency per caller.",
            "The flood (a used-up free user's `POST /v1/jobs`, 64 conns) is as fast as the server answers "
            "it (wrk is closed-loop); the rate it reached is in the table, and the goal is judged at "
            f"≥ 2,000/s. Each pair alone/flooded is repeated {1 if ctx.quick else 3}× "
            f"({8 if ctx.quick else 15} s each); the table gives medians.",
        ],
    )
    return Section(
        name="flood",
        summary=(f"Refusals (429 + 401 mixed, 64 conns): **{mix_row['_rate']:,.0f}/s, "
                 f"p99 {mix_row['p99 ms']:.1f} ms** (goal ≥ 3,000/s, ≤ 5 ms); reads "
                 f"{rate('read: GET /v1/usage'):,.0f}/s (usage) and "
                 f"{rate('read: GET /v1/jobs/{id}'):,.0f}/s (job) (goal ≥ 3,000/s); admissions "
                 f"{admitted('sqlite')} on SQLite and {admitted('postgres')} on PostgreSQL (goal ≥ 1,500/s). "
                 f"Refusals without Retry-After: {missing}. Per second of the server's own CPU (what a core "
                 f"to itself would give): refusals "
                 f"{rate('refusals: 429 used-up quota + 401', key='_per_core'):,.0f}/s, "
                 f"usage {rate('read: GET /v1/usage', key='_per_core'):,.0f}/s, admissions "
                 f"{rate('admission: POST /v1/jobs, sqlite', key='_per_core'):,.0f}/s (SQLite) and "
                 f"{rate('admission: POST /v1/jobs, postgres', key='_per_core'):,.0f}/s (PostgreSQL)."),
        table=public,
        plots=[plot],
        data={"rows": rows, "pinning": [server_cpu, load_cpu]},
        notes=[
            pinned_note + " The machine's 2 cores are shared with other work, so each figure is the median "
                          f"of {1 if ctx.quick else 3} runs of {3 if ctx.quick else 10} s (range in "
                          "brackets); "
                          "latencies and the status mix come from the median run.",
            "`server CPU ms/req`: CPU time of all of `kiln serve`'s processes during the median run ÷ its "
            "answers, which the noise of a shared machine moves far less than requests/s (`req/s per server "
            "core` is its inverse: the rate with a whole core); `server's core "
            "share`: that CPU time ÷ the run's length (below 1 while the server is the bottleneck means "
            "someone else had part of its core); `others' share of its core`: the core's busy time "
            "(/proc/stat) that was not the server's, ÷ the run's length: near 0 on a quiet machine.",
            "`expected share`: the fraction of answers with the status the row is about (401/429 for "
            "refusals, 202 for admissions, 200 otherwise); `no Retry-After`: 429/503 answers without one.",
            f"Refusals: {SPENT_USERS} free users who used their day's images through the API first "
            "(a submit from each is checked to be 429 with Retry-After before measuring); bad keys: a fresh "
            "random `kiln-…` key per request and one fixed key never issued. All are `POST /v1/jobs` "
            "with a JSON body.",
            f"Admissions: {ADMISSION_USERS} enterprise users (plan widened in the config: 1,000 concurrent "
            "jobs, a wait target no queue reaches) and a fake worker at 30 s a step, so nothing finishes "
            "during the run; PostgreSQL on a fresh schema, dropped after.",
        ],
    ), gpu_section
