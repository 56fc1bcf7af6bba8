"""`kiln users …` and `kiln keys …`: the same service code the HTTP API and web UI use."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from kiln.service import accounts
from kiln.service.redis_bus import KeyRevoked

users_app = typer.Typer(help="Create users and change their plans.", no_args_is_help=True)
keys_app = typer.Typer(help="Create, list and revoke API keys.", no_args_is_help=True)
console = Console()


@users_app.command("create")
def create_user(
    ctx: typer.Context,
    name: str,
    plan: Annotated[str | None, typer.Option(help="Plan name (default: the configured default).")] = None,
    admin: Annotated[bool, typer.Option("--admin", help="May open /admin and manage plans.")] = False,
    password: Annotated[str | None, typer.Option(help="Password for the web UI.")] = None,
) -> None:
    """Create a user."""
    factory = ctx.obj.db()
    account = accounts.create_user(
        factory, name, plan or ctx.obj.settings().default_plan, is_admin=admin, password=password
    )
    role = " (admin)" if account.is_admin else ""
    console.print(f"created user [bold]{account.name}[/] on plan [bold]{account.plan_name}[/]{role}")


@users_app.command("set-plan")
def set_plan(ctx: typer.Context, name: str, plan: str) -> None:
    """Move a user to another plan."""
    account = accounts.set_plan(ctx.obj.db(), name, plan)
    console.print(f"user [bold]{account.name}[/] is now on plan [bold]{account.plan_name}[/]")


@users_app.command("set-password")
def set_password(
    ctx: typer.Context,
    name: str,
    password: Annotated[str, typer.Option(prompt=True, hide_input=True, confirmation_prompt=True)],
) -> None:
    """Set a user's web UI password."""
    accounts.set_password(ctx.obj.db(), name, password)
    console.print(f"password set for [bold]{name}[/]")


@users_app.command("list")
def list_users(ctx: typer.Context) -> None:
    """List users."""
    table = Table("name", "plan", "admin")
    for account in accounts.list_users(ctx.obj.db()):
        table.add_row(account.name, account.plan_name, "yes" if account.is_admin else "")
    console.print(table)


@keys_app.command("create")
def create_key(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="The user the key belongs to.")],
    label: Annotated[str | None, typer.Option(help="A note to recognise the key by.")] = None,
) -> None:
    """Create an API key; it is printed once and never stored."""
    key, info = accounts.create_key(ctx.obj.db(), name, label)
    print(key)
    Console(stderr=True).print(
        f"[dim]key {info.prefix}… for {info.user_name}; store it now, it is not shown again[/]"
    )


@keys_app.command("revoke")
def revoke_key(
    ctx: typer.Context,
    key_prefix: Annotated[str, typer.Argument(help="The key, or its first characters (at least 8).")],
) -> None:
    """Revoke a key; requests with it fail from the next one on."""
    info = accounts.revoke_key(ctx.obj.db(), key_prefix)
    ctx.obj.announce(KeyRevoked(info.prefix))
    console.print(f"revoked key [bold]{info.prefix}…[/] of {info.user_name}")


@keys_app.command("list")
def list_keys(ctx: typer.Context, name: Annotated[str | None, typer.Argument()] = None) -> None:
    """List keys (by prefix), optionally of one user."""
    table = Table("prefix", "user", "label", "created", "revoked")
    for info in accounts.list_keys(ctx.obj.db(), name):
        table.add_row(
            info.prefix + "…",
            info.user_name,
            info.label or "",
            f"{info.created_at:%Y-%m-%d %H:%M}",
            f"{info.revoked_at:%Y-%m-%d %H:%M}" if info.revoked_at else "",
        )
    console.print(table)
