"""What crosses the engine's boundary: the batch key, requests in, events out. Frozen and small.

Nothing here knows accounts, HTTP, the database or torch: a tenant is a user id string, a plan is a
name with a weight and a wait target passed in with each request.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

REFERENCE_PIXELS = 512 * 512
"""A work unit is one image-step at 512×512; costs and throughput are counted in these."""


class BatchKey(NamedTuple):
    """Requests share a pipeline call only when their keys are equal."""

    model: str
    task: str
    width: int
    height: int
    steps: int
    guidance_scale: float
    loras: tuple[tuple[str, float], ...] = ()
    """LoRA adapters (name, scale), sorted by name: a call runs one set of adapters."""

    def units_per_image(self) -> float:
        return self.steps * (self.width * self.height) / REFERENCE_PIXELS


@dataclass(frozen=True)
class EngineRequest:
    """One job as the engine sees it. `job_id` is the identity: adding it twice is a no-op."""

    job_id: str
    user_id: str
    plan: str
    key: BatchKey
    prompt: str
    seed: int
    n: int = 1
    negative_prompt: str = ""
    init_image: bytes | None = None
    mask_image: bytes | None = None
    strength: float = 0.75
    weight: int = 1
    """The plan's priority weight now; the latest request of a plan updates the plan live."""
    wait_target_s: float = 120.0
    """The plan's queue wait target; admission degrades, then refuses, beyond it."""
    relax: bool = False
    """Idle-only: runs only when no other request can be dispatched."""
    attempts: int = 0
    """Starts this job already had (a restarted service re-submits running jobs with their count)."""
    min_steps: int = 1
    """Admission never degrades steps below this."""
    allow_smaller: bool = False
    """Admission may halve the image sides when overloaded (the caller will upscale or accept it)."""
    preview_every: int = 0
    """Ask for a small preview every this many steps (0: none)."""
    units: float = field(init=False, repr=False, compare=False)
    """Work units (512×512 image-steps); read on every queue change, so computed once."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "units", self.n * self.key.units_per_image())

    @property
    def images(self) -> int:
        return self.n

    def identity(self) -> tuple[object, ...] | None:
        """Requests with equal identity draw identical images; None for edits (never shared)."""
        if self.init_image is not None or self.mask_image is not None:
            return None
        return (self.key, self.prompt, self.negative_prompt, self.seed, self.n)


@dataclass(frozen=True)
class Degradation:
    """What admission changed to fit the plan's wait target, so the response can say so."""

    steps_from: int
    steps_to: int
    size_from: tuple[int, int]
    size_to: tuple[int, int]


@dataclass(frozen=True)
class Admitted:
    """Admission's answer for a request it accepts (a refusal raises `kiln.errors.Overloaded`)."""

    request: EngineRequest
    """The request to add: the original, or its degraded form."""
    expected_wait_s: float
    degraded: Degradation | None = None


# ---- events, per job, in this order: Queued, Position*, Started, Progress*, then one terminal
# (Completed · Failed · Cancelled). A requeue (worker lost, preempted, isolating a failure) emits
# Requeued and starts again from Position/Started.


@dataclass(frozen=True)
class EngineEvent:
    job_id: str


@dataclass(frozen=True)
class Queued(EngineEvent):
    position: int
    eta_s: float


@dataclass(frozen=True)
class Position(EngineEvent):
    position: int
    eta_s: float


@dataclass(frozen=True)
class Started(EngineEvent):
    attempt: int
    """1 for the first start; the service stores it as the job's attempts."""
    batch_id: str
    batch_images: int


@dataclass(frozen=True)
class Progress(EngineEvent):
    step: int
    total: int
    preview_png: bytes | None = None


@dataclass(frozen=True)
class Requeued(EngineEvent):
    reason: str
    """worker_lost · preempted · isolating"""


@dataclass(frozen=True)
class Completed(EngineEvent):
    images: tuple[object, ...] = field(default=())
    """The images in seed order, as the executor produced them (raw pixels from real workers)."""
    shared_with: int = 0
    """How many other jobs received these same images (identical seeded requests, computed once)."""


@dataclass(frozen=True)
class Failed(EngineEvent):
    code: str
    """generation_failed · out_of_memory · worker_crashed · too_many_attempts"""
    message: str


@dataclass(frozen=True)
class Cancelled(EngineEvent):
    pass


TERMINAL_EVENTS = (Completed, Failed, Cancelled)
