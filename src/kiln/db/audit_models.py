"""The audit list: what operators and the thermal guard changed, when and why (one row per change)."""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import JSON, Index, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from kiln.db.models import Base, utcnow


class AuditEvent(Base):
    __tablename__ = "audit_events"
    __table_args__ = (Index("ix_audit_events_target", "target", "id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[dt.datetime] = mapped_column(default=utcnow, index=True)
    actor: Mapped[str] = mapped_column(String(128))
    """Who: `thermal-guard`, `cli:<os user>`, `admin:<user name>`."""
    action: Mapped[str] = mapped_column(String(64))
    """What: plan.update · thermal.hot · thermal.cool · thermal.limit · thermal.lift."""
    target: Mapped[str] = mapped_column(String(128))
    """Which: a plan's name, or `gpu:<index>`."""
    details: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
