"""The HTTP contract, fuzzed: Schemathesis draws requests from the server's own /openapi.json (every
operation, valid and invalid input, then chains of calls along the schema's links) against a real
Kiln (API, scheduler, worker processes with the fake pipeline) and checks every answer against the
schema: its status, headers and body documented, never a 500, bad input refused with an OpenAI-shaped
400 naming the field. Then what the fuzzer cannot reach: a key that revokes itself, the 405s' Allow.

Bounded and repeatable: a handful of examples per operation, drawn deterministically from a fixed
seed, a failure reported unshrunk; one server for the module, whose enterprise key has no daily quota
(three jobs at a time: its 429 is documented too).
"""

from __future__ import annotations

import asyncio
import io
import os
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from conftest import (
    POSTGRES_ENV, Server, _postgres_schema_url, fake_models, free_port_socket, with_scheduler_ports,
)
from engine_server import engine_settings
from PIL import Image
from schemathesis.config import SchemathesisConfig
from schemathesis.generation import GenerationMode
from schemathesis.transport.serialization import Binary

from kiln.config import load_settings

EXAMPLES_PER_OPERATION = 4
"""Fuzzed examples per operation and mode (valid, invalid), besides the coverage phase's own."""
STATEFUL_STEPS = 5


def _png(size: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGBA", (size, size), (200, 80, 40, 128)).save(buffer, format="PNG")
    return buffer.getvalue()


IMAGE, MASK = _png(64), _png(64)


@pytest.fixture(scope="module")
def contract_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, str]]:
    """One Kiln for the module (PostgreSQL where the tests have it: its strings refuse NUL bytes),
    with an enterprise user's key."""
    import uvicorn

    from kiln.app import create_app
    from kiln.db.engine import make_engine, make_session_factory
    from kiln.db.migrate import upgrade
    from kiln.service import accounts
    from kiln.service.plans import ensure_plans, update_plan
    from kiln.service.scheduler_host import SchedulerHost

    tmp_path = tmp_path_factory.mktemp("contract")
    base = os.environ.get(POSTGRES_ENV)
    schema_urls = _postgres_schema_url(base) if base else iter([f"sqlite:///{tmp_path / 'kiln.db'}"])
    database_url = next(schema_urls)
    upgrade(database_url)
    (tmp_path / "model").mkdir()
    configured = load_settings(
        database_url=database_url, data_dir=tmp_path, images_dir=tmp_path / "images",
        models=fake_models(tmp_path / "model"), default_model="fake",
        model_aliases={"gpt-image-1": "fake"}, live_settings_poll_s=0.5, scheduler_timeout_s=5.0,
        # The schema says what a webhook URL looks like; which addresses it may reach is the operator's
        # setting, which no schema can say: the fuzzer's schema-valid URLs are all allowed here.
        webhook_allow_private=True,
    )
    configured = with_scheduler_ports(engine_settings(configured, tmp_path, steps=2, step_s=0.001))
    engine = make_engine(database_url)
    factory = make_session_factory(engine)
    ensure_plans(factory, configured.plans)
    # Unlimited images, but few at once: the backlog of the fuzzer's jobs (up to 10 images of
    # 1536x1024 each) stays short, and the cap's 429 is one more documented answer.
    update_plan(factory, "enterprise", max_concurrent=3)
    accounts.create_user(factory, "fuzzer", "enterprise")
    key, _ = accounts.create_key(factory, "fuzzer")

    host = SchedulerHost(configured)
    host.start_in_thread()
    app = create_app(configured)
    sock = free_port_socket()
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on", access_log=False))
    loops: list[asyncio.AbstractEventLoop] = []

    async def serve() -> None:
        loops.append(asyncio.get_running_loop())
        await server.serve(sockets=[sock])

    thread = threading.Thread(target=asyncio.run, args=(serve(),), daemon=True)
    thread.start()
    host_name, port = sock.getsockname()
    running = Server(f"http://{host_name}:{port}", app, None, server, thread,  # type: ignore[arg-type]
                     scheduler=host)
    try:
        _wait_ready(running, thread)
        yield running, key
    finally:
        server.should_exit = True
        thread.join(15)
        host.stop_thread()
        engine.dispose()
        for _ in schema_urls:  # drops the PostgreSQL schema
            pass


def _wait_ready(server: Server, thread: threading.Thread) -> None:
    """Until /readyz says the scheduler and its workers serve (polled, with a deadline)."""
    import time

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert thread.is_alive(), "the contract server failed to start"
        try:
            if httpx.get(f"{server.base_url}/readyz", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        threading.Event().wait(0.1)
    raise AssertionError("the contract server never became ready")


@pytest.fixture(scope="module")
def contract_schema(contract_server: tuple[Server, str]) -> Any:
    server, key = contract_server
    from kiln.service import accounts

    accounts.create_user(server.state.db, "stranger", "free")
    stranger_key, _ = accounts.create_key(server.state.db, "stranger")
    config = SchemathesisConfig.from_dict({
        "headers": {"Authorization": f"Bearer {key}"},
        "seed": 13,
        "workers": 1,
        "request-timeout": 60,
        "generation": {"max-examples": EXAMPLES_PER_OPERATION, "deterministic": True, "no-shrink": True},
        "phases": {"stateful": {"max-steps": STATEFUL_STEPS,
                                "inference": {"algorithms": []}}},  # the schema's own links only
        "operations": [
            # Keys are revoked as another user: the fuzzer learns its own key's prefix from GET /v1/keys
            # and would revoke it (which a key may do: tested below); as a stranger it gets 404s.
            {"include-path": "/v1/keys/{prefix}", "include-method": "DELETE",
             "headers": {"Authorization": f"Bearer {stranger_key}"}},
            # Schemathesis' coverage phase cannot judge a file part against the body's `not` (its
            # fuzzing phase can): the edit's form is fuzzed without it.
            {"include-path": "/v1/images/edits", "phases": {"coverage": {"enabled": False}}},
        ],
        "checks": {
            # 503 is the documented overload answer (with Retry-After); any other 5xx is a failure.
            "not_a_server_error": {"expected-statuses": ["2xx", "3xx", "4xx", 503]},
            # A cancelled job stays readable (as cancelled), as OpenAI's cancelled batches do.
            "use_after_free": {"enabled": False},
            # A valid body with an Idempotency-Key that came before with another body is a 422, as
            # documented (the IETF Idempotency-Key draft's answer); the fuzzer reuses small keys often.
            "positive_data_acceptance": {
                "expected-statuses": ["2xx", "3xx", 401, 403, 404, 409, 422, 429, "5xx"],
            },
        },
    })
    loaded = schemathesis.openapi.from_url(f"{server.base_url}/openapi.json", config=config)
    loaded.hook(map_case)
    return loaded


def map_case(context: Any, case: Any) -> Any:
    """A valid edit carries real pictures (the fuzzer's files are bytes of any kind, or a
    PDF); invalid ones keep what the fuzzer drew, so their refusal is still checked."""
    if case.operation.path != "/v1/images/edits" or not isinstance(case.body, dict):
        return case
    if case.meta is not None and case.meta.generation.mode is not GenerationMode.POSITIVE:
        return case
    images = case.body.get("image")
    if isinstance(images, list) and images:
        case.body["image"] = [Binary(IMAGE) for _ in images]
    if "mask" in case.body:
        case.body["mask"] = Binary(MASK)
    return case


def test_every_answer_is_the_one_the_schema_documents(contract_schema: Any) -> None:
    """Schemathesis' whole run, as `st run` does it: examples, coverage, fuzzing, then stateful chains
    along the links (a submitted job looked up, followed and cancelled; a generated image fetched)."""
    from schemathesis.engine import Status, events, from_schema

    problems: dict[tuple[str, str], str] = {}
    cases = 0
    for event in from_schema(contract_schema).execute():
        if isinstance(event, events.ScenarioFinished):
            cases += len(event.recorder.cases)
            for checks in event.recorder.checks.values():
                for check in checks:
                    if check.status == Status.FAILURE and check.failure_info is not None:
                        failure = check.failure_info.failure
                        problems.setdefault((event.recorder.label, failure.title),
                                            f"{failure.message}\n{check.failure_info.code_sample}")
        elif isinstance(event, (events.NonFatalError, events.FatalError)):
            label = getattr(event, "label", "engine")
            problems.setdefault((label, type(event.value).__name__), str(event.value))
    report = "\n\n".join(f"{label}: {title}\n{detail}" for (label, title), detail in problems.items())
    assert not problems, f"{len(problems)} contract failures in {cases} cases:\n{report}"
    assert cases > 100  # it did run


def test_the_links_the_fuzzer_follows_are_in_the_schema(contract_server: tuple[Server, str]) -> None:
    server, _ = contract_server
    spec = httpx.get(f"{server.base_url}/openapi.json").json()
    submitted = spec["paths"]["/v1/jobs"]["post"]["responses"]["202"]["links"]
    assert {"GetJob", "CancelJob", "JobEvents"} <= set(submitted)
    assert submitted["GetJob"]["parameters"] == {"job_id": "$response.body#/id"}
    generated = spec["paths"]["/v1/images/generations"]["post"]["responses"]["200"]["links"]
    assert generated["GetImage"]["parameters"] == {"image_id": "$response.body#/data/0/id"}
    for path, methods in spec["paths"].items():
        for method, operation in methods.items():
            if operation.get("security"):
                assert {"401", "429", "503"} <= set(operation["responses"]), (method, path)
            assert "HTTPValidationError" not in str(operation["responses"]), (method, path)  # ours are 400s


def test_a_405_names_every_method_of_the_path(contract_server: tuple[Server, str]) -> None:
    server, key = contract_server
    with server.client(key) as http:
        jobs = http.request("PUT", "/v1/jobs")
        assert jobs.status_code == 405 and set(jobs.headers["allow"].split(", ")) >= {"GET", "POST"}
        assert jobs.json()["error"]["code"] == "method_not_allowed"
        job = http.request("PATCH", "/v1/jobs/job_nothing")
        assert job.status_code == 405 and set(job.headers["allow"].split(", ")) >= {"GET", "DELETE"}


def test_json_types_are_their_own_and_form_fields_are_text(contract_server: tuple[Server, str]) -> None:
    server, key = contract_server
    with server.client(key) as http:
        for field, value in (("partial_images", False), ("n", True), ("n", "2"), ("stream", 0)):
            refused = http.post("/v1/jobs", json={"prompt": "a kiln", field: value})
            assert refused.status_code == 400, (field, value, refused.text)
            assert refused.json()["error"]["param"] == field
        integral = http.post("/v1/jobs", json={"prompt": "a kiln", "n": 1.0, "seed": 7})
        assert integral.status_code == 202, integral.text
        body = integral.json()
        assert body["n"] == 1 and "finished" in body and body["finished"] is None  # as the schema requires
        edit = http.post("/v1/images/edits", files={"image": ("a.png", IMAGE, "image/png")},
                         data={"prompt": "a kiln", "n": "1", "stream": "false", "background": "opaque"})
        assert edit.status_code == 200, edit.text
        bad = http.post("/v1/images/edits", files={"image": ("a.png", IMAGE, "image/png")},
                        data={"prompt": "a kiln", "background": "null"})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "background"


def test_a_short_key_prefix_is_a_400_naming_it_and_a_key_may_revoke_itself(
    contract_server: tuple[Server, str],
) -> None:
    from kiln.service import accounts

    server, _ = contract_server
    account = accounts.create_user(server.state.db, "self-revoker", "plus")
    key, info = accounts.create_key(server.state.db, account.name)
    with server.client(key) as http:
        short = http.delete("/v1/keys/0")
        assert short.status_code == 400 and short.json()["error"]["param"] == "prefix"
        assert http.delete("/v1/keys/kiln-nothing-like-it").status_code == 404
        revoked = http.delete(f"/v1/keys/{info.prefix}")
        assert revoked.status_code == 200, revoked.text
        assert revoked.json()["prefix"] == info.prefix and revoked.json()["revoked"] is not None
        after = http.get("/v1/usage")
        assert after.status_code == 401 and after.json()["error"]["code"] == "invalid_api_key"


def test_an_idempotency_key_reused_with_another_body_is_the_documented_422(
    contract_server: tuple[Server, str],
) -> None:
    server, key = contract_server
    spec = httpx.get(f"{server.base_url}/openapi.json").json()
    assert "idempotency_key_reused" in spec["paths"]["/v1/jobs"]["post"]["responses"]["422"]["description"]
    with server.client(key) as http:
        headers = {"Idempotency-Key": "contract-reuse"}
        assert http.post("/v1/jobs", json={"prompt": "one"}, headers=headers).status_code == 202
        reused = http.post("/v1/jobs", json={"prompt": "another"}, headers=headers)
        assert reused.status_code == 422 and reused.json()["error"]["code"] == "idempotency_key_reused"

