"""Kiln's jobs: submit without waiting, look up with a live queue position, follow as server-sent
events (resumable with Last-Event-ID), list and cancel your own (404 for anyone else's)."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Depends, Header, HTTPException, Query, Response
from fastapi.sse import EventSourceResponse, ServerSentEvent

from kiln.api.deps import CurrentAccount, State
from kiln.api.headers import degraded_header
from kiln.api.routes.images import _spec
from kiln.api.schemas import ERRORS, SUBMIT_ERRORS, JobId, JobInfo, JobList, JobRequest
from kiln.api.state import AppState
from kiln.service import image_requests as ir
from kiln.errors import InvalidRequest
from kiln.service import jobs, webhooks_guard, webhooks_outbox
from kiln.service.accounts import Account
from kiln.service.admission import admit_job
from kiln.service.prompts import composer

router = APIRouter(prefix="/v1", tags=["jobs"])


def job_info(view: jobs.JobView, state: AppState | None = None, admission: jobs.Admission | None = None,
             place: tuple[int | None, float | None] | None = None) -> JobInfo:
    """The job object (`webhooks_outbox.job_object`, what its webhooks carry too) with a queued job's
    live position and wait; `place`: the position and wait already looked up (else this process's own)."""
    position = eta_s = None
    if state is not None and not view.terminal:
        position, eta_s = place if place is not None else state.runner.position(view.id)
        if position is None and admission is not None and admission.position is not None:
            position = admission.position  # the scheduler's guess, until its first update arrives
            eta_s = None if admission.expected_wait_s is None else round(admission.expected_wait_s, 3)
    return JobInfo(**{**webhooks_outbox.job_object(view), "queue_position": position, "eta_s": eta_s})


def _webhook_params(state: AppState, body: JobRequest) -> dict | None:
    """The job's webhook subscription, its URL checked by the SSRF guard (400 naming the field)."""
    if body.webhook_url is None:
        if body.webhook_events is not None:
            raise InvalidRequest("webhook_events needs a webhook_url.", param="webhook_events")
        return None
    url = str(webhooks_guard.check_url(body.webhook_url, state.settings.webhook_allow_private))
    return webhooks_outbox.subscription_params(url, body.webhook_events)


@router.post("/jobs", response_model=JobInfo, status_code=202, responses=SUBMIT_ERRORS)
async def submit_job(
    body: JobRequest,
    response: Response,
    state: State,
    account: CurrentAccount,
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key", max_length=255)] = None,
) -> JobInfo:
    """Admit a generation and return at once with its queue position and expected wait; follow it at
    GET /v1/jobs/{id}/events or poll GET /v1/jobs/{id}. With `image_id`, an edit of that image."""
    webhook = _webhook_params(state, body)
    uploads = None
    if body.image_id is not None:
        image = await asyncio.to_thread(jobs.get_image, state.db, body.image_id, account.user_id)  # 404
        content = await asyncio.to_thread(state.store.read, image.path)
        uploads = await asyncio.to_thread(ir.edit_inputs, content, None, state.settings.max_image_pixels)
        spec = await follow_up(state, account, body, image, _spec(state, body, "edit", "edit"))
    else:
        spec = first_prompt(state, body, _spec(state, body, "generate", "generate"))
    spec.params["preview_every"] = state.settings.preview_every_steps
    if webhook is not None:
        spec.params["webhook"] = webhook
    # A generation's Idempotency-Key is shared with POST /v1/images/generations (same job either way).
    endpoint = "generations" if body.image_id is None else "edits"
    digest = jobs.request_hash({"endpoint": endpoint, **body.model_dump(exclude_none=True)})
    admission = await admit_job(state, account, spec, idempotency_key=idempotency_key, digest=digest,
                                uploads=uploads)
    response.headers.update(degraded_header(admission.job.degraded))
    return job_info(admission.job, state, admission)


def first_prompt(state: AppState, body: JobRequest, spec: jobs.JobSpec) -> jobs.JobSpec:
    """A new picture's spec, its prompt completed for the embedded grammar's models (the user's words
    kept as `instruction`), unless `compose_prompt` is false."""
    made = None if body.compose_prompt is False else state.prompts.complete(spec.model, body.prompt)
    if made is None:
        return spec
    params = {**spec.params, "instruction": body.prompt, "composer": made.composer}
    return dataclasses.replace(spec, prompt=made.prompt, params=params)


async def follow_up(state: AppState, account: Account, body: JobRequest, image: jobs.ImageView,
                    spec: jobs.JobSpec) -> jobs.JobSpec:
    """An edit's spec with the prompt composed from the image's prompt and the follow-up (`body.prompt`,
    kept as `instruction`), unless `compose_prompt` is false."""
    params = {**spec.params, "instruction": body.prompt, "source_image_id": image.id}
    if body.compose_prompt is False:
        return dataclasses.replace(spec, params={**params, "composer": "literal"})
    state.moderation.check(body.prompt)  # a refused follow-up is never sent to a rewriter
    source = await asyncio.to_thread(jobs.get_job, state.db, image.job_id, account.user_id)
    earlier: list[str] = []
    if state.prompts.kind_for(spec.model) == "rewriter":
        earlier = await asyncio.to_thread(composer.earlier_turns, state.db, source.id, account.user_id)
    made = await state.prompts.compose(spec.model, source.prompt, body.prompt, earlier)
    return dataclasses.replace(spec, prompt=made.prompt, params={**params, "composer": made.composer})


@router.get("/jobs", response_model=JobList, responses=ERRORS)
async def list_jobs(
    state: State, account: CurrentAccount, limit: Annotated[int, Query(ge=1, le=100)] = 20
) -> JobList:
    views = await asyncio.to_thread(jobs.list_jobs, state.db, account.user_id, limit)
    return JobList(data=[job_info(v, state) for v in views])


@router.get("/jobs/{job_id}", response_model=JobInfo, responses=ERRORS)
async def get_job(job_id: JobId, state: State, account: CurrentAccount) -> JobInfo:
    view = await asyncio.to_thread(jobs.get_job, state.db, job_id, account.user_id)
    place = None if view.terminal else await state.runner.position_anywhere(view.id)  # from any replica
    return job_info(view, state, place=place)


@router.delete("/jobs/{job_id}", response_model=JobInfo, responses=ERRORS)
async def cancel_job(job_id: JobId, state: State, account: CurrentAccount) -> JobInfo:
    """Cancel a queued (it never runs) or running job (it stops at the next step); refunded once."""
    view = await asyncio.to_thread(jobs.cancel_job, state.db, job_id, account.user_id)
    state.refusals.ended(view.user_id, view.id, view.charge_state, view.charge_units)
    await state.runner.cancel(job_id)
    return job_info(view)


async def _resume_after(
    job_id: JobId,
    state: State,
    account: CurrentAccount,
    last_event_id: Annotated[str | None, Header(alias="Last-Event-ID")] = None,
) -> int:
    """Where a stream resumes; 404 if the job is not yours, 204 if its last event was seen."""
    view = await asyncio.to_thread(jobs.get_job, state.db, job_id, account.user_id)
    after = int(last_event_id) if last_event_id and last_event_id.isdigit() else 0
    last = await state.runner.last_event_id(job_id)
    if view.terminal and last is not None and after >= last:
        raise HTTPException(status_code=204)  # tells EventSource to stop reconnecting
    return after


@router.get("/jobs/{job_id}/events", response_class=EventSourceResponse, responses={
    200: {"content": {"text/event-stream": {}}, "description": "The job's events as they happen."},
    204: {"description": "The job is finished and the client has seen its last event."}, **ERRORS})
async def job_events(
    job_id: JobId, state: State, after: Annotated[int, Depends(_resume_after)]
) -> AsyncIterator[ServerSentEvent]:
    """Server-sent events: queued, position, started, requeued, progress (with a base64 PNG preview
    now and then), then one of completed (the stored images' ids), failed or cancelled. Each event has
    an id; reconnecting with Last-Event-ID resumes after it. FastAPI frames them and sends keep-alive
    comments while the job is quiet."""
    first = True
    async for event in state.runner.events(job_id, after):
        yield ServerSentEvent(data=event.data, event=event.name, id=str(event.id),
                              retry=1000 if first else None)
        first = False
