"""The operators' dashboard shows the thermal guard: a GPU table with its temperature and state from
the scheduler's heartbeat, and the audit list, live (headless Chromium)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from kiln.config import Settings

TELEMETRY = "gpus.jsonl"


@pytest.fixture
def settings(settings: Settings, tmp_path: Path) -> Settings:
    """The web tests' settings with the file telemetry source reporting GPU 0 hot."""
    reading = {"gpu": 0, "temp_c": 91, "power_w": 640, "sm_clock_mhz": 1410, "util": 100,
               "clocks_event_reasons": 0x40}
    (tmp_path / TELEMETRY).write_text(json.dumps(reading) + "\n")
    return settings.model_copy(update={"telemetry_source": "file", "telemetry_file": tmp_path / TELEMETRY,
                                       "telemetry_poll_s": 0.2})


def test_the_dashboard_shows_a_hot_gpu_and_the_guards_audit_entry(open_page: Any, people: Any) -> None:
    page = open_page(people("ops", "enterprise", admin=True))
    page.goto("/admin?every=0.5")
    row = page.wait_for_selector('#gpu-rows tr[data-state="hot"]')
    cells = [c.inner_text() for c in row.query_selector_all("td")]
    assert cells[:3] == ["GPU 0", "0", "91"] and "hw_thermal_slowdown" in cells[6]
    assert cells[7] == "hot" and cells[8] == "50%"
    page.wait_for_function("document.querySelector('#audit-rows').innerText.includes('thermal.hot')")
    assert "gpu:0" in page.inner_text("#audit-rows")
    assert page.js_errors == []
