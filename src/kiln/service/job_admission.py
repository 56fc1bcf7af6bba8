"""The admission transaction: idempotency, the concurrency cap, the quota reservation and the job row
(leased to the scheduler that will run it) in one short transaction of SQLAlchemy Core statements,
the answer built from what the statements returned, with no reload.

`AdmissionWriter` runs many admissions in one transaction (group commit) on a thread of its own, so
a flood of admissions costs one commit and one thread hop per group, not per request. Any number of
processes agree: on PostgreSQL each admission locks its user's row (groups lock users in id order,
so two groups never deadlock); on SQLite `BEGIN IMMEDIATE` serialises all writers.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import datetime as dt
import logging
import queue
import threading
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, Engine, func, insert, select

from kiln.db.engine import is_sqlite, write_lock
from kiln.db.models import Job, QuotaUsage, User, new_id, utcnow
from kiln.errors import IdempotencyMismatch, InvalidRequest, KilnError, QuotaExceeded, RateLimited
from kiln.service import quota
from kiln.service.plans import PlanLimits

log = logging.getLogger(__name__)

ACTIVE = ("queued", "running")
_jobs = Job.__table__
_usage = QuotaUsage.__table__


@dataclass(frozen=True)
class AdmissionRow:
    """One request to admit: everything the job row needs, decided before the transaction."""

    user_id: str
    plan: PlanLimits
    values: dict[str, Any]
    """The job row's columns (kind, model, prompt, n, width, height, steps, …, params, degraded)."""
    now: dt.datetime
    idempotency_key: str | None = None
    request_hash: str | None = None
    lease_to: str | None = None
    """The scheduler that will run the job; None leaves it unleased (adopted by whichever runs)."""
    lease_s: float = 30.0
    job_id: str = field(default_factory=lambda: new_id("job"))


@dataclass(frozen=True)
class Admitted:
    row: dict[str, Any]
    """The job row as written (or the earlier one an Idempotency-Key matched)."""
    created: bool
    used: int | None
    """Images charged to the user today after this admission (None: unlimited or not known)."""


def concurrency_refusal(plan: PlanLimits) -> RateLimited:
    return RateLimited(
        f"Your plan ({plan.name}) allows {plan.max_concurrent} job(s) at once; wait for one to finish.",
        retry_after_s=1.0,
    )


def _upsert(conn: Connection):  # type: ignore[no-untyped-def]
    if conn.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as dialect_insert
    else:
        from sqlalchemy.dialects.sqlite import insert as dialect_insert
    return dialect_insert


def admit_in(conn: Connection, item: AdmissionRow) -> Admitted:
    """One admission inside the caller's transaction. Raises InvalidRequest (n > max_n),
    IdempotencyMismatch, QuotaExceeded or RateLimited having written nothing."""
    plan, n = item.plan, int(item.values["n"])
    if n > plan.max_n:
        raise InvalidRequest(f"Your plan ({plan.name}) allows at most {plan.max_n} image(s) per request.",
                             param="n")
    if conn.dialect.name == "postgresql":  # serialise this user's admissions across processes
        conn.execute(select(User.id).where(User.id == item.user_id).with_for_update())
    if item.idempotency_key is not None:
        earlier = conn.execute(
            select(_jobs).where(_jobs.c.user_id == item.user_id, _jobs.c.idempotency_key == item.idempotency_key)
        ).mappings().first()
        if earlier is not None:
            if earlier["request_hash"] != item.request_hash:
                raise IdempotencyMismatch("This Idempotency-Key was already used with a different request body.",
                                          param="Idempotency-Key")
            return Admitted(dict(earlier), created=False, used=None)
    active = conn.execute(
        select(func.count()).select_from(_jobs).where(_jobs.c.user_id == item.user_id, _jobs.c.status.in_(ACTIVE))
    ).scalar_one()
    day = quota.quota_day(item.now)
    limit = plan.images_per_day
    if active >= plan.max_concurrent:
        # Quota first: "used up for today" is the more useful refusal than "busy right now".
        used = conn.execute(
            select(_usage.c.used).where(_usage.c.user_id == item.user_id, _usage.c.day == day)
        ).scalar() or 0
        if limit is not None and used + n > limit and not plan.relax_mode:
            raise quota.quota_refusal(limit, item.now)
        raise concurrency_refusal(plan)
    relax, units, used = False, n, None
    if limit is None or n <= limit:
        upsert = _upsert(conn)
        stmt = upsert(_usage).values(user_id=item.user_id, day=day, used=n)
        update_where = None if limit is None else (_usage.c.used + n <= limit)
        stmt = stmt.on_conflict_do_update(
            index_elements=["user_id", "day"], set_={"used": _usage.c.used + n}, where=update_where
        ).returning(_usage.c.used)
        used = conn.execute(stmt).scalar()
    if used is None:  # over the quota
        if not plan.relax_mode:
            raise quota.quota_refusal(limit, item.now)
        relax, units = True, 0
    row = {
        **item.values, "id": item.job_id, "user_id": item.user_id, "plan_name": plan.name, "status": "queued",
        "relax": relax, "charge_units": units, "charge_day": day, "charge_state": "reserved",
        "idempotency_key": item.idempotency_key, "request_hash": item.request_hash, "attempts": 0,
        "worker_id": item.lease_to, "cancel_requested": False, "created_at": utcnow(),
        "lease_expires_at": None if item.lease_to is None else utcnow() + dt.timedelta(seconds=item.lease_s),
    }
    conn.execute(insert(_jobs).values(row))
    return Admitted(row, created=True, used=None if limit is None else used)


def _begin(engine: Engine):  # type: ignore[no-untyped-def]
    conn = engine.connect()
    if is_sqlite(engine):
        conn = conn.execution_options(sqlite_immediate=True)
    return conn


def admit_one(engine: Engine, item: AdmissionRow) -> Admitted:
    """One admission in its own transaction (what `AdmissionWriter` falls back to)."""
    with write_lock(engine), _begin(engine) as conn, conn.begin():
        return admit_in(conn, item)


class AdmissionWriter:
    """Group commit: admissions queued from any thread or loop, written by one thread, many to a
    transaction. A refusal inside a group writes nothing for that request and does not disturb the
    others; an unexpected database error retries each request of the group on its own."""

    def __init__(self, engine: Engine, *, max_group: int = 64) -> None:
        self.engine = engine
        self.max_group = max_group
        self._queue: queue.SimpleQueue[tuple[AdmissionRow, concurrent.futures.Future[Admitted]] | None] = (
            queue.SimpleQueue())
        self._thread: threading.Thread | None = None
        self.groups = 0
        self.admissions = 0

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="kiln-admission-writer", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(10)
            self._thread = None

    async def admit(self, item: AdmissionRow) -> Admitted:
        future: concurrent.futures.Future[Admitted] = concurrent.futures.Future()
        self._queue.put((item, future))
        return await asyncio.wrap_future(future)

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            group = [first]
            while len(group) < self.max_group:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._queue.put(None)
                    break
                group.append(nxt)
            self._write(group)

    def _write(self, group: list[tuple[AdmissionRow, concurrent.futures.Future[Admitted]]]) -> None:
        group.sort(key=lambda entry: entry[0].user_id)  # row locks in one order: no deadlocks
        results: list[Admitted | BaseException] = []
        try:
            with write_lock(self.engine), _begin(self.engine) as conn, conn.begin():
                for item, _future in group:
                    try:
                        results.append(admit_in(conn, item))
                    except KilnError as refusal:  # raised before that request wrote anything
                        results.append(refusal)
        except Exception:
            log.exception("a group of %d admissions failed; writing them one by one", len(group))
            results = []
            for item, _future in group:
                try:
                    results.append(admit_one(self.engine, item))
                except BaseException as exc:  # noqa: BLE001 - handed to the waiting request
                    results.append(exc)
        self.groups += 1
        self.admissions += len(group)
        for (_item, future), result in zip(group, results, strict=True):
            if future.set_running_or_notify_cancel():
                if isinstance(result, BaseException):
                    future.set_exception(result)
                else:
                    future.set_result(result)


__all__ = ["AdmissionRow", "AdmissionWriter", "Admitted", "QuotaExceeded", "admit_in", "admit_one",
           "concurrency_refusal"]
