"""The scheduler at scale, small: Kiln's engine over many simulated GPUs with every plan backlogged
gives each plan its weight's share of GPU time, and enterprise work arriving under a free flood
starts within its target (the full-size run is `python -m bench.run --only cluster-sim`)."""

from __future__ import annotations

from bench.scenarios.scheduler_sim import TARGETS, simulate


def test_every_plan_gets_its_weights_share_of_many_gpus():
    result = simulate(gpus=16, users=400, sim_s=60.0, queued={"free": 3000, "plus": 1000, "enterprise": 500})
    for plan, want in result["weights"].items():
        assert abs(result["shares"][plan] - want) / want < 0.05, result["shares"]


def test_enterprise_starts_within_target_behind_a_free_flood():
    result = simulate(gpus=16, users=400, sim_s=60.0, queued={"free": 5000}, arrivals={"enterprise": 5.0})
    waits = sorted(result["waits"]["enterprise"])
    assert len(waits) > 100
    assert waits[int(0.99 * len(waits))] < TARGETS["enterprise"]
