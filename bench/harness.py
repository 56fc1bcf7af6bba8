"""What the scenarios share: the machine's description, a Kiln server in a subprocess (on SQLite or a
throw-away PostgreSQL schema), closed- and open-loop HTTP load from Python or from wrk, percentiles,
and the report's sections."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parent.parent
EMBEDDED = REPO / "src" / "kiln" / "embedded" / "model"
WRK_SCRIPT = REPO / "bench" / "wrk" / "flood.lua"
POSTGRES_URL = os.environ.get("KILN_BENCH_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


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


def pinning() -> tuple[str | None, str | None]:
    """(server's core, load generator's core) for `taskset -c`, or (None, None) where this process may
    use only one core (then both run unpinned and share it)."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2 or not shutil.which("taskset"):
        return None, None
    return str(cores[0]), str(cores[1])


def pinned(cpu: str | None, command: list[str]) -> list[str]:
    return ["taskset", "-c", cpu, *command] if cpu else command


@contextlib.contextmanager
def postgres_schema(base_url: str = POSTGRES_URL) -> Iterator[str]:
    """A fresh schema on `base_url`'s database, as a URL whose search_path points at it; dropped after
    (as tests/conftest.py does), so every run starts empty and leaves nothing behind."""
    import uuid

    import psycopg
    from sqlalchemy.engine import make_url

    schema = f"bench_{uuid.uuid4().hex[:12]}"
    plain = make_url(base_url).set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(plain, autocommit=True, connect_timeout=10) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    separator = "&" if "?" in base_url else "?"
    try:
        yield f"{base_url}{separator}options=-csearch_path%3D{schema}"
    finally:
        with psycopg.connect(plain, autocommit=True, connect_timeout=10) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


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
        import tomli_w  # the bench extra's; imported here so `make test` can import this module without it

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
        command = pinned(self.cpu, command)
        self.log = open(self.dir / "server.log", "wb")  # noqa: SIM115
        # A session of its own, so that whatever processes `kiln serve` starts can be swept on exit.
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT, env=self._env(),
                                        start_new_session=True)
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

    def cpu_s(self) -> tuple[float, float]:
        """(CPU seconds of the server's live processes, busy seconds of the core it is pinned to) so far:
        what each request cost the server, and how much of its core other work took."""
        if self.process is None:
            return 0.0, 0.0
        return session_cpu_s(self.process.pid), core_busy_s(self.cpu) if self.cpu else 0.0

    def __exit__(self, *_: object) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.process.pid, signal.SIGKILL)  # children that outlived their parent
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def session_cpu_s(sid: int) -> float:
    """utime + stime of every live process in session `sid` (a process's own figure includes its
    threads that have ended, which per-thread counters would lose), plus what the leader reaped."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # ended while we looked
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": state, ppid, pgrp, session, …
        if int(fields[3]) != sid:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
        if int(entry.name) == sid:
            total += int(fields[13]) + int(fields[14])  # cutime, cstime
    return total / tick


def core_busy_s(cpu: str) -> float:
    """Seconds core `cpu` has been busy (anything but idle and iowait) since boot, from /proc/stat."""
    for line in Path("/proc/stat").read_text().splitlines():
        name, *ticks = line.split()
        if name == f"cpu{cpu}":
            user, nice, system, _idle, _iowait, irq, softirq, steal = (int(t) for t in ticks[:8])
            return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
    return 0.0


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


# ------------------------------------------------------------------------------------------- wrk


@dataclass(frozen=True)
class WrkRequest:
    """One line of bench/wrk/flood.lua's spec file. key: a bearer key, `-` for none, `@random` for a
    fresh random one per request."""

    method: str
    path: str
    key: str = "-"
    body: str = ""

    def line(self) -> str:
        for part in (self.method, self.path, self.key, self.body):
            if "\t" in part or "\n" in part:
                raise ValueError(f"tab or newline in a wrk request field: {part!r}")
        return "\t".join((self.method, self.path, self.key, self.body))


@dataclass
class WrkRun:
    """What one wrk run reports through flood.lua's summary line."""

    requests: int
    duration_s: float
    connections: int
    status: dict[int, int]
    retry_after_missing: int
    quota_exceeded: int
    errors: dict[str, int]
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    mean_ms: float
    server_cpu_s: float | None = None
    """CPU the server's processes used during the run, where the caller measured it."""
    others_on_core_s: float | None = None
    """Busy time of the server's core during the run that was not the server's (other work's)."""

    @classmethod
    def parse(cls, stdout: str, connections: int) -> WrkRun:
        match = re.search(r"^KILN (\{.*\})$", stdout, re.MULTILINE)
        if not match:
            raise RuntimeError(f"no summary line from wrk: {stdout[-500:]!r}")
        raw = json.loads(match[1])
        lat = raw["latency_us"]
        return cls(
            requests=raw["requests"], duration_s=raw["duration_us"] / 1e6, connections=connections,
            status={int(k): v for k, v in raw["status"].items()},
            retry_after_missing=raw["retry_after_missing"], quota_exceeded=raw["quota_exceeded"],
            errors=raw["errors"], p50_ms=lat["p50"] / 1000, p90_ms=lat["p90"] / 1000,
            p99_ms=lat["p99"] / 1000, max_ms=lat["max"] / 1000, mean_ms=lat["mean"] / 1000,
        )

    @property
    def rate(self) -> float:
        """Answers per second, whatever their status."""
        return self.requests / self.duration_s if self.duration_s else 0.0

    def rate_of(self, *statuses: int) -> float:
        return sum(self.status.get(s, 0) for s in statuses) / self.duration_s if self.duration_s else 0.0

    def share(self, *statuses: int) -> float:
        return sum(self.status.get(s, 0) for s in statuses) / self.requests if self.requests else 0.0

    def closed_loop_rate(self, *statuses: int) -> float:
        """Answers of `statuses` per second by Little's law (connections ÷ mean latency): each connection
        is a caller that asks again at once, so this holds without the edge effect of counting only what
        finished inside the window (up to a whole latency per caller: 5 % of a 15 s run at 0.8 s)."""
        if not self.mean_ms:
            return 0.0
        return self.connections / (self.mean_ms / 1000) * (self.share(*statuses) if statuses else 1.0)

    @property
    def cpu_ms_per_request(self) -> float | None:
        if self.server_cpu_s is None or not self.requests:
            return None
        return self.server_cpu_s / self.requests * 1000

    @property
    def per_core_s(self) -> float | None:
        """Answers per second of the server's CPU: its rate were it to have a whole core to itself."""
        return self.requests / self.server_cpu_s if self.server_cpu_s else None

    @property
    def core_share(self) -> float | None:
        """Fraction of one core the server used while wrk ran (< 1 on a saturated server means others
        took the rest of its core)."""
        if self.server_cpu_s is None or not self.duration_s:
            return None
        return self.server_cpu_s / self.duration_s

    @property
    def others_share(self) -> float | None:
        """Fraction of the server's core that other work took during the run (0 on a quiet machine)."""
        if self.others_on_core_s is None or not self.duration_s:
            return None
        return max(0.0, self.others_on_core_s / self.duration_s)

    def mix(self) -> str:
        return " ".join(f"{s}:{n}" for s, n in sorted(self.status.items()))


class Wrk:
    """One wrk run (compiled load, one thread, pinned to `cpu`) over a list of requests taken in turn."""

    def __init__(self, url: str, requests: list[WrkRequest], *, connections: int, duration_s: float,
                 cpu: str | None, folder: Path, timeout_s: float = 30.0,
                 server: KilnServer | None = None) -> None:
        spec = Path(tempfile.mkstemp(prefix="wrk-", suffix=".tsv", dir=folder)[1])
        spec.write_text("\n".join(r.line() for r in requests) + "\n")
        self.connections = connections
        self.command = pinned(cpu, ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(duration_s))}s",
                                    f"--timeout={round(timeout_s)}s", "-s", str(WRK_SCRIPT), url, "--",
                                    str(spec)])
        self.process: subprocess.Popen[str] | None = None
        self.server, self.cpu_at_start = server, (0.0, 0.0)

    def start(self) -> Wrk:
        self.cpu_at_start = self.server.cpu_s() if self.server else (0.0, 0.0)
        self.process = subprocess.Popen(self.command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        text=True)
        return self

    def result(self) -> WrkRun:
        assert self.process is not None
        stdout, _ = self.process.communicate()
        run = WrkRun.parse(stdout, self.connections)
        if self.server:
            ran, busy = self.server.cpu_s()
            run.server_cpu_s = ran - self.cpu_at_start[0]
            if self.server.cpu:
                run.others_on_core_s = (busy - self.cpu_at_start[1]) - run.server_cpu_s
        return run

    def run(self) -> WrkRun:
        return self.start().result()


def median_run(runs: list[WrkRun], key: str = "rate") -> WrkRun:
    """The run whose `key` is the median (the lower middle one for an even count), so its latencies
    and mix come from the same run as its rate."""
    ordered = sorted(runs, key=lambda r: getattr(r, key))
    return ordered[(len(ordered) - 1) // 2]


def spread(values: list[float]) -> str:
    """`median (min–max)` of repeated measurements, for a report's table."""
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:,.0f}"
    return f"{statistics.median(values):,.0f} ({min(values):,.0f}–{max(values):,.0f})"
