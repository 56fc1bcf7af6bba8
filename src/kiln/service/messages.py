"""What crosses between API processes and the scheduler process: small frozen msgspec structs.

API → scheduler (one ROUTER socket, many DEALERs): `Admit` (answered by `AdmitReply`), `Submit`,
`Release`, `Cancel`. Scheduler → every API (PUB/SUB): `JobUpdate` for each job event and `Status`,
the heartbeat that says the scheduler is there, how many workers it has and what /metrics shows.
Nothing here knows HTTP, SQL or torch.
"""

from __future__ import annotations

from typing import Any

import msgspec


class Admit(msgspec.Struct, frozen=True, tag=True):
    """Would this request be admitted now (maybe degraded)? The scheduler holds the work as queued
    until `Submit` or `Release` names `hold_id` (or the hold expires), so a flood arriving at once
    is judged as the queue it will become."""

    req_id: int
    hold_id: str
    user_id: str
    plan: str
    weight: int
    wait_target_s: float
    model: str
    task: str
    width: int
    height: int
    steps: int
    guidance_scale: float
    n: int
    relax: bool = False
    loras: tuple[tuple[str, float], ...] = ()


class AdmitReply(msgspec.Struct, frozen=True, tag=True):
    req_id: int
    accepted: bool
    expected_wait_s: float = 0.0
    position: int = 0
    """Queued jobs that would run before it (a guess; exact positions follow as updates)."""
    retry_after_s: float = 0.0
    message: str = ""
    steps: int = 0
    """The steps and size to run (degraded when they differ from the request's)."""
    width: int = 0
    height: int = 0


class Ticket(msgspec.Struct, frozen=True):
    """Everything the scheduler needs to run a job without reading its row again."""

    job_id: str
    user_id: str
    plan: str
    model: str
    task: str
    prompt: str
    seed: int
    n: int
    width: int
    height: int
    steps: int
    guidance_scale: float
    params: dict[str, Any]
    attempts: int = 0
    relax: bool = False

    @classmethod
    def of(cls, job: Any) -> Ticket:
        """From a `kiln.service.jobs.JobView` (the admitted row, or an adopted one)."""
        return cls(
            job_id=job.id, user_id=job.user_id, plan=job.plan_name, model=job.model,
            task=job.params.get("task", "generate"), prompt=job.prompt, seed=job.seed, n=job.n,
            width=job.width, height=job.height, steps=job.steps, guidance_scale=job.guidance_scale,
            params=job.params, attempts=job.attempts, relax=job.relax,
        )


class Submit(msgspec.Struct, frozen=True, tag=True):
    ticket: Ticket
    hold_id: str = ""


class Release(msgspec.Struct, frozen=True, tag=True):
    """An admission that did not become a job (quota, cap, a failed write): stop holding its work."""

    hold_id: str


class Cancel(msgspec.Struct, frozen=True, tag=True):
    job_id: str


class JobUpdate(msgspec.Struct, frozen=True, tag=True):
    """One job event: queued · position · started · requeued · progress · completed · failed ·
    cancelled. Terminal ones say what happened to the charge, so every API process can correct
    the usage it keeps in memory."""

    job_id: str
    user_id: str
    name: str
    data: dict[str, Any]
    charge_state: str = ""
    charge_units: int = 0


class Status(msgspec.Struct, frozen=True, tag=True):
    """The scheduler's heartbeat (a few times a second)."""

    scheduler_id: str
    started_at: float
    workers: int
    sent_at: float
    metrics: bytes = b""
    """The scheduler's Prometheus exposition, appended to the API's own at GET /metrics."""
    stats: dict[str, Any] = {}
    """Queue depth and throughput for the dashboard."""
    role: str = "active"
    """"active": it runs jobs and answers requests; "standby": it waits to take over (see `leadership`)."""


ToScheduler = Admit | Submit | Release | Cancel
FromScheduler = AdmitReply | JobUpdate | Status

_encoder = msgspec.msgpack.Encoder()
_to_scheduler = msgspec.msgpack.Decoder(ToScheduler)
_from_scheduler = msgspec.msgpack.Decoder(FromScheduler)


def encode(message: msgspec.Struct) -> bytes:
    return _encoder.encode(message)


def decode_to_scheduler(data: bytes) -> ToScheduler:
    return _to_scheduler.decode(data)


def decode_from_scheduler(data: bytes) -> FromScheduler:
    return _from_scheduler.decode(data)
