"""The accept path's performance devices, in one place.

A hook request (`POST /api/v1/dh`) costs the HTTP worker a token lookup (on a token's first use
only) and a share of one insert transaction. What follows is everything that makes those cheap
when many CI jobs call at once, each with what it buys; the figures are in bench/README.md
("Results" for today's, "Log" for what each step gained and what was tried and dropped).

- `Prepared`: the accept path's statements, compiled by SQLAlchemy once from the table
  definitions and run on a DBAPI cursor, with the parameters passed through the same type
  processors. An ORM session costs several times the statement per request, Core's execution
  machinery about as much as the statement; a cursor costs what the database costs.
- `DirectConnections`: DBAPI connections of the accept path, taken out of SQLAlchemy's pool and
  reused through a lock-free queue, in autocommit mode with explicit transactions: no pool
  checkout, reset or implicit BEGIN per call.
- the token cache (`AcceptPath.known_hook`, `hook_by_digest(remember=True)`): a token's hook is
  looked up once per process; later requests skip the SELECT. It stays correct because the
  insert's transaction checks, once per hook, that the hook still exists (and on PostgreSQL keeps
  it from being deleted until the commit), so a deleted hook records nothing, from any process.
- the write lock (`write_lock`): SQLite has one writer at a time, and a writer that finds the
  database locked sleeps in SQLite's busy handler, whole milliseconds at a time. Every writer of
  shiphook (the accept path, the deployer, the CLI, migrations; any thread, any process) holds
  an OS file lock beside the database around its write transaction instead, so writers queue
  in the kernel and the next one starts as soon as the last one commits. A no-op elsewhere.
  (`BEGIN IMMEDIATE` with no busy timeout and a retry loop instead makes writers poll; the Log
  of 2026-12-01 has how it compared.)
- checkpoint deferral (`AcceptPath.defer_checkpoints`, `checkpoint`): a commit that reaches
  SQLite's automatic checkpoint copies the write-ahead log into the database and syncs both to
  disk, which holds up every request waiting for that commit. The HTTP workers of `shiphook
  serve` never checkpoint; its deployer process calls `checkpoint` a few times a second.
- `GroupCommit`: the deployments accepted within a few turns of the event loop share one
  transaction (one BEGIN, one hook re-check, one write lock, one COMMIT and disk sync), run in a
  database thread while the event loop reads the next batch.
- one statement per batch on PostgreSQL (`batch_insert`), made from the event loop: the batch
  travels as one JSON parameter, and a single statement checks its hooks, stamps them and
  inserts its rows, in the transaction the server gives every statement in autocommit mode; one
  round trip, nothing per row on the client but its JSON. The event loop sends it on an
  asynchronous connection of its own (`AcceptPath.add_deployments_on_loop`): no thread to hand
  the batch to, and no wait for the lock a thread needs to deliver its result.

Why a module of its own, beside `shiphook.storage` rather than in `shiphook.http`: the group
commit runs in an HTTP worker, but the write lock is taken by every writer, the deployer
process's included, and the deployer process runs the checkpoints; `shiphook.deployer` must not
import `shiphook.http`. So this module imports only the models (storage builds on it:
`Storage.accept_path` is an `AcceptPath`), and nothing here knows HTTP or orchestrators.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import os
import queue
import sqlite3
import threading
import weakref
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from select import POLLIN, poll
from typing import TYPE_CHECKING, Any

import orjson
from sqlalchemy import Engine, bindparam, insert, select, update
from sqlalchemy.engine import Dialect
from sqlalchemy.sql.expression import Executable

from shiphook.models import Deployment, DeploymentCreate, Hook, HookIdentity

if TYPE_CHECKING:
    from shiphook.storage import Storage

KNOWN_HOOKS = 10_000  # token digests remembered per process; the cache starts over when full


class KeyTaken(Exception):
    """Another deployment of this hook already holds the idempotency key."""


class HookGone(Exception):
    """The hook that made a request was deleted before its deployment was committed."""


class DatabaseFileGone(sqlite3.OperationalError):
    """The SQLite database file was removed or replaced while shiphook ran (or cannot be looked
    at): what is written now may go to a file no later start reads."""


# "<device> <inode> <path>" of the SQLite file `serve` migrated, for the processes it starts:
# each takes that file for the database, not whatever is at the path when it first connects
SQLITE_FILE_ENV = "SHIPHOOK_SQLITE_FILE"


class SqliteFile:
    """An engine's SQLite database file, as the engine first found it at its path (or as
    `SQLITE_FILE_ENV` names it): `check` raises `DatabaseFileGone` once the path holds another
    file, or none. On other databases `path` is None and there is nothing to check."""

    def __init__(self, path: str | None) -> None:
        self.path = path
        self._found: tuple[int, int] | None = None
        device, _, rest = os.environ.get(SQLITE_FILE_ENV, "").partition(" ")
        inode, _, given = rest.partition(" ")
        if path is not None and given == path:
            self._found = int(device), int(inode)

    def identity(self) -> str:
        """The file as `SQLITE_FILE_ENV` names it."""
        self.check()
        device, inode = self._found or (0, 0)
        return f"{device} {inode} {self.path}"

    def check(self) -> None:
        if self.path is None:
            return
        try:
            found = os.stat(self.path)  # through a symbolic link: its target now
        except (FileNotFoundError, NotADirectoryError):
            now = None
        except OSError as exc:
            raise DatabaseFileGone(
                f"the database file {self.path} cannot be looked at: {exc.strerror}"
            ) from None
        else:
            now = found.st_dev, found.st_ino
        if self._found is None:
            self._found = now
        elif now != self._found:
            raise DatabaseFileGone(
                f"the database file {self.path} was removed or replaced while shiphook ran"
            )


_sqlite_files: weakref.WeakKeyDictionary[Engine, SqliteFile] = weakref.WeakKeyDictionary()
_sqlite_files_guard = threading.Lock()


def sqlite_file(engine: Engine) -> SqliteFile:
    """The SQLite database file of `engine`, one per engine (`path` None on other databases)."""
    with _sqlite_files_guard:
        if engine not in _sqlite_files:
            database = engine.url.database or ""
            on_disk = engine.dialect.name == "sqlite" and database not in ("", ":memory:")
            _sqlite_files[engine] = SqliteFile(os.path.abspath(database) if on_disk else None)
        return _sqlite_files[engine]


@dataclass(frozen=True)
class Accepted:
    """A deployment to commit; with `hook_digest`, only if that hook still exists."""

    new: DeploymentCreate
    stamp_hook: bool = False
    hook_digest: str | None = None

    def row(self) -> dict[str, object]:
        return vars(self.new)

    def batch_row(self) -> dict[str, object]:
        """Its row for `batch_insert`: with the hook digest to check, and whether to stamp."""
        return vars(self.new) | {"checked": self.hook_digest, "stamp": self.stamp_hook}


# -- the write lock -------------------------------------------------------------------------


class FileWriteLock:
    """An exclusive OS lock on a file beside the SQLite database, held around each write
    transaction by every thread and process."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._thread_lock = threading.Lock()  # flock is per open file: threads queue here
        self._fd: int | None = None
        # a forked child shares the descriptor, and with it the lock: it must open its own
        os.register_at_fork(after_in_child=self._forget)

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        with self._thread_lock:
            if self._fd is None:
                self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(self._fd, fcntl.LOCK_UN)

    def _forget(self) -> None:
        self._fd = None


@contextlib.contextmanager
def no_lock() -> Iterator[None]:
    yield


_file_locks: dict[Path, FileWriteLock] = {}  # one per database file, as the OS lock is per process
_file_locks_guard = threading.Lock()


def write_lock(engine: Engine) -> Callable[[], contextlib.AbstractContextManager[None]]:
    """What to hold around a write transaction on this engine: the database file's
    `FileWriteLock` on SQLite, nothing on a database that queues its writers itself."""
    if engine.dialect.name != "sqlite":
        return no_lock
    path = Path(engine.url.database or "").resolve().with_suffix(".lock")
    with _file_locks_guard:
        return _file_locks.setdefault(path, FileWriteLock(path))


# -- checkpoints ----------------------------------------------------------------------------


def checkpoint(engine: Engine) -> tuple[int, int]:
    """Copy what SQLite's write-ahead log holds into the database without waiting for readers
    or writers; return the log's frames and how many are now in the database. Nothing to do on
    other databases."""
    if engine.dialect.name != "sqlite":
        return 0, 0
    with engine.connect() as connection:
        _busy, frames, copied = connection.exec_driver_sql("PRAGMA wal_checkpoint(PASSIVE)").one()
    return frames, copied


# -- statements and connections ---------------------------------------------------------------


class Prepared:
    """A Core statement compiled once for a dialect, run on a DBAPI cursor."""

    def __init__(self, dialect: Dialect, statement: Executable) -> None:
        compiled = statement.compile(dialect=dialect)
        self.sql = str(compiled)
        self._processors = [
            (key, process)
            for key, bind in compiled.binds.items()
            if (process := bind.type.dialect_impl(dialect).bind_processor(dialect)) is not None
        ]
        self._order = compiled.positiontup if compiled.positional else None

    def params(self, values: dict[str, Any]) -> tuple[Any, ...] | dict[str, Any]:
        """The DBAPI parameters for `values` (which holds every bind's value, processed here
        once each); None is always SQL NULL."""
        processed = values | {
            key: process(value)
            for key, process in self._processors
            if (value := values[key]) is not None
        }
        if self._order is None:
            return processed
        return tuple(map(processed.__getitem__, self._order))


class DirectConnections:
    """DBAPI connections in autocommit mode (transactions are explicit), reused through a
    lock-free queue; one that the database closed is replaced before use (on PostgreSQL), or
    after the statement it failed (elsewhere)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.autocheckpoint = True  # SQLite: whether commits may checkpoint the write-ahead log
        self._idle: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._psycopg = engine.dialect.driver == "psycopg"

    @contextlib.contextmanager
    def cursor(self) -> Iterator[Any]:
        try:
            connection = self._idle.get_nowait()
            if self._psycopg and _closed(connection):
                connection.close()
                connection = self._connect()
        except queue.Empty:
            connection = self._connect()
        try:
            cursor = connection.cursor()
            yield cursor
            cursor.close()
        except self.engine.dialect.loaded_dbapi.Error as exc:
            # a fresh one next time for one gone, and on SQLite for one that met a read-only
            # or failing file: it may stay so (its write-ahead log opened read-only) once the
            # file is writable again
            if self.engine.dialect.is_disconnect(exc, connection, None) or (
                not self._psycopg
                and isinstance(exc, self.engine.dialect.loaded_dbapi.OperationalError)
            ):
                connection.close()
                raise
            self._rollback(connection)
            self._idle.put(connection)
            raise
        except BaseException:
            self._rollback(connection)
            self._idle.put(connection)
            raise
        self._idle.put(connection)

    def _connect(self) -> Any:
        fairy = self.engine.raw_connection()
        fairy.detach()  # ours from now on; the pool neither counts nor resets it
        connection = fairy.dbapi_connection
        self.engine.dialect.set_isolation_level(connection, "AUTOCOMMIT")
        if not self.autocheckpoint and self.engine.dialect.name == "sqlite":
            connection.execute("PRAGMA wal_autocheckpoint=0")
        return connection

    def close(self) -> None:
        """Close the idle connections (one in use is closed when it comes back, or with its
        process)."""
        while True:
            try:
                self._idle.get_nowait().close()
            except queue.Empty:
                return

    @staticmethod
    def _rollback(connection: Any) -> None:
        with contextlib.suppress(Exception):
            connection.cursor().execute("ROLLBACK")


# -- the accept path's two calls ----------------------------------------------------------------


class AcceptPath:
    """The database calls of a hook request: the token's hook, and the insert of accepted
    deployments. Blocking, thread-safe; the event loop makes them through `Storage.call` and
    `GroupCommit`, which on PostgreSQL inserts with `add_deployments_on_loop` instead.
    `connect_on_loop` opens the asynchronous connection that takes."""

    def __init__(
        self, engine: Engine, *, connect_on_loop: Callable[[], Awaitable[Any]] | None = None
    ) -> None:
        self.engine = engine
        self.connect_on_loop = connect_on_loop
        self._on_loop: tuple[asyncio.AbstractEventLoop, Any] | None = None
        self._lock = write_lock(engine)
        self._direct = DirectConnections(engine)
        self._file = sqlite_file(engine)
        self._known: dict[str, HookIdentity] = {}
        # SQLite takes its write lock at BEGIN IMMEDIATE, waiting in its busy handler while
        # another connection holds it; a deferred transaction that has read fails at its first
        # write instead ("database is locked"), without waiting
        self._begin = "BEGIN IMMEDIATE" if engine.dialect.name == "sqlite" else "BEGIN"
        hook, deployment = Hook.__table__, Deployment.__table__
        dialect = engine.dialect
        self._find_hook = Prepared(
            dialect,
            select(hook.c.id, hook.c.name, hook.c.target).where(
                hook.c.token_digest == bindparam("token_digest")
            ),
        )
        values = {c: bindparam(c) for c in DeploymentCreate.model_fields}
        self._insert_deployment = Prepared(dialect, insert(deployment).values(values))
        self._hook_alive = Prepared(
            dialect,
            select(hook.c.id)
            .where(hook.c.id == bindparam("hook_id"), hook.c.token_digest == bindparam("digest"))
            .with_for_update(read=True, key_share=True),
        )
        self._stamp_hook = Prepared(
            dialect,
            update(hook)
            .where(hook.c.id == bindparam("hook_id"))
            .values(last_used_at=bindparam("at")),
        )
        self._batch_insert = batch_insert(dialect) if dialect.name == "postgresql" else None

    def close(self) -> None:
        """Close this path's own connections (the pool's are the engine's)."""
        self._direct.close()
        self._close_on_loop()

    def _close_on_loop(self) -> None:
        if self._on_loop is not None:  # without awaiting: its loop may be gone
            self._on_loop[1].pgconn.finish()
            self._on_loop = None

    def defer_checkpoints(self) -> None:
        """Keep this process's commits from checkpointing SQLite's write-ahead log. Call before
        the first request; then another process must call `checkpoint` regularly (the deployer
        process of `shiphook serve` does)."""
        self._direct.autocheckpoint = False

    def known_hook(self, *, token_digest: str) -> HookIdentity | None:
        """The hook with this token digest if it was remembered: for callers whose write checks
        the hook again (`add_deployments` does)."""
        return self._known.get(token_digest)

    def forget(self, *, token_digest: str) -> None:
        """A deleted hook's token is no longer known."""
        self._known.pop(token_digest, None)

    def hook_by_digest(self, *, token_digest: str, remember: bool = False) -> HookIdentity | None:
        """The hook with this token digest; with `remember`, kept for `known_hook`."""
        with self._direct.cursor() as cursor:
            cursor.execute(
                self._find_hook.sql, self._find_hook.params({"token_digest": token_digest})
            )
            row = cursor.fetchone()
        if row is None:
            return None
        hook = HookIdentity(id=row[0], name=row[1], target=row[2], token_digest=token_digest)
        if remember:
            if len(self._known) >= KNOWN_HOOKS:
                self._known.clear()
            self._known[token_digest] = hook
        return hook

    def add_deployments(self, *, batch: Sequence[Accepted]) -> set[str]:
        """Commit queued deployments in one transaction; return the ids of those not recorded
        because their hook no longer exists (checked once per hook, in the same transaction).
        Raises `KeyTaken` (committing nothing) when an idempotency key is already held."""
        if self._batch_insert is not None:
            with self._direct.cursor() as cursor, self._keys_taken(batch):
                cursor.execute(self._batch_insert, (_batch_json(batch),))
                return self._not_recorded(batch, cursor.fetchall())
        hooks = {a.hook_digest: a.new.hook_id for a in batch if a.hook_digest is not None}
        with self._lock(), self._direct.cursor() as cursor:
            cursor.execute(self._begin)
            gone = {
                digest
                for digest, hook_id in hooks.items()
                if not self._alive(cursor, hook_id, digest)
            }
            kept = [a for a in batch if a.hook_digest not in gone] if gone else batch
            with self._keys_taken(batch):
                cursor.executemany(
                    self._insert_deployment.sql,
                    [self._insert_deployment.params(a.row()) for a in kept],
                )
            stamps = [
                self._stamp_hook.params({"hook_id": a.new.hook_id, "at": a.new.created_at})
                for a in kept
                if a.stamp_hook
            ]
            if stamps:
                cursor.executemany(self._stamp_hook.sql, stamps)
            cursor.execute("COMMIT")
        self._file.check()  # committed to a file removed or replaced: no 201 for it
        for digest in gone:
            self.forget(token_digest=digest)
        return {a.new.id for a in batch if a.hook_digest in gone}

    async def add_deployments_on_loop(self, *, batch: Sequence[Accepted]) -> set[str]:
        """`add_deployments` on PostgreSQL, from the event loop (see `GroupCommit`): on this
        process's asynchronous connection of the running loop, opened on first use and again
        when the database has closed it."""
        assert self._batch_insert is not None and self.connect_on_loop is not None
        loop = asyncio.get_running_loop()
        if self._on_loop is None or self._on_loop[0] is not loop or _closed(self._on_loop[1]):
            self._close_on_loop()  # another loop's (tests run several), or one closed
            self._on_loop = (loop, await self.connect_on_loop())
        connection = self._on_loop[1]
        try:
            with self._keys_taken(batch):
                cursor = await connection.execute(self._batch_insert, (_batch_json(batch),))
                rows = await cursor.fetchall()
        except self.engine.dialect.loaded_dbapi.Error:
            if connection.broken:
                self._close_on_loop()
            raise
        return self._not_recorded(batch, rows)

    @contextlib.contextmanager
    def _keys_taken(self, batch: Sequence[Accepted]) -> Iterator[None]:
        """An insert refused for a unique key is `KeyTaken` when the batch has idempotency
        keys (the database's own message would quote the row)."""
        try:
            yield
        except self.engine.dialect.loaded_dbapi.IntegrityError:
            keys = [a.new.idempotency_key for a in batch if a.new.idempotency_key]
            if not keys:
                raise
            raise KeyTaken(", ".join(keys)) from None

    def _not_recorded(self, batch: Sequence[Accepted], returned: Sequence[Any]) -> set[str]:
        """The ids of the batch that `batch_insert` did not return, their hooks forgotten."""
        recorded = {row[0] for row in returned}
        missing = [a for a in batch if a.new.id not in recorded]
        for accepted in missing:  # only a checked row is left out: it has a digest
            self.forget(token_digest=accepted.hook_digest or "")
        return {a.new.id for a in missing}

    def _alive(self, cursor: Any, hook_id: int | None, digest: str) -> bool:
        cursor.execute(
            self._hook_alive.sql, self._hook_alive.params({"hook_id": hook_id, "digest": digest})
        )
        return cursor.fetchone() is not None


# -- the group commit ------------------------------------------------------------------------------


class GroupCommit:
    """Commits the deployments accepted within `TURNS` turns of the event loop in one
    transaction, in a database thread (on PostgreSQL, from the event loop), one transaction at
    a time.

    The turns after the first matter when each CI job opens its own connection: its request
    often arrives a turn or two after the one before. While a transaction commits (waiting for
    the write lock or the disk's sync), the event loop reads more requests: they form the next
    batch, committed when this one is, so that deployments commit in the order they were
    accepted (superseding relies on it). Every caller is answered only after the commit holding
    its row, or with `DatabaseUnavailable` when that took longer than the storage's `timeout` (a
    batch then still waiting is dropped; one in flight may yet commit). When a batch fails for
    another reason, each of its deployments is committed alone, so that only the holder of a
    taken idempotency key (or whatever failed) gets the error. Used from the event loop's
    thread only.
    """

    TURNS = 3

    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        self._batch: list[tuple[Accepted, asyncio.Future[None]]] = []
        self._expiry: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # the batch's
        self._committing = False

    async def add(self, accepted: Accepted) -> None:
        """Return once `accepted` is committed; raise `HookGone`, `KeyTaken` or
        `DatabaseUnavailable` if it was not."""
        if not self._batch:
            # a batch is one loop's: asking once per batch saves a getpid() per request
            loop = self._loop = asyncio.get_running_loop()
            # after this turn and the ones after it: each call_soon defers by one turn
            loop.call_soon(*[loop.call_soon] * (self.TURNS - 1), self._commit)
            self._expiry = loop.call_later(self.storage.timeout, self._expire, self._batch)
        future = self._loop.create_future()
        self._batch.append((accepted, future))
        await future

    def _commit(self) -> None:
        if self._committing:
            return  # the transaction in flight starts this batch when it ends
        batch, expiry, self._batch, self._expiry = self._batch, self._expiry, [], None
        waiting = [(accepted, future) for accepted, future in batch if not future.done()]
        if not waiting:
            if expiry is not None:
                expiry.cancel()
            return
        self._committing = True
        accept_path, accepted = self.storage.accept_path, [a for a, _ in waiting]
        committed: asyncio.Future[set[str]]
        if accept_path.connect_on_loop is not None:
            committed = asyncio.ensure_future(accept_path.add_deployments_on_loop(batch=accepted))
        else:
            committed = self.storage.in_thread(
                functools.partial(accept_path.add_deployments, batch=accepted)
            )
        committed.add_done_callback(functools.partial(self._committed, waiting, expiry))

    def _committed(
        self,
        waiting: list[tuple[Accepted, asyncio.Future[None]]],
        expiry: asyncio.TimerHandle | None,
        committed: asyncio.Future[set[str]],
    ) -> None:
        if expiry is not None:
            expiry.cancel()
        error = committed.exception()
        if error is None:
            self.storage.reachability.answered()
            gone = committed.result()
            try:
                self._next()  # the next batch's transaction starts before these callers' answers
            finally:
                for accepted, future in waiting:
                    _settle(future, HookGone() if accepted.new.id in gone else None)
            return
        if self.storage.unavailable(error):
            unavailable = self.storage.reachability.failed(error)
            for _, future in waiting:
                _settle(future, unavailable)
        else:
            alone = self.storage.in_thread(
                functools.partial(self._each_alone, [a for a, _ in waiting])
            )
            alone.add_done_callback(functools.partial(self._committed_alone, waiting))
            return
        self._next()

    def _committed_alone(
        self,
        waiting: list[tuple[Accepted, asyncio.Future[None]]],
        outcomes: asyncio.Future[list[BaseException | None]],
    ) -> None:
        for (_, future), outcome in zip(waiting, outcomes.result(), strict=True):
            _settle(future, outcome)
        self._next()

    def _next(self) -> None:
        self._committing = False
        if self._batch:
            self._commit()

    def _expire(self, batch: list[tuple[Accepted, asyncio.Future[None]]]) -> None:
        unavailable = self.storage.reachability.failed(TimeoutError())
        for _, future in batch:
            _settle(future, unavailable)

    def _each_alone(self, batch: list[Accepted]) -> list[BaseException | None]:
        """Commit each deployment in a transaction of its own (in a database thread); what each
        gave."""
        outcomes: list[BaseException | None] = []
        for accepted in batch:
            try:
                missing = self.storage.accept_path.add_deployments(batch=[accepted])
            except Exception as error:
                outcomes.append(error)
            else:
                outcomes.append(HookGone() if missing else None)
        return outcomes


def batch_insert(dialect: Dialect) -> str:
    """PostgreSQL's insert of a batch of accepted deployments, given as one JSON array of
    `Accepted.batch_row`s: rows with a `checked` token digest only if that hook still exists
    (locked against deletion until the commit, as `_hook_alive` does), their hooks' `last_used_at`
    set where `stamp` says so; returns the ids inserted. Its column types are the table's."""
    table = Deployment.__table__
    names = list(DeploymentCreate.model_fields)
    columns = ", ".join(names)
    types = ", ".join(f"{name} {table.c[name].type.compile(dialect)}" for name in names)
    return f"""
        WITH batch AS (
            SELECT * FROM json_to_recordset(%s::json)
                AS b({types}, checked TEXT, stamp BOOLEAN)
        ), alive AS (
            SELECT hook.id FROM hook
            JOIN (SELECT DISTINCT hook_id, checked FROM batch) c
                ON hook.id = c.hook_id AND hook.token_digest = c.checked
            FOR KEY SHARE OF hook
        ), stamped AS (
            UPDATE hook SET last_used_at = s.at
            FROM (SELECT hook_id, max(created_at) AS at FROM batch WHERE stamp GROUP BY hook_id) s
            WHERE hook.id = s.hook_id AND hook.id IN (SELECT id FROM alive)
        )
        INSERT INTO deployment ({columns})
        SELECT {columns} FROM batch WHERE checked IS NULL OR hook_id IN (SELECT id FROM alive)
        RETURNING id
    """


def _closed(connection: Any) -> bool:
    """Whether an idle psycopg connection (either kind) is closed or has something unread from
    the server: as a rule the goodbye of a server that ended it (a restart, an idle timeout,
    `pg_terminate_backend`). Replacing a connection costs less than failing a request."""
    if connection.closed:
        return True
    poller = poll()
    poller.register(connection.pgconn.socket, POLLIN)
    return bool(poller.poll(0))


def _batch_json(batch: Sequence[Accepted]) -> str:
    return orjson.dumps([a.batch_row() for a in batch]).decode()


def _settle(future: asyncio.Future[None], error: BaseException | None) -> None:
    if future.done():  # its request timed out or was cancelled
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)
