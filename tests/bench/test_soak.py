"""bench/scenarios/soak.py's verdicts: a real process's sample (this one), and "flat" that a growing
series fails and a spiky but steady one passes."""

from __future__ import annotations

import os

from bench.scenarios.soak import Sample, growth, sample_session


def _series(values: list[float]) -> list[Sample]:
    return [Sample(float(t), {"api": v}, {"api": 40}, {"api": 8}) for t, v in enumerate(values)]


def test_a_leak_is_growth_and_a_spike_is_not() -> None:
    leaking = _series([100 + 2 * t for t in range(40)])
    first, last, change = growth(leaking, "rss_mb", "api", warmup_s=10)
    assert last > first and change > 0.10
    spiky = _series([100.0 if t % 7 else 164.0 for t in range(40)])  # argon2's moment, then back
    assert abs(growth(spiky, "rss_mb", "api", warmup_s=10)[2]) < 0.10
    assert growth(spiky, "fds", "api", warmup_s=10)[2] == 0


def test_a_session_s_processes_are_sampled_by_role() -> None:
    leader = os.getsid(0)
    sample = sample_session(leader, 0.0)
    assert sum(sample.rss_mb.values()) > 1  # at least this process, in MiB
    assert sum(sample.fds.values()) >= 3
