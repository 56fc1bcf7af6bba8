"""Jobs: their views, admission in a transaction of its own (the statements live in `job_admission`),
and the transitions the scheduler drives — running, succeeded (images stored, charge committed), failed or cancelled
(charge refunded exactly once).

Every transition is a conditional UPDATE on the job's status, so calling one twice, or racing a cancel
against a completion, changes the ledger at most once; the one that happened writes its webhook
delivery (`webhooks_outbox`) in the same transaction. Knows no HTTP and no scheduler.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from PIL import Image as PILImage
from sqlalchemy import case, insert, select, update
from sqlalchemy.orm import Session, sessionmaker

from kiln.db.engine import write_transaction
from kiln.db.models import Image, Job, new_id, utcnow
from kiln.errors import NotFound
from kiln.service import provenance, quota, webhooks_outbox
from kiln.service.accounts import Account
from kiln.service.job_admission import ACTIVE, AdmissionRow, admit_one
from kiln.service.plans import PlanLimits
from kiln.service.storage import ImageStore, image_path, upload_dir

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
    expected_wait_s: float | None = None
    """The scheduler's estimate of the wait when it admitted the job (None: it was not asked)."""
    position: int | None = None


def loras_of(params: dict[str, Any]) -> tuple[tuple[str, float], ...]:
    """A job's LoRA adapters as the batch key holds them (stored as JSON lists of [name, scale])."""
    return tuple((str(name), float(scale)) for name, scale in params.get("loras", ()))


def request_hash(payload: dict[str, Any], files: dict[str, bytes] | None = None) -> str:
    """A stable hash of a request body (and uploaded files) for Idempotency-Key comparisons."""
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode())
    for name in sorted(files or {}):
        digest.update(name.encode() + b"\0" + hashlib.sha256((files or {})[name]).digest())
    return digest.hexdigest()


def _view(job: Job, image_ids: tuple[str, ...] = ()) -> JobView:
    return view_of_row({c.key: getattr(job, c.key) for c in Job.__table__.columns}, image_ids)


def view_of_row(row: Mapping[str, Any], image_ids: tuple[str, ...] = ()) -> JobView:
    """A job's view from its row's columns (an ORM object's, or what an INSERT wrote)."""
    return JobView(
        id=row["id"], user_id=row["user_id"], status=row["status"], kind=row["kind"], model=row["model"],
        prompt=row["prompt"], n=row["n"], width=row["width"], height=row["height"], steps=row["steps"],
        guidance_scale=row["guidance_scale"], seed=row["seed"], params=dict(row["params"] or {}),
        charge_state=row["charge_state"], charge_units=row["charge_units"], error_code=row.get("error_code"),
        error_message=row.get("error_message"), created_at=_aware(row["created_at"]),
        started_at=_aware(row.get("started_at")), finished_at=_aware(row.get("finished_at")),
        image_ids=image_ids, plan_name=row["plan_name"], attempts=row.get("attempts") or 0,
        relax=bool(row.get("relax")), degraded=row.get("degraded"),
    )


def _aware(value: dt.datetime | None) -> dt.datetime | None:
    """SQLite hands datetimes back naive; they were written in UTC."""
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=dt.UTC)
    return value


def _image_ids(session: Session, job_id: str) -> tuple[str, ...]:
    return tuple(session.scalars(select(Image.id).where(Image.job_id == job_id).order_by(Image.index)))


def _load(session: Session, job_id: str) -> JobView | None:
    job = session.get(Job, job_id, populate_existing=True)
    return None if job is None else _view(job, _image_ids(session, job_id))


def job_values(spec: JobSpec, params: dict[str, Any], degraded: dict[str, Any] | None) -> dict[str, Any]:
    """The job row's columns that the request decides."""
    return dict(kind=spec.kind, model=spec.model, prompt=spec.prompt, n=spec.n, width=spec.width,
                height=spec.height, steps=spec.steps, guidance_scale=spec.guidance_scale, seed=spec.seed,
                params=params, degraded=degraded)


def admission_row(
    store: ImageStore, user_id: str, plan: PlanLimits, spec: JobSpec, now: dt.datetime, *,
    idempotency_key: str | None = None, request_hash: str | None = None,
    uploads: dict[str, bytes] | None = None, degraded: dict[str, Any] | None = None,
    lease_to: str | None = None, lease_s: float = 30.0,
) -> AdmissionRow:
    """The admission of `spec`, its uploads (an edit's inputs) written to the store first."""
    job_id = new_id("job")
    params = dict(spec.params)
    if uploads:
        folder = upload_dir(job_id)
        for name, content in uploads.items():
            store.write(f"{folder}/{name}.png", content)
        params["inputs"] = {name: f"{folder}/{name}.png" for name in uploads}
    return AdmissionRow(user_id=user_id, plan=plan, values=job_values(spec, params, degraded), now=now,
                        idempotency_key=idempotency_key, request_hash=request_hash, lease_to=lease_to,
                        lease_s=lease_s, job_id=job_id)


def discard_uploads(store: ImageStore, item: AdmissionRow) -> None:
    """An admission that did not create its job keeps no uploaded files."""
    if item.values["params"].get("inputs"):
        store.remove_tree(upload_dir(item.job_id))


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
    lease_to: str | None = None,
) -> Admission:
    """Admit a job in a transaction of its own (`job_admission.admit_in`: idempotency, the plan's
    limits, the quota reservation and the row). Past the daily quota a plan with `relax_mode` admits
    it uncharged as relax work. Raises InvalidRequest (n > max_n), IdempotencyMismatch, QuotaExceeded
    or RateLimited. The API's hot path runs the same statements in groups (`AdmissionWriter`)."""
    item = admission_row(store, account.user_id, plan, spec, now, idempotency_key=idempotency_key,
                         request_hash=request_hash, uploads=uploads, degraded=degraded, lease_to=lease_to)
    try:
        admitted = admit_one(db.kw["bind"], item)
    except BaseException:
        discard_uploads(store, item)
        raise
    if not admitted.created:
        discard_uploads(store, item)
    return Admission(view_of_row(admitted.row), created=admitted.created)


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


def mark_running(db: sessionmaker[Session], job_id: str, attempt: int) -> bool:
    """A queued job starts (its `attempt`-th start); False if it is no longer queued."""
    return job_id in mark_running_many(db, {job_id: attempt})


def mark_running_many(db: sessionmaker[Session], attempts: dict[str, int]) -> set[str]:
    """Queued jobs start (each its `attempts[job_id]`-th start), the jobs of a batch together in one
    transaction; returns the ids that were still queued (and now run)."""
    by_attempt: dict[int, list[str]] = {}
    for job_id, attempt in attempts.items():
        by_attempt.setdefault(attempt, []).append(job_id)
    claimed: set[str] = set()
    with write_transaction(db) as session:
        for attempt, job_ids in by_attempt.items():
            for row in session.execute(
                update(Job)
                .where(Job.id.in_(job_ids), Job.status == "queued")
                .values(status="running", started_at=utcnow(), attempts=attempt)
                .returning(*Job.__table__.columns)
            ).mappings():
                claimed.add(row["id"])
                if webhooks_outbox.wants(row["params"] or {}, "started"):
                    webhooks_outbox.enqueue(session, view_of_row(row), "started")
    return claimed


def report_progress(db: sessionmaker[Session], job_id: str, step: int, total: int) -> bool:
    """A running job's progress for its webhook (the outbox row in a transaction of its own; the
    scheduler calls it at most every `webhooks_outbox.PROGRESS_EVERY_S`); False if it is not running."""
    with write_transaction(db) as session:
        view = _load(session, job_id)
        if view is None or view.status != "running":
            return False
        progress = {"progress": {"step": step, "total": total}}
        return webhooks_outbox.enqueue(session, view, "progress", progress) is not None


def requeue_job(db: sessionmaker[Session], job_id: str) -> bool:
    """A running job goes back to the queue (its worker died, it was preempted); its charge stays."""
    with write_transaction(db) as session:
        return session.execute(
            update(Job)
            .where(Job.id == job_id, Job.status == "running")
            .values(status="queued")
            .execution_options(**_NO_SYNC)
        ).rowcount == 1


class JobFacts(Protocol):
    """What storing a job's images needs to know of it (a JobView, or the scheduler's Ticket)."""

    @property
    def user_id(self) -> str: ...
    @property
    def model(self) -> str: ...
    @property
    def prompt(self) -> str: ...
    @property
    def seed(self) -> int: ...
    @property
    def params(self) -> dict[str, Any]: ...


def store_images(
    db: sessionmaker[Session], store: ImageStore, job_id: str, job: JobFacts,
    images: list[Any],
) -> JobView:
    """Encode each image once (provenance embedded, C2PA-signed), store it, then in one transaction
    the job succeeds, its image rows are written and its charge made final. A call for a job that
    was cancelled or failed meanwhile stores nothing. Returns the job as the database now has it."""
    fmt = job.params.get("output_format", "png")
    compression = job.params.get("output_compression")
    rows: list[dict[str, Any]] = []
    for index, item in enumerate(images):
        picture = _picture(item)
        image_id = new_id("img")
        record = provenance.record(
            model=job.model, seed=job.seed + index, job_id=job_id, image_id=image_id, prompt=job.prompt
        )
        content = provenance.encode(picture, fmt, compression, record)
        if store.credentials is not None:
            content = store.credentials.sign(content, fmt, record)
        rel = image_path(job.user_id, image_id, fmt)
        size = store.write(rel, content)
        rows.append(dict(
            id=image_id, job_id=job_id, user_id=job.user_id, index=index, path=rel, format=fmt,
            width=picture.width, height=picture.height, seed=job.seed + index, size_bytes=size,
            provenance=record, created_at=utcnow(),
        ))
    with write_transaction(db) as session:
        done = session.execute(
            update(Job)
            .where(Job.id == job_id, Job.status.in_(ACTIVE))
            .values(status="succeeded", finished_at=utcnow(), charge_state=case(
                (Job.charge_state == "reserved", "committed"), else_=Job.charge_state))
            .returning(*Job.__table__.columns)
        ).mappings().first()
        if done is not None:
            if rows:
                session.execute(insert(Image.__table__), rows)
            view = view_of_row(done, tuple(row["id"] for row in rows))
            webhooks_outbox.enqueue(session, view, "completed")
            return view
    for row in rows:  # lost the race to a cancel or another completion: keep no orphan files
        store.delete(row["path"])
    return get_job(db, job_id)


def _picture(item: Any) -> PILImage.Image:
    """A worker's image: raw pixels (the usual), encoded bytes, or a PIL image."""
    if isinstance(item, bytes):
        return PILImage.open(io.BytesIO(item))
    to_image = getattr(item, "image", None)
    return to_image() if callable(to_image) else item


def complete_job(
    db: sessionmaker[Session], store: ImageStore, job_id: str, images: list[PILImage.Image | bytes]
) -> list[str]:
    """`store_images` for a job known by id; returns its image ids (none if it ended otherwise)."""
    job = get_job(db, job_id)
    if job.status not in ACTIVE:
        return list(job.image_ids)
    return list(store_images(db, store, job_id, job, images).image_ids)


def fail_job(db: sessionmaker[Session], job_id: str, code: str, message: str) -> bool:
    """Mark an unfinished job failed and refund its charge; True if this call refunded it."""
    with write_transaction(db) as session:
        ended = session.execute(
            update(Job)
            .where(Job.id == job_id, Job.status.in_(ACTIVE))
            .values(status="failed", error_code=code, error_message=message[:2000], finished_at=utcnow())
            .returning(Job.id, Job.params)
            .execution_options(**_NO_SYNC)
        ).first()
        refunded = quota.refund(session, job_id)
        if ended is not None:
            _report_end(session, job_id, ended.params, "failed")
        return refunded


def _report_end(session: Session, job_id: str, params: dict[str, Any] | None, event: str) -> None:
    """The webhook delivery of a job's end, in the transaction that ended it."""
    if webhooks_outbox.wants(params or {}, event):
        view = _load(session, job_id)
        if view is not None:
            webhooks_outbox.enqueue(session, view, event)


def cancel_job(db: sessionmaker[Session], job_id: str, user_id: str | None) -> JobView:
    """Cancel a queued or running job and refund it once; NotFound if it is not `user_id`'s
    (`user_id=None`: the system cancels, e.g. at shutdown). A finished job is returned unchanged."""
    with write_transaction(db) as session:
        job = session.get(Job, job_id)
        if job is None or (user_id is not None and job.user_id != user_id):
            raise NotFound(f"No job found with id '{job_id}'.", param="job_id")
        ended = session.execute(
            update(Job)
            .where(Job.id == job_id, Job.status.in_(ACTIVE))
            .values(status="cancelled", cancel_requested=True, finished_at=utcnow())
            .returning(Job.id, Job.params)
            .execution_options(**_NO_SYNC)
        ).first()
        if ended is not None:
            quota.refund(session, job_id)
            _report_end(session, job_id, ended.params, "cancelled")
    return get_job(db, job_id)


def active_job_ids(db: sessionmaker[Session], user_id: str) -> set[str]:
    with db() as session:
        return set(session.scalars(select(Job.id).where(Job.user_id == user_id, Job.status.in_(ACTIVE))))


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
