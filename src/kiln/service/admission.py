"""The create path shared by the Images API and the Jobs API: moderation, refusals from memory, the
scheduler's admission (accept · degrade · 503), then the admission transaction (group-committed),
then the job handed to the scheduler.

A flood is refused before anything is written: memory knows the used-up quotas, full concurrency caps
and the scheduler's latest "overloaded" for each user. Every refusal is counted by plan and reason.
While no scheduler answers, jobs that need no promise (`POST /v1/jobs`) are still queued durably and
run when one is back; requests that wait for their image get 503 with a Retry-After.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import functools
from typing import Any

from kiln.errors import Overloaded, QuotaExceeded, RetryLater
from kiln.service import jobs, quota
from kiln.service.accounts import Account
from kiln.service.job_admission import Admitted
from kiln.service.scheduler_client import Decision, SchedulerAway

SCHEDULER_AWAY_RETRY_S = 5.0


def refusal_reason(exc: RetryLater) -> str:
    """The `reason` label of `kiln_admission_refusals_total`: quota_exceeded, rate_limit_exceeded or
    overloaded."""
    return "overloaded" if isinstance(exc, Overloaded) else exc.code or "refused"


def degradation_record(decision: Decision, spec: jobs.JobSpec) -> dict[str, Any] | None:
    """What admission changed, as stored in the job's `degraded` column and shown in responses."""
    if (decision.steps, decision.width, decision.height) == (spec.steps, spec.width, spec.height):
        return None
    return {
        "steps_from": spec.steps, "steps_to": decision.steps,
        "size_from": f"{spec.width}x{spec.height}", "size_to": f"{decision.width}x{decision.height}",
        "expected_wait_s": round(decision.expected_wait_s, 3),
    }


async def admit_job(
    state: Any,
    account: Account,
    spec: jobs.JobSpec,
    *,
    idempotency_key: str | None,
    digest: str,
    uploads: dict[str, bytes] | None = None,
    needs_scheduler: bool = False,
) -> jobs.Admission:
    """Admit and submit a job (or find the earlier one for a repeated Idempotency-Key).

    Raises Overloaded (503), QuotaExceeded / RateLimited (429) with the x-ratelimit headers attached.
    `needs_scheduler`: the caller waits for the image, so a missing scheduler is a 503 at once.
    """
    state.moderation.check(spec.prompt)  # before anything is reserved
    plan = await state.plans.get_async(account.plan_name)
    now = state.clock.now()
    try:
        if idempotency_key is not None:  # a retry of an admitted job is answered whatever the queue says
            earlier = await asyncio.to_thread(jobs.find_idempotent, state.db, account.user_id, idempotency_key)
            if earlier is not None:
                return await _write(state, account, plan, spec, idempotency_key, digest, uploads, None, now)
        refusal = await _refusal_from_memory(state, account, plan, spec.n, now)
        if refusal is not None:
            raise refusal
        decision: Decision | None = None
        try:
            decision = await state.runner.admit(account.user_id, plan, spec)
        except SchedulerAway:
            if needs_scheduler:
                raise Overloaded("The scheduler is not available right now; nothing was charged. "
                                 f"Retry in {SCHEDULER_AWAY_RETRY_S:.0f}s.",
                                 retry_after_s=SCHEDULER_AWAY_RETRY_S) from None
        degraded = None
        if decision is not None:
            degraded = degradation_record(decision, spec)
            if degraded is not None:
                state.metrics.degraded(plan.name)
                spec = dataclasses.replace(spec, steps=decision.steps, width=decision.width,
                                           height=decision.height)
        try:
            return await _write(state, account, plan, spec, idempotency_key, digest, uploads, degraded, now,
                                decision)
        except BaseException:
            if decision is not None:
                await state.runner.release(decision.hold_id)
            raise
    except RetryLater as exc:
        state.metrics.refused(plan.name, refusal_reason(exc))
        if getattr(exc, "headers", None) is None:
            exc.headers = (await usage_headers(state, account))[1]  # type: ignore[attr-defined]
        raise


async def _refusal_from_memory(
    state: Any, account: Account, plan: Any, n: int, now: dt.datetime
) -> RetryLater | None:
    """What memory refuses; an entry that would refuse but is older than its recheck interval is read
    again first (one read per user per interval, however many requests arrive)."""
    refusals, user_id = state.refusals, account.user_id
    if refusals.stale_usage(user_id, plan, n, now):
        usage = await asyncio.to_thread(jobs.usage_of, state.db, user_id, plan, now)
        refusals.confirm_usage(user_id, quota.quota_day(now), usage.used)
    if refusals.needs_recheck(user_id, plan):
        refusals.confirm_active(user_id, await asyncio.to_thread(jobs.active_job_ids, state.db, user_id))
    return refusals.refusal(user_id, plan, n, now)


async def _write(
    state: Any, account: Account, plan: Any, spec: jobs.JobSpec, idempotency_key: str | None, digest: str,
    uploads: dict[str, bytes] | None, degraded: dict | None, now: dt.datetime, decision: Decision | None = None,
) -> jobs.Admission:
    lease_to = state.runner.scheduler_id if decision is not None else None
    build = functools.partial(
        jobs.admission_row, state.store, account.user_id, plan, spec, now, idempotency_key=idempotency_key,
        request_hash=digest, uploads=uploads, degraded=degraded, lease_to=lease_to,
        lease_s=state.settings.job_lease_s,
    )
    item = await asyncio.to_thread(build) if uploads else build()  # uploads are written to the store
    try:
        admitted: Admitted = await state.admissions.admit(item)
    except QuotaExceeded:
        if plan.images_per_day is not None:
            state.refusals.confirm_usage(account.user_id, quota.quota_day(now), plan.images_per_day)
        jobs.discard_uploads(state.store, item)
        raise
    except BaseException:
        jobs.discard_uploads(state.store, item)
        raise
    view = jobs.view_of_row(admitted.row)
    if not admitted.created:
        jobs.discard_uploads(state.store, item)
        return jobs.Admission(view, created=False)
    state.refusals.admitted(account.user_id, view.id, quota.quota_day(now), admitted.used)
    await state.runner.submit(view, decision.hold_id if decision else "")
    if decision is None:
        return jobs.Admission(view, created=True)
    return jobs.Admission(view, created=True, expected_wait_s=decision.expected_wait_s,
                          position=decision.position)


async def usage_headers(state: Any, account: Account) -> tuple[quota.Usage, dict[str, str]]:
    """Today's usage (from memory when it knows, else one read) and the x-ratelimit headers."""
    now = state.clock.now()
    plan = await state.plans.get_async(account.plan_name)
    usage = state.refusals.usage(account.user_id, plan, now)
    if usage is None:
        usage = await asyncio.to_thread(jobs.usage_of, state.db, account.user_id, plan, now)
        state.refusals.confirm_usage(account.user_id, quota.quota_day(now), usage.used)
    return usage, headers_for(usage, now)


def headers_for(usage: quota.Usage, now: dt.datetime) -> dict[str, str]:
    reset_s = max(0, int((usage.resets_at - now).total_seconds()))
    return {
        "x-ratelimit-limit-images": "unlimited" if usage.limit is None else str(usage.limit),
        "x-ratelimit-remaining-images": "unlimited" if usage.remaining is None else str(usage.remaining),
        "x-ratelimit-reset-images": f"{reset_s}s",
    }
