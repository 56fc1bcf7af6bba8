"""The chat's memory: conversations, their messages and the state of the job each message started.

Everything here is scoped to one user; another user's conversation is simply not found.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from kiln.db.engine import write_transaction
from kiln.db.models import Image, Job, utcnow
from kiln.db.web_models import Conversation, Message
from kiln.errors import InvalidRequest, NotFound

TITLE_CHARS = 80
MAX_TEXT_CHARS = 4000
PENDING = frozenset({"queued", "running"})


@dataclass(frozen=True)
class ConversationInfo:
    id: str
    title: str
    updated_at: dt.datetime


@dataclass(frozen=True)
class MessageView:
    """A message as the thread shows it: the sentence, and what became of its job."""

    id: str
    text: str
    kind: str
    source_image_id: str | None
    job_id: str | None
    status: str
    """queued · running · succeeded · failed · cancelled · missing"""
    image_ids: tuple[str, ...]
    error: str | None
    seed: int | None
    prompt: str | None = None
    """The prompt the picture was drawn from (for a follow-up, the one composed from the thread)."""

    @property
    def pending(self) -> bool:
        return self.status in PENDING


def _title(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= TITLE_CHARS else text[: TITLE_CHARS - 1] + "…"


def _owned(session: Session, user_id: str, conversation_id: str) -> Conversation:
    conversation = session.get(Conversation, conversation_id)
    if conversation is None or conversation.user_id != user_id:
        raise NotFound("No such conversation.", param="conversation")
    return conversation


def list_conversations(
    factory: sessionmaker[Session], user_id: str, limit: int = 100
) -> list[ConversationInfo]:
    with factory() as session:
        rows = session.scalars(
            select(Conversation)
            .where(Conversation.user_id == user_id)
            .order_by(Conversation.updated_at.desc())
            .limit(limit)
        )
        return [ConversationInfo(c.id, c.title, c.updated_at) for c in rows]


def create_conversation(factory: sessionmaker[Session], user_id: str, title: str = "") -> ConversationInfo:
    with write_transaction(factory) as session:  # BEGIN IMMEDIATE on SQLite: read, then write
        conversation = Conversation(user_id=user_id, title=_title(title) or "New chat")
        session.add(conversation)
        session.flush()
        return ConversationInfo(conversation.id, conversation.title, conversation.updated_at)


def get_conversation(factory: sessionmaker[Session], user_id: str, conversation_id: str) -> ConversationInfo:
    with factory() as session:
        c = _owned(session, user_id, conversation_id)
        return ConversationInfo(c.id, c.title, c.updated_at)


def add_message(
    factory: sessionmaker[Session],
    user_id: str,
    conversation_id: str,
    *,
    text: str,
    job_id: str,
    kind: str = "generate",
    source_image_id: str | None = None,
) -> MessageView:
    """Record a sentence and the job the browser submitted for it (which must be this user's)."""
    text = text.strip()
    if not text or len(text) > MAX_TEXT_CHARS:
        raise InvalidRequest(f"a message is 1–{MAX_TEXT_CHARS} characters", param="text")
    if kind not in ("generate", "edit"):
        raise InvalidRequest("kind is generate or edit", param="kind")
    with write_transaction(factory) as session:  # BEGIN IMMEDIATE on SQLite: read, then write
        conversation = _owned(session, user_id, conversation_id)
        job = session.get(Job, job_id)
        if job is None or job.user_id != user_id:
            raise NotFound("No such job.", param="job_id")
        if source_image_id is not None:
            image = session.get(Image, source_image_id)
            if image is None or image.user_id != user_id:
                raise NotFound("No such image.", param="source_image_id")
        message = Message(
            conversation_id=conversation.id,
            text=text,
            kind=kind,
            source_image_id=source_image_id,
            job_id=job.id,
        )
        session.add(message)
        conversation.updated_at = utcnow()
        session.flush()
        return _view(message, job)


def thread(factory: sessionmaker[Session], user_id: str, conversation_id: str) -> list[MessageView]:
    with factory() as session:
        conversation = _owned(session, user_id, conversation_id)
        job_ids = [m.job_id for m in conversation.messages if m.job_id]
        jobs = {j.id: j for j in session.scalars(select(Job).where(Job.id.in_(job_ids)))} if job_ids else {}
        return [_view(m, jobs.get(m.job_id or "")) for m in conversation.messages]


def _view(message: Message, job: Job | None) -> MessageView:
    return MessageView(
        id=message.id,
        text=message.text,
        kind=message.kind,
        source_image_id=message.source_image_id,
        job_id=message.job_id,
        status=job.status if job else "missing",
        image_ids=tuple(i.id for i in job.images) if job else (),
        error=(job.error_message if job and job.status == "failed" else None),
        seed=job.seed if job else None,
        prompt=job.prompt if job else None,
    )
