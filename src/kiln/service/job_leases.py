"""Job leases: a scheduler holds the unfinished jobs it runs by a lease in their rows, renewed every
third of its length; a job whose lease lapsed (its scheduler died) is adopted by a live one.

API processes write the lease in the admission itself (`job_admission`), so submitting a job costs
the scheduler no write. Every claim is a conditional UPDATE: of several schedulers sweeping at once
exactly one gets each job.
"""

from __future__ import annotations

import datetime as dt

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from kiln.db.engine import write_transaction
from kiln.db.models import Job, utcnow
from kiln.service.job_admission import ACTIVE
from kiln.service.jobs import JobView, get_job

_NO_SYNC = {"synchronize_session": False}


def _until(lease_s: float) -> dt.datetime:
    return utcnow() + dt.timedelta(seconds=lease_s)


def lease_jobs(db: sessionmaker[Session], job_ids: list[str], holder: str, until: dt.datetime) -> int:
    """Mark unfinished jobs as held by `holder` until `until`; a holder renews or loses them."""
    if not job_ids:
        return 0
    with write_transaction(db) as session:
        return session.execute(
            update(Job)
            .where(Job.id.in_(job_ids), Job.status.in_(ACTIVE))
            .values(worker_id=holder, lease_expires_at=until)
            .execution_options(**_NO_SYNC)
        ).rowcount


def renew_leases(db: sessionmaker[Session], holder: str, lease_s: float) -> int:
    with write_transaction(db) as session:
        return session.execute(
            update(Job)
            .where(Job.worker_id == holder, Job.status.in_(ACTIVE))
            .values(lease_expires_at=_until(lease_s))
            .execution_options(**_NO_SYNC)
        ).rowcount


def adopt_orphans(
    db: sessionmaker[Session], holder: str, lease_s: float, *, own: bool = False, force: bool = False,
    now: dt.datetime | None = None, grace_s: float | None = None,
) -> list[JobView]:
    """Take over unfinished jobs whose holder stopped renewing its lease (a killed or stopped
    scheduler), and jobs never leased that are older than `grace_s` (default: the lease; admitted
    while no scheduler was there). With `own`, also the jobs leased to `holder` itself: a scheduler
    restarted under the same id runs what its previous life left. With `force`, every unfinished job
    held by anyone else, live lease or not: only for the holder of the scheduler leadership, whose
    lock proves that no other scheduler runs (`kiln.service.leadership`). They are leased to
    `holder`, set back to queued, and returned for it to run."""
    now = now or utcnow()
    unleased_before = now - dt.timedelta(seconds=lease_s if grace_s is None else grace_s)
    orphaned = (Job.lease_expires_at < now) | (Job.lease_expires_at.is_(None) & (Job.created_at < unleased_before))
    if force:
        orphaned = orphaned | Job.worker_id.is_(None) | (Job.worker_id != holder)
    if own:
        orphaned = orphaned | (Job.worker_id == holder)
    with db() as session:
        candidates = list(session.scalars(
            select(Job.id).where(Job.status.in_(ACTIVE), orphaned).order_by(Job.created_at)
        ))
    claimed: list[str] = []
    for job_id in candidates:
        with write_transaction(db) as session:
            if session.execute(
                update(Job)
                .where(Job.id == job_id, Job.status.in_(ACTIVE), orphaned)
                .values(status="queued", worker_id=holder, lease_expires_at=_until(lease_s))
                .execution_options(**_NO_SYNC)
            ).rowcount == 1:
                claimed.append(job_id)
    return [get_job(db, job_id) for job_id in claimed]


def release_leases(db: sessionmaker[Session], holder: str) -> int:
    """A stopping scheduler hands its unfinished jobs back: queued again, lease lapsed, so the next
    scheduler to start (or any live one) adopts and runs them; their charge stays reserved."""
    with write_transaction(db) as session:
        return session.execute(
            update(Job)
            .where(Job.worker_id == holder, Job.status.in_(ACTIVE))
            .values(status="queued", lease_expires_at=utcnow() - dt.timedelta(seconds=1))
            .execution_options(**_NO_SYNC)
        ).rowcount
