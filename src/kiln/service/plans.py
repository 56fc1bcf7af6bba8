"""Plans live in the database so operators can change them on a running server."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session, sessionmaker

from kiln.config import PlanSpec
from kiln.db.engine import write_transaction
from kiln.db.models import Plan
from kiln.errors import NotFound
from kiln.service import audit


@dataclass(frozen=True)
class PlanLimits:
    """A snapshot of one plan's live limits."""

    name: str
    images_per_day: int | None
    priority_weight: int
    max_concurrent: int
    max_n: int
    wait_target_s: float
    relax_mode: bool

    @classmethod
    def of(cls, plan: Plan) -> PlanLimits:
        return cls(
            name=plan.name,
            images_per_day=plan.images_per_day,
            priority_weight=plan.priority_weight,
            max_concurrent=plan.max_concurrent,
            max_n=plan.max_n,
            wait_target_s=plan.wait_target_s,
            relax_mode=plan.relax_mode,
        )


def ensure_plans(factory: sessionmaker[Session], defaults: dict[str, PlanSpec]) -> None:
    """Create the configured plans that do not exist yet; never overwrite live values.

    Several servers may start at once on one database: each insert gives way to a plan that another
    one created first (ON CONFLICT DO NOTHING), instead of failing on the primary key.
    """
    if not defaults:
        return
    rows = [{"name": name, **spec.model_dump()} for name, spec in defaults.items()]
    with write_transaction(factory) as session:
        dialect = session.get_bind().dialect.name
        insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
        session.execute(insert(Plan).values(rows).on_conflict_do_nothing(index_elements=["name"]))


def list_plans(factory: sessionmaker[Session]) -> list[PlanLimits]:
    with factory() as session:
        return [PlanLimits.of(p) for p in session.scalars(select(Plan).order_by(Plan.priority_weight))]


def get_plan(factory: sessionmaker[Session], name: str) -> PlanLimits:
    with factory() as session:
        plan = session.get(Plan, name)
        if plan is None:
            raise NotFound(f"no plan named {name!r}", param="plan")
        return PlanLimits.of(plan)


UNSET = object()


def update_plan(factory: sessionmaker[Session], name: str, *, actor: str = "operator",
                **changes: object) -> PlanLimits:
    """Change a plan's live limits; fields passed as UNSET are left alone. What changed goes on the
    audit list, in the same transaction, under `actor` (`cli:<os user>`, `admin:<name>`)."""
    allowed = set(PlanSpec.model_fields)
    with write_transaction(factory) as session:
        plan = session.get(Plan, name)
        if plan is None:
            raise NotFound(f"no plan named {name!r}", param="plan")
        values = {k: v for k, v in changes.items() if v is not UNSET}
        unknown = set(values) - allowed
        if unknown:
            raise ValueError(f"unknown plan fields: {sorted(unknown)}")
        before = PlanLimits.of(plan).__dict__
        merged = PlanSpec.model_validate({**before, **values})
        for field in values:
            setattr(plan, field, getattr(merged, field))
        changed = {f: {"from": before[f], "to": getattr(merged, f)}
                   for f in values if before[f] != getattr(merged, f)}
        if changed:
            audit.add(session, actor, "plan.update", name, changes=changed)
        session.flush()
        return PlanLimits.of(plan)
