"""The webhook outbox: a job's subscription (`params["webhook"]`), the job object its events carry,
and the delivery rows — written inside the transaction of the job transition they report, so an
event is delivered if and only if it happened — then claimed, retried and settled by the deliverer.

Ordering: a delivery is due only when no earlier delivery of its job is still pending, so a job's
events arrive in the order they happened. Claims use `FOR UPDATE SKIP LOCKED` on PostgreSQL (any
number of deliverers share the outbox) and BEGIN IMMEDIATE on SQLite. Knows no HTTP.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import and_, delete, func, insert, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from kiln.db.engine import write_transaction
from kiln.db.models import new_id, utcnow
from kiln.db.webhook_models import WebhookDelivery, WebhookDisabledUrl
from kiln.service.webhooks_secret import secrets_of

EVENTS = ("started", "progress", "completed", "failed", "cancelled")
DEFAULT_EVENTS = ("started", "completed", "failed", "cancelled")
"""Progress is opt-in: it is the chatty one (at most every PROGRESS_EVERY_S per job)."""
PROGRESS_EVERY_S = 0.5
TERMINAL_EVENT = {"succeeded": "completed", "failed": "failed", "cancelled": "cancelled"}

DROPPED = "the endpoint was disabled (it answered 410 Gone)"

_deliveries = WebhookDelivery.__table__
_disabled = WebhookDisabledUrl.__table__


@dataclass(frozen=True)
class Subscription:
    url: str
    events: tuple[str, ...]


def subscription_params(url: str, events: list[str] | None) -> dict[str, Any]:
    """What a job's params hold of its webhook (events in EVENTS order, defaults when not given)."""
    chosen = DEFAULT_EVENTS if events is None else tuple(e for e in EVENTS if e in set(events))
    return {"url": url, "events": list(chosen)}


def subscription(params: Mapping[str, Any]) -> Subscription | None:
    hook = params.get("webhook")
    if not hook or not hook.get("url"):
        return None
    return Subscription(hook["url"], tuple(hook.get("events") or ()))


def wants(params: Mapping[str, Any], event: str) -> bool:
    sub = subscription(params)
    return sub is not None and event in sub.events


def job_object(view: Any) -> dict[str, Any]:
    """A `JobView` as GET /v1/jobs/{id} shows it (queue position and ETA: None; the API fills them
    in for queued jobs). The one owner of that shape: the API's `job_info` is built from it."""
    error = None
    if view.error_code:
        error = {"message": view.error_message or "", "type": "server_error", "param": None,
                 "code": view.error_code}
    sub = subscription(view.params)
    return {
        "id": view.id, "object": "job", "status": view.status, "kind": view.kind, "model": view.model,
        "n": view.n, "size": f"{view.width}x{view.height}", "created": int(view.created_at.timestamp()),
        "finished": int(view.finished_at.timestamp()) if view.finished_at else None,
        "image_ids": list(view.image_ids), "charge_state": view.charge_state, "error": error,
        "queue_position": None, "eta_s": None, "attempts": view.attempts, "degraded": view.degraded,
        "relax": view.relax, "prompt": view.prompt, "instruction": view.params.get("instruction"),
        "source_image_id": view.params.get("source_image_id"), "webhook_url": sub.url if sub else None,
        "webhook_events": list(sub.events) if sub else None,
    }


def _timestamp(moment: dt.datetime) -> str:
    return moment.astimezone(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def enqueue(session: Session, view: Any, event: str, extra: dict[str, Any] | None = None) -> str | None:
    """Write the delivery of `event` of the job `view` in the caller's transaction, if the job
    subscribed to it; returns its webhook-id. The body is fixed now: retries send the same bytes."""
    sub = subscription(view.params)
    if sub is None or event not in sub.events:
        return None
    now = utcnow()
    body = json.dumps({"type": f"job.{event}", "timestamp": _timestamp(now),
                       "data": {**job_object(view), **(extra or {})}}, separators=(",", ":"))
    msg_id = new_id("msg")
    session.execute(insert(_deliveries).values(
        id=msg_id, job_id=view.id, user_id=view.user_id, url=sub.url, event_type=f"job.{event}", body=body,
        status="pending", attempts=0, next_attempt_at=now, created_at=now,
    ))
    return msg_id


# ---- the deliverer's side


@dataclass(frozen=True)
class Due:
    """A delivery claimed for sending."""

    seq: int
    id: str
    job_id: str
    user_id: str
    url: str
    event_type: str
    body: str
    attempts: int
    secret: str = ""
    """The user's signing secret as it is now (read with the claim: a rotation applies to the next)."""


@dataclass(frozen=True)
class Settlement:
    """The outcome of one attempt: `pending` again (due at `next_attempt_at`), or final."""

    seq: int
    status: str
    attempts: int
    status_code: int | None = None
    error: str | None = None
    next_attempt_at: dt.datetime | None = None


def claim_due(db: sessionmaker[Session], limit: int, claim_s: float) -> tuple[list[Due], int]:
    """Claim up to `limit` due deliveries (each the earliest pending one of its job) for `claim_s`
    (a deliverer that dies mid-send leaves them to be sent again then, with the same webhook-id).
    Deliveries to an endpoint disabled since they were written are dropped here; returns the claimed
    ones and how many were dropped."""
    d, earlier = _deliveries, _deliveries.alias("earlier")
    now = utcnow()
    blocked = select(earlier.c.seq).where(
        earlier.c.job_id == d.c.job_id, earlier.c.status == "pending", earlier.c.seq < d.c.seq).exists()
    with db() as session:  # the usual answer, "nothing due", costs no write lock (SQLite has one)
        if session.scalar(select(d.c.seq).where(d.c.status == "pending", d.c.next_attempt_at <= now)
                          .limit(1)) is None:
            return [], 0
    with write_transaction(db) as session:
        rows = session.execute(
            select(d.c.seq, d.c.id, d.c.job_id, d.c.user_id, d.c.url, d.c.event_type, d.c.body, d.c.attempts)
            .where(d.c.status == "pending", d.c.next_attempt_at <= now, ~blocked)
            .order_by(d.c.seq).limit(limit).with_for_update(skip_locked=True, of=d)
        ).all()
        if not rows:
            return [], 0
        pairs = {(row.user_id, row.url) for row in rows}
        off = set(session.execute(select(_disabled.c.user_id, _disabled.c.url).where(
            or_(*(and_(_disabled.c.user_id == user, _disabled.c.url == url) for user, url in pairs))
        )).tuples())
        dropped = [row.seq for row in rows if (row.user_id, row.url) in off]
        if dropped:
            session.execute(update(d).where(d.c.seq.in_(dropped)).values(
                status="dropped", finished_at=now, last_error=DROPPED))
        live = [row for row in rows if row.seq not in set(dropped)]
        secrets = secrets_of(session, {row.user_id for row in live}) if live else {}
        claimed = [Due(*row, secret=secrets[row.user_id]) for row in live]
        if claimed:
            session.execute(update(d).where(d.c.seq.in_([c.seq for c in claimed])).values(
                next_attempt_at=now + dt.timedelta(seconds=claim_s)))
    return claimed, len(dropped)


def settle(db: sessionmaker[Session], seq: int, status: str, *, attempts: int, status_code: int | None = None,
           error: str | None = None, next_attempt_at: dt.datetime | None = None) -> None:
    """Record one attempt (see `settle_many`)."""
    settle_many(db, [Settlement(seq, status, attempts, status_code, error, next_attempt_at)])


def settle_many(db: sessionmaker[Session], outcomes: list[Settlement]) -> None:
    """Record attempts in one transaction: `pending` again, or final (delivered, failed, refused)."""
    if not outcomes:
        return
    now = utcnow()
    with write_transaction(db) as session:
        for outcome in outcomes:
            values: dict[str, Any] = dict(
                status=outcome.status, attempts=outcome.attempts, last_status_code=outcome.status_code,
                last_error=None if outcome.error is None else outcome.error[:2000])
            if outcome.status == "pending":
                values["next_attempt_at"] = outcome.next_attempt_at or now
            else:
                values["finished_at"] = now
            session.execute(update(_deliveries).where(_deliveries.c.seq == outcome.seq).values(**values))


def disable_endpoint(db: sessionmaker[Session], due: Due, *, attempts: int, status_code: int) -> int:
    """The receiver answered 410 Gone: this delivery ends `disabled`, the user's endpoint is disabled
    and their other pending deliveries to it are dropped (returns how many)."""
    now = utcnow()
    with write_transaction(db) as session:
        if session.get_bind().dialect.name == "postgresql":
            from sqlalchemy.dialects.postgresql import insert as upsert
        else:
            from sqlalchemy.dialects.sqlite import insert as upsert
        session.execute(upsert(_disabled).values(user_id=due.user_id, url=due.url, disabled_at=now)
                        .on_conflict_do_nothing(index_elements=["user_id", "url"]))
        session.execute(update(_deliveries).where(_deliveries.c.seq == due.seq).values(
            status="disabled", attempts=attempts, last_status_code=status_code, finished_at=now,
            last_error="the receiver answered 410 Gone: endpoint disabled"))
        return session.execute(update(_deliveries).where(
            _deliveries.c.user_id == due.user_id, _deliveries.c.url == due.url,
            _deliveries.c.status == "pending",
        ).values(status="dropped", finished_at=now, last_error=DROPPED)).rowcount


def pending_count(db: sessionmaker[Session]) -> int:
    with db() as session:
        return int(session.scalar(select(func.count()).select_from(_deliveries)
                                  .where(_deliveries.c.status == "pending")) or 0)


def deliveries_of(db: sessionmaker[Session], job_id: str) -> list[dict[str, Any]]:
    """A job's deliveries in order, their times in UTC."""
    with db() as session:
        rows = [dict(row) for row in session.execute(
            select(_deliveries).where(_deliveries.c.job_id == job_id).order_by(_deliveries.c.seq)).mappings()]
    for row in rows:
        for name in ("created_at", "finished_at", "next_attempt_at"):
            row[name] = _aware(row[name])
    return rows


def disabled_endpoints(db: sessionmaker[Session], user_id: str) -> list[tuple[str, dt.datetime]]:
    """The user's endpoints that answered 410 Gone, newest first: (url, disabled_at)."""
    with db() as session:
        return [(url, at if at.tzinfo else at.replace(tzinfo=dt.UTC)) for url, at in session.execute(
            select(_disabled.c.url, _disabled.c.disabled_at).where(_disabled.c.user_id == user_id)
            .order_by(_disabled.c.disabled_at.desc()))]


def enable_endpoint(db: sessionmaker[Session], user_id: str, url: str) -> bool:
    """Deliveries to `url` (written from now on) are sent again; False if it was not disabled."""
    with write_transaction(db) as session:
        return session.execute(delete(_disabled).where(_disabled.c.user_id == user_id,
                                                       _disabled.c.url == url)).rowcount == 1


def _aware(value: dt.datetime | None) -> dt.datetime | None:
    """SQLite hands datetimes back naive; they were written in UTC."""
    return value if value is None or value.tzinfo is not None else value.replace(tzinfo=dt.UTC)
