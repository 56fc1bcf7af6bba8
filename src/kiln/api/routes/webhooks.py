"""Your webhooks: the signing secret (made on first read) and its rotation (the old one signs nothing
from then on), what became of a job's deliveries, and the endpoints a 410 Gone disabled (re-enable
one by deleting it from the list). Deliveries themselves are sent by the scheduler process."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Query

from kiln.api.deps import CurrentAccount, State
from kiln.api.schemas import (
    ERRORS,
    DisabledEndpoint,
    DisabledEndpointList,
    WebhookDeliveryInfo,
    WebhookDeliveryList,
    WebhookSecretResponse,
)
from kiln.errors import NotFound
from kiln.service import jobs, webhooks_outbox, webhooks_secret

router = APIRouter(prefix="/v1", tags=["webhooks"])


@router.get("/webhooks/secret", response_model=WebhookSecretResponse, responses=ERRORS)
async def get_secret(state: State, account: CurrentAccount) -> WebhookSecretResponse:
    """The secret your job webhooks are signed with (`whsec_…`, Standard Webhooks)."""
    return WebhookSecretResponse(secret=await asyncio.to_thread(webhooks_secret.get_secret, state.db,
                                                                account.user_id))


@router.post("/webhooks/secret/rotate", response_model=WebhookSecretResponse, responses=ERRORS)
async def rotate_secret(state: State, account: CurrentAccount) -> WebhookSecretResponse:
    """A new secret; every delivery sent from now on (retries of earlier events too) is signed with it."""
    return WebhookSecretResponse(secret=await asyncio.to_thread(webhooks_secret.rotate_secret, state.db,
                                                                account.user_id))


@router.get("/jobs/{job_id}/webhooks", response_model=WebhookDeliveryList, responses=ERRORS)
async def job_deliveries(job_id: str, state: State, account: CurrentAccount) -> WebhookDeliveryList:
    """Your job's webhook deliveries in order: status, attempts, the last answer or error."""
    await asyncio.to_thread(jobs.get_job, state.db, job_id, account.user_id)  # 404 unless yours
    rows = await asyncio.to_thread(webhooks_outbox.deliveries_of, state.db, job_id)
    return WebhookDeliveryList(data=[WebhookDeliveryInfo(
        id=row["id"], type=row["event_type"], url=row["url"], status=row["status"], attempts=row["attempts"],
        last_status_code=row["last_status_code"], last_error=row["last_error"],
        created=int(row["created_at"].timestamp()),
        finished=int(row["finished_at"].timestamp()) if row["finished_at"] else None,
    ) for row in rows])


@router.get("/webhooks/disabled", response_model=DisabledEndpointList, responses=ERRORS)
async def disabled_endpoints(state: State, account: CurrentAccount) -> DisabledEndpointList:
    """Your endpoints that answered 410 Gone: deliveries to them are dropped."""
    found = await asyncio.to_thread(webhooks_outbox.disabled_endpoints, state.db, account.user_id)
    return DisabledEndpointList(data=[DisabledEndpoint(url=url, disabled=int(at.timestamp())) for url, at in found])


@router.delete("/webhooks/disabled", response_model=DisabledEndpointList, responses=ERRORS)
async def enable_endpoint(
    state: State, account: CurrentAccount, url: Annotated[str, Query(max_length=2048)]
) -> DisabledEndpointList:
    """Enable a disabled endpoint again (deliveries written from now on are sent); 404 if it is not
    disabled. Answers with the endpoints still disabled."""
    if not await asyncio.to_thread(webhooks_outbox.enable_endpoint, state.db, account.user_id, url):
        raise NotFound("That webhook URL is not disabled.", param="url")
    return await disabled_endpoints(state, account)

