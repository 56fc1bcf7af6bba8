"""The engine's knobs, with their units and why they exist. Built from Settings at the app factory."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Preemption = Literal["off", "bound", "preempt", "both"]


@dataclass(frozen=True)
class EngineConfig:
    max_batch_images: int = 8
    """Most images in one pipeline call (settings.max_batch_size)."""
    max_batch_wait_s: float = 0.05
    """How long a partial batch is held for more requests with its key (settings.max_batch_wait_s)."""
    preemption: Preemption = "bound"
    """How paying work avoids waiting behind a long low-priority batch:
    bound: while higher-weight work waits or arrived within `bound_window_s`, a batch holds at most
    `bound_batch_images` images of lower-weight (or relax) work, whoever leads it; so a paying job
    waits behind a short batch and never rides in a long one. Nothing is thrown away.
    preempt: a running lower-weight batch is stopped at the next step and requeued at the head of
    its queue (at most `max_preemptions` times per request, and only before `preempt_max_progress`
    of its steps); the steps it had done are lost.
    both: bound and preempt. off: neither."""
    bound_batch_images: int = 2
    """Most lower-weight images in one batch while bounding applies."""
    bound_window_s: float = 30.0
    """A higher-weight arrival this recent counts as 'arriving' for bounding."""
    bound_gap_s: float = 0.25
    """Bounding applies only where a worker frees up less often than this (a full batch's time over
    the number of workers): with many workers better work gets one within it anyway, so
    lower-weight work keeps its full share of the GPUs. 0: bound whatever the gap."""
    max_preemptions: int = 2
    """A request is preempted at most this often, so free work always finishes."""
    preempt_max_progress: float = 0.5
    """A batch further along than this fraction of its steps is left to finish."""
    plan_max_running_images: dict[str, int] = field(default_factory=dict)
    """Per-plan cap on images running at once (a plan absent here is uncapped)."""
    throughput_prior_units_per_s: float = 20.0
    """Work units (512×512 image-steps) per second one worker is assumed to do before any batch is
    measured; replaced by an EWMA of real batch durations."""
    throughput_alpha: float = 0.3
    """Weight of the newest batch in the throughput EWMA."""
    refuse_at_target_x: float = 2.0
    """Expected wait over the plan's target degrades; over this multiple of it, refuses."""
    max_worker_crashes: int = 3
    """A request whose batch lost its worker this many times is failed as poison."""
    max_attempts: int = 10
    """Starts after which a request is failed whatever the reason (guards restarts that crash)."""
    position_interval_s: float = 1.0
    """Least time between two rounds of Position events (a requeue sends them at once)."""
    finished_memory: int = 10_000
    """Finished job ids remembered so a re-submitted one is ignored (add_request is idempotent)."""

    @classmethod
    def from_settings(cls, settings: Any, **overrides: Any) -> EngineConfig:
        values: dict[str, Any] = {
            "max_batch_images": settings.max_batch_size,
            "max_batch_wait_s": settings.max_batch_wait_s,
            "preemption": settings.preemption,
            "bound_batch_images": settings.bound_batch_images,
            "max_preemptions": settings.max_preemptions,
            "plan_max_running_images": dict(settings.plan_max_running_images),
            "throughput_prior_units_per_s": settings.throughput_prior_units_per_s,
            "refuse_at_target_x": settings.refuse_at_target_x,
            "max_worker_crashes": settings.max_worker_crashes,
        }
        values.update(overrides)
        return cls(**values)
