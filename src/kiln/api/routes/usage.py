"""GET /v1/usage: the caller's plan and today's quota, with the same headers as image responses."""

from __future__ import annotations

from fastapi import APIRouter, Response

from kiln.api.deps import CurrentAccount, State
from kiln.api.schemas import ERRORS, UsageResponse
from kiln.service.admission import usage_headers

router = APIRouter(prefix="/v1", tags=["usage"])


@router.get("/usage", response_model=UsageResponse, responses=ERRORS)
async def get_usage(response: Response, state: State, account: CurrentAccount) -> UsageResponse:
    usage, headers = await usage_headers(state, account)
    response.headers.update(headers)
    return UsageResponse(
        plan=usage.plan, used=usage.used, limit=usage.limit, remaining=usage.remaining,
        resets_at=usage.resets_at.isoformat(),
    )
