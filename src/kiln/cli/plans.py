"""`kiln plans …` (live limits) and `kiln db …` (migrations)."""

from __future__ import annotations

import getpass
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from kiln.errors import InvalidRequest
from kiln.service import plans
from kiln.service.redis_bus import PlansChanged

plans_app = typer.Typer(help="Show and change plans; changes reach running servers within seconds.",
                        no_args_is_help=True)
db_app = typer.Typer(help="Database migrations.", no_args_is_help=True)
console = Console()


def _quota(value: int | None) -> str:
    return "unlimited" if value is None else str(value)


@plans_app.command("list")
def list_plans(ctx: typer.Context) -> None:
    """List plans and their live limits."""
    table = Table("plan", "images/day", "weight", "concurrent", "max n", "wait target (s)", "relax mode")
    for p in plans.list_plans(ctx.obj.db()):
        table.add_row(
            p.name, _quota(p.images_per_day), str(p.priority_weight), str(p.max_concurrent),
            str(p.max_n), f"{p.wait_target_s:g}", "on" if p.relax_mode else "off",
        )
    console.print(table)


def _parse_quota(value: str) -> int | None:
    if value.lower() in ("unlimited", "none", "inf"):
        return None
    try:
        number = int(value)
    except ValueError:
        raise InvalidRequest(f"--images-per-day must be a number or 'unlimited', not {value!r}") from None
    if number < 0:
        raise InvalidRequest("--images-per-day cannot be negative")
    return number


@plans_app.command("set")
def set_plan(
    ctx: typer.Context,
    plan: str,
    images_per_day: Annotated[str | None, typer.Option(help="Daily quota, or 'unlimited'.")] = None,
    priority_weight: Annotated[int | None, typer.Option(min=1, max=1000)] = None,
    max_concurrent: Annotated[int | None, typer.Option(min=1, max=1000)] = None,
    max_n: Annotated[int | None, typer.Option(min=1, max=10)] = None,
    wait_target_s: Annotated[float | None, typer.Option(min=0.1)] = None,
    relax_mode: Annotated[bool | None, typer.Option("--relax-mode/--no-relax-mode")] = None,
) -> None:
    """Change a plan's limits on the database every server reads (live within seconds)."""
    changes: dict[str, object] = {}
    if images_per_day is not None:
        changes["images_per_day"] = _parse_quota(images_per_day)
    for field, value in [
        ("priority_weight", priority_weight), ("max_concurrent", max_concurrent), ("max_n", max_n),
        ("wait_target_s", wait_target_s), ("relax_mode", relax_mode),
    ]:
        if value is not None:
            changes[field] = value
    if not changes:
        raise InvalidRequest("nothing to change: give at least one option, e.g. --images-per-day 5")
    p = plans.update_plan(ctx.obj.db(), plan, actor=f"cli:{_os_user()}", **changes)
    ctx.obj.announce(PlansChanged())
    console.print(
        f"plan [bold]{p.name}[/]: {_quota(p.images_per_day)} images/day, weight {p.priority_weight}, "
        f"{p.max_concurrent} concurrent, max n {p.max_n}, wait target {p.wait_target_s:g} s, "
        f"relax mode {'on' if p.relax_mode else 'off'}"
    )


def _os_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (a container's bare uid)
        return "unknown"


@db_app.command("upgrade")
def upgrade(ctx: typer.Context) -> None:
    """Migrate the database to the latest schema and create the configured plans."""
    ctx.obj.db()
    console.print(f"database at {ctx.obj.settings().database_url} is up to date")
