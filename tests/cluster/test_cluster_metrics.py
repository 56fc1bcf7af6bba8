"""Workers and capacity by node in /metrics (the local executor: this host; Ray: each Ray node), the
RayExecutor's slot gate (the thermal guard's rest between batches), the thermal guard's plan changes
announced to the other replicas over Redis, and `kiln cluster` (`make cluster`): clear errors when
PostgreSQL or Redis are away, its database created, and the whole cluster up, serving and stopped."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import time
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
import redis
from conftest import _postgres_schema_url
from engine_server import engine_settings
from prometheus_client.parser import text_string_to_metric_families

from kiln.engine.capacity import Capacity
from kiln.executor.base import BatchCompleted
from kiln.executor.ray_executor import RayExecutor
from kiln.service.redis_bus import PlansChanged, RedisBus
from kiln.service.thermal import ThermalGuard

from cluster.test_ray_serving import on_ray
from cluster.test_replicas import redis_prefix  # noqa: F401 - a Redis prefix of the test's own
from executor.conftest import batch, collect, fake_model

sqlite_only = pytest.mark.parametrize("empty_database_url", ["sqlite"], indirect=True)


def eventually(condition: Callable[[], object], timeout_s: float = 60.0) -> object:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if result := condition():
            return result
        time.sleep(0.1)
    return condition()


def by_node(http, name: str) -> dict[str, float]:  # type: ignore[no-untyped-def]
    """One metric of GET /metrics, node → value."""
    text = http.get("/metrics").text
    return {s.labels["node"]: s.value for family in text_string_to_metric_families(text)
            for s in family.samples if s.name == name}


@sqlite_only
def test_metrics_report_this_hosts_workers_and_their_capacity(start_server, settings, tmp_path, make_user) -> None:
    server = start_server(engine_settings(settings, tmp_path))
    core, host = server.scheduler.engine.core, socket.gethostname()
    slots = server.scheduler.executor.total_slots()
    ann = make_user(plan="plus")
    with server.client(ann.key) as http:
        assert http.post("/v1/images/generations", json={"prompt": "a lamp"}).status_code == 200
        assert eventually(lambda: by_node(http, "kiln_workers") == {host: slots})
        images = eventually(lambda: by_node(http, "kiln_capacity_images_per_s").get(host))
        assert images == pytest.approx(slots * core.throughput.images_per_s) and images > 0
        full = by_node(http, "kiln_capacity_units_per_s")[host]
        assert full == pytest.approx(slots * core.throughput.units_per_s, rel=0.05)

        async def rest_slot_0() -> None:
            core.set_capacity(0, 0.5)  # what the thermal guard does to a hot GPU's worker

        server.scheduler.call(rest_slot_0())
        halved = (slots - 0.5) / slots * full
        assert eventually(lambda: by_node(http, "kiln_capacity_units_per_s")[host] == pytest.approx(halved, rel=0.05))


@sqlite_only
def test_metrics_report_workers_per_ray_node(start_server, settings, tmp_path, ray_cluster, make_user) -> None:
    node = ray_cluster.add_node(num_cpus=1)  # the head has 2 CPUs: 2 actors there, 1 on this node
    try:
        server = start_server(on_ray(engine_settings(settings, tmp_path), ray_cluster, actors=3))
        executor = server.scheduler.executor
        assert eventually(lambda: executor.total_slots() == 3 and executor.wait_ready(1))
        expected = Counter(executor.worker_nodes())
        assert sorted(expected.values()) == [1, 2] and node.node_id in expected
        with server.client(make_user(plan="plus").key) as http:
            assert eventually(lambda: by_node(http, "kiln_workers") == {n: float(c) for n, c in expected.items()})
            assert http.post("/v1/images/generations", json={"prompt": "a boat"}).status_code == 200
            units = eventually(lambda: (u := by_node(http, "kiln_capacity_units_per_s")) and
                               all(v > 0 for v in u.values()) and u)
            assert units[node.node_id] * 2 == pytest.approx([v for n, v in units.items() if n != node.node_id][0])
    finally:
        ray_cluster.remove_node(node)


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_ray_worker_rests_between_batches_as_its_slot_gate_says(ray_cluster) -> None:
    clock = FakeClock()
    gate = Capacity(clock)
    gate.set_factor(0, 0.5)  # a hot GPU: half its time
    executor = RayExecutor(fake_model(), {}, "fake", address=ray_cluster.address, torch_threads=1,
                           actor_resources={"CPU": 1}, max_actors=1)
    executor.set_slot_gate(gate)
    executor.start()
    try:
        assert executor.wait_ready(timeout_s=60) and executor.free_slots() == 1
        executor.submit(batch("warm", "a kettle", steps=20))
        done = collect(executor, lambda o: isinstance(o, BatchCompleted))[-1]
        assert isinstance(done, BatchCompleted)
        opens_at = gate.next_open_at()
        assert opens_at is not None and opens_at > clock.now  # rests as long as it ran (factor 0.5)
        assert executor.free_slots() == 0
        with pytest.raises(RuntimeError):
            executor.submit(batch("too-soon", "a cup"))
        clock.now = opens_at
        assert executor.free_slots() == 1
        executor.submit(batch("after", "a cup"))
        assert isinstance(collect(executor, lambda o: isinstance(o, BatchCompleted))[-1], BatchCompleted)
    finally:
        executor.shutdown()


@sqlite_only
def test_the_thermal_guard_announces_its_plan_limits_to_every_replica(db, settings, tmp_path) -> None:
    url = os.environ.get("KILN_TEST_REDIS_URL")
    if not url:
        pytest.skip("KILN_TEST_REDIS_URL is not set")
    redis.Redis.from_url(url, socket_connect_timeout=5).ping()  # set but unreachable: fail, never skip
    prefix = f"kiln-test-{uuid.uuid4().hex[:12]}:"
    path = tmp_path / "gpus.jsonl"
    settings = settings.model_copy(update={
        "telemetry_source": "file", "telemetry_file": path, "thermal_cool_s": 0.0, "telemetry_poll_s": 60.0,
        "thermal_policy": {"free": {"images_per_day": 1}}, "redis_url": url, "redis_prefix": prefix})
    clock = FakeClock()
    capacity = Capacity(clock)
    engine = SimpleNamespace(core=SimpleNamespace(capacity=capacity, set_capacity=capacity.set_factor,
                                                  executor=SimpleNamespace(total_slots=lambda: 1), plan_caps={}),
                             wake=lambda: None)

    def reading(temp_c: int) -> None:
        with open(path, "a") as file:
            file.write(json.dumps({"gpu": 0, "temp_c": temp_c}) + "\n")

    async def scenario() -> int:
        replica = RedisBus(url, prefix)  # another replica's end of the bus
        heard = asyncio.Event()
        count = 0

        def on_plans(_notice: PlansChanged) -> None:
            nonlocal count
            count += 1
            heard.set()

        replica.on(PlansChanged, on_plans)
        await replica.start()
        guard = ThermalGuard(settings, engine, db, clock=clock)
        try:
            await asyncio.wait_for(replica.subscribed.wait(), 10)
            await guard.start()
            reading(95)  # hot: the free plan's limit is written, and announced
            await guard.poll_once()
            await asyncio.wait_for(heard.wait(), 5)
            heard.clear()
            reading(50)  # cool: given back, and announced
            await guard.poll_once()
            await asyncio.wait_for(heard.wait(), 5)
            return count
        finally:
            await guard.stop()
            await replica.stop()

    try:
        assert asyncio.run(scenario()) == 2
    finally:
        client = redis.Redis.from_url(url)
        for key in client.scan_iter(match=f"{prefix}*", count=500):
            client.delete(key)
        client.close()


def test_kiln_cluster_says_which_service_is_unreachable_and_starts_nothing(tmp_path) -> None:
    from typer.testing import CliRunner

    from kiln.cli import app

    runner = CliRunner()
    dead = free_port_number()
    no_redis = runner.invoke(app, ["cluster", "--database-url", f"sqlite:///{tmp_path}/k.db", "--redis-url",
                                   f"redis://127.0.0.1:{dead}/0", "--data-dir", str(tmp_path / "c")])
    assert no_redis.exit_code == 1 and f"Redis at 127.0.0.1:{dead} is not reachable" in no_redis.output
    no_postgres = runner.invoke(app, ["cluster", "--database-url",
                                      f"postgresql+psycopg://postgres@127.0.0.1:{dead}/kiln_cluster",
                                      "--data-dir", str(tmp_path / "c")])
    assert no_postgres.exit_code == 1 and f"PostgreSQL at 127.0.0.1:{dead} is not reachable" in no_postgres.output
    assert "nothing of it is running" in no_postgres.output and not (tmp_path / "c" / "logs").exists()


def test_kiln_cluster_creates_its_database_when_missing() -> None:
    base = os.environ.get("KILN_TEST_DATABASE_URL")
    if not base:
        pytest.skip("KILN_TEST_DATABASE_URL is not set")
    import psycopg
    from sqlalchemy.engine import make_url

    from kiln.cli.cluster import ensure_database

    name = f"kiln_cluster_test_{uuid.uuid4().hex[:8]}"
    url = make_url(base).set(database=name)
    ensure_database(url.render_as_string(hide_password=False))
    ensure_database(url.render_as_string(hide_password=False))  # there already: nothing to do
    admin = make_url(base)
    with psycopg.connect(host=admin.host, port=admin.port or 5432, user=admin.username, password=admin.password,
                         dbname=admin.database, autocommit=True) as conn:
        try:
            assert conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone() == (1,)
        finally:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}"')


def free_port_number() -> int:
    """A port nothing listens on (bound and released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _processes_with(marker: bytes) -> list[int]:
    """Processes whose environment holds `marker` (this test's own Redis prefix)."""
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if marker in environ.read_bytes():
                found.append(int(environ.parent.name))
        except OSError:
            continue
    return found


def test_kiln_cluster_starts_every_piece_serves_and_stops_leaving_nothing(tmp_path, redis_prefix) -> None:
    """`kiln cluster` for real (the fake model, one Ray CPU): ready, an image from the second replica,
    then SIGTERM stops the replicas, both schedulers and the Ray head."""
    import subprocess
    import sys

    import httpx

    base = os.environ.get("KILN_TEST_DATABASE_URL")
    schema_url = _postgres_schema_url(base) if base else None
    database_url = next(schema_url) if schema_url is not None else f"sqlite:///{tmp_path / 'kiln.db'}"
    (tmp_path / "model").mkdir()
    config = tmp_path / "kiln.toml"
    config.write_text(f'default_model = "fake"\nmodel_aliases = {{}}\n[models.fake]\npath = "{tmp_path / "model"}"\n'
                      f'loader = "kiln.testing:load_fake_pipeline"\nnative_size = 64\nsteps = 2\n')
    ports = [free_port_number(), free_port_number()]
    process = subprocess.Popen(
        [sys.executable, "-m", "kiln", "--config", str(config), "cluster", "--database-url", database_url,
         "--redis-url", os.environ["KILN_TEST_REDIS_URL"], "--redis-prefix", redis_prefix,
         "--data-dir", str(tmp_path / "cluster"), "--ray-cpus", "1", "--ready-timeout-s", "120",
         *[arg for port in ports for arg in ("--api-port", str(port))]],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    try:
        assert process.stdout is not None
        for line in process.stdout:
            lines.append(line)
            if "Ctrl-C stops everything" in line or "error:" in line:
                break
        output = "".join(lines)
        assert "Kiln cluster ready" in output, output
        assert ": active" in output and ": standby" in output
        key = next(w for line in lines if "demo-enterprise" in line for w in line.split() if w.startswith("kiln-"))
        with httpx.Client(base_url=f"http://127.0.0.1:{ports[1]}", timeout=60,
                          headers={"Authorization": f"Bearer {key}"}) as http:
            assert http.post("/v1/images/generations", json={"prompt": "a bell"}).status_code == 200
        assert httpx.get(f"http://127.0.0.1:{ports[0]}/readyz", timeout=10).json()["workers"] == 1
        assert _processes_with(f"KILN_REDIS_PREFIX={redis_prefix}".encode())
    finally:
        process.terminate()
        rest, _ = process.communicate(timeout=90)
        if schema_url is not None:
            next(schema_url, None)
    assert process.returncode == 0 and "nothing of it is running" in rest, rest
    assert _processes_with(f"KILN_REDIS_PREFIX={redis_prefix}".encode()) == []
