"""The admission transaction: idempotency, the concurrency cap, the quota reservation and the job row
(leased to the scheduler that will run it) in one short transaction of SQLAlchemy Core statements,
the answer built from what was written, with no reload.

`AdmissionWriter` runs many admissions in one transaction (group commit) on a thread of its own, and
`admit_group` decides a whole group with a handful of statements, so a flood of admissions costs a
few statements, one commit and one thread hop per group, not per request. Any number of processes
agree: on PostgreSQL a group locks its users' rows (in id order, so two groups never deadlock); on
SQLite `BEGIN IMMEDIATE` serialises all writers. Refunds only ever lower the usage, so a decision
made under those locks never admits more than the quota.
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

from sqlalchemy import Connection, Engine, and_, func, insert, or_, select

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


def admit_group(conn: Connection, items: list[AdmissionRow]) -> list[Admitted | KilnError]:
    """Admissions inside the caller's transaction, decided in order as if one after another, with a
    handful of statements for the whole group: lock the users (PostgreSQL), read earlier jobs of
    their Idempotency-Keys, their running jobs and today's usage, decide in memory, then one upsert
    of the usage and one insert of the job rows. A refusal (InvalidRequest, IdempotencyMismatch,
    QuotaExceeded, RateLimited) is that request's result; it writes nothing for it."""
    results: list[Admitted | KilnError | None] = [None] * len(items)
    for index, item in enumerate(items):
        if int(item.values["n"]) > item.plan.max_n:
            results[index] = InvalidRequest(
                f"Your plan ({item.plan.name}) allows at most {item.plan.max_n} image(s) per request.", param="n")
    users = sorted({item.user_id for item in items})
    if conn.dialect.name == "postgresql":  # serialise these users' admissions across processes
        conn.execute(select(User.id).where(User.id.in_(users)).order_by(User.id).with_for_update())
    keyed = {(item.user_id, item.idempotency_key) for item in items if item.idempotency_key is not None}
    earlier: dict[tuple[str, str], dict[str, Any]] = {}
    if keyed:
        for row in conn.execute(select(_jobs).where(or_(*(
            and_(_jobs.c.user_id == user, _jobs.c.idempotency_key == key) for user, key in keyed
        )))).mappings():
            earlier[(row["user_id"], row["idempotency_key"])] = dict(row)
    active: dict[str, int] = dict(conn.execute(
        select(_jobs.c.user_id, func.count()).where(_jobs.c.user_id.in_(users), _jobs.c.status.in_(ACTIVE))
        .group_by(_jobs.c.user_id)
    ).all())
    days = {quota.quota_day(item.now) for item in items}
    used: dict[tuple[str, dt.date], int] = {
        (user, day): value for user, day, value in conn.execute(
            select(_usage.c.user_id, _usage.c.day, _usage.c.used)
            .where(_usage.c.user_id.in_(users), _usage.c.day.in_(days)))
    }
    increments: dict[tuple[str, dt.date], int] = {}
    rows: list[dict[str, Any]] = []
    for index, item in enumerate(items):
        if results[index] is not None:
            continue
        results[index] = _decide(item, earlier, active, used, increments, rows)
    if increments:
        upsert = _upsert(conn)
        stmt = upsert(_usage).values([{"user_id": u, "day": d, "used": n} for (u, d), n in increments.items()])
        conn.execute(stmt.on_conflict_do_update(index_elements=["user_id", "day"],
                                                set_={"used": _usage.c.used + stmt.excluded.used}))
    if rows:
        conn.execute(insert(_jobs), rows)
    return results  # type: ignore[return-value]


def _decide(
    item: AdmissionRow,
    earlier: dict[tuple[str, str], dict[str, Any]],
    active: dict[str, int],
    used: dict[tuple[str, dt.date], int],
    increments: dict[tuple[str, dt.date], int],
    rows: list[dict[str, Any]],
) -> Admitted | KilnError:
    """One request's admission against the group's running state (which it updates when admitted)."""
    plan, n, user = item.plan, int(item.values["n"]), item.user_id
    if item.idempotency_key is not None and (found := earlier.get((user, item.idempotency_key))) is not None:
        if found["request_hash"] != item.request_hash:
            return IdempotencyMismatch("This Idempotency-Key was already used with a different request body.",
                                       param="Idempotency-Key")
        return Admitted(found, created=False, used=None)
    day = quota.quota_day(item.now)
    limit = plan.images_per_day
    today = used.get((user, day), 0)
    over = limit is not None and today + n > limit
    if active.get(user, 0) >= plan.max_concurrent:
        # Quota first: "used up for today" is the more useful refusal than "busy right now".
        return quota.quota_refusal(limit, item.now) if over and not plan.relax_mode else concurrency_refusal(plan)
    if over and not plan.relax_mode:
        return quota.quota_refusal(limit, item.now)
    relax, units = over, 0 if over else n  # past the quota on a relax plan: uncharged, idle-only
    if units:
        used[(user, day)] = today + units
        increments[(user, day)] = increments.get((user, day), 0) + units
    active[user] = active.get(user, 0) + 1
    now = utcnow()
    row = {
        **item.values, "id": item.job_id, "user_id": user, "plan_name": plan.name, "status": "queued",
        "relax": relax, "charge_units": units, "charge_day": day, "charge_state": "reserved",
        "idempotency_key": item.idempotency_key, "request_hash": item.request_hash, "attempts": 0,
        "worker_id": item.lease_to, "cancel_requested": False, "created_at": now,
        "lease_expires_at": None if item.lease_to is None else now + dt.timedelta(seconds=item.lease_s),
    }
    rows.append(row)
    if item.idempotency_key is not None:
        earlier[(user, item.idempotency_key)] = row
    return Admitted(row, created=True, used=None if limit is None else used.get((user, day), 0))


def admit_in(conn: Connection, item: AdmissionRow) -> Admitted:
    """One admission inside the caller's transaction; raises its refusal having written nothing."""
    (result,) = admit_group(conn, [item])
    if isinstance(result, KilnError):
        raise result
    return result


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
        results: list[Admitted | BaseException]
        try:
            with write_lock(self.engine), _begin(self.engine) as conn, conn.begin():
                results = list(admit_group(conn, [item for item, _future in group]))
        except Exception:  # noqa: BLE001 - one bad request must not fail its neighbours
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


__all__ = ["AdmissionRow", "AdmissionWriter", "Admitted", "QuotaExceeded", "admit_group", "admit_in", "admit_one",
           "concurrency_refusal"]
