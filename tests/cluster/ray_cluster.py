"""One real local Ray cluster per test session (Ray's own `Cluster` test helper), in a temporary
directory of its own, with token authentication from the environment so nothing is written to
`~/.ray`, no dashboard, and 2 CPUs on its head. Tests add and remove nodes on it (`ray_cluster.add`)."""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

RAY_ENV = ("RAY_TMPDIR", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN")
HEAD_CPUS = 2


@dataclass
class RayTestCluster:
    cluster: Any
    address: str
    temp_dir: str

    def add_node(self, **resources: float) -> Any:
        """Another raylet on this machine: `add_node(num_cpus=1, resources={...})` as Ray takes them."""
        return self.cluster.add_node(object_store_memory=80 * 2**20, **resources)

    def remove_node(self, node: Any) -> None:
        self.cluster.remove_node(node)


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[RayTestCluster]:
    saved = {name: os.environ.get(name) for name in RAY_ENV}
    temp_dir = tempfile.mkdtemp(prefix="kiln-ray-")  # short: Ray's socket paths must fit in 107 bytes
    os.environ.update(RAY_TMPDIR=temp_dir, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16))
    import ray
    from ray._private.authentication_test_utils import reset_auth_token_state
    from ray.cluster_utils import Cluster

    reset_auth_token_state()  # Ray reads the mode and token once per process: read them again now
    cluster = None
    try:
        cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": HEAD_CPUS, "include_dashboard": False, "temp_dir": os.path.join(temp_dir, "ray"),
            "object_store_memory": 80 * 2**20,
        })
        ray.init(address=cluster.address, namespace="kiln-tests", log_to_driver=False)
        yield RayTestCluster(cluster, cluster.address, temp_dir)
    finally:
        ray.shutdown()
        if cluster is not None:
            cluster.shutdown()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        reset_auth_token_state()
        shutil.rmtree(temp_dir, ignore_errors=True)
