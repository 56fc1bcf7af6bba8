"""What the scenarios share: the machine's description, a Kiln server in a subprocess, closed- and
open-loop HTTP load, percentiles, and the report's sections."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import tomli_w

REPO = Path(__file__).resolve().parent.parent
EMBEDDED = REPO / "src" / "kiln" / "embedded" / "model"


# ----------------------------------------------------------------------------------------- report


@dataclass
class Section:
    name: str
    summary: str
    table: list[dict[str, Any]] = field(default_factory=list)
    plots: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)

    def markdown(self) -> str:
        lines = [f"## {self.name}", "", self.summary, ""]
        if self.table:
            cols = list(dict.fromkeys(c for row in self.table for c in row))
            lines.append("| " + " | ".join(cols) + " |")
            lines.append("|" + "---|" * len(cols))
            for row in self.table:
                lines.append("| " + " | ".join(_fmt(row.get(c)) for c in cols) + " |")
            lines.append("")
        for plot in self.plots:
            lines += [f"![{self.name}]({plot})", ""]
        for note in self.notes:
            lines += [f"- {note}"]
        if self.notes:
            lines.append("")
        return "\n".join(lines)


    def save(self, folder: Path) -> None:
        (folder / f"{self.name}.json").write_text(json.dumps(dataclasses.asdict(self), default=str, indent=1))

    @classmethod
    def load(cls, path: Path) -> Section:
        return cls(**json.loads(path.read_text()))


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


@dataclass
class Context:
    out: Path
    quick: bool
    threads: int
    model_path: Path
    results: dict[str, Section] = field(default_factory=dict)


def machine() -> dict[str, str]:
    gpu = "none"
    if shutil.which("nvidia-smi"):
        probe = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                               capture_output=True, text=True)
        gpu = probe.stdout.strip() or "none"
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=REPO).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                           text=True, cwd=REPO).stdout.strip()
    return {
        "cores": str(os.cpu_count()),
        "cpu": cpu,
        "gpu": gpu,
        "commit": commit + ("+dirty" if dirty else ""),
        "python": platform.python_version(),
    }


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------ the server


class KilnServer:
    """`kiln serve` in a subprocess on a fresh SQLite database, with users and keys made up front."""

    def __init__(self, model: Path | None, settings: dict[str, Any], *, fake_step_s: float | None = None,
                 cpu: str | None = None, threads: int = 2) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="kiln-bench-"))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cpu = cpu
        self.threads = threads
        self.keys: dict[str, str] = {}
        config: dict[str, Any] = {
            "database_url": f"sqlite:///{self.dir / 'kiln.db'}",
            "data_dir": str(self.dir),
            "images_dir": str(self.dir / "images"),
            "torch_threads": threads,
            **settings,
        }
        if fake_step_s is not None:
            config["default_model"] = "fake"
            config["models"] = {"fake": {"path": str(self.dir), "loader": "kiln.testing:load_fake_pipeline",
                                         "native_size": 64, "steps": 8, "options": {"step_s": fake_step_s}}}
        elif model is not None:
            config["default_model"] = "kiln-embedded"
            config["models"] = {"kiln-embedded": {"path": str(model)}}
        self.config = self.dir / "kiln.toml"
        self.config.write_text(tomli_w.dumps(config))
        self.process: subprocess.Popen[bytes] | None = None

    def kiln(self, *args: str) -> str:
        result = subprocess.run([sys.executable, "-m", "kiln", "--config", str(self.config), *args],
                                capture_output=True, text=True, env=self._env())
        if result.returncode != 0:
            raise RuntimeError(f"kiln {' '.join(args)}: {result.stderr.strip()[-500:]}")
        return result.stdout.strip()

    def _env(self) -> dict[str, str]:
        return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(self.threads)}

    def user(self, name: str, plan: str) -> str:
        return self.users([name], plan)[name]

    def users(self, names: list[str], plan: str) -> dict[str, str]:
        """Create users on `plan` with one key each, in one process (the CLI's service code)."""
        script = (
            "import json, sys\n"
            "from kiln.cli.context import CliState\n"
            "from kiln.service import accounts\n"
            f"state = CliState(config_file={str(self.config)!r})\n"
            "db = state.db()\n"
            "keys = {}\n"
            f"for name in {names!r}:\n"
            f"    accounts.create_user(db, name, {plan!r})\n"
            "    keys[name] = accounts.create_key(db, name)[0]\n"
            "print(json.dumps(keys))\n"
        )
        result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=self._env())
        if result.returncode != 0:
            raise RuntimeError(f"creating users: {result.stderr.strip()[-500:]}")
        created = json.loads(result.stdout.strip().splitlines()[-1])
        self.keys.update(created)
        return created

    def set_plan(self, plan: str, *args: str) -> None:
        self.kiln("plans", "set", plan, *args)

    def __enter__(self) -> KilnServer:
        self.kiln("db", "upgrade")
        command = [sys.executable, "-m", "kiln", "--config", str(self.config), "serve", "--port",
                   str(self.port)]
        if self.cpu:
            command = ["taskset", "-c", self.cpu, *command]
        self.log = open(self.dir / "server.log", "wb")  # noqa: SIM115
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT, env=self._env())
        deadline = time.time() + 180
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"kiln serve exited: {(self.dir / 'server.log').read_text()[-2000:]}")
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise RuntimeError("kiln serve did not become ready")

    def __exit__(self, *_: object) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


# ------------------------------------------------------------------------------------------ load


@dataclass
class Result:
    user: str
    status: int
    latency_s: float
    started_s: float
    retry_after: str | None = None
    error: str | None = None


async def one_request(client: httpx.AsyncClient, key: str, user: str, body: dict[str, Any], t0: float,
                      path: str = "/v1/images/generations") -> Result:
    start = time.perf_counter()
    try:
        response = await client.post(path, json=body, headers={"Authorization": f"Bearer {key}"})
        return Result(user, response.status_code, time.perf_counter() - start, start - t0,
                      response.headers.get("retry-after"),
                      None if response.status_code < 400 else response.text[:200])
    except httpx.HTTPError as exc:
        return Result(user, 0, time.perf_counter() - start, start - t0, None, repr(exc))


async def closed_loop(url: str, users: dict[str, str], body: dict[str, Any], concurrency: int,
                      duration_s: float, path: str = "/v1/images/generations") -> list[Result]:
    """`concurrency` callers, each sending the next request as soon as the last one answers."""
    results: list[Result] = []
    names = list(users)
    limits = httpx.Limits(max_connections=concurrency + 8, max_keepalive_connections=concurrency + 8)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        t0 = time.perf_counter()
        stop = t0 + duration_s

        async def caller(i: int) -> None:
            name = names[i % len(names)]
            while time.perf_counter() < stop:
                results.append(await one_request(client, users[name], name, body, t0, path))

        await asyncio.gather(*(caller(i) for i in range(concurrency)))
    return results


async def open_loop(url: str, users: dict[str, str], body: dict[str, Any], rate_per_s: float,
                    duration_s: float) -> list[Result]:
    """Requests at a fixed rate whatever the answers (how a crowd behaves), users in turn."""
    names = list(users)
    tasks: list[asyncio.Task[Result]] = []
    limits = httpx.Limits(max_connections=2000, max_keepalive_connections=200)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        t0 = time.perf_counter()
        count = int(rate_per_s * duration_s)
        for i in range(count):
            delay = t0 + i / rate_per_s - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            name = names[i % len(names)]
            tasks.append(asyncio.create_task(one_request(client, users[name], name, body, t0)))
        return list(await asyncio.gather(*tasks))


def throughput(results: list[Result], images_per_request: int = 1) -> float:
    done = [r for r in results if r.status == 200]
    if not done:
        return 0.0
    span = max(r.started_s + r.latency_s for r in done) - min(r.started_s for r in done)
    return len(done) * images_per_request / span if span > 0 else 0.0
