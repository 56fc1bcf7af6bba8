"""RayExecutor on a real local Ray cluster: batches stream back from worker actors, a killed actor's
batch is reported lost and Ray restarts it, cancel is read between steps, and the actors (and the
capacity) follow the nodes that join and leave."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator

import pytest

from kiln.executor.base import BatchCancelled, BatchCompleted, BatchProgress, BatchStarted, WorkerLost
from kiln.executor.ray_executor import RayExecutor
from kiln.testing import prompt_colour

from executor.conftest import batch, collect, fake_model


def eventually(condition: Callable[[], bool], timeout_s: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


@pytest.fixture
def make_executor(ray_cluster) -> Iterator[Callable[..., RayExecutor]]:
    made: list[RayExecutor] = []

    def make(**options) -> RayExecutor:
        executor = RayExecutor(fake_model(), {}, "fake", address=ray_cluster.address, torch_threads=1, **options)
        executor.start()
        made.append(executor)
        return executor

    yield make
    for executor in made:
        executor.shutdown()


def test_an_actor_streams_a_batch_and_a_killed_actor_loses_only_its_batch(make_executor):
    executor = make_executor(actor_resources={"CPU": 1}, max_actors=1)
    assert executor.wait_ready(timeout_s=60) and executor.total_slots() == 1

    executor.submit(batch("ok", "a fox", "an owl", n=2))
    outputs = collect(executor, lambda o: isinstance(o, BatchCompleted))
    assert isinstance(outputs[0], BatchStarted) and outputs[0].worker_id.startswith("ray-")
    assert [o.step for o in outputs if isinstance(o, BatchProgress)] == [1, 2, 3, 4]
    image = outputs[-1].images["ok-r1"][1].image()
    assert image.size == (32, 32) and image.getpixel((0, 0)) == prompt_colour("an owl", 2)
    [load] = executor.model_loads()
    assert load.model == "fake" and load.device == "cpu"

    executor.submit(batch("long", "slow", steps=500))
    collect(executor, lambda o: isinstance(o, BatchProgress))
    executor.cancel("long")
    outputs = collect(executor, lambda o: isinstance(o, (BatchCancelled, BatchCompleted)))
    assert isinstance(outputs[-1], BatchCancelled)
    assert max(o.step for o in outputs if isinstance(o, BatchProgress)) < 500

    executor.submit(batch("doomed", "slow", steps=500))
    collect(executor, lambda o: isinstance(o, BatchProgress))
    pid = executor.worker_pid("doomed")
    os.kill(pid, signal.SIGKILL)
    lost = collect(executor, lambda o: isinstance(o, WorkerLost))[-1]
    assert lost.batch_id == "doomed"
    assert eventually(lambda: executor.free_slots() == 1)  # Ray restarted it, warm again
    assert executor.worker_pids() != [pid] and executor.total_slots() == 1
    executor.submit(batch("after", "fine"))
    assert isinstance(collect(executor, lambda o: isinstance(o, BatchCompleted))[-1], BatchCompleted)


def test_a_gpu_node_that_joins_gets_an_actor_per_gpu_and_takes_them_when_it_leaves(make_executor, ray_cluster):
    executor = make_executor(actor_resources={"GPU": 1}, poll_s=0.25)
    assert executor.total_slots() == 0  # the head has no GPU

    # Ray takes a node's GPU count as declared, so this node has two (fake) GPUs for Ray to hand out.
    node = ray_cluster.add_node(num_cpus=1, num_gpus=2)
    assert eventually(lambda: executor.total_slots() == 2)  # capacity follows the node in
    assert executor.wait_ready(timeout_s=60)
    assert sorted(executor.worker_gpus()) == ["0", "1"]  # each actor sees only its own GPU
    assert len(set(executor.worker_nodes())) == 1
    executor.submit(batch("there", "on the new node", steps=2))
    assert isinstance(collect(executor, lambda o: isinstance(o, BatchCompleted))[-1], BatchCompleted)

    executor.submit(batch("stranded", "slow", steps=500))
    collect(executor, lambda o: isinstance(o, BatchProgress))
    ray_cluster.remove_node(node)
    assert collect(executor, lambda o: isinstance(o, WorkerLost))[-1].batch_id == "stranded"
    assert eventually(lambda: executor.total_slots() == 0)  # and out
