"""Kiln's own `x-ratelimit-*-images` headers, on every image response (successes and refusals)."""

from __future__ import annotations

import asyncio
import datetime as dt

from kiln.api.state import AppState
from kiln.service.accounts import Account
from kiln.service.jobs import usage_of
from kiln.service.quota import Usage


def headers_for(usage: Usage, now: dt.datetime) -> dict[str, str]:
    reset_s = max(0, int((usage.resets_at - now).total_seconds()))
    return {
        "x-ratelimit-limit-images": "unlimited" if usage.limit is None else str(usage.limit),
        "x-ratelimit-remaining-images": "unlimited" if usage.remaining is None else str(usage.remaining),
        "x-ratelimit-reset-images": f"{reset_s}s",
    }


async def current_usage(state: AppState, account: Account) -> tuple[Usage, dict[str, str]]:
    now = state.clock.now()
    plan = await asyncio.to_thread(state.plans.get, account.plan_name)
    usage = await asyncio.to_thread(usage_of, state.db, account.user_id, plan, now)
    return usage, headers_for(usage, now)
