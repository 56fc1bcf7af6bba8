"""/metrics for operators only: behind `metrics_token` (a Bearer token; 401 OpenAI-shaped without it,
an API key is no substitute), or on a listener of its own at `metrics_bind` (the API's port then has no
/metrics at all), or both. Unset, it is open, as before."""

from __future__ import annotations

import httpx
import pytest
from engine_server import free_port
from pydantic import SecretStr

TOKEN = "scrape-me-0123456789"

sqlite_only = pytest.mark.parametrize("empty_database_url", ["sqlite"], indirect=True)


@sqlite_only
def test_open_by_default(server) -> None:  # type: ignore[no-untyped-def]
    answer = httpx.get(f"{server.base_url}/metrics")
    assert answer.status_code == 200 and "kiln_admission_refusals_total" in answer.text


@sqlite_only
def test_a_token_guards_metrics_and_an_api_key_is_no_substitute(  # type: ignore[no-untyped-def]
    start_server, settings, make_user,
) -> None:
    server = start_server(settings.model_copy(update={"metrics_token": SecretStr(TOKEN)}))
    ann = make_user(plan="plus")
    url = f"{server.base_url}/metrics"
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Bearer {ann.key}"},
                    {"Authorization": f"Basic {TOKEN}"}):
        refused = httpx.get(url, headers=headers)
        assert refused.status_code == 401, headers
        assert refused.headers["www-authenticate"].startswith("Bearer")
        assert refused.json()["error"]["code"] == "invalid_api_key"
    scraped = httpx.get(url, headers={"Authorization": f"Bearer {TOKEN}"})
    assert scraped.status_code == 200 and "kiln_admission_refusals_total" in scraped.text
    with server.client(ann.key) as http:  # the API itself is as before
        assert http.get("/v1/usage").status_code == 200
    documented = httpx.get(f"{server.base_url}/openapi.json").json()["paths"]["/metrics"]["get"]
    assert "401" in documented["responses"]


@sqlite_only
def test_a_bind_address_of_its_own_and_none_on_the_api_port(  # type: ignore[no-untyped-def]
    start_server, settings,
) -> None:
    port = free_port()
    server = start_server(settings.model_copy(update={
        "metrics_bind": f"127.0.0.1:{port}", "metrics_token": SecretStr(TOKEN)}))
    assert server.app.state.metrics_listener.address == ("127.0.0.1", port)
    on_api = httpx.get(f"{server.base_url}/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
    assert on_api.status_code == 404 and on_api.json()["error"]["code"] == "not_found"
    assert "/metrics" not in httpx.get(f"{server.base_url}/openapi.json").json()["paths"]
    own = f"http://127.0.0.1:{port}/metrics"
    assert httpx.get(own).status_code == 401  # the token guards this listener too
    scraped = httpx.get(own, headers={"Authorization": f"Bearer {TOKEN}"})
    assert scraped.status_code == 200 and "kiln_admission_refusals_total" in scraped.text
    assert httpx.get(f"http://127.0.0.1:{port}/v1/usage").status_code == 404  # only /metrics there
    server.stop()
    with pytest.raises(httpx.ConnectError):  # it stops with the app
        httpx.get(own, timeout=5)


def test_a_bind_address_must_be_host_and_port() -> None:
    from pydantic import ValidationError

    from kiln.config import load_settings

    assert load_settings(metrics_bind="[::1]:9464").metrics_bind == "[::1]:9464"
    with pytest.raises(ValidationError):
        load_settings(metrics_bind="9464")
