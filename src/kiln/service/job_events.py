"""A job's outcome and events as clients see them, shared by the scheduler (which ends every job it
starts through `store_images`, `fail_job` or `cancel_job`, so the ledger stays exact) and the API
processes (`SchedulerClient`, which routes follow and wait on)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kiln.service import jobs

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
