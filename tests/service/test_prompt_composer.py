"""The prompt composer: the embedded grammar's rules read follow-ups attribute by attribute (and read
back every caption the grammar writes, and their own output), the OpenAI-compatible rewriter against a
real HTTP server on a free port (and the fallback when it fails, is slow or is down), and POST /v1/jobs
with `image_id` composing a chain of follow-ups that GET /v1/jobs/{id} then shows."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import random
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from engine_server import engine_settings, events_until_end

from kiln.config import ModelSpec, load_settings
from kiln.embedded import captions
from kiln.embedded.scenes import all_scenes
from kiln.service.prompts import embedded_rules as rules
from kiln.service.prompts.chat_rewriter import ChatRewriter
from kiln.service.prompts.composer import PromptComposer, append
from kiln.service.prompts.embedded_rules import Picture

TRIANGLE = "a yellow triangle on the right on a purple background"
BASE = rules.read(TRIANGLE)


def test_the_issue_s_example_keeps_the_place_and_the_background() -> None:
    assert BASE == Picture("shape", "triangle", "yellow", None, "right", "purple")
    assert rules.compose(TRIANGLE, "make the triangle green") == (
        "a green triangle on the right on a purple background"
    )


@pytest.mark.parametrize(("follow_up", "changes"), [
    ("make it green", {"color": "green"}),
    ("make the triangle green", {"color": "green"}),
    ("Make the yellow triangle red.", {"color": "red"}),
    ("change it from yellow to blue", {"color": "blue"}),
    ("now it should be violet", {"color": "purple"}),
    ("make it scarlet instead", {"color": "red"}),
    ("move it to the left", {"position": "left"}),
    ("move it from the right to the left", {"position": "left"}),
    ("put it in the middle", {"position": "centre"}),
    ("centre it", {"position": "centre"}),
    ("move it up", {"position": "top"}),
    ("move the triangle down a bit", {"position": "bottom"}),
    ("put it at the bottom of the picture", {"position": "bottom"}),
    ("now on the left-hand side", {"position": "left"}),
    ("make it bigger", {"size": "large"}),
    ("make it a little bigger", {"size": "large"}),
    ("make it small", {"size": "small"}),
    ("shrink it", {"size": "small"}),
    ("make it tiny", {"size": "small"}),
    ("change the background to blue", {"background": "blue"}),
    ("make the background black", {"background": "black"}),
    ("on a white background", {"background": "white"}),
    ("the background should be orange", {"background": "orange"}),
    ("make it a circle", {"shape": "circle"}),
    ("turn the triangle into a square", {"shape": "square"}),
    ("make it a dot", {"shape": "circle"}),
    ("switch to a square", {"shape": "square"}),
    ("make the triangle’s colour blue", {"color": "blue"}),
    ("let's slide it left", {"position": "left"}),
    ('now make it say "BYE"', {"word": "BYE"}),
    ("now make it say BYE", {"word": "BYE"}),
    ("write Hi on it", {"word": "HI"}),
    ('make it say "bye"', {"word": "BYE"}),
    ("make it a sign that says OPEN", {"subject": "sign", "word": "OPEN"}),
    ("make it green and move it to the left", {"color": "green", "position": "left"}),
    ("great, now a large blue square at the top on a white background",
     {"shape": "square", "color": "blue", "size": "large", "position": "top", "background": "white"}),
    ("thanks!", {}),
])
def test_a_follow_up_changes_only_what_it_names(follow_up: str, changes: dict[str, Any]) -> None:
    assert rules.read(follow_up, BASE) == dataclasses.replace(BASE, **changes)


@pytest.mark.parametrize(("follow_up", "kept", "changes"), [
    ("add a hat", ("add a hat",), {}),
    ("give it a red hat", ("give it a red hat",), {}),  # red belongs to the hat: not applied
    ("make it green and add a hat", ("add a hat",), {"color": "green"}),
    ("make it pink", ("make it pink",), {}),  # a colour the model does not draw
    ("put it in the top left corner", ("put it in the top left corner",), {}),
])
def test_words_the_rules_do_not_know_are_kept_and_never_applied_in_part(
    follow_up: str, kept: tuple[str, ...], changes: dict[str, Any]
) -> None:
    after = rules.read(follow_up, BASE)
    assert after == dataclasses.replace(BASE, extras=kept, **changes)
    composed = rules.render(after)
    assert composed is not None and composed.endswith(". " + ". ".join(kept))
    assert rules.read(composed) == after  # and they survive the next follow-up


def test_the_word_on_a_shape_a_sign_and_alone() -> None:
    hello = rules.read('a blue circle with the word "HELLO" on it')
    assert hello == Picture("shape", "circle", "blue", word="HELLO")
    bye = rules.compose('a blue circle with the word "HELLO" on it', 'now make it say "BYE"')
    assert bye == 'a blue circle with the word "BYE" on it'
    assert rules.compose(bye, "move it to the left") == 'a blue circle on the left with the word "BYE" on it'
    assert rules.compose(bye, "remove the word") == "a blue circle"
    sign = 'a sign that says "OPEN" on a white background'
    assert rules.compose(sign, "make it red") == 'a red sign that says "OPEN" on a white background'
    assert rules.compose(sign, "make it a circle") == (
        'a circle with the word "OPEN" on it, on a white background'
    )
    word = 'the word "HI" in green on a black background'
    assert rules.read(word) == Picture("word", None, "green", None, None, "black", "HI")
    assert rules.compose(word, "change the background to orange") == (
        'the word "HI" in green on an orange background'
    )
    assert rules.compose(word, "make it bigger") == (  # no size for a word alone: kept as said
        'the word "HI" in green on a black background. make it bigger'
    )


def test_every_canonical_phrasing_reads_back_as_its_picture() -> None:
    seen = 0
    for scene in all_scenes()[::7]:
        base = Picture("shape", scene.shape, scene.color, scene.size, scene.position, scene.background)
        for picture in (
            base,
            dataclasses.replace(base, word="HELLO"),
            dataclasses.replace(base, subject="sign", shape=None, word="OPEN 24H"),
            dataclasses.replace(base, subject="word", shape=None, size=None, word="BYE"),
            dataclasses.replace(base, size=None, background=None, extras=("add a hat",)),
        ):
            text = rules.render(picture)
            assert text is not None
            assert rules.read(text) == picture, text
            seen += 1
    assert seen > 1000


def test_the_rules_read_the_embedded_grammar_s_own_captions() -> None:
    """The first prompt of a thread is often in one of the grammar's phrasings (train and held out)."""
    rng = random.Random(5)
    pool, scenes = captions.all_phrasings(), all_scenes()
    for _ in range(1500):
        scene = rng.choice(scenes)
        text = captions.caption(scene, rng.choice(pool), rng)
        picture = rules.read(text)
        assert (picture.shape, picture.color, picture.size, picture.position, picture.background) == (
            scene.shape, scene.color, scene.size, scene.position, scene.background
        ), text
        assert picture.extras == (), text


def test_a_prompt_outside_the_grammar_is_not_composed_by_the_rules() -> None:
    assert rules.compose("a lighthouse on a cliff at dusk", "make it green") is None
    composer = PromptComposer({"kiln-embedded"})
    made = asyncio.run(composer.compose("kiln-embedded", "a lighthouse on a cliff at dusk", "make it green"))
    assert (made.prompt, made.composer) == ("a lighthouse on a cliff at dusk. make it green", "append")


def test_other_models_get_the_previous_prompt_and_the_change() -> None:
    assert append("a lighthouse at dusk", "add a moon") == "a lighthouse at dusk. add a moon"
    assert append("A lighthouse at dusk!", "add a moon") == "A lighthouse at dusk! add a moon"
    made = asyncio.run(PromptComposer(set()).compose("sdxl", TRIANGLE, "make the triangle green"))
    assert made.composer == "append" and made.prompt == f"{TRIANGLE}. make the triangle green"


# -- the rewriter against a real OpenAI-compatible chat server ----------------------------------------


class ChatServer:
    """A chat completions endpoint on a free port: answers `reply`, or an error, or after `delay_s`."""

    def __init__(self) -> None:
        self.reply = "a green triangle on the right on a purple background"
        self.status = 200
        self.delay_s = 0.0
        self.requests: list[dict[str, Any]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (the stdlib's name)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), **body})
                if server.delay_s:
                    server.release.wait(server.delay_s)
                answer = {"id": "chatcmpl-1", "object": "chat.completion", "model": body["model"],
                          "choices": [{"index": 0, "finish_reason": "stop",
                                       "message": {"role": "assistant", "content": server.reply}}]}
                data = json.dumps(answer if self.path == "/v1/chat/completions" else {}).encode()
                code = server.status if self.path == "/v1/chat/completions" else 404
                try:
                    self.send_response(code)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:
                    pass  # the client gave up waiting

            def log_message(self, *args: Any) -> None:
                pass

        self.release = threading.Event()
        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.http.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.http.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.http.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.release.set()
        self.http.shutdown()
        self.http.server_close()


@pytest.fixture
def chat_server() -> Iterator[ChatServer]:
    server = ChatServer()
    yield server
    server.stop()


def rewriting(url: str, timeout_s: float = 5.0) -> PromptComposer:
    settings = load_settings(prompt_composer_url=url, prompt_composer_model="qwen3",
                             prompt_composer_api_key="k1", prompt_composer_timeout_s=timeout_s)
    return PromptComposer.from_settings(settings)


def test_the_rewriter_writes_the_prompt_from_the_conversation(chat_server: ChatServer) -> None:
    chat_server.reply = 'Prompt: "a green triangle on the right on a purple background"'
    composer = rewriting(chat_server.url)
    made = asyncio.run(composer.compose("sdxl", TRIANGLE, "make the triangle green", [TRIANGLE]))
    assert made.composer == "rewriter"
    assert made.prompt == "a green triangle on the right on a purple background"
    [sent] = chat_server.requests
    assert sent["path"] == "/v1/chat/completions" and sent["model"] == "qwen3" and sent["auth"] == "Bearer k1"
    said = sent["messages"][-1]["content"]
    assert f"First description: {TRIANGLE}" in said and "Change 1: make the triangle green" in said
    # the embedded model keeps its rules: the rewriter is not asked
    assert asyncio.run(composer.compose("kiln-embedded", TRIANGLE, "make it blue")).composer == "rules"
    assert len(chat_server.requests) == 1


@pytest.mark.parametrize("failure", ["error", "empty", "slow", "down"])
def test_a_failing_rewriter_falls_back_and_the_edit_goes_on(chat_server: ChatServer, failure: str) -> None:
    url = chat_server.url
    if failure == "error":
        chat_server.status = 500
    elif failure == "empty":
        chat_server.reply = "  "
    elif failure == "slow":
        chat_server.delay_s = 30
    else:
        chat_server.stop()
    composer = rewriting(url, timeout_s=0.5)
    started = time.monotonic()
    made = asyncio.run(composer.compose("sdxl", TRIANGLE, "make the triangle green"))
    assert made.composer == "append" and made.prompt == f"{TRIANGLE}. make the triangle green"
    assert time.monotonic() - started < 5


def test_the_rewriter_settings_need_a_model_name() -> None:
    with pytest.raises(ValueError, match="prompt_composer_model"):
        load_settings(prompt_composer_url="http://127.0.0.1:9/v1")
    assert ChatRewriter("http://h:1/v1/", "m").url == "http://h:1/v1/chat/completions"


# -- first prompts ----------------------------------------------------------------------------------

HELLO = 'a large blue circle in the centre with the word "HELLO" on it, on a black background'
"""The chat's first example, completed: white letters on the blue circle, so the background is neither."""


@pytest.mark.parametrize(("prompt", "completed"), [
    ('a blue circle with the word "HELLO" on it', HELLO),
    ("a white square", "a large white square in the centre on a black background"),
    ('a sign that says "KILN"', 'a sign that says "KILN" on a blue background'),  # a white sign, black letters
    ('a red sign that says "GO"', 'a red sign that says "GO" on a black background'),
    ('the word "SUN"', 'the word "SUN" in red on a white background'),
    ('the word "SUN" in white', 'the word "SUN" in white on a black background'),
    (TRIANGLE, "a large yellow triangle on the right on a purple background"),
    ("a circle. add a hat", "a large red circle in the centre on a white background. add a hat"),
    ("a lighthouse at dusk", None),
])
def test_a_first_prompt_gets_what_the_captions_always_say(prompt: str, completed: str | None) -> None:
    assert rules.complete(prompt) == completed
    if completed is not None:
        assert rules.complete(completed) == completed  # complete already: drawn as written
        said = rules.read(prompt)
        kept = rules.read(completed)
        assert all(getattr(kept, name) == value for name, value in dataclasses.asdict(said).items()
                   if value is not None and name != "subject")


def test_only_the_grammar_s_models_get_their_first_prompt_completed() -> None:
    composer = PromptComposer({"embedded"})
    assert composer.complete("embedded", "a white square").prompt == (
        "a large white square in the centre on a black background"
    )
    assert composer.complete("embedded", "a large white square in the centre on a black background") is None
    assert composer.complete("sdxl", "a white square") is None


# -- POST /v1/jobs with image_id ---------------------------------------------------------------------

def _done(http: Any, job: dict[str, Any]) -> str:
    assert events_until_end(http, job["id"])[-1]["event"] == "completed"
    return http.get(f"/v1/jobs/{job['id']}").json()["image_ids"][0]


def test_jobs_with_image_id_compose_a_chain_of_follow_ups(start_server, settings, tmp_path, make_user,
                                                          chat_server: ChatServer) -> None:
    settings = engine_settings(settings, tmp_path, steps=1)
    grammar = settings.models["fake"]
    other = ModelSpec(**{**grammar.model_dump(), "path": tmp_path / "other"})
    (tmp_path / "other").mkdir()
    server = start_server(settings.model_copy(update={
        "models": {"fake": grammar, "other": other}, "prompt_composer_rules_models": ["fake"],
        "prompt_composer_url": chat_server.url, "prompt_composer_model": "qwen3",
    }))
    ann, bob = make_user(plan="plus"), make_user(plan="plus")
    with server.client(ann.key) as http, server.client(bob.key) as other_user:
        first = http.post("/v1/jobs", json={"prompt": 'a blue circle with the word "HELLO" on it'}).json()
        image = _done(http, first)
        bye = http.post("/v1/jobs", json={"prompt": 'now make it say "BYE"', "image_id": image})
        assert bye.status_code == 202, bye.text
        assert first["prompt"] == HELLO and first["instruction"] == 'a blue circle with the word "HELLO" on it'
        assert bye.json()["prompt"] == HELLO.replace("HELLO", "BYE")
        assert bye.json()["instruction"] == 'now make it say "BYE"'
        bye_image = _done(http, bye.json())
        left = http.post("/v1/jobs", json={"prompt": "move it to the left", "image_id": bye_image})
        shown = http.get(f"/v1/jobs/{left.json()['id']}").json()
        assert shown["prompt"] == HELLO.replace("HELLO", "BYE").replace("in the centre", "on the left")
        assert shown["instruction"] == "move it to the left" and shown["kind"] == "edit"
        assert shown["source_image_id"] == bye_image
        first_prompt = http.get(f"/v1/jobs/{first['id']}").json()["prompt"]
        assert first_prompt == HELLO
        as_said = http.post("/v1/jobs", json={"prompt": "a red square", "compose_prompt": False}).json()
        assert as_said["prompt"] == "a red square" and as_said["instruction"] is None
        literal = http.post("/v1/jobs", json={"prompt": "a red square", "image_id": image,
                                              "compose_prompt": False})
        assert literal.json()["prompt"] == "a red square"
        blocked = http.post("/v1/jobs", json={"prompt": "make it gore", "image_id": image})
        assert blocked.status_code == 400 and blocked.json()["error"]["code"] == "moderation_blocked"
        stolen = other_user.post("/v1/jobs", json={"prompt": "make it red", "image_id": image})
        assert stolen.status_code == 404 and stolen.json()["error"]["param"] == "image_id"

        # another model: the operator's rewriter is shown the whole conversation
        start = http.post("/v1/jobs", json={"model": "other", "prompt": "a lighthouse at dusk"}).json()
        chat_server.reply = "a lighthouse at dusk under a full moon"
        moon = http.post("/v1/jobs", json={"model": "other", "prompt": "add a full moon",
                                           "image_id": _done(http, start)}).json()
        assert moon["prompt"] == "a lighthouse at dusk under a full moon"
        chat_server.reply = "a lighthouse at dawn under a full moon"
        dawn = http.post("/v1/jobs", json={"model": "other", "prompt": "make it dawn",
                                           "image_id": _done(http, moon)}).json()
        assert dawn["prompt"] == "a lighthouse at dawn under a full moon"
        said = chat_server.requests[-1]["messages"][-1]["content"]
        assert "First description: a lighthouse at dusk\nChange 1: add a full moon\nChange 2: make it dawn" \
            in said
        chat_server.status = 503  # the rewriter is down: the edit is still made, its prompt appended
        down = http.post("/v1/jobs", json={"model": "other", "prompt": "add a boat",
                                           "image_id": _done(http, dawn)})
        assert down.status_code == 202 and down.json()["prompt"] == (
            "a lighthouse at dawn under a full moon. add a boat"
        )
