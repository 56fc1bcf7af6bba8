"""The thermal guard end to end, through a real server: a GPU reported at 90 °C with thermal slowdown
(the file telemetry source) shows on the admin dashboard's JSON and /metrics; free requests are
degraded, then refused with Retry-After, while enterprise requests are still admitted within their
target; the policy's limit holds for free; all of it lifts once the GPU reads cool, and the audit
list records each change."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from engine_server import engine_settings

from kiln.service import accounts
from kiln.service.plans import update_plan

sqlite_only = pytest.mark.parametrize("empty_database_url", ["sqlite"], indirect=True)


def until(condition: Callable[[], Any], what: str, timeout_s: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def report(path: Path, **reading: Any) -> None:
    with open(path, "a") as file:
        file.write(json.dumps(reading) + "\n")


def signed_in_admin(server: Any, db: Any) -> httpx.Client:
    accounts.create_user(db, "ops", "enterprise", is_admin=True, password="correct horse battery")
    client = httpx.Client(base_url=server.base_url, timeout=30)
    token = re.search(r'name="csrf-token" content="([^"]+)"', client.get("/login").text).group(1)
    signed = client.post("/login", data={"username": "ops", "password": "correct horse battery", "csrf_token": token})
    assert signed.status_code in (200, 303), signed.text
    return client


@sqlite_only
def test_a_hot_gpu_degrades_then_refuses_free_work_while_enterprise_keeps_its_target_and_all_lifts_when_cool(
    start_server, settings, tmp_path, make_user, db
) -> None:
    telemetry = tmp_path / "gpus.jsonl"
    report(telemetry, gpu=0, temp_c=60, power_w=300, sm_clock_mhz=1980, util=95, clocks_event_reasons=0)
    # Workers stay loading, so every job stays queued and the estimate runs on the prior: each
    # 64×64 4-step image is 1/16 unit, 6.25 s at 0.01 units/s.
    server = start_server(engine_settings(
        settings, tmp_path, hold=True, throughput_prior_units_per_s=0.01, telemetry_source="file",
        telemetry_file=telemetry, telemetry_poll_s=0.1, thermal_cool_s=0.5,
        thermal_policy={"free": {"images_per_day": 1}},
    ))
    update_plan(db, "free", actor="cli:test", wait_target_s=20.0)  # degrade over 20 s, refuse over 40 s
    server.state.plans.invalidate()
    admin = signed_in_admin(server, db)
    stats = lambda: admin.get("/admin/api/stats").json()  # noqa: E731
    until(lambda: (stats()["thermal"] or {}).get("gpus"), "the guard's first reading")
    # Every key made up front: the key cache may not have caught up with a key made a moment ago.
    first, second, boss = make_user(), make_user(), make_user(plan="enterprise")
    crowd = [make_user() for _ in range(12)]
    with server.client(first.key) as http:
        assert http.post("/v1/jobs", json={"prompt": "before the heat"}).status_code == 202
    with server.client(second.key) as http:  # 6.25 s ahead: within free's target
        cool = http.post("/v1/jobs", json={"prompt": "still cool"})
        assert cool.status_code == 202 and cool.json()["degraded"] is None

    report(telemetry, gpu=0, temp_c=90, power_w=600, sm_clock_mhz=1500, util=99, clocks_event_reasons=64)
    hot = until(lambda: next((g for g in stats()["thermal"]["gpus"] if g["state"] == "hot"), None), "GPU 0 hot")
    assert (hot["gpu"], hot["temp_c"], hot["workers"], hot["capacity_factor"]) == (0, 90, [0], 0.5)
    assert hot["throttle_reasons"] == ["hw_thermal_slowdown"]
    until(lambda: 'kiln_thermal_state{gpu="0",worker="0"} 1.0' in httpx.get(f"{server.base_url}/metrics").text,
          "the scheduler's metrics to say so")
    metrics = httpx.get(f"{server.base_url}/metrics").text
    assert 'DCGM_FI_DEV_GPU_TEMP{gpu="0",worker="0"} 90.0' in metrics
    assert 'DCGM_FI_DEV_CLOCK_THROTTLE_REASONS{gpu="0",worker="0"} 64.0' in metrics
    assert 'kiln_gpu_capacity_factor{gpu="0",worker="0"} 0.5' in metrics

    outcomes: list[str] = []
    for i, user in enumerate(crowd):  # other free users, one job each, until past twice the target
        with server.client(user.key) as http:
            response = http.post("/v1/jobs", json={"prompt": f"free {i}"})
        if response.status_code == 503:
            assert response.json()["error"]["code"] == "server_is_overloaded"
            assert int(response.headers["Retry-After"]) >= 1
            outcomes.append("refused")
            break
        assert response.status_code == 202, response.text
        outcomes.append("degraded" if response.json().get("degraded") else "admitted")
    assert outcomes[0] == "degraded" and outcomes[-1] == "refused", outcomes
    with server.client(boss.key) as http:
        paid = http.post("/v1/jobs", json={"prompt": "paid work", "n": 2})
        assert paid.status_code == 202 and paid.json()["degraded"] is None
        assert paid.json()["eta_s"] <= 15.0  # enterprise's target
    with server.client(first.key) as http:  # the policy: free is down to 1 image a day while hot
        until(lambda: http.get("/v1/usage").json()["limit"] == 1, "free's temporary limit")
        refused = http.post("/v1/jobs", json={"prompt": "a second one"})
        assert refused.status_code == 429 and refused.json()["error"]["code"] == "quota_exceeded"

    report(telemetry, gpu=0, temp_c=70, power_w=350, sm_clock_mhz=1980, util=90, clocks_event_reasons=0)
    until(lambda: all(g["state"] == "ok" for g in stats()["thermal"]["gpus"]), "GPU 0 cool again")
    snapshot = until(lambda: (s := stats()) and not s["thermal"]["limits_held"] and s, "the limits lifted")
    assert snapshot["thermal"]["gpus"][0]["capacity_factor"] == 1.0
    with server.client(first.key) as http:
        until(lambda: http.get("/v1/usage").json()["limit"] == 3, "free's own limit back")
    token = re.search(r'name="csrf-token" content="([^"]+)"', admin.get("/admin").text).group(1)
    saved = admin.post("/admin/plans/plus", headers={"Accept": "application/json"}, data={
        "csrf_token": token, "images_per_day": "150", "priority_weight": "4", "max_concurrent": "3", "max_n": "4",
        "wait_target_s": "30"})
    assert saved.status_code == 200, saved.text
    audit = admin.get("/admin/api/audit", params={"limit": 20}).json()["data"]
    assert [(e["actor"], e["action"], e["target"]) for e in audit[::-1]] == [
        ("cli:test", "plan.update", "free"), ("thermal-guard", "thermal.hot", "gpu:0"),
        ("thermal-guard", "thermal.limit", "free"), ("thermal-guard", "thermal.cool", "gpu:0"),
        ("thermal-guard", "thermal.lift", "free"), ("admin:ops", "plan.update", "plus"),
    ]
    assert audit[3]["change"] == "images_per_day 3 → 1" and audit[1]["change"] == "restored images_per_day → 3"
    assert audit[0]["change"] == "images_per_day 200 → 150"
    assert snapshot["audit"][0]["action"] == "thermal.lift"  # the dashboard's feed carries it too
    assert stats()["audit"][0]["actor"] == "admin:ops"
    page = admin.get("/admin").text
    assert 'id="gpu-rows"' in page and "thermal.lift" in page
    admin.close()
