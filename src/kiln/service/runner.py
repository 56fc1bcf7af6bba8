"""The seam between the HTTP API and whatever executes jobs.

Routes speak only to a `JobRunner`: admit a request (`admitting`: the engine's wait estimate, maybe
degraded, maybe Overloaded), `submit` the job that `jobs.create_job` then made, follow its `events`,
`wait` for its outcome, `cancel` it. A runner must end every job it starts through `complete_job`,
`fail_job` or `cancel_job`, so the quota ledger stays exact whatever happens in the pipeline.
`kiln.service.engine_runner.EngineJobRunner` is the one Kiln serves with.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, ContextManager, Protocol

from kiln.engine import Admitted
from kiln.service import jobs
from kiln.service.plans import PlanLimits

TERMINAL_EVENTS = ("completed", "failed", "cancelled")


@dataclass(frozen=True)
class JobOutcome:
    job_id: str
    status: str
    """succeeded · failed · cancelled, or queued/running when `wait` timed out."""
    image_ids: tuple[str, ...] = ()
    error_code: str | None = None
    error_message: str | None = None

    @property
    def finished(self) -> bool:
        return self.status in jobs.TERMINAL


def outcome_of(view: jobs.JobView) -> JobOutcome:
    return JobOutcome(view.id, view.status, view.image_ids, view.error_code, view.error_message)


@dataclass(frozen=True)
class JobEvent:
    """One event of a job as clients see it; `id` counts up per job (SSE's Last-Event-ID)."""

    id: int
    name: str
    """queued · position · started · requeued · progress · completed · failed · cancelled"""
    data: dict[str, Any]

    @property
    def terminal(self) -> bool:
        return self.name in TERMINAL_EVENTS


def terminal_event(view: jobs.JobView) -> tuple[str, dict[str, Any]]:
    """A finished job's last event, from its row: `completed` carries the stored images' ids."""
    if view.status == "succeeded":
        return "completed", {"image_ids": list(view.image_ids)}
    if view.status == "failed":
        return "failed", {"error": {"code": view.error_code or "generation_failed",
                                    "message": view.error_message or "The image could not be generated."}}
    return "cancelled", {}


class JobRunner(Protocol):
    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def admitting(self, user_id: str, plan: PlanLimits, spec: jobs.JobSpec) -> ContextManager[Admitted]:
        """Before anything is reserved: accept, accept degraded, or raise Overloaded. The admitted
        work counts as queued until the block (which creates and submits the job) ends."""
        ...

    async def submit(self, job_id: str) -> None:
        """Hand over a job that `create_job` admitted (status queued, charge reserved)."""
        ...

    async def wait(self, job_id: str, timeout_s: float) -> JobOutcome:
        """The job's outcome once it is finished, or its current status after `timeout_s`."""
        ...

    async def cancel(self, job_id: str) -> None:
        """Stop a job's work (the caller has already cancelled and refunded it via `cancel_job`)."""
        ...

    def position(self, job_id: str) -> tuple[int | None, float | None]:
        """(jobs ahead, seconds until it starts) for a job this runner holds; (None, None) otherwise."""
        ...

    def active_jobs(self, user_id: str) -> int:
        """The user's unfinished jobs held by this runner: a lower bound of their jobs in the database,
        so a refusal based on it is always right (the database's count stays the authority)."""
        ...

    def events(self, job_id: str, after: int = 0) -> AsyncIterator[JobEvent]:
        """The job's events numbered above `after`, replayed then live, ending with the terminal one."""
        ...

    def last_event_id(self, job_id: str) -> int | None:
        """A finished job's terminal event id, where the runner remembers it."""
        ...
