"""Ask an OpenAI-compatible chat model (a local vLLM, Ollama, llama.cpp server, …) to write a
picture's prompt from the conversation, as ChatGPT does for its images.

One POST to `{base_url}/chat/completions` with httpx (a core dependency: the request is one JSON
body, and the `openai` SDK's own retries would outlast the deadline an edit can wait). Any failure —
refused, unreachable, too slow, an empty or odd answer — raises `RewriteFailed`; the caller falls back
to the rules and never fails the user's edit because of it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import httpx

MAX_PROMPT_CHARS = 4000
"""Longest rewritten prompt kept (longer answers are not a prompt: the rules are used instead)."""
SYSTEM_PROMPT = (
    "You write prompts for a text-to-image model. You are given what a user said so far in a chat "
    "about one picture: their first description, then each change they asked for, and the prompt "
    "the current picture was drawn from. Write the one prompt that describes the picture after the "
    "latest change: keep everything the user did not change, apply the change, and describe the "
    "picture itself (never an instruction such as 'make it'). Keep quoted words exactly as written. "
    "Answer with the prompt alone, on one line, with no quotes around it and no explanation."
)
_LEAD_IN = re.compile(r"^\s*(?:(?:new|updated|rewritten|final|image)\s+)?prompt\s*:\s*", re.IGNORECASE)


class RewriteFailed(Exception):
    """The chat model gave no usable prompt (the reason is the message)."""


class ChatRewriter:
    """A client of one chat completions endpoint; holds no connection between calls."""

    def __init__(self, base_url: str, model: str, *, api_key: str | None = None, timeout_s: float = 5.0,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.timeout_s = timeout_s
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._transport = transport

    def messages(self, conversation: Sequence[str], previous: str) -> list[dict[str, str]]:
        """The chat sent: the rules above, then the user's turns and the current prompt."""
        said = "\n".join(f"{'First description' if i == 0 else f'Change {i}'}: {text}"
                         for i, text in enumerate(conversation))
        return [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": f"{said}\n\nThe current picture's prompt: {previous}\n\n"
                                        "Write the prompt after the last change."},
        ]

    async def rewrite(self, conversation: Sequence[str], previous: str) -> str:
        """The prompt after the conversation's last turn; RewriteFailed if none came back in time."""
        body = {"model": self.model, "messages": self.messages(conversation, previous), "temperature": 0,
                "max_tokens": 300, "stream": False}
        try:
            async with httpx.AsyncClient(timeout=self.timeout_s, transport=self._transport) as client:
                response = await client.post(self.url, json=body, headers=self._headers)
                response.raise_for_status()
                data = response.json()
        except (httpx.HTTPError, ValueError) as exc:
            raise RewriteFailed(f"{type(exc).__name__}: {exc}") from exc
        try:
            content = data["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise RewriteFailed("the answer has no choices[0].message.content") from None
        return _clean(content)


def _clean(content: object) -> str:
    if not isinstance(content, str):
        raise RewriteFailed("the answer's content is not text")
    text = re.sub(r"<think>.*?</think>", " ", content, flags=re.DOTALL)  # reasoning models' notes
    lines = [line for line in text.strip().splitlines() if line.strip()]
    text = _LEAD_IN.sub("", " ".join(lines[:1]) if lines else "").strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'`" and text[0] not in text[1:-1]:
        text = text[1:-1].strip()
    if not text:
        raise RewriteFailed("the answer is empty")
    if len(text) > MAX_PROMPT_CHARS:
        raise RewriteFailed(f"the answer is over {MAX_PROMPT_CHARS} characters")
    return text
