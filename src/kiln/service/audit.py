"""The audit list: every change the thermal guard makes and every plan change an operator makes, in
the transaction that makes it (so the list never says what did not happen), read back newest first.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from kiln.db.audit_models import AuditEvent
from kiln.db.engine import write_transaction

GUARD = "thermal-guard"
"""The actor name of the thermal guard's own changes."""


@dataclass(frozen=True)
class AuditEntry:
    id: int
    at: dt.datetime
    actor: str
    action: str
    target: str
    details: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        at = self.at if self.at.tzinfo else self.at.replace(tzinfo=dt.UTC)  # SQLite drops the zone
        return {"id": self.id, "at": at.isoformat(), "actor": self.actor, "action": self.action,
                "target": self.target, "details": self.details}


def add(session: Session, actor: str, action: str, target: str, **details: Any) -> None:
    """Record a change inside the caller's transaction."""
    session.add(AuditEvent(actor=actor, action=action, target=target, details=details))


def record(factory: sessionmaker[Session], actor: str, action: str, target: str, **details: Any) -> None:
    """Record something that needs no other write (a GPU turning hot or cool)."""
    with write_transaction(factory) as session:
        add(session, actor, action, target, **details)


def list_events(
    factory: sessionmaker[Session], *, limit: int = 50, action: str | None = None, target: str | None = None,
) -> list[AuditEntry]:
    """Newest first; `action` may name a prefix such as `thermal.`."""
    query = select(AuditEvent).order_by(AuditEvent.id.desc()).limit(max(1, min(limit, 1000)))
    if action:
        query = query.where(AuditEvent.action.startswith(action))
    if target:
        query = query.where(AuditEvent.target == target)
    with factory() as session:
        return [AuditEntry(e.id, e.at, e.actor, e.action, e.target, dict(e.details or {}))
                for e in session.scalars(query)]


def describe(entry: AuditEntry) -> str:
    """One line for people: `free: images_per_day 3 → 1` and the like."""
    details = entry.details
    if "changes" in details:
        return ", ".join(f"{field} {_show(c.get('from'))} → {_show(c.get('to'))}"
                         for field, c in details["changes"].items()) or "no change"
    if "temp_c" in details or "reasons" in details:
        parts = []
        if details.get("temp_c") is not None:
            parts.append(f"{details['temp_c']:g} °C")
        if details.get("reasons"):
            parts.append(", ".join(details["reasons"]))
        if details.get("capacity_factor") is not None:
            parts.append(f"capacity × {details['capacity_factor']:g}")
        return "; ".join(parts)
    if "restored" in details or "kept" in details:
        restored = ", ".join(f"{f} → {_show(v)}" for f, v in details.get("restored", {}).items())
        kept = ", ".join(f"{f} = {_show(v)}" for f, v in details.get("kept", {}).items())
        parts = (f"restored {restored}" if restored else "", f"kept the operator's {kept}" if kept else "")
        return "; ".join(p for p in parts if p) or "nothing to restore"
    return ", ".join(f"{k}={_show(v)}" for k, v in details.items())


def _show(value: Any) -> str:
    return "unlimited" if value is None else f"{value:g}" if isinstance(value, float) else str(value)
