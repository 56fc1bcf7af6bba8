"""The create path shared by the Images API and the Jobs API: moderation, the engine's admission
(accept · degrade · 503), then the atomic quota reservation and job row, then the runner.

Admission comes first and reads only in-memory counters, so a flood is refused in milliseconds
without reserving anything or touching a GPU. Every refusal is counted by plan and reason.
"""

from __future__ import annotations

import asyncio
import dataclasses

from kiln.api.ratelimit import current_usage
from kiln.api.state import AppState
from kiln.errors import Overloaded, RetryLater
from kiln.service import jobs, quota
from kiln.service.accounts import Account
from kiln.service.engine_runner import degradation_record
from kiln.service.plans import PlanLimits

DEGRADED_HEADER = "x-kiln-degraded"


async def admit_job(
    state: AppState,
    account: Account,
    spec: jobs.JobSpec,
    *,
    idempotency_key: str | None,
    digest: str,
    uploads: dict[str, bytes] | None = None,
) -> jobs.Admission:
    """Admit and submit a job (or find the earlier one for a repeated Idempotency-Key).

    Raises Overloaded (503), QuotaExceeded / RateLimited (429) with the x-ratelimit headers attached.
    """
    state.moderation.check(spec.prompt)  # before anything is reserved
    plan = await asyncio.to_thread(state.plans.get, account.plan_name)
    try:
        earlier = None
        if idempotency_key is not None:
            earlier = await asyncio.to_thread(jobs.find_idempotent, state.db, account.user_id, idempotency_key)
        if earlier is not None:  # a retry of an admitted job is answered whatever the queue looks like
            return await _create(state, account, plan, spec, idempotency_key, digest, uploads, None)
        if state.runner.active_jobs(account.user_id) >= plan.max_concurrent:
            # Sure without a write (this server alone holds that many): refuse before taking the lock,
            # with the same answer the transaction would give (the quota first).
            usage, headers = await current_usage(state, account)
            if usage.remaining is not None and usage.remaining < spec.n and not plan.relax_mode:
                refusal: RetryLater = quota.quota_refusal(usage.limit, state.clock.now())
            else:
                refusal = jobs.concurrency_refusal(plan)
            refusal.headers = headers  # type: ignore[attr-defined]
            raise refusal
        with state.runner.admitting(account.user_id, plan, spec) as admitted:
            degraded = degradation_record(admitted)
            if degraded is not None:
                key = admitted.request.key
                spec = dataclasses.replace(spec, steps=key.steps, width=key.width, height=key.height)
            return await _create(state, account, plan, spec, idempotency_key, digest, uploads, degraded)
    except RetryLater as exc:
        if not isinstance(exc, Overloaded):  # the engine counts its own refusals
            state.metrics.refused(plan.name, exc.code or "refused")
        if getattr(exc, "headers", None) is None:  # the fast refusal above read them already
            exc.headers = (await current_usage(state, account))[1]  # type: ignore[attr-defined]
        raise


async def _create(
    state: AppState, account: Account, plan: PlanLimits, spec: jobs.JobSpec, idempotency_key: str | None,
    digest: str, uploads: dict[str, bytes] | None, degraded: dict | None,
) -> jobs.Admission:
    admission = await asyncio.to_thread(
        jobs.create_job, state.db, state.store, account=account, plan=plan, spec=spec,
        now=state.clock.now(), idempotency_key=idempotency_key, request_hash=digest, uploads=uploads,
        degraded=degraded,
    )
    if admission.created:
        await state.runner.submit(admission.job.id)
    return admission


def degraded_header(degraded: dict | None) -> dict[str, str]:
    """`x-kiln-degraded: steps=30->15; size=1024x1024->1024x1024` when admission degraded the job."""
    if not degraded:
        return {}
    return {DEGRADED_HEADER: f"steps={degraded['steps_from']}->{degraded['steps_to']}; "
                             f"size={degraded['size_from']}->{degraded['size_to']}"}
