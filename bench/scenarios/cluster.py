"""cluster: Kiln on a cluster (issue 11). Scale-out: the GPU-shaped worker on Ray worker actors, images/s
with two actors over twice one actor's, goal ≥ 0.9, the two measured side by side in one run.

Each `kiln serve` (executor = "ray") starts a local Ray of its own (in its own temporary directory,
token authentication from the environment, so nothing is written to ~/.ray) and sweeps it on exit.
The scheduler-at-scale simulation of the same section joins `run` as a part of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import statistics
import tempfile
from collections.abc import Iterator
from typing import Any

from bench.harness import Context, KilnServer, Section, closed_loop, free_port, spread, throughput

STEP_S, STEPS, BATCH = 0.05, 8, 8
ACTOR_CEILING = BATCH / (STEPS * STEP_S)  # images/s of one GPU-shaped actor: 20, and no CPU spent on it
N = 4  # images per request: two requests fill a batch, so HTTP is a small share of the cores
CALLERS_PER_ACTOR = 6  # 24 images in flight per actor: a full batch running, one or two waiting
PLANS: dict[str, dict[str, Any]] = {  # the defaults, enterprise widened so that nothing refuses the callers
    "free": {"images_per_day": 3, "priority_weight": 1, "max_concurrent": 1, "max_n": 1, "wait_target_s": 120.0},
    "plus": {"images_per_day": 200, "priority_weight": 4, "max_concurrent": 3, "max_n": 4, "wait_target_s": 30.0},
    "enterprise": {"priority_weight": 8, "max_concurrent": 1000, "max_n": 10, "wait_target_s": 1e7},
}
BODY = {"prompt": "a red circle in the centre on a white background", "size": "64x64", "n": N,
        "response_format": "b64_json"}
GOAL = 0.9


@contextlib.contextmanager
def _ray_env(folder: str) -> Iterator[None]:
    """What the servers' Ray reads: its temporary directory, and a token it needs not write down."""
    env = {"RAY_TMPDIR": folder, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16)}
    saved = {name: os.environ.get(name) for name in (*env, "RAY_ADDRESS")}
    os.environ.update(env)
    os.environ.pop("RAY_ADDRESS", None)  # a local Ray of its own, never one found in the environment
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _served(settings: dict[str, Any], actors: int, duration_s: float) -> dict[str, Any]:
    """Images/s of one fresh server with `actors` worker actors under `CALLERS_PER_ACTOR` callers each."""
    folder = tempfile.mkdtemp(prefix="kiln-bench-ray-")  # short: Ray's socket paths must fit in 107 bytes
    try:
        with _ray_env(folder), KilnServer(None, settings, fake_step_s=STEP_S, threads=1) as server:
            users = server.users([f"ent{i}" for i in range(CALLERS_PER_ACTOR * 2)], "enterprise")
            callers = CALLERS_PER_ACTOR * actors
            asyncio.run(closed_loop(server.url, users, BODY, callers, 3.0))  # warm the actors
            results = asyncio.run(closed_loop(server.url, users, BODY, callers, duration_s))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    ok = [r for r in results if r.status == 200]
    return {"actors": actors, "images_per_s": throughput(results, N), "ok": len(ok),
            "refused": sum(1 for r in results if r.status in (429, 503)),
            "errors": sum(1 for r in results if r.status not in (200, 429, 503)),
            "p50_s": statistics.median(r.latency_s for r in ok) if ok else None}


def scale_out(ctx: Context) -> dict[str, Any]:
    """One actor, then two, alternating (rounds), each on a fresh server with the same load per actor."""
    duration = 12.0 if ctx.quick else 25.0
    rounds = 1 if ctx.quick else 2
    runs = [_served(_settings(actors), actors, duration) for _ in range(rounds) for actors in (1, 2)]
    one = statistics.median(r["images_per_s"] for r in runs if r["actors"] == 1)
    two = statistics.median(r["images_per_s"] for r in runs if r["actors"] == 2)
    return {"runs": runs, "one": one, "two": two, "efficiency": two / (2 * one) if one else None,
            "duration_s": duration}


def _settings(actors: int) -> dict[str, Any]:
    return {"executor": "ray", "ray_actor_resources": {"CPU": 0.5}, "ray_max_actors": actors,
            "max_batch_size": BATCH, "max_batch_wait_s": 0.05, "plans": PLANS,
            # never the default ports: other servers may hold them on a shared machine
            "scheduler_url": f"tcp://127.0.0.1:{free_port()}", "scheduler_events_url": f"tcp://127.0.0.1:{free_port()}"}


def run(ctx: Context) -> Section:
    scale = scale_out(ctx)
    rows = [{
        "part": "scale-out (Ray actors, GPU-shaped worker)",
        "1 actor images/s": scale["one"], "2 actors images/s": scale["two"],
        "ceiling per actor": ACTOR_CEILING,
        "2 ÷ (2 × 1)": scale["efficiency"], "goal": f"≥ {GOAL}",
        "runs 1 actor": spread([r["images_per_s"] for r in scale["runs"] if r["actors"] == 1]),
        "runs 2 actors": spread([r["images_per_s"] for r in scale["runs"] if r["actors"] == 2]),
        "refused": sum(r["refused"] for r in scale["runs"]), "errors": sum(r["errors"] for r in scale["runs"]),
    }]
    met = scale["efficiency"] is not None and scale["efficiency"] >= GOAL
    summary = (
        f"Scale-out on Ray: the GPU-shaped worker (`kiln.testing:load_fake_pipeline`, {STEPS} steps of "
        f"{STEP_S} s, batches of {BATCH}: {ACTOR_CEILING:.0f} images/s per actor and no CPU) on one worker "
        f"actor, then on two, through `kiln serve` with `executor = \"ray\"` (a local Ray it starts), "
        f"{CALLERS_PER_ACTOR} closed-loop callers per actor asking n={N} at 64×64 over HTTP. Two actors "
        f"gave **{scale['two']:.1f} images/s**, one gave {scale['one']:.1f}: "
        f"**{scale['efficiency']:.2f}** of linear (goal ≥ {GOAL}: {'met' if met else 'not met'})."
    )
    notes = [
        f"Rounds of one actor then two, each {scale['duration_s']:.0f} s on a fresh server (the median of "
        "the rounds is reported); Ray's own processes, the server and the load generator share the "
        "machine's cores with whatever else runs.",
        "Both Ray actors are on one node here: the figure is what the executor and the engine add on "
        "top of the actors (streaming every step back, placing batches), not the network between nodes.",
    ]
    return Section("cluster", summary, rows, notes=notes, data=scale)
