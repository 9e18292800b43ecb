"""Database engine: SQLite (WAL) by default, any SQLAlchemy URL by config; Alembic migrations."""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from alembic import command
from alembic.config import Config as AlembicConfig
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from shiphook.errors import ConfigError

MIGRATIONS = Path(__file__).parent / "migrations"


def normalize_url(url: str) -> str:
    """`postgresql://` means psycopg 3, the driver shiphook installs."""
    for plain in ("postgresql://", "postgres://"):
        if url.startswith(plain):
            return "postgresql+psycopg://" + url[len(plain) :]
    return url


def create_db_engine(url: str) -> Engine:
    url = normalize_url(url)
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise ConfigError(
            f"server.database_url: {url!r} is not a database URL "
            "(expected e.g. sqlite:///shiphook.db or postgresql://user@host/db)"
        ) from None
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database or ""
        if database in ("", ":memory:"):
            raise ConfigError(
                "server.database_url: an in-memory SQLite database would lose every deployment; "
                "give a file, e.g. sqlite:///shiphook.db"
            )
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    try:
        return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)
    except ImportError as exc:
        raise ConfigError(
            f"server.database_url: no driver for {parsed.drivername}: {exc}"
        ) from None


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


class FileWriteLock:
    """Serialises SQLite writers across threads and processes.

    SQLite's busy handler sleeps whole milliseconds while another connection writes, which
    stalls the event loop; taking an OS lock around each write transaction makes writers queue
    instead of polling.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._thread_lock = threading.Lock()
        self._fd: int | None = None
        self._pid: int | None = None

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        with self._thread_lock:
            fd = self._descriptor()
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)

    def _descriptor(self) -> int:
        if self._fd is None or self._pid != os.getpid():  # a forked worker needs its own
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
            self._pid = os.getpid()
        return self._fd


@contextlib.contextmanager
def no_lock() -> Iterator[None]:
    yield


_file_locks: dict[Path, FileWriteLock] = {}  # one per database file, as the OS lock is per process
_file_locks_guard = threading.Lock()


def write_lock(engine: Engine) -> Callable[[], contextlib.AbstractContextManager[None]]:
    """What to hold around a write transaction on this engine."""
    if engine.dialect.name != "sqlite":
        return no_lock
    path = Path(engine.url.database or "").resolve().with_suffix(".lock")
    with _file_locks_guard:
        return _file_locks.setdefault(path, FileWriteLock(path))


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Apply Alembic migrations up to `revision`."""
    config = AlembicConfig()
    config.set_main_option("script_location", str(MIGRATIONS))
    with write_lock(engine)(), engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, revision)
