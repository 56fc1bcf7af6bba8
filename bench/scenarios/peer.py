"""peer: aquiles-image (its own virtual environment) and Kiln serving the same model on the same load,
one after the other: goodput (images delivered within each plan's wait target) and p99."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import httpx

from bench.harness import (
    REPO,
    Context,
    KilnServer,
    Result,
    Section,
    closed_loop,
    free_port,
    open_loop,
    percentile,
)
from bench.plots import bar_plot

PEER_VENV = REPO / "bench" / ".peer-venv"
PEER_VERSION = "0.8.3"
TARGETS_S = {"enterprise": 15.0, "free": 120.0}


def install_peer() -> Path:
    """aquiles-image in its own venv, torch pinned to the CPU wheel, torchvision removed (see PEERS)."""
    python = PEER_VENV / "bin" / "python"
    if not python.exists():
        subprocess.run(["python3", "-m", "venv", str(PEER_VENV)], check=True)
        constraints = PEER_VENV / "constraints.txt"
        constraints.write_text("torch==2.13.0\n")
        pip = [str(python), "-m", "pip", "install", "-q"]
        subprocess.run([*pip, "torch==2.13.0"], check=True)
        subprocess.run([*pip, "-c", str(constraints), f"aquiles-image=={PEER_VERSION}"], check=True)
        subprocess.run([str(python), "-m", "pip", "uninstall", "-y", "-q", "torchvision"], check=False)
    return python


class PeerServer:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.dir = Path(tempfile.mkdtemp(prefix="aquiles-bench-"))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> PeerServer:
        python = install_peer()
        defaults = json.loads((self.ctx.model_path / "kiln.json").read_text())
        env = {**os.environ, "XDG_DATA_HOME": str(self.dir / "data"), "TMPDIR": str(self.dir),
               "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(self.ctx.threads)}
        command = [str(python), str(REPO / "bench" / "peer_launcher.py"), "serve", "--host", "127.0.0.1",
                   "--port", str(self.port), "--model", str(self.ctx.model_path), "--auto-pipeline",
                   "--auto-pipeline-type", "t2i", "--set-steps", str(defaults["steps"]),
                   "--guidance-scale", str(defaults["guidance_scale"]), "--max-batch-size", "16",
                   "--batch-timeout", "0.05", "--max-concurrent-infer", "64", "--force"]
        self.log = open(self.dir / "server.log", "wb")  # noqa: SIM115
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        deadline = time.time() + 300
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError("aquiles-image exited: " + (self.dir / "server.log").read_text()[-3000:])
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code < 500:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError("aquiles-image did not come up")

    def __exit__(self, *_: object) -> None:
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


async def mixed_load(url: str, enterprise: dict[str, str], free: dict[str, str], body: dict,
                     rate: float, duration_s: float) -> tuple[list[Result], list[Result]]:
    return await asyncio.gather(closed_loop(url, enterprise, body, 1, duration_s),
                                open_loop(url, free, body, rate, duration_s))


def score(paid: list[Result], crowd: list[Result], duration_s: float) -> dict:
    def good(results: list[Result], target: float) -> int:
        return sum(1 for r in results if r.status == 200 and r.latency_s <= target)

    goodput = (good(paid, TARGETS_S["enterprise"]) + good(crowd, TARGETS_S["free"])) / duration_s
    return {
        "goodput images/s": goodput,
        "enterprise p99 s": percentile([r.latency_s for r in paid if r.status == 200], 99),
        "free p99 s": percentile([r.latency_s for r in crowd if r.status == 200], 99),
        "free delivered": sum(1 for r in crowd if r.status == 200),
        "refused (429/503)": sum(1 for r in paid + crowd if r.status in (429, 503)),
        "refusals with Retry-After": sum(1 for r in paid + crowd if r.status in (429, 503) and r.retry_after),
        "errors": sum(1 for r in paid + crowd if r.status not in (200, 429, 503)),
    }


def run(ctx: Context) -> Section:
    capacity = ctx.results["saturation"].data["served"]
    duration = 20.0 if ctx.quick else 45.0
    rate = 2 * capacity
    body = {"prompt": "a red circle on the left on a blue background", "size": "256x256",
            "response_format": "b64_json", "model": str(ctx.model_path)}
    with KilnServer(ctx.model_path, {"model_aliases": {str(ctx.model_path): "kiln-embedded"}},
                    threads=ctx.threads) as server:
        server.set_plan("free", "--images-per-day", "1000000")
        enterprise = {"ent": server.user("ent", "enterprise")}
        free = server.users([f"free{i}" for i in range(100)], "free")
        asyncio.run(closed_loop(server.url, enterprise, body, 1, 3.0))
        kiln = score(*asyncio.run(mixed_load(server.url, enterprise, free, body, rate, duration)), duration)
    try:
        with PeerServer(ctx) as peer:
            anonymous = {"ent": "none"}
            asyncio.run(closed_loop(peer.url, anonymous, body, 1, 3.0))
            crowd = {f"free{i}": "none" for i in range(100)}
            aquiles = score(*asyncio.run(mixed_load(peer.url, anonymous, crowd, body, rate, duration)),
                            duration)
    except Exception as exc:  # noqa: BLE001 - the report says why the peer could not be measured
        return Section("peer", f"aquiles-image {PEER_VERSION} could not be measured: {exc}",
                       table=[{"server": "Kiln", **kiln}])
    ratio = kiln["goodput images/s"] / aquiles["goodput images/s"] if aquiles["goodput images/s"] else None
    return Section(
        name="peer",
        summary=(f"Same model, same load (one enterprise caller back-to-back plus a free crowd at "
                 f"{rate:.1f} requests/s, 2× Kiln's capacity, for {duration:.0f} s), one server after the "
                 f"other: Kiln's goodput is **{kiln['goodput images/s']:.2f} images/s** against "
                 f"aquiles-image's **{aquiles['goodput images/s']:.2f}**"
                 + (f" (**{ratio:.2f}×**)." if ratio else ".")),
        table=[{"server": "Kiln", **kiln}, {"server": f"aquiles-image {PEER_VERSION}", **aquiles}],
        plots=[bar_plot(ctx.out / "peer.png", "Goodput: images within the plan's wait target",
                        "images/s", {"Kiln": kiln["goodput images/s"],
                                     "aquiles-image": aquiles["goodput images/s"]})],
        notes=[
            "aquiles-image has no plans or users: its requests are all alike; goodput counts each "
            "request against the wait target of the plan it stands for (enterprise 15 s, free 120 s).",
            "aquiles-image runs with three run-time replacements (bench/peer_launcher.py): CPU device, "
            "CPU fp32 load, and 256x256 mapped to the model's native 64×64 so both denoise the same "
            "latents; Kiln serves 256x256 by drawing at 64×64 and resizing.",
            "Steps and guidance are server-wide flags on aquiles-image, set to Kiln's model defaults.",
        ],
    )
