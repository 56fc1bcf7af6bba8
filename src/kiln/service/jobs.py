"""Jobs: admission (limits, idempotency, quota reservation and the job row, in one transaction), and the
transitions a runner drives — running, succeeded (images stored, charge committed), failed or cancelled
(charge refunded exactly once).

Every transition is a conditional UPDATE on the job's status, so calling one twice, or racing a cancel
against a completion, changes the ledger at most once. Knows no HTTP and no scheduler.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
from dataclasses import dataclass, field
from typing import Any

from PIL import Image as PILImage
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from kiln.db.engine import write_transaction
from kiln.db.models import Image, Job, User, new_id, utcnow
from kiln.errors import IdempotencyMismatch, InvalidRequest, NotFound, QuotaExceeded, RateLimited
from kiln.service import provenance, quota
from kiln.service.accounts import Account
from kiln.service.plans import PlanLimits
from kiln.service.storage import ImageStore, image_path, upload_dir

ACTIVE = ("queued", "running")
TERMINAL = ("succeeded", "failed", "cancelled")
_NO_SYNC = {"synchronize_session": False}


@dataclass(frozen=True)
class JobSpec:
    """A validated request: the model resolved, the size and steps decided."""

    kind: str
    """generate · edit"""
    model: str
    prompt: str
    n: int
    width: int
    height: int
    steps: int
    guidance_scale: float
    seed: int
    params: dict[str, Any] = field(default_factory=dict)
    """output_format, output_compression, response_format, quality, task, … (stored with the job)."""


@dataclass(frozen=True)
class JobView:
    id: str
    user_id: str
    status: str
    kind: str
    model: str
    prompt: str
    n: int
    width: int
    height: int
    steps: int
    guidance_scale: float
    seed: int
    params: dict[str, Any]
    charge_state: str
    charge_units: int
    error_code: str | None
    error_message: str | None
    created_at: dt.datetime
    started_at: dt.datetime | None
    finished_at: dt.datetime | None
    image_ids: tuple[str, ...] = ()
    plan_name: str = ""
    attempts: int = 0
    relax: bool = False
    """Admitted past the quota on a relax plan: uncharged, run only when the GPUs are otherwise idle."""
    degraded: dict[str, Any] | None = None
    """What admission changed to meet the plan's wait target (steps_from/to, size_from/to), or None."""

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL


@dataclass(frozen=True)
class ImageView:
    id: str
    job_id: str
    user_id: str
    index: int
    path: str
    format: str
    width: int
    height: int
    seed: int
    size_bytes: int
    provenance: dict[str, Any]
    created_at: dt.datetime


@dataclass(frozen=True)
class Admission:
    job: JobView
    created: bool
    """False when an Idempotency-Key matched an earlier job (nothing was charged again)."""


def request_hash(payload: dict[str, Any], files: dict[str, bytes] | None = None) -> str:
    """A stable hash of a request body (and uploaded files) for Idempotency-Key comparisons."""
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode())
    for name in sorted(files or {}):
        digest.update(name.encode() + b"\0" + hashlib.sha256((files or {})[name]).digest())
    return digest.hexdigest()


def _view(job: Job, image_ids: tuple[str, ...] = ()) -> JobView:
    return JobView(
        id=job.id, user_id=job.user_id, status=job.status, kind=job.kind, model=job.model,
        prompt=job.prompt, n=job.n, width=job.width, height=job.height, steps=job.steps,
        guidance_scale=job.guidance_scale, seed=job.seed, params=dict(job.params or {}),
        charge_state=job.charge_state, charge_units=job.charge_units, error_code=job.error_code,
        error_message=job.error_message, created_at=job.created_at, started_at=job.started_at,
        finished_at=job.finished_at, image_ids=image_ids, plan_name=job.plan_name,
        attempts=job.attempts or 0, relax=bool(job.relax), degraded=job.degraded,
    )


def _image_ids(session: Session, job_id: str) -> tuple[str, ...]:
    return tuple(session.scalars(select(Image.id).where(Image.job_id == job_id).order_by(Image.index)))


def _load(session: Session, job_id: str) -> JobView | None:
    job = session.get(Job, job_id, populate_existing=True)
    return None if job is None else _view(job, _image_ids(session, job_id))


def create_job(
    db: sessionmaker[Session],
    store: ImageStore,
    *,
    account: Account,
    plan: PlanLimits,
    spec: JobSpec,
    now: dt.datetime,
    idempotency_key: str | None = None,
    request_hash: str | None = None,
    uploads: dict[str, bytes] | None = None,
    degraded: dict[str, Any] | None = None,
) -> Admission:
    """Admit a job atomically: idempotency, the plan's limits and the quota reservation are checked and
    the job row inserted in one write transaction, so any number of servers agree. `degraded` records
    what admission changed to meet the plan's wait target.

    Past the daily quota a plan with `relax_mode` admits the job anyway, uncharged, as relax work
    (the engine runs it only when nothing else can run). Raises InvalidRequest (n > max_n),
    IdempotencyMismatch, QuotaExceeded or RateLimited.
    """
    if spec.n > plan.max_n:
        raise InvalidRequest(
            f"Your plan ({plan.name}) allows at most {plan.max_n} image(s) per request.", param="n"
        )
    job_id = new_id("job")
    params = dict(spec.params)
    if uploads:
        folder = upload_dir(job_id)
        for name, content in uploads.items():
            store.write(f"{folder}/{name}.png", content)
        params["inputs"] = {name: f"{folder}/{name}.png" for name in uploads}
    try:
        with write_transaction(db) as session:
            # Serialise admissions per user (SQLite's BEGIN IMMEDIATE already serialises all writers).
            session.execute(select(User.id).where(User.id == account.user_id).with_for_update())
            if idempotency_key is not None:
                earlier = session.scalar(
                    select(Job).where(Job.user_id == account.user_id, Job.idempotency_key == idempotency_key)
                )
                if earlier is not None:
                    if earlier.request_hash != request_hash:
                        raise IdempotencyMismatch(
                            "This Idempotency-Key was already used with a different request body.",
                            param="Idempotency-Key",
                        )
                    admission = Admission(_view(earlier, _image_ids(session, earlier.id)), created=False)
                    if uploads:
                        store.remove_tree(upload_dir(job_id))
                    return admission
            active = session.scalar(
                select(func.count()).select_from(Job).where(
                    Job.user_id == account.user_id, Job.status.in_(ACTIVE)
                )
            )
            # Quota first: "used up for today" is the more useful refusal than "busy right now".
            relax, units = False, spec.n
            try:
                day = quota.reserve(session, account.user_id, spec.n, plan.images_per_day, now)
            except QuotaExceeded:
                if not plan.relax_mode:
                    raise
                relax, units, day = True, 0, quota.quota_day(now)
            if (active or 0) >= plan.max_concurrent:
                raise concurrency_refusal(plan)
            job = Job(
                id=job_id, user_id=account.user_id, plan_name=plan.name, status="queued", kind=spec.kind,
                model=spec.model, prompt=spec.prompt, n=spec.n, width=spec.width, height=spec.height,
                steps=spec.steps, guidance_scale=spec.guidance_scale, seed=spec.seed, params=params,
                charge_units=units, charge_day=day, charge_state="reserved", relax=relax,
                idempotency_key=idempotency_key, request_hash=request_hash, degraded=degraded,
            )
            session.add(job)
            session.flush()
            return Admission(_view(job), created=True)
    except BaseException:
        if uploads:
            store.remove_tree(upload_dir(job_id))
        raise


def concurrency_refusal(plan: PlanLimits) -> RateLimited:
    return RateLimited(
        f"Your plan ({plan.name}) allows {plan.max_concurrent} job(s) at once; wait for one to finish.",
        retry_after_s=1.0,
    )


def get_job(db: sessionmaker[Session], job_id: str, user_id: str | None = None) -> JobView:
    """The job; NotFound if it does not exist or (when `user_id` is given) is someone else's."""
    with db() as session:
        view = _load(session, job_id)
    if view is None or (user_id is not None and view.user_id != user_id):
        raise NotFound(f"No job found with id '{job_id}'.", param="job_id")
    return view


def find_idempotent(db: sessionmaker[Session], user_id: str, idempotency_key: str) -> JobView | None:
    """The user's job made with this Idempotency-Key, if any (a retry is answered, never re-admitted)."""
    with db() as session:
        job = session.scalar(select(Job).where(Job.user_id == user_id, Job.idempotency_key == idempotency_key))
        return None if job is None else _view(job, _image_ids(session, job.id))


def list_jobs(db: sessionmaker[Session], user_id: str, limit: int = 20) -> list[JobView]:
    with db() as session:
        jobs = session.scalars(
            select(Job).where(Job.user_id == user_id).order_by(Job.created_at.desc()).limit(limit)
        )
        return [_view(job, _image_ids(session, job.id)) for job in jobs]


def mark_running(db: sessionmaker[Session], job_id: str, attempt: int | None = None) -> JobView | None:
    """A queued job starts (its `attempt`-th start; default: one more); None if it is no longer queued."""
    with write_transaction(db) as session:
        claimed = session.execute(
            update(Job)
            .where(Job.id == job_id, Job.status == "queued")
            .values(status="running", started_at=utcnow(),
                    attempts=Job.attempts + 1 if attempt is None else attempt)
            .execution_options(**_NO_SYNC)
        ).rowcount
        return _load(session, job_id) if claimed == 1 else None


def requeue_job(db: sessionmaker[Session], job_id: str) -> bool:
    """A running job goes back to the queue (its worker died, it was preempted); its charge stays."""
    with write_transaction(db) as session:
        return session.execute(
            update(Job)
            .where(Job.id == job_id, Job.status == "running")
            .values(status="queued")
            .execution_options(**_NO_SYNC)
        ).rowcount == 1


def complete_job(
    db: sessionmaker[Session], store: ImageStore, job_id: str, images: list[PILImage.Image | bytes]
) -> list[str]:
    """Store the images, their rows and the final charge; the job succeeds. A second call, or a call
    for a job that was cancelled or failed meanwhile, changes nothing. Returns the job's image ids."""
    with db() as session:
        job = _load(session, job_id)
    if job is None:
        raise NotFound(f"No job found with id '{job_id}'.", param="job_id")
    if job.status not in ACTIVE:
        return list(job.image_ids)
    fmt = job.params.get("output_format", "png")
    compression = job.params.get("output_compression")
    rows: list[Image] = []
    for index, item in enumerate(images):
        picture = PILImage.open(io.BytesIO(item)) if isinstance(item, bytes) else item
        image_id = new_id("img")
        record = provenance.record(
            model=job.model, seed=job.seed + index, job_id=job.id, image_id=image_id, prompt=job.prompt
        )
        content = provenance.encode(picture, fmt, compression, record)
        if store.credentials is not None:
            content = store.credentials.sign(content, fmt, record)
        rel = image_path(job.user_id, image_id, fmt)
        size = store.write(rel, content)
        rows.append(Image(
            id=image_id, job_id=job.id, user_id=job.user_id, index=index, path=rel, format=fmt,
            width=picture.width, height=picture.height, seed=job.seed + index, size_bytes=size,
            provenance=record,
        ))
    with write_transaction(db) as session:
        done = session.execute(
            update(Job)
            .where(Job.id == job_id, Job.status.in_(ACTIVE))
            .values(status="succeeded", finished_at=utcnow())
            .execution_options(**_NO_SYNC)
        ).rowcount
        if done == 1:
            session.add_all(rows)
            quota.commit_charge(session, job_id)
            return [row.id for row in rows]
    for row in rows:  # lost the race to a cancel or another completion: keep no orphan files
        store.path(row.path).unlink(missing_ok=True)
    return list(get_job(db, job_id).image_ids)


def fail_job(db: sessionmaker[Session], job_id: str, code: str, message: str) -> bool:
    """Mark an unfinished job failed and refund its charge; True if this call refunded it."""
    with write_transaction(db) as session:
        session.execute(
            update(Job)
            .where(Job.id == job_id, Job.status.in_(ACTIVE))
            .values(status="failed", error_code=code, error_message=message[:2000], finished_at=utcnow())
            .execution_options(**_NO_SYNC)
        )
        return quota.refund(session, job_id)


def cancel_job(db: sessionmaker[Session], job_id: str, user_id: str | None) -> JobView:
    """Cancel a queued or running job and refund it once; NotFound if it is not `user_id`'s
    (`user_id=None`: the system cancels, e.g. at shutdown). A finished job is returned unchanged."""
    with write_transaction(db) as session:
        job = session.get(Job, job_id)
        if job is None or (user_id is not None and job.user_id != user_id):
            raise NotFound(f"No job found with id '{job_id}'.", param="job_id")
        cancelled = session.execute(
            update(Job)
            .where(Job.id == job_id, Job.status.in_(ACTIVE))
            .values(status="cancelled", cancel_requested=True, finished_at=utcnow())
            .execution_options(**_NO_SYNC)
        ).rowcount
        if cancelled == 1:
            quota.refund(session, job_id)
    return get_job(db, job_id)


def lease_jobs(db: sessionmaker[Session], job_ids: list[str], worker_id: str, until: dt.datetime) -> int:
    """Mark unfinished jobs as held by `worker_id` until `until`; a holder renews or loses them."""
    if not job_ids:
        return 0
    with write_transaction(db) as session:
        return session.execute(
            update(Job)
            .where(Job.id.in_(job_ids), Job.status.in_(ACTIVE))
            .values(worker_id=worker_id, lease_expires_at=until)
            .execution_options(**_NO_SYNC)
        ).rowcount


def renew_leases(db: sessionmaker[Session], worker_id: str, until: dt.datetime) -> int:
    with write_transaction(db) as session:
        return session.execute(
            update(Job)
            .where(Job.worker_id == worker_id, Job.status.in_(ACTIVE))
            .values(lease_expires_at=until)
            .execution_options(**_NO_SYNC)
        ).rowcount


def adopt_orphans(
    db: sessionmaker[Session], worker_id: str, until: dt.datetime, now: dt.datetime, grace_s: float
) -> list[JobView]:
    """Take over unfinished jobs whose holder stopped renewing its lease (a killed or stopped server),
    and jobs never leased that are older than `grace_s`: they are leased to `worker_id`, set back to
    queued, and returned for it to run. Each claim is a conditional UPDATE, so of several servers
    sweeping at once exactly one gets each job."""
    unleased_before = now - dt.timedelta(seconds=grace_s)
    orphaned = (Job.lease_expires_at < now) | (Job.lease_expires_at.is_(None) & (Job.created_at < unleased_before))
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
                .values(status="queued", worker_id=worker_id, lease_expires_at=until)
                .execution_options(**_NO_SYNC)
            ).rowcount == 1:
                claimed.append(job_id)
    with db() as session:
        return [view for job_id in claimed if (view := _load(session, job_id)) is not None]


def release_leases(db: sessionmaker[Session], worker_id: str, now: dt.datetime) -> int:
    """A stopping server hands its unfinished jobs back: queued again, lease lapsed, so the next
    server to start (or any live one) adopts and runs them; their charge stays reserved."""
    with write_transaction(db) as session:
        return session.execute(
            update(Job)
            .where(Job.worker_id == worker_id, Job.status.in_(ACTIVE))
            .values(status="queued", lease_expires_at=now - dt.timedelta(seconds=1))
            .execution_options(**_NO_SYNC)
        ).rowcount


def finished_among(db: sessionmaker[Session], job_ids: list[str]) -> list[str]:
    """Those of `job_ids` that are finished in the database (e.g. cancelled through another server)."""
    if not job_ids:
        return []
    with db() as session:
        return list(session.scalars(select(Job.id).where(Job.id.in_(job_ids), Job.status.in_(TERMINAL))))


def get_image(db: sessionmaker[Session], image_id: str, user_id: str) -> ImageView:
    """An image row; NotFound unless it is `user_id`'s."""
    with db() as session:
        row = session.get(Image, image_id)
        if row is None or row.user_id != user_id:
            raise NotFound(f"No image found with id '{image_id}'.", param="image_id")
        return ImageView(
            id=row.id, job_id=row.job_id, user_id=row.user_id, index=row.index, path=row.path,
            format=row.format, width=row.width, height=row.height, seed=row.seed,
            size_bytes=row.size_bytes, provenance=dict(row.provenance or {}), created_at=row.created_at,
        )


def usage_of(db: sessionmaker[Session], user_id: str, plan: PlanLimits, now: dt.datetime) -> quota.Usage:
    with db() as session:
        return quota.usage(session, user_id, plan, now)
