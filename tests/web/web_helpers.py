"""Helpers the web tests import by name (a module of its own: `conftest` is ambiguous across folders)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

DOCS = Path(__file__).resolve().parents[2] / "docs"


def sign_in(page: Any, person: Any) -> None:
    page.goto("/login")
    page.fill("input[name=username]", person.name)
    page.fill("input[name=password]", person.password)
    page.click("button[type=submit]")
    page.wait_for_url("**/")
    page.wait_for_selector("#composer")


def run_async(coroutine: Any) -> Any:
    """`asyncio.run` on a thread of its own: Playwright's sync API keeps a loop running on this one."""
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coroutine).result()
