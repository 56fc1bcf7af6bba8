"""`kiln audit list`: what operators and the thermal guard changed, newest first."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from kiln.service import audit

audit_app = typer.Typer(help="The audit list: plan changes by operators and the thermal guard.",
                        no_args_is_help=True)
console = Console()


@audit_app.command("list")
def list_audit(
    ctx: typer.Context,
    limit: Annotated[int, typer.Option(min=1, max=1000, help="How many, newest first.")] = 50,
    action: Annotated[str | None,
                      typer.Option(help="Only actions starting with this, e.g. 'thermal.'.")] = None,
    json_lines: Annotated[bool, typer.Option("--json", help="One JSON object a line.")] = False,
) -> None:
    """Show the latest changes: when, who, what and to which plan or GPU."""
    entries = audit.list_events(ctx.obj.db(), limit=limit, action=action)
    if json_lines:
        import json

        for entry in entries:
            typer.echo(json.dumps(entry.as_dict()))
        return
    table = Table("when (UTC)", "who", "what", "target", "change")
    for entry in entries:
        table.add_row(entry.as_dict()["at"][:19].replace("T", " "), entry.actor, entry.action, entry.target,
                      audit.describe(entry))
    console.print(table)
