"""Fixtures for the cluster tests (Ray, and the helpers' other cluster parts)."""

from cluster.ray_cluster import ray_cluster  # noqa: F401
