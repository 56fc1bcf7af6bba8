"""How many Ray worker actors a node holds and what each reserves (no cluster needed: the nodes are
what `ray.nodes()` reports)."""

from __future__ import annotations

from kiln.executor.ray_executor import RayExecutor, _fits

from .conftest import fake_model


def test_a_node_holds_as_many_actors_as_its_resources_fit() -> None:
    assert _fits({"CPU": 16.0, "GPU": 8.0}, {"GPU": 1.0}) == 8
    assert _fits({"CPU": 16.0}, {"GPU": 1.0}) == 0
    assert _fits({"CPU": 16.0, "GPU": 8.0}, {"GPU": 1.0, "CPU": 4.0}) == 4  # the scarcer one decides
    assert _fits({"CPU": 2.0, "slot": 3.0}, {"slot": 1.5}) == 2


def test_actors_reserve_a_gpu_once_the_cluster_has_gpus_and_keep_to_it() -> None:
    executor = RayExecutor(fake_model(), {}, "fake", torch_threads=2)
    assert executor._need([{"CPU": 8.0}]) == {"CPU": 2.0}  # a CPU-only cluster: torch_threads CPUs each
    assert executor._need([{"CPU": 8.0}, {"CPU": 8.0, "GPU": 4.0}]) == {"GPU": 1.0}
    assert executor._need([{"CPU": 8.0}]) == {"GPU": 1.0}  # its GPU nodes left: wait for GPUs, not CPUs
    chosen = RayExecutor(fake_model(), {}, "fake", actor_resources={"accelerator": 1})
    assert chosen._need([{"CPU": 8.0, "GPU": 4.0}]) == {"accelerator": 1.0}
