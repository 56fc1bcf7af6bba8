"""Tables of webhooks: each user's signing secret, the outbox of deliveries (written in the same
transaction as the job event it reports) and the endpoints a receiver disabled with 410 Gone.

Rows only; the rules live in `kiln.service.webhooks_outbox`, `webhooks_delivery` and `webhooks_secret`.
"""

from __future__ import annotations

import datetime as dt

from sqlalchemy import ForeignKey, Index, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from kiln.db.models import Base, utcnow


class WebhookSecret(Base):
    """A user's current signing secret (`whsec_<base64>`); rotating it replaces the row's secret."""

    __tablename__ = "webhook_secrets"

    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), primary_key=True)
    secret: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class WebhookDelivery(Base):
    """One event to deliver to one endpoint: its body is fixed when written, its id (the
    `webhook-id` header) never changes across retries; `seq` orders a job's events."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        Index("ix_webhook_deliveries_due", "status", "next_attempt_at"),
        Index("ix_webhook_deliveries_job_seq", "job_id", "seq"),
    )

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(40), unique=True)
    """`msg_…`: the webhook-id header."""
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    url: Mapped[str] = mapped_column(String(2048))
    event_type: Mapped[str] = mapped_column(String(32))
    """job.started · job.progress · job.completed · job.failed · job.cancelled"""
    body: Mapped[str] = mapped_column(Text)
    """The exact JSON sent (the envelope with the job object), signed afresh on each attempt."""
    status: Mapped[str] = mapped_column(String(16), default="pending")
    """pending · delivered · failed (retries used up) · disabled (the receiver answered 410) ·
    dropped (its endpoint was disabled before) · refused (the address is not allowed)"""
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    """When it is due (while being sent: when a claim by a deliverer that died lapses)."""
    last_status_code: Mapped[int | None] = mapped_column(Integer, nullable=True)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[dt.datetime | None] = mapped_column(nullable=True)


class WebhookDisabledUrl(Base):
    """An endpoint of a user's that answered 410 Gone: later deliveries to it are dropped."""

    __tablename__ = "webhook_disabled_urls"

    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), primary_key=True)
    url: Mapped[str] = mapped_column(String(2048), primary_key=True)
    disabled_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
