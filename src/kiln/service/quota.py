"""The daily quota ledger: the quota day, usage, the refusal, and the refund that happens exactly once.

A reservation is made with the job row in the admission transaction (`job_admission.admit_group`,
under the users' locks), and made final in the same UPDATE that marks the job succeeded
(`jobs.store_images`). The ledger must never go below zero nor above a plan's limit: every change is
a conditional UPDATE.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from kiln.db.models import Job, QuotaUsage
from kiln.errors import QuotaExceeded
from kiln.service.plans import PlanLimits

_NO_SYNC = {"synchronize_session": False}


def quota_day(now: dt.datetime) -> dt.date:
    """The quota day of `now`: its UTC calendar date."""
    return now.astimezone(dt.UTC).date()


def next_reset(now: dt.datetime) -> dt.datetime:
    """The next UTC midnight after `now`, when a new quota day starts."""
    day = quota_day(now) + dt.timedelta(days=1)
    return dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC)


def seconds_to_reset(now: dt.datetime) -> float:
    return (next_reset(now) - now.astimezone(dt.UTC)).total_seconds()


@dataclass(frozen=True)
class Usage:
    """One user's quota today, as `GET /v1/usage` and the rate-limit headers report it."""

    plan: str
    used: int
    limit: int | None
    """None: unlimited."""
    resets_at: dt.datetime

    @property
    def remaining(self) -> int | None:
        return None if self.limit is None else max(0, self.limit - self.used)


def quota_refusal(limit: int | None, now: dt.datetime) -> QuotaExceeded:
    wait_s = seconds_to_reset(now)
    return QuotaExceeded(
        f"You have used your {limit} images for today; the quota resets in {int(wait_s)} s "
        f"(at {next_reset(now).isoformat()}).",
        retry_after_s=wait_s,
    )


def refund(session: Session, job_id: str) -> bool:
    """Give a job's reserved charge back; True only for the one call that actually refunded it."""
    flipped = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.charge_state == "reserved")
        .values(charge_state="refunded")
        .execution_options(**_NO_SYNC)
    ).rowcount
    if flipped != 1:
        return False
    user_id, day, units = session.execute(
        select(Job.user_id, Job.charge_day, Job.charge_units).where(Job.id == job_id)
    ).one()
    session.execute(
        update(QuotaUsage)
        .where(QuotaUsage.user_id == user_id, QuotaUsage.day == day, QuotaUsage.used >= units)
        .values(used=QuotaUsage.used - units)
        .execution_options(**_NO_SYNC)
    )
    return True


def usage(session: Session, user_id: str, plan: PlanLimits, now: dt.datetime) -> Usage:
    used = session.scalar(
        select(QuotaUsage.used).where(QuotaUsage.user_id == user_id, QuotaUsage.day == quota_day(now))
    )
    return Usage(plan=plan.name, used=used or 0, limit=plan.images_per_day, resets_at=next_reset(now))
