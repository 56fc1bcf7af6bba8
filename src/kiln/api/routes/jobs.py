"""Kiln's jobs: submit without waiting, look up, list and cancel your own (404 for anyone else's)."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Header, Query

from kiln.api.deps import CurrentAccount, State
from kiln.api.ratelimit import current_usage
from kiln.api.routes.images import _spec
from kiln.api.schemas import ERRORS, ErrorDetail, GenerationRequest, JobInfo, JobList
from kiln.errors import RetryLater
from kiln.service import jobs

router = APIRouter(prefix="/v1", tags=["jobs"])


def job_info(view: jobs.JobView) -> JobInfo:
    error = None
    if view.error_code:
        error = ErrorDetail(message=view.error_message or "", type="server_error", code=view.error_code)
    return JobInfo(
        id=view.id, status=view.status, kind=view.kind, model=view.model, n=view.n,  # type: ignore[arg-type]
        size=f"{view.width}x{view.height}", created=int(view.created_at.timestamp()),
        finished=int(view.finished_at.timestamp()) if view.finished_at else None,
        image_ids=list(view.image_ids), charge_state=view.charge_state, error=error,
    )


@router.post("/jobs", response_model=JobInfo, status_code=202, responses=ERRORS)
async def submit_job(
    body: GenerationRequest,
    state: State,
    account: CurrentAccount,
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key", max_length=255)] = None,
) -> JobInfo:
    """Admit a generation and return at once; poll GET /v1/jobs/{id}."""
    spec = _spec(state, body, "generate", "generate")
    state.moderation.check(spec.prompt)
    digest = jobs.request_hash({"endpoint": "generations", **body.model_dump(exclude_none=True)})
    plan = await asyncio.to_thread(state.plans.get, account.plan_name)
    try:
        admission = await asyncio.to_thread(
            jobs.create_job, state.db, state.store, account=account, plan=plan, spec=spec,
            now=state.clock.now(), idempotency_key=idempotency_key, request_hash=digest,
        )
    except RetryLater as exc:
        exc.headers = (await current_usage(state, account))[1]  # type: ignore[attr-defined]
        raise
    if admission.created:
        await state.runner.submit(admission.job.id)
    return job_info(admission.job)


@router.get("/jobs", response_model=JobList, responses=ERRORS)
async def list_jobs(
    state: State, account: CurrentAccount, limit: Annotated[int, Query(ge=1, le=100)] = 20
) -> JobList:
    views = await asyncio.to_thread(jobs.list_jobs, state.db, account.user_id, limit)
    return JobList(data=[job_info(v) for v in views])


@router.get("/jobs/{job_id}", response_model=JobInfo, responses=ERRORS)
async def get_job(job_id: str, state: State, account: CurrentAccount) -> JobInfo:
    return job_info(await asyncio.to_thread(jobs.get_job, state.db, job_id, account.user_id))


@router.delete("/jobs/{job_id}", response_model=JobInfo, responses=ERRORS)
async def cancel_job(job_id: str, state: State, account: CurrentAccount) -> JobInfo:
    """Cancel a queued or running job; its charge is refunded once."""
    view = await asyncio.to_thread(jobs.cancel_job, state.db, job_id, account.user_id)
    await state.runner.cancel(job_id)
    return job_info(view)
