"""The `kiln` CLI on SQLite and PostgreSQL: users, keys (printed once), revocation, plans, and bad input
as one line with exit status 1."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from kiln.cli import main
from kiln.errors import AuthenticationFailed
from kiln.service.accounts import authenticate_key


@pytest.fixture
def kiln(database_url: str, tmp_path: Path, capsys, monkeypatch):  # type: ignore[no-untyped-def]
    config = tmp_path / "kiln.toml"
    config.write_text(f'database_url = "{database_url}"\n')
    monkeypatch.setenv("COLUMNS", "200")  # Rich tables: no truncated cells

    def run(*args: str) -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "argv", ["kiln", "--config", str(config), *args])
        with pytest.raises(SystemExit) as exited:
            main()
        out, err = capsys.readouterr()
        return exited.value.code or 0, out, err

    return run


def test_users_keys_and_revocation(kiln, db) -> None:  # type: ignore[no-untyped-def]
    assert kiln("users", "create", "ann", "--plan", "plus")[0] == 0
    code, out, err = kiln("keys", "create", "ann", "--label", "laptop")
    key = out.strip()
    assert code == 0 and key.startswith("kiln-") and len(out.splitlines()) == 1
    assert authenticate_key(db, key).name == "ann"
    code, listing, _ = kiln("keys", "list", "ann")
    assert key[:14] in listing and key not in listing  # shown once, then only its prefix
    code, out, _ = kiln("keys", "revoke", key[:14])
    assert code == 0 and "revoked" in out
    with pytest.raises(AuthenticationFailed):
        authenticate_key(db, key)


def test_plans_list_and_set(kiln, db) -> None:  # type: ignore[no-untyped-def]
    from kiln.service.plans import get_plan

    code, out, _ = kiln("plans", "list")
    assert code == 0 and all(name in out for name in ("free", "plus", "enterprise"))
    code, out, _ = kiln("plans", "set", "free", "--images-per-day", "5")
    assert code == 0 and get_plan(db, "free").images_per_day == 5
    assert kiln("plans", "set", "plus", "--images-per-day", "unlimited")[0] == 0
    assert get_plan(db, "plus").images_per_day is None


@pytest.mark.parametrize("args", [
    ("plans", "set", "gold", "--images-per-day", "5"),
    ("plans", "set", "free", "--images-per-day", "many"),
    ("users", "create", "ann", "--plan", "gold"),
    ("keys", "create", "nobody"),
])
def test_bad_input_is_one_line_and_exit_1(kiln, args) -> None:  # type: ignore[no-untyped-def]
    code, out, err = kiln(*args)
    assert code == 1
    assert len(err.strip().splitlines()) == 1 and err.startswith("error:"), err
