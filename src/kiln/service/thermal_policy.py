"""The thermal policy's plan limits: tightened while the fleet is hot, given back once it is cool.

Written to the plans table that `kiln plans set` changes (so every server follows within
`live_settings_poll_s`, or within a second of the guard's `PlansChanged` notice with `redis_url`), each change with its audit entry in the same transaction. The audit list is
also the record of what is held: a plan's latest `thermal.limit` without a later `thermal.lift` is a
hold, so a scheduler restarted while hot still gives the limits back, and a second guard does not
take the held (tightened) value for the operator's.

Giving back never clobbers an operator: a field is restored only while it still holds the guard's
value and no operator changed it since the hold (a `plan.update` entry for that field); otherwise the
operator's value stays and the lift says so (`kept`).
"""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from kiln.db.audit_models import AuditEvent
from kiln.db.engine import write_transaction
from kiln.db.models import Plan
from kiln.service import audit

log = logging.getLogger(__name__)

PLAN_FIELDS = ("images_per_day", "max_concurrent", "max_n")
"""Policy fields that live in the plans table; `max_running_images` is the scheduler's own cap."""
LIMIT, LIFT = "thermal.limit", "thermal.lift"

Changes = dict[str, dict[str, Any]]
"""field → {"from": the operator's value, "to": the guard's}; None is unlimited."""


def tighter(current: int | None, limit: int) -> int:
    """The stricter of a live value (None: unlimited) and the policy's."""
    return limit if current is None else min(current, limit)


def open_holds(factory: sessionmaker[Session]) -> dict[str, tuple[int, Changes]]:
    """Plan → (the hold's audit id, its changes) for every limit not yet lifted."""
    with factory() as session:
        return _open_holds(session)


def _open_holds(session: Session) -> dict[str, tuple[int, Changes]]:
    holds: dict[str, tuple[int, Changes]] = {}
    rows = session.execute(
        select(AuditEvent.id, AuditEvent.action, AuditEvent.target, AuditEvent.details)
        .where(AuditEvent.action.in_((LIMIT, LIFT))).order_by(AuditEvent.id)
    )
    for event_id, action, plan, details in rows:
        if action == LIMIT:
            holds[plan] = (event_id, dict((details or {}).get("changes", {})))
        else:
            holds.pop(plan, None)
    return holds


def apply(
    factory: sessionmaker[Session], policy: dict[str, dict[str, int]], engine_changes: dict[str, Changes],
) -> dict[str, Changes]:
    """Tighten each named plan that is not already held; returns what changed per plan.
    `engine_changes`: the scheduler caps the caller changed (recorded with the plan's hold)."""
    done: dict[str, Changes] = {}
    with write_transaction(factory) as session:
        held = _open_holds(session)
        for name, limits in policy.items():
            if name in held:
                continue
            plan = session.get(Plan, name, with_for_update=True)
            changes: Changes = dict(engine_changes.get(name, {}))
            if plan is None:
                log.warning("thermal_policy names plan %r, which does not exist", name)
            else:
                for field, limit in limits.items():
                    if field not in PLAN_FIELDS:
                        continue
                    was = getattr(plan, field)
                    new = tighter(was, limit)
                    if new != was:
                        setattr(plan, field, new)
                        changes[field] = {"from": was, "to": new}
            if changes:
                audit.add(session, audit.GUARD, LIMIT, name, changes=changes, reason="the fleet is hot")
                done[name] = changes
    return done


def lift(factory: sessionmaker[Session], engine_results: dict[str, dict[str, dict[str, Any]]]) -> list[str]:
    """Give back every open hold; returns the plans lifted. `engine_results`: plan → {"restored": …,
    "kept": …} of the scheduler caps the caller already gave back."""
    lifted = []
    with write_transaction(factory) as session:
        for name, (hold_id, changes) in _open_holds(session).items():
            plan = session.get(Plan, name, with_for_update=True)
            touched = _operator_fields_since(session, name, hold_id)
            results = engine_results.get(name, {})
            restored: dict[str, Any] = dict(results.get("restored", {}))
            kept: dict[str, Any] = dict(results.get("kept", {}))
            for field, change in changes.items():
                if field not in PLAN_FIELDS or plan is None:
                    continue
                current = getattr(plan, field)
                if field not in touched and current == change["to"]:
                    setattr(plan, field, change["from"])
                    restored[field] = change["from"]
                elif current == change["from"]:
                    restored[field] = current  # already the operator's value
                else:
                    kept[field] = current
            audit.add(session, audit.GUARD, LIFT, name, restored=restored, kept=kept,
                      reason="the fleet is cool")
            lifted.append(name)
    return lifted


def _operator_fields_since(session: Session, plan: str, hold_id: int) -> set[str]:
    """The fields of `plan` that anyone changed (a `plan.update` entry) after the hold."""
    fields: set[str] = set()
    for details in session.scalars(
        select(AuditEvent.details).where(AuditEvent.action == "plan.update", AuditEvent.target == plan,
                                         AuditEvent.id > hold_id)
    ):
        fields.update((details or {}).get("changes", {}))
    return fields
