"""`kiln audit list`: the plan changes `kiln plans set` made, newest first, as a table or JSON lines."""

from __future__ import annotations

import getpass
import json
import sys
from pathlib import Path

import pytest

from kiln.cli import main


def test_plans_set_goes_on_the_audit_list(database_url: str, tmp_path: Path, capsys, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    config = tmp_path / "kiln.toml"
    config.write_text(f'database_url = "{database_url}"\n')
    monkeypatch.setenv("COLUMNS", "200")

    def kiln(*args: str) -> str:
        monkeypatch.setattr(sys, "argv", ["kiln", "--config", str(config), *args])
        with pytest.raises(SystemExit) as exited:
            main()
        out, err = capsys.readouterr()
        assert (exited.value.code or 0) == 0, err
        return out

    kiln("plans", "set", "free", "--images-per-day", "5")
    kiln("plans", "set", "free", "--images-per-day", "5")  # no change: nothing to record
    kiln("plans", "set", "plus", "--images-per-day", "unlimited", "--max-n", "2")
    lines = [json.loads(line) for line in kiln("audit", "list", "--json").splitlines()]
    actor = f"cli:{getpass.getuser()}"
    assert [(e["actor"], e["action"], e["target"]) for e in lines] == [
        (actor, "plan.update", "plus"), (actor, "plan.update", "free")]
    assert lines[0]["details"]["changes"] == {"images_per_day": {"from": 200, "to": None},
                                              "max_n": {"from": 4, "to": 2}}
    table = kiln("audit", "list", "--limit", "1")
    assert "images_per_day 200 → unlimited, max_n 4 → 2" in table and "free" not in table
    assert kiln("audit", "list", "--action", "thermal.").count("plan.update") == 0
