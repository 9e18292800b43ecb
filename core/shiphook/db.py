"""Database engine: SQLite (WAL) by default, any SQLAlchemy URL by config; Alembic migrations."""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import math
import os
import re
import socket
import threading
import time
import urllib.parse
import zlib
from collections.abc import Awaitable, Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError, SQLAlchemyError

from shiphook.errors import ConfigError, quoted
from shiphook.fastpath import sqlite_file, write_lock

MIGRATIONS = Path(__file__).parent / "migrations"
DATABASE_TIMEOUT = 5.0  # seconds; `[server] database_timeout`
SQLITE_SYNCHRONOUS = "full"  # `[server] sqlite_synchronous`
# every shiphook process on a PostgreSQL database migrates under this advisory lock, one at a time
MIGRATION_LOCK = zlib.crc32(b"shiphook migrations")
CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def normalize_url(url: str) -> str:
    """`postgresql://` means psycopg 3, the driver shiphook installs."""
    for plain in ("postgresql://", "postgres://"):
        if url.startswith(plain):
            return "postgresql+psycopg://" + url[len(plain) :]
    return url


DATABASE_URL_ENV = "SHIPHOOK_DATABASE_URL"  # overrides [server] database_url


def create_db_engine(
    url: str, *, timeout: float = DATABASE_TIMEOUT, synchronous: str = SQLITE_SYNCHRONOUS
) -> Engine:
    """An engine for `url` whose errors and log lines never quote a statement's parameters (a
    hook's token digest is one). On a networked database every connection gives up after
    `timeout` seconds: to connect, per statement (server side), and on a peer that stopped
    answering (TCP keepalives, unacknowledged data); the URL's own libpq parameters take
    precedence. On SQLite, `synchronous` is the pragma of that name ("full" or "normal")."""
    url = normalize_url(url)
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):  # not quoted: it may hold a password
        raise ConfigError(
            f"{database_url_source()}: not a database URL "
            "(expected e.g. sqlite:///shiphook.db or postgresql://user@host/db)"
        ) from None
    if CONTROL.search(urllib.parse.unquote(url)):  # libpq cuts a string at a NUL
        raise ConfigError(
            f"{database_url_source()}: the URL holds a control character (%00 or the like): "
            "a database URL has none"
        )
    if "@" in url.partition("://")[2].rpartition("@")[0]:  # SQLAlchemy would split at the first
        raise ConfigError(
            f"{database_url_source()}: the URL's user or password holds an @: write it as %40"
        )
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database or ""
        if database in ("", ":memory:"):
            raise ConfigError(
                f"{database_url_source()}: an in-memory SQLite database would lose every "
                "deployment; give a file, e.g. sqlite:///shiphook.db"
            )
        if parsed.query:  # pysqlite's would override how shiphook opens it, SQLite's need file:
            raise ConfigError(
                f"{database_url_source()}: a SQLite URL takes no arguments here "
                f"({quoted(next(iter(parsed.query)))} given): shiphook sets how the file is opened"
            )
        engine = create_engine(
            url,
            connect_args={"check_same_thread": False, "timeout": 30},
            hide_parameters=True,
        )
        event.listen(engine, "do_connect", functools.partial(_open_private, engine))
        event.listen(
            engine, "connect", functools.partial(_sqlite_pragmas, synchronous, Path(database))
        )
        return engine
    try:
        engine = create_engine(
            url,
            pool_pre_ping=True,
            pool_size=10,
            max_overflow=20,
            pool_timeout=timeout,
            hide_parameters=True,
            connect_args=_libpq_timeouts(parsed.query, timeout)
            if parsed.get_backend_name() == "postgresql"
            else {},
        )
    except (ImportError, NoSuchModuleError) as exc:
        raise ConfigError(
            f"{database_url_source()}: no driver for {parsed.drivername}: {exc} (expected e.g. "
            "sqlite:///shiphook.db or postgresql://user@host/db)"
        ) from None
    if engine.dialect.driver == "psycopg":
        event.listen(engine, "do_connect", functools.partial(_connect_bounded, timeout))
    return engine


def database_url_source() -> str:
    """Where the database URL came from, as the config reads it: the environment wins."""
    return DATABASE_URL_ENV if os.environ.get(DATABASE_URL_ENV) else "server.database_url"


def connect_on_loop(engine: Engine, timeout: float) -> Callable[[], Awaitable[Any]] | None:
    """How an event loop opens a connection of its own to `engine`'s database, in autocommit
    mode and with the parameters and timeouts of the engine's connections: psycopg's
    `AsyncConnection` on PostgreSQL, None on other databases and drivers."""
    if engine.dialect.driver != "psycopg":
        return None
    _, given = engine.dialect.create_connect_args(engine.url)
    # without SQLAlchemy's adapters ("context"): the accept path passes plain text
    params = {k: v for k, v in given.items() if k != "context"}
    params |= _libpq_timeouts(engine.url.query, timeout)

    async def connect() -> Any:
        connection = await _bounded_classes()[1].connect(autocommit=True, **params)
        connection.deadline = _deadline(timeout)
        return connection

    return connect


def _libpq_timeouts(query: Mapping[str, Any], timeout: float) -> dict[str, Any]:
    """libpq connection parameters that bound every wait on the server; the URL's win."""
    seconds = _whole_seconds(timeout)
    defaults = {
        "connect_timeout": seconds,
        "keepalives": 1,
        "keepalives_idle": seconds,
        "keepalives_interval": 1,
        "keepalives_count": 3,
        "tcp_user_timeout": seconds * 1000,  # ms: data sent and never acknowledged
    }
    given = query.get("options", "")
    # statement_timeout first, so that one in the URL's own options overrides it
    options = f"-c statement_timeout={seconds * 1000} {given if isinstance(given, str) else ''}"
    return {k: v for k, v in defaults.items() if k not in query} | {"options": options.strip()}


# -- calls that get no answer ------------------------------------------------------------------

ANSWER_MARGIN = 1.0  # seconds past `database_timeout`: the server's statement_timeout comes first


class _Watchdog:
    """Ends the PostgreSQL calls of this process that have waited past their deadline, by
    shutting their connection's socket down from a thread of its own: the call then fails at
    once, and the pool replaces the connection. libpq's timeouts end a call when the network
    loses the server, but not when something between still acknowledges every packet and
    forwards none (a proxy that stopped relaying): without this, such a call waits until the
    database answers, and so does the deployer, and a stop of `serve`."""

    def __init__(self) -> None:
        self._calls: dict[object, tuple[float, int]] = {}  # a call: (expiry, its socket)
        self._ended: set[object] = set()
        self._wake = threading.Condition()
        self._next_check: float | None = None  # None: the thread waits for a call
        self._thread: threading.Thread | None = None
        os.register_at_fork(after_in_child=self.__init__)

    @contextlib.contextmanager
    def watching(self, fd: int, seconds: float) -> Iterator[Callable[[], bool]]:
        """Around one call on socket `fd`; yields whether the deadline ended it. Costs a lock
        and two dict operations: the thread is woken only when it was idle."""
        call, expiry = object(), time.monotonic() + seconds
        with self._wake:
            self._calls[call] = (expiry, fd)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="db-deadlines", daemon=True)
                self._thread.start()
            if self._next_check is None or expiry < self._next_check:
                self._wake.notify()
        try:
            yield lambda: call in self._ended
        finally:
            with self._wake:  # under the lock: the socket is never shut down once it is left
                del self._calls[call]
                self._ended.discard(call)

    def _run(self) -> None:
        with self._wake:
            while True:
                now = time.monotonic()
                for call, (expiry, fd) in self._calls.items():
                    if expiry <= now and call not in self._ended:
                        self._ended.add(call)
                        with contextlib.suppress(OSError), socket.socket(fileno=os.dup(fd)) as s:
                            s.shutdown(socket.SHUT_RDWR)
                waiting = [e for call, (e, _) in self._calls.items() if call not in self._ended]
                self._next_check = min(waiting, default=None)
                self._wake.wait(None if self._next_check is None else self._next_check - now)


_watchdog = _Watchdog()


@functools.cache
def _bounded_classes() -> tuple[type, type]:
    """psycopg's connection classes whose every call has a `deadline` (seconds, None for
    none), enforced by `_watchdog`; made on first use."""
    import psycopg  # here, as SQLAlchemy does: importing it costs every other database 0.1 s

    @contextlib.contextmanager
    def within_deadline(connection: Any) -> Iterator[None]:
        if connection.deadline is None:
            yield
            return
        with _watchdog.watching(connection.pgconn.socket, connection.deadline) as ended:
            try:
                yield
            except psycopg.OperationalError:
                if ended():
                    raise psycopg.OperationalError(
                        f"no answer from the database within {connection.deadline:g} s"
                    ) from None
                raise

    class Bounded(psycopg.Connection):
        deadline: float | None = None

        def wait(self, gen: Any, *args: Any, **kwargs: Any) -> Any:
            with within_deadline(self):
                return super().wait(gen, *args, **kwargs)

    class AsyncBounded(psycopg.AsyncConnection):
        deadline: float | None = None

        async def wait(self, gen: Any, *args: Any, **kwargs: Any) -> Any:
            with within_deadline(self):
                return await super().wait(gen, *args, **kwargs)

    return Bounded, AsyncBounded


def _connect_bounded(timeout: float, _dialect, _record, cargs, cparams) -> Any:
    connection = _bounded_classes()[0].connect(*cargs, **cparams)
    connection.deadline = _deadline(timeout)
    return connection


def _deadline(timeout: float) -> float:
    """A call's deadline: a margin past the server's statement_timeout, so that an honest slow
    statement is cancelled by the server."""
    return _whole_seconds(timeout) + ANSWER_MARGIN


def _whole_seconds(timeout: float) -> int:
    """`database_timeout` as libpq's timeouts and the statement_timeout take it."""
    return max(1, math.ceil(timeout))


@contextlib.contextmanager
def unbounded(connection: Any) -> Iterator[None]:
    """No deadline for the calls of this SQLAlchemy connection meanwhile (a migration)."""
    dbapi = connection.connection.dbapi_connection
    saved = getattr(dbapi, "deadline", None)
    if saved is not None:
        dbapi.deadline = None
    try:
        yield
    finally:
        if saved is not None:
            dbapi.deadline = saved


def _sqlite_pragmas(synchronous: str, path: Path, dbapi_connection, _record) -> None:
    _private(path)
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute(f"PRAGMA synchronous={synchronous.upper()}")
    # shiphook's writers queue on `fastpath.write_lock`; this waits for a writer outside it
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def _open_private(engine: Engine, *_: Any) -> None:
    """Before each new SQLite connection: create a missing database file readable by its owner
    only, before SQLite creates it readable by all (as the umask allows) until `_private`
    narrows it; but a file removed or replaced since the engine first found it is an error
    (`DatabaseFileGone`), not a new empty database."""
    database = sqlite_file(engine)
    database.check()
    with contextlib.suppress(OSError):  # there already, or its directory missing: SQLite says
        os.close(os.open(database.path or "", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    database.check()  # found now, if it was not before


def _private(database: Path) -> None:
    """The database file readable by its owner only (it holds the hooks' token digests and the
    job runs' environments); SQLite gives its -wal and -shm files the database file's mode, and
    an older database's are narrowed too."""
    for path in (database, Path(f"{database}-wal"), Path(f"{database}-shm")):
        with contextlib.suppress(OSError):  # not there (yet), or not ours to change
            mode = path.stat().st_mode
            if mode & 0o077:
                os.chmod(path, mode & 0o700)


def safe_url(engine: Engine) -> str:
    """The database URL without its password, the `user:password@` one or a libpq parameter's
    (`?password=`, `?sslpassword=`)."""
    shown = engine.url.render_as_string(hide_password=True)
    return re.sub(r"([?&][^=&]*password=)[^&]*", r"\1***", shown, flags=re.IGNORECASE)


def describe_failure(engine: Engine, exc: BaseException) -> str:
    """Why the database failed, in one line without the URL's password (for errors and logs)."""
    cause = getattr(exc, "orig", None) or exc  # SQLAlchemy wraps the driver's error
    if isinstance(cause, OSError) and cause.filename:
        message = f"{cause.filename}: {cause.strerror}"
    else:
        message = str(cause) or type(cause).__name__
    message = "; ".join(line.strip() for line in message.splitlines() if line.strip())
    if engine.url.password:
        message = message.replace(str(engine.url.password), "***")
    return message


def unusable(engine: Engine, exc: BaseException) -> ConfigError:
    """The error for a database that cannot be opened or written at all (at start-up)."""
    cause = describe_failure(engine, exc)
    return ConfigError(f"{database_url_source()}: cannot use {safe_url(engine)}: {cause}")


class _DialectLines(logging.Filter):
    """Drops the lines Alembic logs about its dialect at every start ("Context impl ...",
    "Will assume ... DDL"), which tell an operator nothing; its "Running upgrade" lines stay."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(("Context impl ", "Will assume "))


logging.getLogger("alembic.runtime.migration").addFilter(_DialectLines())


def _alembic_config() -> AlembicConfig:
    config = AlembicConfig()
    config.set_main_option("script_location", str(MIGRATIONS))
    return config


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Apply Alembic migrations up to `revision`; a database that cannot be opened or written
    is a `ConfigError` naming it and the cause."""
    config = _alembic_config()
    try:
        with write_lock(engine)(), engine.begin() as connection:
            if engine.dialect.name == "postgresql":
                # a migration may take longer than a request; replicas migrate one at a time
                connection.exec_driver_sql("SET LOCAL statement_timeout = 0")
            with unbounded(connection):
                if engine.dialect.name == "postgresql":
                    connection.execute(
                        text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK}
                    )
                config.attributes["connection"] = connection
                command.upgrade(config, revision)
    except (SQLAlchemyError, OSError) as exc:
        raise unusable(engine, exc) from None
    except CommandError as exc:
        if "Can't locate revision" not in str(exc):
            raise
        raise ConfigError(
            f"{database_url_source()}: cannot use {safe_url(engine)}: its schema is unknown to "
            f"this shiphook ({exc}): a newer version wrote it; run that version, or restore "
            "the database as it was before that version's upgrade"
        ) from None


class SchemaUnknown(Exception):
    """A schema this shiphook has no migration for: `serve` refuses the database."""


def schema_state(engine: Engine) -> str:
    """The database's schema version against this shiphook's, in words (for `shiphook check`);
    `SchemaUnknown` for one it cannot use. An SQLite file that does not exist yet is not
    created."""
    if engine.dialect.name == "sqlite":
        path = Path(engine.url.database or "")
        if not path.exists():  # what `serve` would meet creating it (OSError, as it would)
            if not path.parent.is_dir():
                raise FileNotFoundError(errno.ENOENT, "no such directory", str(path.parent))
            if not os.access(path.parent, os.W_OK):
                raise PermissionError(errno.EACCES, "directory not writable", str(path.parent))
            return "no database yet (`shiphook serve` or `shiphook db upgrade` creates it)"
    with engine.connect() as connection:
        current = MigrationContext.configure(connection).get_current_revision()
    script = ScriptDirectory.from_config(_alembic_config())
    head = script.get_current_head()
    if current is None:
        return "reachable, no schema yet (`shiphook serve` or `shiphook db upgrade` creates it)"
    if current == head:
        return f"schema {current}, the latest"
    try:
        script.get_revision(current)
    except CommandError:
        raise SchemaUnknown(
            f"schema {current}, unknown to this shiphook (written by a newer version?)"
        ) from None
    return f"schema {current}, this shiphook needs {head}: run `shiphook db upgrade`"
