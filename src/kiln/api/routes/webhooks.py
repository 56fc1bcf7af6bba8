"""Your webhook signing secret: read it (made on first read) and rotate it (the old one signs
nothing from then on). Deliveries themselves are sent by the scheduler process."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter

from kiln.api.deps import CurrentAccount, State
from kiln.api.schemas import ERRORS, WebhookSecretResponse
from kiln.service import webhooks_secret

router = APIRouter(prefix="/v1/webhooks", tags=["webhooks"])


@router.get("/secret", response_model=WebhookSecretResponse, responses=ERRORS)
async def get_secret(state: State, account: CurrentAccount) -> WebhookSecretResponse:
    """The secret your job webhooks are signed with (`whsec_…`, Standard Webhooks)."""
    return WebhookSecretResponse(secret=await asyncio.to_thread(webhooks_secret.get_secret, state.db,
                                                                account.user_id))


@router.post("/secret/rotate", response_model=WebhookSecretResponse, responses=ERRORS)
async def rotate_secret(state: State, account: CurrentAccount) -> WebhookSecretResponse:
    """A new secret; every delivery sent from now on (retries of earlier events too) is signed with it."""
    return WebhookSecretResponse(secret=await asyncio.to_thread(webhooks_secret.rotate_secret, state.db,
                                                                account.user_id))
