"""The `kiln` command line (Typer + Rich). Bad input is one clear line and a non-zero exit."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from kiln.cli import accounts, audit, cluster, generate, plans, serve
from kiln.cli.context import CliState
from kiln.errors import KilnError

app = typer.Typer(
    name="kiln",
    help="Kiln: self-hosted image generation with plans, quotas and an OpenAI-compatible API.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(accounts.users_app, name="users")
app.add_typer(accounts.keys_app, name="keys")
app.add_typer(plans.plans_app, name="plans")
app.add_typer(plans.db_app, name="db")
app.add_typer(audit.audit_app, name="audit")
app.command("serve")(serve.serve)
app.command("generate")(generate.generate)
app.command("cluster")(cluster.cluster)


@app.callback()
def _root(
    ctx: typer.Context,
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="TOML settings file.", envvar="KILN_CONFIG")
    ] = None,
) -> None:
    ctx.obj = CliState(config_file=config)


def main() -> None:
    err = Console(stderr=True)
    try:
        app()
    except KilnError as exc:
        err.print(f"[bold red]error:[/] {exc.message}", highlight=False)
        sys.exit(1)
    except (FileNotFoundError, ValueError, OSError) as exc:
        err.print(f"[bold red]error:[/] {exc}", highlight=False)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
