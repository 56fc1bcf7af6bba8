"""The caller's own API keys: list them (by prefix) and revoke one; anyone else's is a 404."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter

from kiln.api.deps import CurrentAccount, State
from kiln.api.schemas import ERRORS, KeyInfoResponse, KeyPrefix
from kiln.service import accounts

router = APIRouter(prefix="/v1", tags=["keys"])


def _info(key: accounts.KeyInfo) -> KeyInfoResponse:
    return KeyInfoResponse(
        prefix=key.prefix, label=key.label, created=int(key.created_at.timestamp()),
        revoked=int(key.revoked_at.timestamp()) if key.revoked_at else None,
    )


@router.get("/keys", response_model=list[KeyInfoResponse], responses=ERRORS)
async def list_keys(state: State, account: CurrentAccount) -> list[KeyInfoResponse]:
    return [_info(k) for k in await asyncio.to_thread(accounts.list_keys, state.db, account.name)]


@router.delete("/keys/{prefix}", response_model=KeyInfoResponse, responses=ERRORS)
async def revoke_key(prefix: KeyPrefix, state: State, account: CurrentAccount) -> KeyInfoResponse:
    """Revoke one of your keys by its prefix (or the whole key). The key making this call may revoke
    itself: the answer still comes, and requests with it fail from the next one on here, and within a
    second on every other API process. Revoking a revoked key again answers it as it is."""
    key = await asyncio.to_thread(accounts.revoke_key, state.db, prefix, user_id=account.user_id)
    state.keys.forget_prefix(key.prefix)
    return _info(key)
