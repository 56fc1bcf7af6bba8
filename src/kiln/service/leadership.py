"""Which of several `kiln serve --role scheduler` processes is the active one: the holder of a lock
that dies with its process. On PostgreSQL a session advisory lock on a connection of its own; on
SQLite (everything on one machine) an OS file lock beside the database file. Killed with -9, the process's
connection or file closes and the lock is free for a standby at once.

The holder re-checks the lock as often as a standby tries to take it, and stops acting the moment
it cannot prove it still holds it. While one process holds it, no other scheduler runs jobs: the
active one may take over every unfinished job (see `job_leases.adopt_orphans(force=True)`).
Nothing here knows jobs or the engine.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any, Protocol

log = logging.getLogger(__name__)

LOCK_CLASS = 0x4B494C4E
"""The first key of Kiln's advisory lock ("KILN"); the second is a hash of the schema's name, so
deployments sharing one database in separate schemas (tests do) elect separately."""

SESSION_SETTINGS = (
    # A leader whose machine vanished (no FIN) loses its session, and so the lock, within ~10 s.
    "SET tcp_keepalives_idle = 3", "SET tcp_keepalives_interval = 2", "SET tcp_keepalives_count = 3",
    "SET tcp_user_timeout = 10000", "SET statement_timeout = 5000", "SET idle_session_timeout = 0",
)


class Leadership(Protocol):
    def try_acquire(self) -> bool:
        """Take the lock if it is free; never waits."""

    def held(self) -> bool:
        """Whether this process provably still holds the lock (False on any doubt)."""

    def release(self) -> None: ...


class PostgresLeadership:
    """`pg_try_advisory_lock` on a dedicated connection (never a pooled one: the lock belongs to the
    session). It must reach PostgreSQL directly, not through a transaction pooler."""

    def __init__(self, database_url: str) -> None:
        from sqlalchemy import create_engine
        from sqlalchemy.pool import NullPool

        self._engine = create_engine(
            database_url, poolclass=NullPool, isolation_level="AUTOCOMMIT",
            connect_args={"connect_timeout": 5, "keepalives": 1, "keepalives_idle": 3,
                          "keepalives_interval": 2, "keepalives_count": 3},
        )
        self._conn: Any = None
        self._key: int | None = None

    def try_acquire(self) -> bool:
        from sqlalchemy import text

        try:
            if self._conn is None:
                self._conn = self._engine.connect()
                for statement in SESSION_SETTINGS:
                    with contextlib.suppress(Exception):  # an older server lacks one: keep the rest
                        self._conn.execute(text(statement))
                self._key = self._conn.execute(
                    text("SELECT hashtext('kiln-scheduler/' || current_schema()) & 2147483647")).scalar_one()
            return bool(self._conn.execute(text("SELECT pg_try_advisory_lock(:a, :b)"),
                                           {"a": LOCK_CLASS, "b": self._key}).scalar_one())
        except Exception as exc:  # noqa: BLE001 - the database away: not the leader, try again later
            log.warning("could not try the scheduler leadership: %s", exc)
            self._drop()
            return False

    def held(self) -> bool:
        from sqlalchemy import text

        if self._conn is None:
            return False
        try:
            return bool(self._conn.execute(text(
                "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted"
                " AND pid = pg_backend_pid() AND classid::bigint = :a AND objid::bigint = :b"
                " AND objsubid = 2)"), {"a": LOCK_CLASS, "b": self._key}).scalar_one())
        except Exception as exc:  # noqa: BLE001 - cannot prove it: act as if lost
            log.error("could not re-check the scheduler leadership: %s", exc)
            self._drop()
            return False

    def release(self) -> None:
        self._drop()  # closing the session frees the lock
        self._engine.dispose()

    def _drop(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()
            self._conn = None


class FileLeadership:
    """An exclusive `flock` on a file beside the SQLite database (every process is on this machine)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def try_acquire(self) -> bool:
        import fcntl

        if self._fd is not None:
            return True
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())  # for an operator wondering who leads
        self._fd = fd
        return True

    def held(self) -> bool:
        if self._fd is None:
            return False
        try:  # the file replaced or removed under us: another process could lock the new one
            return os.fstat(self._fd).st_ino == os.stat(self.path).st_ino
        except OSError:
            return False

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the lock
            self._fd = None


def leadership_for(settings: Any) -> Leadership:
    """The lock that fits the settings' database."""
    from sqlalchemy.engine import make_url

    url = make_url(settings.database_url)
    if url.get_backend_name() == "postgresql":
        return PostgresLeadership(settings.database_url)
    if url.database and url.database != ":memory:":  # beside the file the schedulers share
        return FileLeadership(Path(f"{url.database}.scheduler-lock"))
    return FileLeadership(Path(settings.data_dir) / "scheduler.lock")
