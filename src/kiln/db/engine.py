"""The database engine and session factory, built from settings (never at import time).

SQLite runs in WAL mode with a busy timeout so several processes can share one file; writers that
need atomic read-modify-write use `BEGIN IMMEDIATE` (see `write_transaction`).
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker


def is_sqlite(engine: Engine) -> bool:
    return engine.dialect.name == "sqlite"


def make_engine(url: str) -> Engine:
    """An engine for `url`; creates the directory of a SQLite file and turns on WAL."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection, _record) -> None:  # type: ignore[no-untyped-def]
            # Let SQLAlchemy, not the driver, issue BEGIN, so BEGIN IMMEDIATE is possible.
            dbapi_connection.isolation_level = None
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn) -> None:  # type: ignore[no-untyped-def]
            immediate = conn.get_execution_options().get("sqlite_immediate", False)
            conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)


_write_locks: weakref.WeakKeyDictionary[Engine, threading.Lock] = weakref.WeakKeyDictionary()
_write_locks_guard = threading.Lock()


def _write_lock(engine: Engine) -> threading.Lock:
    with _write_locks_guard:
        return _write_locks.setdefault(engine, threading.Lock())


def write_lock(engine: Engine):  # type: ignore[no-untyped-def]
    """This process's SQLite writer mutex (see `write_transaction`); nothing on PostgreSQL."""
    return _write_lock(engine) if is_sqlite(engine) else nullcontext()


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def write_transaction(factory: sessionmaker[Session]) -> Iterator[Session]:
    """A session whose transaction takes the write lock up front on SQLite (BEGIN IMMEDIATE).

    On PostgreSQL it is an ordinary transaction; callers use `SELECT … FOR UPDATE` or conditional
    UPDATEs there. Either way the block commits on success and rolls back on error.
    """
    bind = factory.kw["bind"]
    # SQLite has one writer at a time. Threads of this process queue on a mutex instead of on
    # SQLite's busy handler, whose sleeps and retries cost far more than the writes themselves;
    # other processes still meet at BEGIN IMMEDIATE.
    with _write_lock(bind) if is_sqlite(bind) else nullcontext(), factory() as session:
        if is_sqlite(bind):
            session.connection(execution_options={"sqlite_immediate": True})
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise
