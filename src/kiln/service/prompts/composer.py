"""The prompt of a follow-up edit, written from the picture's prompt and the change the user asked for,
so that what they said before is kept ("make the triangle green" keeps the triangle's place and the
background); and, for the embedded grammar's models, a first prompt completed with what their
captions always say (`complete`).

Which composer writes it depends on the model:
- `rules` — models that follow the embedded model's caption grammar (the embedded model itself, found
  by its path, and `prompt_composer_rules_models`): attribute-level rules (`embedded_rules`), the
  result in the grammar's canonical phrasing.
- `rewriter` — other models, when the operator names an OpenAI-compatible chat model
  (`prompt_composer_url`): it writes the prompt from the conversation (`chat_rewriter`); on any failure
  or timeout `append` is used instead, so an edit never fails because the rewriter is down.
- `append` — other models otherwise: `"{previous}. {follow-up}"`, both in the user's words.
Knows no HTTP; the only I/O is the rewriter's call and reading a picture's earlier turns.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.orm import Session, sessionmaker

from kiln.config import EMBEDDED_MODEL_PATH, Settings
from kiln.db.models import Image, Job
from kiln.service.prompts import embedded_rules
from kiln.service.prompts.chat_rewriter import ChatRewriter, RewriteFailed

log = logging.getLogger(__name__)

MAX_TURNS = 12
"""Most of a picture's earlier turns the rewriter is shown (the newest ones)."""


@dataclass(frozen=True)
class Composition:
    """The prompt an edit is drawn from, and who wrote it."""

    prompt: str
    composer: str
    """rules · rewriter · append (also when the rewriter failed) · literal (`compose_prompt: false`)"""


def append(previous: str, instruction: str) -> str:
    """`"{previous}. {follow-up}"`: the earlier prompt first (most text encoders weigh the start
    most), the change after it, both exactly as written."""
    previous, instruction = previous.strip(), instruction.strip()
    if not previous:
        return instruction
    return f"{previous}{'' if previous[-1] in '.!?' else '.'} {instruction}"


def _is_embedded(path: Path) -> bool:
    try:
        return Path(path).resolve() == EMBEDDED_MODEL_PATH.resolve()
    except OSError:
        return False


class PromptComposer:
    """Chooses the composer by model and writes follow-up prompts. Built once by the app factory."""

    def __init__(self, rules_models: Collection[str], rewriter: ChatRewriter | None = None) -> None:
        self.rules_models = frozenset(rules_models)
        self.rewriter = rewriter

    @classmethod
    def from_settings(cls, settings: Settings) -> PromptComposer:
        rules = {name for name, spec in settings.models.items() if _is_embedded(spec.path)}
        rules |= set(settings.prompt_composer_rules_models)
        rewriter = None
        if settings.prompt_composer_url:
            rewriter = ChatRewriter(
                settings.prompt_composer_url, settings.prompt_composer_model or "",
                api_key=key.get_secret_value() if (key := settings.prompt_composer_api_key) else None,
                timeout_s=settings.prompt_composer_timeout_s,
            )
        return cls(rules, rewriter)

    def kind_for(self, model: str) -> str:
        """The composer `model`'s follow-ups get: rules, rewriter or append."""
        if model in self.rules_models:
            return "rules"
        return "rewriter" if self.rewriter is not None else "append"

    def complete(self, model: str, prompt: str) -> Composition | None:
        """A first prompt with what `model`'s captions always say filled in (`embedded_rules.complete`),
        for the models the rules compose; None when it is drawn as written."""
        if self.kind_for(model) != "rules":
            return None
        completed = embedded_rules.complete(prompt)
        if completed is None or completed == prompt:
            return None
        return Composition(completed, "rules")

    async def compose(self, model: str, previous: str, instruction: str,
                      earlier_turns: Sequence[str] = ()) -> Composition:
        """The prompt for `instruction` applied to a picture drawn from `previous`. `earlier_turns`:
        what the user said about the picture before (first description first), for the rewriter."""
        kind = self.kind_for(model)
        if kind == "rules":
            composed = embedded_rules.compose(previous, instruction)
            if composed is not None:
                return Composition(composed, "rules")
        elif kind == "rewriter" and self.rewriter is not None:
            turns = [*(list(earlier_turns) or [previous]), instruction]
            try:
                return Composition(await self.rewriter.rewrite(turns, previous), "rewriter")
            except RewriteFailed as exc:
                log.warning("the prompt rewriter at %s failed (%s); appending the follow-up instead",
                            self.rewriter.url, exc)
        return Composition(append(previous, instruction), "append")


def earlier_turns(db: sessionmaker[Session], job_id: str, user_id: str, limit: int = MAX_TURNS) -> list[str]:
    """What the user said about the picture job `job_id` drew, oldest first: the first description,
    then each follow-up (an edit job keeps its follow-up as `params["instruction"]` and its source
    image as `params["source_image_id"]`). Only `user_id`'s jobs and images are read."""
    turns: list[str] = []
    with db() as session:
        job = session.get(Job, job_id)
        while job is not None and job.user_id == user_id and len(turns) < limit:
            instruction = (job.params or {}).get("instruction")
            if instruction is None:
                turns.append(job.prompt)
                break
            turns.append(instruction)
            source = session.get(Image, (job.params or {}).get("source_image_id") or "")
            job = source.job if source is not None and source.user_id == user_id else None
    return turns[::-1]
