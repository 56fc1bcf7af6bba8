"""RayExecutor: a worker actor per GPU of a Ray cluster, with the LocalExecutor's interface.

Each actor (`kiln.executor.ray_worker.WorkerActor`) holds a loaded registry and runs one batch at a
time; its outputs stream back through a Ray streaming generator, read by a keeper thread per actor.
An actor whose process or node died is WorkerLost for its batch (the engine runs it again elsewhere);
Ray restarts the process (`max_restarts`), and an actor past its restarts is replaced. A monitor reads
the cluster's nodes every `poll_s`: a node that joins gets as many actors as its resources fit, a
node that leaves takes its actors away, and `total_slots` follows both. `ray` is imported only here.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kiln.executor.base import (
    BatchFailed, ExecBatch, ExecutorOutput, ModelLoad, OutputQueue, SlotGate, WorkerLost,
)
from kiln.executor.messages import BATCH_ENDS, FromWorker, ModelLoaded
from kiln.executor.ray_worker import MAX_CONCURRENCY, ActorReady, WorkerActor
from kiln.worker.registry import ModelInfo, ModelRegistry

log = logging.getLogger(__name__)

WAIT_STEP_S = 0.5
"""How long a keeper blocks in one `ray.wait`, so shutdown is seen this quickly."""

MAX_STARTUP_FAILURES = 5
"""A node whose actors die this many times in a row before they are ready gets no more (logged):
Kiln or the model is missing there, and each try would cost a process start."""


@dataclass
class _Actor:
    worker_id: str
    node_id: str
    handle: Any
    need: dict[str, float]
    """What it reserves (the executor's choice when it was made)."""
    ready: bool = False
    was_ready: bool = False
    gone: bool = False
    """Dead for good (its node left, its restarts are spent, or Kiln removed it)."""
    batch: ExecBatch | None = None
    batch_since: float = 0.0
    pid: int | None = None
    gpus: str | None = None
    loads: dict[str, ModelLoad] = field(default_factory=dict)
    assigned: threading.Event = field(default_factory=threading.Event)
    """Set when a batch is handed to it (or it must stop): its keeper thread wakes on it."""


class RayExecutor(OutputQueue):
    """Worker actors on a Ray cluster. Thread-safe; never blocks in poll, submit or cancel."""

    def __init__(
        self,
        models: dict[str, ModelInfo],
        aliases: dict[str, str],
        default: str,
        *,
        address: str | None = None,
        namespace: str = "kiln",
        actor_resources: dict[str, float] | None = None,
        max_actors: int | None = None,
        max_restarts: int = 3,
        torch_threads: int = 1,
        poll_s: float = 2.0,
    ) -> None:
        self._models = models
        self._aliases = aliases
        self._default = default
        self._address = address
        self._namespace = namespace
        self._resources = {k: float(v) for k, v in (actor_resources or {}).items() if v > 0}
        self._max_actors = max_actors
        self._max_restarts = max_restarts
        self._torch_threads = torch_threads
        self._poll_s = poll_s
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._actors: list[_Actor] = []
        self._outputs: list[ExecutorOutput] = []
        self._notify: Callable[[], None] | None = None
        self._gate: SlotGate | None = None
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._monitor_thread: threading.Thread | None = None
        self._ids = itertools.count(1)
        self._startup_failures: dict[str, int] = {}
        self._seen_gpus = False
        self._owns_ray = False
        self._ray: Any = None
        self._actor_class: Any = None
        self.replaced = 0
        """Actors created to replace ones that died for good (their node stayed)."""

    @classmethod
    def from_settings(cls, settings: Any) -> RayExecutor:
        registry = ModelRegistry.from_settings(settings)
        return cls(
            {name: registry.info(name) for name in registry.names}, registry.aliases, registry.default,
            address=settings.ray_address, namespace=settings.ray_namespace,
            actor_resources=settings.ray_actor_resources, max_actors=settings.ray_max_actors,
            max_restarts=settings.ray_max_restarts, torch_threads=settings.torch_threads,
            poll_s=settings.ray_poll_s,
        )

    # ---- lifecycle

    def start(self) -> None:
        import ray

        self._ray = ray
        self._actor_class = ray.remote(WorkerActor)
        if not ray.is_initialized():
            starts_local = self._address is None and not os.environ.get("RAY_ADDRESS")
            ray.init(address=self._address, namespace=self._namespace,
                     **({"include_dashboard": False} if starts_local else {}))
            self._owns_ray = True
        self._reconcile()
        self._monitor_thread = threading.Thread(target=self._monitor, name="kiln-ray-monitor", daemon=True)
        self._monitor_thread.start()

    def shutdown(self, timeout_s: float = 5.0) -> None:
        self._stopping.set()
        if self._monitor_thread is not None:
            self._monitor_thread.join(timeout_s)  # no actor is made after this
        with self._lock:
            actors = list(self._actors)
            for actor in actors:
                actor.assigned.set()
        for actor in actors:
            self._kill(actor)
        for thread in list(self._threads):
            thread.join(timeout_s)
        if self._owns_ray:
            self._ray.shutdown()

    # ---- the Executor interface

    def total_slots(self) -> int:
        with self._lock:
            return sum(1 for a in self._actors if not a.gone)

    def free_slots(self) -> int:
        with self._lock:
            return sum(1 for slot, a in enumerate(self._live()) if self._open(slot, a))

    def ready_slots(self) -> int:
        """Live actors that have loaded their models (idle or busy)."""
        with self._lock:
            return sum(1 for a in self._live() if a.ready)

    def submit(self, batch: ExecBatch) -> None:
        with self._lock:
            actor = next((a for slot, a in enumerate(self._live()) if self._open(slot, a)), None)
            if actor is None:
                raise RuntimeError("no idle worker: check free_slots() before submit()")
            actor.batch, actor.batch_since = batch, time.monotonic()
            actor.assigned.set()

    def set_slot_gate(self, gate: SlotGate | None) -> None:
        """Ask `gate` before giving a slot a batch, and tell it how long each batch kept its slot. Slot i
        is the i-th live actor (the order of `worker_nodes()` and `worker_gpus()`)."""
        self._gate = gate

    def _live(self) -> list[_Actor]:
        return [a for a in self._actors if not a.gone]

    def _open(self, slot: int, actor: _Actor) -> bool:
        idle = actor.ready and actor.batch is None and not actor.gone
        return idle and (self._gate is None or self._gate.may_start(slot))

    def cancel(self, batch_id: str) -> None:
        with self._lock:
            actor = next((a for a in self._actors if a.batch is not None and a.batch.batch_id == batch_id), None)
        if actor is not None:
            actor.handle.cancel.remote(batch_id)  # fire and forget: a dead actor reports its batch lost

    def wait_ready(self, timeout_s: float) -> bool:
        """Block until there is an actor and every live one has loaded its model (True), or the timeout."""
        with self._changed:
            return self._changed.wait_for(
                lambda: any(not a.gone for a in self._actors) and all(a.ready for a in self._actors if not a.gone),
                timeout_s)

    # ---- for tests and operators

    def worker_pid(self, batch_id: str) -> int | None:
        with self._lock:
            return next((a.pid for a in self._actors if a.batch is not None and a.batch.batch_id == batch_id), None)

    def worker_pids(self) -> list[int]:
        with self._lock:
            return [a.pid for a in self._actors if a.ready and not a.gone and a.pid is not None]

    def busy_pids(self) -> list[int]:
        """The processes of the actors running a batch now."""
        with self._lock:
            return [a.pid for a in self._actors if a.batch is not None and not a.gone and a.pid is not None]

    def worker_gpus(self) -> list[str | None]:
        """The CUDA_VISIBLE_DEVICES each ready actor reported (Ray sets it per actor)."""
        with self._lock:
            return [a.gpus for a in self._actors if a.ready and not a.gone]

    def worker_nodes(self) -> list[str]:
        """The Ray node id of each live actor."""
        with self._lock:
            return [a.node_id for a in self._actors if not a.gone]

    def model_loads(self) -> list[ModelLoad]:
        """What each live actor loaded: load seconds and memory (read by /metrics at scrape time)."""
        with self._lock:
            return [load for a in self._actors if not a.gone for load in a.loads.values()]

    # ---- placement: actors follow the cluster's nodes

    def _monitor(self) -> None:
        while not self._stopping.wait(self._poll_s):
            try:
                self._reconcile()
            except Exception:  # noqa: BLE001 - a GCS hiccup must not end the monitor
                log.exception("reading the Ray cluster's nodes failed; trying again in %.1f s", self._poll_s)

    def _reconcile(self) -> None:
        """Actors for nodes that fit more; none for nodes that left (their batches are lost), nor of
        a kind the cluster no longer calls for (CPU actors once GPUs are there)."""
        nodes = {n["NodeID"]: n["Resources"] for n in self._ray.nodes() if n.get("Alive")}
        need = self._need(nodes.values())
        dropped: list[tuple[_Actor, str]] = []
        wanted: list[str] = []
        with self._lock:
            if self._stopping.is_set():
                return
            for actor in self._actors:
                if actor.gone:
                    continue
                if actor.node_id not in nodes:
                    dropped.append((actor, "its node left"))
                elif actor.need != need and actor.batch is None:
                    dropped.append((actor, f"actors now reserve {need}"))
                else:
                    continue
                actor.gone, actor.ready = True, False
            self._actors = [a for a in self._actors if not a.gone or a.batch is not None]
            live = [a for a in self._actors if not a.gone]
            budget = (self._max_actors - len(live)) if self._max_actors is not None else len(nodes) * 4096
            for node_id in sorted(nodes):
                if self._startup_failures.get(node_id, 0) >= MAX_STARTUP_FAILURES:
                    continue
                on_node = sum(1 for a in live if a.node_id == node_id and a.need == need)
                more = max(0, min(_fits(nodes[node_id], need) - on_node, budget))
                wanted += [node_id] * more
                budget -= more
            if dropped:
                self._changed.notify_all()
        for actor, why in dropped:
            log.warning("Ray worker %s removed: %s", actor.worker_id, why)
            actor.assigned.set()
            self._kill(actor)
        added = [self._create(node_id, need) for node_id in wanted]  # outside the lock: Ray calls
        with self._lock:
            self._actors.extend(added)
            self._changed.notify_all()
        for actor in added:
            thread = threading.Thread(target=self._keep, args=(actor,), name=f"kiln-{actor.worker_id}", daemon=True)
            thread.start()
            self._threads.append(thread)
        if dropped:
            self._notify_driver()

    def _need(self, nodes: Any) -> dict[str, float]:
        """What one actor reserves: as set, else a GPU once the cluster has (or had) one, else CPUs."""
        if self._resources:
            return self._resources
        self._seen_gpus = self._seen_gpus or any(r.get("GPU", 0) >= 1 for r in nodes)
        return {"GPU": 1.0} if self._seen_gpus else {"CPU": float(self._torch_threads)}

    def _create(self, node_id: str, need: dict[str, float]) -> _Actor:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        worker_id = f"ray-{node_id[:8]}-{next(self._ids)}"
        others = {k: v for k, v in need.items() if k not in ("CPU", "GPU", "memory")}
        options: dict[str, Any] = dict(
            num_cpus=need.get("CPU", 0), num_gpus=need.get("GPU", 0), resources=others,
            max_restarts=self._max_restarts, max_concurrency=MAX_CONCURRENCY,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
        )
        if "memory" in need:
            options["memory"] = need["memory"]
        handle = self._actor_class.options(**options).remote(
            worker_id, self._models, self._aliases, self._default, self._torch_threads)
        return _Actor(worker_id, node_id, handle, need)

    def _kill(self, actor: _Actor) -> None:
        try:
            self._ray.kill(actor.handle, no_restart=True)
        except Exception:  # noqa: BLE001 - already dead, or the cluster is gone
            pass

    # ---- one keeper thread per actor: readiness, its batch's stream, its death

    def _keep(self, actor: _Actor) -> None:
        from ray.exceptions import ActorUnavailableError, RayError

        while not self._stopping.is_set() and not actor.gone:
            try:
                ready = self._get(actor.handle.ready.remote())
            except ActorUnavailableError:  # restarting: ask again
                self._stopping.wait(WAIT_STEP_S)
                continue
            except RayError as exc:  # dead for good: restarts spent, killed, or its node left
                self._retire(actor, exc)
                return
            if ready is None:
                return
            self._on_ready(actor, ready)
            while self._run_next(actor):
                pass

    def _run_next(self, actor: _Actor) -> bool:
        """Wait for a batch and stream it; False when the actor must be asked whether it is alive."""
        actor.assigned.wait()
        actor.assigned.clear()
        batch = actor.batch
        if batch is None or self._stopping.is_set() or actor.gone:
            if actor.gone and batch is not None:
                self._lose(actor, batch)
            return False
        if not self._stream(actor, batch):
            self._lose(actor, batch)
            return False
        return True

    def _stream(self, actor: _Actor, batch: ExecBatch) -> bool:
        """Pass the batch's outputs on as they come; False if the stream broke before its outcome."""
        from ray.exceptions import RayError, RayTaskError

        try:
            for ref in actor.handle.run.options(num_returns="streaming").remote(batch):
                message = self._ray.get(ref)
                self._on_message(actor, message)
                if isinstance(message, BATCH_ENDS) and message.batch_id == batch.batch_id:
                    return True
        except RayTaskError as exc:  # the actor's own code raised: the batch failed, the actor lives
            self._on_message(actor, BatchFailed(batch.batch_id, "generation_failed", str(exc)[:500]))
            return True
        except RayError as exc:
            log.warning("Ray worker %s lost running %s: %s", actor.worker_id, batch.batch_id, type(exc).__name__)
        # If the actor lives on (the stream broke, not the process), the batch stops at its next step.
        with contextlib.suppress(Exception):
            actor.handle.cancel.remote(batch.batch_id)
        return False

    def _get(self, ref: Any) -> Any:
        """`ray.get` that gives up (None) when the executor stops."""
        while not self._stopping.is_set():
            done, _ = self._ray.wait([ref], timeout=WAIT_STEP_S)
            if done:
                return self._ray.get(done[0])
        return None

    def _on_ready(self, actor: _Actor, ready: ActorReady) -> None:
        with self._lock:
            actor.ready = actor.was_ready = True
            self._startup_failures[actor.node_id] = 0
            actor.pid, actor.gpus = ready.pid, ready.gpus
            actor.loads.update({load.model: load for load in ready.loads})
            self._changed.notify_all()
        self._notify_driver()

    def _on_message(self, actor: _Actor, message: FromWorker) -> None:
        if isinstance(message, ModelLoaded):
            with self._lock:
                actor.loads[message.load.model] = message.load
            return
        with self._lock:
            if isinstance(message, BATCH_ENDS) and actor.batch is not None and actor.batch.batch_id == message.batch_id:
                actor.batch = None  # free before the engine sees the output
                slot = next((i for i, a in enumerate(self._live()) if a is actor), None)
                if self._gate is not None and slot is not None:
                    self._gate.ran(slot, time.monotonic() - actor.batch_since)
            self._outputs.append(message)
            self._changed.notify_all()
        self._notify_driver()

    def _lose(self, actor: _Actor, batch: ExecBatch) -> None:
        with self._lock:
            actor.ready = False
            if actor.batch is batch:
                actor.batch = None
            self._outputs.append(WorkerLost(batch.batch_id, actor.worker_id, None))
            self._changed.notify_all()
        self._notify_driver()

    def _retire(self, actor: _Actor, exc: BaseException) -> None:
        """The actor is dead for good; the monitor puts a fresh one on its node if the node stays."""
        with self._lock:
            was_gone, actor.gone, actor.ready = actor.gone, True, False
            failures = 0
            if not actor.was_ready:
                failures = self._startup_failures[actor.node_id] = self._startup_failures.get(actor.node_id, 0) + 1
            self._changed.notify_all()
        if failures >= MAX_STARTUP_FAILURES:
            log.error("Ray worker actors on node %s died %d times before they were ready; none goes there now "
                      "(last: %s)", actor.node_id[:12], failures, exc)
        elif not was_gone and not self._stopping.is_set():
            log.warning("Ray worker %s is dead (%s); replacing it", actor.worker_id, type(exc).__name__)
            self.replaced += 1
        self._notify_driver()

    def _notify_driver(self) -> None:
        notify = self._notify
        if notify is not None:
            notify()


def _fits(resources: dict[str, float], need: dict[str, float]) -> int:
    """How many actors needing `need` a node with `resources` (its totals) holds."""
    return min((int(resources.get(name, 0.0) // amount) for name, amount in need.items()), default=0)
