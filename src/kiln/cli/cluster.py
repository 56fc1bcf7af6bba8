"""`kiln cluster` (`make cluster`): every piece of a Kiln cluster on this machine, in one command.

A Ray head of its own (a temporary directory, token authentication from the environment, no
dashboard), two `kiln serve --role scheduler` processes on it (`executor = "ray"`: one active, one
standing by), and API replicas (`kiln serve --role api`, each naming both schedulers) on one
PostgreSQL database and one Redis, with images in one directory every process shares. Each child's
settings are `KILN_*` variables; its output goes to a log file of its own. The command waits until
every piece is ready (each replica's /readyz, both schedulers' heartbeats), prints the addresses and
two demo users' keys, and stays in the foreground: Ctrl-C or SIGTERM stops everything it started,
the Ray head included. A scheduler or replica that dies is started again (kill -9 the active
scheduler: the standby takes over, and the dead one comes back as the new standby).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

import typer
from rich.console import Console

console = Console(soft_wrap=True)  # keys and URLs are copied whole: never wrapped

DATABASE_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/kiln_cluster"
REDIS_URL = "redis://127.0.0.1:6379/0"
REDIS_PREFIX = "kiln-cluster:"
STOP_GRACE_S = 20.0
"""How long a piece gets to stop after SIGTERM before it is killed."""
RESTART_AFTER_S = 1.0
DEMO_USERS = (("demo-enterprise", "enterprise"), ("demo-free", "free"))


class ClusterError(Exception):
    """A piece could not start: the message says which and why."""


@dataclass
class Piece:
    """One child process: how to start it, its log, and whether it is started again if it dies."""

    name: str
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    restart: bool = True
    process: subprocess.Popen[bytes] | None = None
    restarts: int = 0

    def start(self) -> None:
        log = open(self.log_path, "ab" if self.process is not None else "wb")  # noqa: SIM115 - a run's own log; a restart appends
        try:
            self.process = subprocess.Popen(
                self.argv, env=self.env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C reaches `kiln cluster` only, which stops them in order
                preexec_fn=_die_with_parent)
        finally:
            log.close()

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def terminate(self) -> None:
        if self.alive():
            assert self.process is not None
            self.process.send_signal(signal.SIGTERM)

    def reap(self, deadline: float) -> None:
        """Wait for it until `deadline`, then kill its process group (whatever it left behind too)."""
        if self.process is None:
            return
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(max(0.0, deadline - time.monotonic()))
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)  # its own session: the group is its id
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(5)


try:
    _prctl = ctypes.CDLL(None, use_errno=True).prctl  # loaded here: nothing is loaded in a forked child
except (OSError, AttributeError):  # not Linux
    _prctl = None


def _die_with_parent() -> None:
    """Linux: the child gets SIGTERM if `kiln cluster` itself is killed (-9 included)."""
    if _prctl is not None:
        _prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _port_taken(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


@dataclass
class ClusterPlan:
    """What `kiln cluster` starts: addresses, ports and the shared settings."""

    database_url: str
    redis_url: str
    redis_prefix: str
    data_dir: Path
    image_store: str
    host: str
    api_ports: list[int]
    ray_cpus: int
    config_file: Path | None = None
    ray_port: int = field(default_factory=free_port)
    scheduler_ports: list[tuple[int, int]] = field(
        default_factory=lambda: [(free_port(), free_port()) for _ in range(2)])

    def scheduler_urls(self) -> tuple[str, str]:
        return (",".join(f"tcp://127.0.0.1:{r}" for r, _ in self.scheduler_ports),
                ",".join(f"tcp://127.0.0.1:{e}" for _, e in self.scheduler_ports))

    def api_urls(self) -> list[str]:
        return [f"http://{self.host}:{port}" for port in self.api_ports]

    def shared_env(self) -> dict[str, str]:
        """The settings every Kiln process of the cluster shares; a `KILN_*` variable already set
        (other than these) passes through unchanged."""
        env = dict(os.environ)
        env.update(
            KILN_DATABASE_URL=self.database_url, KILN_REDIS_URL=self.redis_url, KILN_REDIS_PREFIX=self.redis_prefix,
            KILN_DATA_DIR=str(self.data_dir), KILN_IMAGES_DIR=str(self.data_dir / "images"),
            KILN_IMAGE_STORE=self.image_store, HF_HUB_OFFLINE=env.get("HF_HUB_OFFLINE", "1"),
            PYTHONUNBUFFERED="1",
        )
        if "torch_threads" not in self._config():
            env.setdefault("KILN_TORCH_THREADS", "1")  # one Ray CPU per worker actor
        if self.config_file is not None:
            env["KILN_CONFIG"] = str(self.config_file)
        return env

    def _config(self) -> dict[str, Any]:
        if self.config_file is None:
            return {}
        with open(self.config_file, "rb") as file:
            return tomllib.load(file)


class LocalCluster:
    def __init__(self, plan: ClusterPlan) -> None:
        self.plan = plan
        self.logs = plan.data_dir / "logs"
        self.ray_dir = Path(tempfile.mkdtemp(prefix="kiln-cluster-ray-"))  # short: Ray's socket paths fit 107 bytes
        self.ray_token = secrets.token_hex(16)
        self.ray: Piece | None = None
        self.schedulers: list[Piece] = []
        self.apis: list[Piece] = []
        self._stopping = STOPPING

    # ---- checks before anything starts

    def check(self) -> None:
        plan = self.plan
        for port in plan.api_ports:
            if _port_taken(plan.host, port):
                raise ClusterError(f"port {port} on {plan.host} is in use: stop what holds it, or pass other "
                                   f"--api-port values")
        if plan.database_url.startswith("postgresql"):
            ensure_database(plan.database_url)
        ping_redis(plan.redis_url)
        if not plan.image_store.startswith("s3://"):
            Path(plan.image_store).mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(parents=True, exist_ok=True)

    def migrate(self) -> None:
        result = subprocess.run([*_kiln(), "db", "upgrade"], env=self.plan.shared_env(), capture_output=True,
                                text=True, timeout=300)
        if result.returncode != 0:
            raise ClusterError(f"kiln db upgrade failed:\n{(result.stderr or result.stdout).strip()[-2000:]}")

    # ---- the pieces

    def ray_env(self) -> dict[str, str]:
        env = self.plan.shared_env()
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=self.ray_token, RAY_TMPDIR=str(self.ray_dir),
                   RAY_USAGE_STATS_ENABLED="0")
        return env

    def start_ray(self, timeout_s: float) -> None:
        plan = self.plan
        argv = [*_ray(), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
                "--port", str(plan.ray_port), "--num-cpus", str(plan.ray_cpus), "--include-dashboard=false",
                "--dashboard-agent-listen-port", str(free_port()), "--disable-usage-stats",
                "--temp-dir", str(self.ray_dir / "ray")]
        self.ray = Piece("ray-head", argv, self.ray_env(), self.logs / "ray-head.log", restart=False)
        self.ray.start()
        _wait(lambda: _listening(plan.ray_port), timeout_s, "the Ray head", self.ray)

    def start_schedulers(self) -> None:
        requests, events = self.plan.scheduler_urls()
        for index, (request_url, event_url) in enumerate(zip(requests.split(","), events.split(","), strict=True)):
            env = self.ray_env()
            env.update(KILN_EXECUTOR="ray", KILN_RAY_ADDRESS=f"127.0.0.1:{self.plan.ray_port}",
                       KILN_SCHEDULER_URL=request_url, KILN_SCHEDULER_EVENTS_URL=event_url,
                       KILN_SCHEDULER_ID=f"cluster-scheduler-{index + 1}")
            piece = Piece(f"scheduler-{index + 1}", [*_kiln(), "serve", "--role", "scheduler"], env,
                          self.logs / f"scheduler-{index + 1}.log")
            piece.start()
            self.schedulers.append(piece)

    def start_apis(self) -> None:
        requests, events = self.plan.scheduler_urls()
        for index, port in enumerate(self.plan.api_ports):
            env = self.plan.shared_env()
            env.update(KILN_SCHEDULER_URL=requests, KILN_SCHEDULER_EVENTS_URL=events)
            piece = Piece(f"api-{index + 1}", [*_kiln(), "serve", "--role", "api", "--host", self.plan.host,
                                               "--port", str(port)], env, self.logs / f"api-{index + 1}.log")
            piece.start()
            self.apis.append(piece)

    def wait_ready(self, timeout_s: float) -> dict[str, str]:
        """Until one scheduler says it is active and the other that it stands by, and every replica's
        /readyz answers 200 (database, Redis, scheduler, workers). Returns each scheduler's role."""
        _, events = self.plan.scheduler_urls()
        roles: dict[str, str] = {}

        def schedulers_up() -> bool:
            """One active with every worker's model loaded (so the first image waits for no load),
            the others standing by."""
            for piece, url in zip(self.schedulers, events.split(","), strict=True):
                status = heartbeat(url, 0.5)
                if status is not None:
                    loaded = status.role != "active" or 0 < status.workers <= status.stats.get("workers_ready", 0)
                    roles[piece.name] = status.role if loaded else "loading"
            return len(roles) == len(self.schedulers) and sorted(roles.values()) == ["active", *["standby"] * (
                len(self.schedulers) - 1)]

        _wait(schedulers_up, timeout_s, "the schedulers' heartbeats (one active with its workers loaded)",
              *self.schedulers)
        for piece, url in zip(self.apis, self.plan.api_urls(), strict=True):
            _wait(lambda url=url: readyz(url) == 200, timeout_s, f"{url}/readyz", piece, *self.schedulers)
        return roles

    def demo_users(self) -> list[tuple[str, str, str, str]]:
        """(name, plan, password, key) of each demo user (made once; a fresh key and password each run)."""
        from kiln.db.engine import make_engine, make_session_factory
        from kiln.service import accounts

        engine = make_engine(self.plan.database_url)
        factory = make_session_factory(engine)
        made = []
        try:
            for name, plan in DEMO_USERS:
                password = secrets.token_urlsafe(9)
                if not any(a.name == name for a in accounts.list_users(factory)):
                    accounts.create_user(factory, name, plan, password=password)
                else:
                    accounts.set_password(factory, name, password)
                key, _ = accounts.create_key(factory, name, "kiln cluster")
                made.append((name, plan, password, key))
        finally:
            engine.dispose()
        return made

    # ---- running and stopping

    def supervise(self) -> None:
        """Until stopped: start again a scheduler or replica that died; stop all if the Ray head dies."""
        while not self._stopping.wait(0.5):
            if self.ray is not None and not self.ray.alive():
                console.print(f"[bold red]the Ray head exited[/] (see {self.ray.log_path}); stopping")
                return
            for piece in [*self.schedulers, *self.apis]:
                if not piece.alive() and not self._stopping.is_set():
                    code = piece.process.returncode if piece.process is not None else None
                    console.print(f"{piece.name} exited (code {code}); starting it again "
                                  f"(log: {piece.log_path})", highlight=False)
                    if self._stopping.wait(RESTART_AFTER_S):
                        return
                    piece.restarts += 1
                    piece.start()

    def request_stop(self) -> None:
        self._stopping.set()

    def stop(self) -> None:
        """Replicas first (they hold clients), then both schedulers (the active one hands its jobs
        back), then the Ray head; anything still there after the grace period is killed."""
        self._stopping.set()
        for group in (self.apis, self.schedulers, [self.ray] if self.ray is not None else []):
            for piece in group:
                piece.terminate()
            deadline = time.monotonic() + STOP_GRACE_S
            for piece in group:
                piece.reap(deadline)
        shutil.rmtree(self.ray_dir, ignore_errors=True)


# ---- readiness probes

STOPPING = threading.Event()
"""Set by Ctrl-C / SIGTERM: a wait under way gives up at once."""


def _wait(ready: Any, timeout_s: float, what: str, *pieces: Piece) -> None:
    deadline = time.monotonic() + timeout_s
    while not ready():
        if STOPPING.is_set():
            raise ClusterError(f"stopped while waiting for {what}")
        for piece in pieces:
            if piece.process is not None and piece.process.poll() is not None:
                raise ClusterError(f"{piece.name} exited (code {piece.process.returncode}) while waiting for "
                                   f"{what}; the end of its log ({piece.log_path}):\n{_tail(piece.log_path)}")
        if time.monotonic() > deadline:
            logs = ", ".join(str(p.log_path) for p in pieces)
            raise ClusterError(f"{what} not ready within {timeout_s:.0f} s; see {logs}")
        time.sleep(0.5)


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def readyz(base_url: str) -> int | None:
    import httpx

    try:
        return httpx.get(f"{base_url}/readyz", timeout=5).status_code
    except httpx.HTTPError:
        return None


def heartbeat(events_url: str, timeout_s: float) -> Any:
    """The `Status` a scheduler's heartbeat on `events_url` says (its role, its workers), or None."""
    import zmq

    from kiln.service.messages import Status, decode_from_scheduler

    context = zmq.Context()  # its own, ended below: no I/O thread outlives the look
    sub = context.socket(zmq.SUB)
    try:
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.connect(events_url)
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            if not sub.poll(int(left * 1000)):
                return None
            with contextlib.suppress(Exception):
                message = decode_from_scheduler(sub.recv())
                if isinstance(message, Status):
                    return message
        return None
    finally:
        sub.close()
        context.term()


def ensure_database(url: str) -> None:
    """Create the PostgreSQL database `url` names if it is missing; a clear error if the server is away."""
    import psycopg
    from psycopg import sql
    from sqlalchemy.engine import make_url

    target = make_url(url)
    params = {"host": target.host or "127.0.0.1", "port": target.port or 5432, "user": target.username,
              "password": target.password, "dbname": "postgres", "connect_timeout": 5}
    try:
        with psycopg.connect(**{k: v for k, v in params.items() if v is not None}, autocommit=True) as conn:
            if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (target.database,)).fetchone() is None:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(target.database or "kiln")))
                console.print(f"created database [bold]{target.database}[/]")
    except psycopg.Error as exc:
        where = f"{params['host']}:{params['port']}"
        raise ClusterError(f"PostgreSQL at {where} is not reachable ({str(exc).strip().splitlines()[0]}); "
                           f"start it or pass --database-url") from None


def ping_redis(url: str) -> None:
    import redis

    client = redis.Redis.from_url(url, socket_connect_timeout=3, socket_timeout=3)
    try:
        client.ping()
    except redis.RedisError as exc:
        where = urlsplit(url).netloc.rsplit("@", 1)[-1]
        raise ClusterError(f"Redis at {where} is not reachable ({exc}); start it or pass --redis-url") from None
    finally:
        client.close()


def _kiln() -> list[str]:
    return [sys.executable, "-m", "kiln"]


def _ray() -> list[str]:
    beside = Path(sys.executable).with_name("ray")
    return [str(beside)] if beside.exists() else [sys.executable, "-c", "from ray.scripts.scripts import main; main()"]


# ---- the command

def cluster(
    ctx: typer.Context,
    database_url: Annotated[str, typer.Option(help="PostgreSQL for every process (created if missing).")]
    = DATABASE_URL,
    redis_url: Annotated[str, typer.Option(help="Redis every process shares.")] = REDIS_URL,
    redis_prefix: Annotated[str, typer.Option(help="Start of every Redis key and channel of this cluster.")]
    = REDIS_PREFIX,
    data_dir: Annotated[Path, typer.Option(help="State shared by every process: images, signing key, logs.")]
    = Path("var/cluster"),
    image_store: Annotated[str | None, typer.Option(
        help="A directory every process sees, or s3://bucket/prefix (default: DATA_DIR/images).")] = None,
    host: Annotated[str, typer.Option(help="Address the API replicas bind.")] = "127.0.0.1",
    api_port: Annotated[list[int] | None, typer.Option(help="One per API replica (default 8000 and 8010).")]
    = None,
    ray_cpus: Annotated[int, typer.Option(min=1, help="CPUs the Ray head offers (one worker actor each on CPU).")]
    = 2,
    demo_users: Annotated[bool, typer.Option(help="Create demo-enterprise and demo-free and print their keys.")]
    = True,
    ready_timeout_s: Annotated[float, typer.Option(help="How long each piece may take to be ready.")] = 240.0,
) -> None:
    """A local cluster: a Ray head, an active and a standby scheduler, two API replicas, on
    PostgreSQL and Redis. Stays in the foreground; Ctrl-C stops everything."""
    data_dir = data_dir.resolve()
    plan = ClusterPlan(
        database_url=database_url, redis_url=redis_url, redis_prefix=redis_prefix, data_dir=data_dir,
        image_store=image_store or str(data_dir / "images"), host=host, api_ports=list(api_port or [8000, 8010]),
        ray_cpus=ray_cpus, config_file=ctx.obj.config_file.resolve() if ctx.obj.config_file else None)
    local = LocalCluster(plan)
    previous = {sig: signal.signal(sig, lambda *_: local.request_stop()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        try:
            local.check()
            console.print("migrating the database …")
            local.migrate()
            console.print(f"starting a Ray head on 127.0.0.1:{plan.ray_port} …")
            local.start_ray(ready_timeout_s)
            local.start_schedulers()
            local.start_apis()
            console.print("waiting for the schedulers and the API replicas …")
            roles = local.wait_ready(ready_timeout_s)
            users = local.demo_users() if demo_users else []
        except ClusterError as exc:
            console.print(f"[bold red]error:[/] {exc}", highlight=False)
            raise typer.Exit(1) from None
        if not local._stopping.is_set():
            _print_ready(local, roles, users)
            local.supervise()
    finally:
        console.print("stopping the cluster …")
        local.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        console.print("stopped; nothing of it is running")


def _print_ready(local: LocalCluster, roles: dict[str, str], users: list[tuple[str, str, str, str]]) -> None:
    plan = local.plan
    requests, _ = plan.scheduler_urls()
    console.print("\n[bold green]Kiln cluster ready[/]", highlight=False)
    for url in plan.api_urls():
        console.print(f"  API replica   {url}   (OpenAI base_url {url}/v1, chat {url}/, metrics {url}/metrics)",
                      highlight=False)
    for piece, url in zip(local.schedulers, requests.split(","), strict=True):
        console.print(f"  scheduler     {piece.name} on {url}: {roles.get(piece.name)}", highlight=False)
    console.print(f"  Ray head      127.0.0.1:{plan.ray_port} (RAY_AUTH_MODE=token, RAY_AUTH_TOKEN={local.ray_token})",
                  highlight=False)
    console.print(f"  database      {plan.database_url}\n  Redis         {plan.redis_url} prefix {plan.redis_prefix}",
                  highlight=False)
    console.print(f"  images        {plan.image_store}\n  logs          {local.logs}/", highlight=False)
    for name, plan_name, password, key in users:
        console.print(f"  user {name} ({plan_name}): key {key}  web password {password}", highlight=False)
    kiln_env = f"KILN_DATABASE_URL={plan.database_url} kiln"
    console.print(f"\nMore users: {kiln_env} users create NAME --plan free; {kiln_env} keys create NAME",
                  highlight=False)
    console.print("Ctrl-C stops everything.\n")
