"""Data functions over the hook and deployment tables. Nothing here knows HTTP or orchestrators.

Every write runs in one transaction under the database's write lock (a no-op except on SQLite,
where it makes writers from all threads and processes queue instead of busy-waiting). The two
calls of the accept path (`hook_by_digest`, `add_deployments`) run prepared statements on direct
DBAPI connections; everything else uses SQLModel sessions or Core. The calls are blocking: an
event loop makes them through `Storage.call` and `GroupCommit`, which run them in threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

from sqlalchemy import (
    Connection,
    Engine,
    Update,
    and_,
    bindparam,
    case,
    delete,
    func,
    insert,
    or_,
    update,
)
from sqlalchemy import exc as sa_exc
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from shiphook.db import DATABASE_TIMEOUT, DirectConnections, Prepared, write_lock
from shiphook.errors import DatabaseUnavailable
from shiphook.models import (
    Deployment,
    DeploymentCreate,
    DeploymentEvent,
    Hook,
    HookIdentity,
    Lease,
    Status,
)

log = logging.getLogger("shiphook.storage")

DEPLOYMENT, EVENT, LEASE = Deployment.__table__, DeploymentEvent.__table__, Lease.__table__
KNOWN_HOOKS = 10_000  # token digests remembered by the accept path
SUPERSEDE_CHUNK = 200  # rows per transaction, so a burst never holds the write lock for long
DATABASE_THREADS = 8  # an HTTP worker's database calls in flight at once
T = TypeVar("T")


class KeyTaken(Exception):
    """Another deployment of this hook already holds the idempotency key."""


class HookGone(Exception):
    """The hook that made a request was deleted before its deployment was committed."""


class TokenTaken(Exception):
    """Another hook has the new hook's token digest: the random source repeats itself."""


@dataclass(frozen=True)
class Accepted:
    """A deployment to commit; with `hook_digest`, only if that hook still exists."""

    new: DeploymentCreate
    stamp_hook: bool = False
    hook_digest: str | None = None

    def row(self) -> dict[str, object]:
        return vars(self.new)


class Reachability:
    """Whether the database answered the last call: logs each change of state once, not each
    failed request. Any thread."""

    def __init__(self) -> None:
        self.reachable = True
        self._lock = threading.Lock()

    def failed(self, error: BaseException) -> DatabaseUnavailable:
        """Note the failure; return the error callers get, which names only its class."""
        cause = getattr(error, "orig", None) or error  # the driver's, not SQLAlchemy's wrapper
        with self._lock:
            changed, self.reachable = self.reachable, False
        if changed:
            if isinstance(cause, TimeoutError):
                detail = "no answer in time"
            else:  # the driver's first line; SQLAlchemy's own text adds statements and values
                detail = (str(cause).strip().splitlines() or [""])[0]
            log.error("database unreachable: %s: %s", type(cause).__name__, detail)
        return DatabaseUnavailable(type(cause).__name__)

    def answered(self) -> None:
        if self.reachable:
            return
        with self._lock:
            changed, self.reachable = not self.reachable, True
        if changed:
            log.warning("database reachable again")


@dataclass(frozen=True)
class PendingTarget:
    """A target with work: queued deployments, and the slots of its in-progress ones."""

    target: str
    queued: int
    active_slots: frozenset[int]


class Storage:
    def __init__(self, engine: Engine, *, timeout: float = DATABASE_TIMEOUT) -> None:
        self.engine = engine
        self.timeout = timeout
        self.reachability = Reachability()
        dbapi = engine.dialect.loaded_dbapi
        # what a database that is down, full, unreachable or too slow raises
        self._unavailable: tuple[type[BaseException], ...] = (
            sa_exc.OperationalError,
            sa_exc.InterfaceError,
            sa_exc.TimeoutError,
            dbapi.OperationalError,
            dbapi.InterfaceError,
            TimeoutError,
        )
        self._threads: ThreadPoolExecutor | None = None
        self._lock = write_lock(engine)
        self._direct = DirectConnections(engine)
        hook, deployment = Hook.__table__, Deployment.__table__
        self._find_hook = Prepared(
            engine.dialect,
            select(hook.c.id, hook.c.name, hook.c.target).where(
                hook.c.token_digest == bindparam("token_digest")
            ),
        )
        values = {c: bindparam(c) for c in DeploymentCreate.model_fields}
        self._insert_deployment = Prepared(engine.dialect, insert(deployment).values(values))
        # a token deleted after it was looked up (or while it sat in the cache) records
        # nothing: the insert's transaction checks its hook first, and on PostgreSQL keeps it
        # from being deleted until the commit
        self._hook_alive = Prepared(
            engine.dialect,
            select(hook.c.id)
            .where(hook.c.id == bindparam("hook_id"), hook.c.token_digest == bindparam("digest"))
            .with_for_update(read=True, key_share=True),
        )
        self._stamp_hook = Prepared(
            engine.dialect,
            update(hook)
            .where(hook.c.id == bindparam("hook_id"))
            .values(last_used_at=bindparam("at")),
        )
        self._known_hooks: dict[str, HookIdentity] = {}
        # SQLite takes its write lock at BEGIN IMMEDIATE, waiting in its busy handler while
        # another connection holds it; a deferred transaction that has read fails at its first
        # write instead ("database is locked"), without waiting
        self._begin = "BEGIN IMMEDIATE" if engine.dialect.name == "sqlite" else "BEGIN"

    def defer_checkpoints(self) -> None:
        """Keep the accept path's commits from checkpointing SQLite's write-ahead log.

        A checkpoint copies the log into the database and syncs both to disk, which can take a
        slow disk's whole latency; in an HTTP worker that holds up every request waiting for its
        commit. Call before the first request; then something else must call `checkpoint`
        regularly (the deployer process of `shiphook serve` does, five times a second).
        """
        self._direct.autocheckpoint = False

    def checkpoint(self) -> tuple[int, int]:
        """Copy what SQLite's write-ahead log holds into the database without waiting for
        readers or writers; return the log's frames and how many are now in the database.
        Nothing to do on other databases."""
        if self.engine.dialect.name != "sqlite":
            return 0, 0
        with self.engine.connect() as connection:
            _busy, frames, copied = connection.exec_driver_sql(
                "PRAGMA wal_checkpoint(PASSIVE)"
            ).one()
        return frames, copied

    async def call(self, function: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """`function(*args, **kwargs)`, a blocking call of this storage, for the event loop: in
        a database thread, given up after `timeout` seconds (the thread goes on until the
        database answers). Raises `DatabaseUnavailable` when the database fails or does not
        answer in time."""
        try:
            result = await asyncio.wait_for(
                self.in_thread(functools.partial(function, *args, **kwargs)), self.timeout
            )
        except Exception as error:
            if self.unavailable(error):
                raise self.reachability.failed(error) from None
            raise
        self.reachability.answered()
        return result

    def unavailable(self, error: BaseException) -> bool:
        """Whether `error` says the database is down, full, unreachable or too slow, rather
        than that a statement failed."""
        cause = getattr(error, "orig", None) or error
        # SQLite reports a statement its schema does not fit ("no such table") this way too
        generic = getattr(cause, "sqlite_errorcode", None) == sqlite3.SQLITE_ERROR
        return isinstance(error, self._unavailable) and not generic

    def in_thread(self, function: Callable[[], T]) -> asyncio.Future[T]:
        """`function()` in one of this process's database threads."""
        if self._threads is None:
            self._threads = ThreadPoolExecutor(DATABASE_THREADS, thread_name_prefix="database")
        return asyncio.get_running_loop().run_in_executor(self._threads, function)

    @contextlib.contextmanager
    def _write(self) -> Iterator[Session]:
        with self._lock(), Session(self.engine, expire_on_commit=False) as session:
            yield session
            session.commit()

    def _read(self) -> Session:
        return Session(self.engine, expire_on_commit=False)

    # -- hooks --------------------------------------------------------------

    def create_hook(self, *, name: str, target: str, token_digest: str, now: datetime) -> Hook:
        hook = Hook(name=name, target=target, token_digest=token_digest, created_at=now)
        try:
            with self._write() as session:
                session.add(hook)
                session.flush()
        except IntegrityError:  # PostgreSQL's message would quote the row, the digest with it
            raise TokenTaken("another hook has the new hook's token digest") from None
        return hook

    def known_hook(self, token_digest: str) -> HookIdentity | None:
        """The hook with this token digest if it was remembered: for callers whose write checks
        the hook again (`add_deployments` does)."""
        return self._known_hooks.get(token_digest)

    def hook_by_digest(self, token_digest: str, *, remember: bool = False) -> HookIdentity | None:
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
            if len(self._known_hooks) >= KNOWN_HOOKS:
                self._known_hooks.clear()
            self._known_hooks[token_digest] = hook
        return hook

    def list_hooks(self, *, target: str | None = None) -> Sequence[Hook]:
        query = select(Hook).order_by(Hook.id)
        if target is not None:
            query = query.where(Hook.target == target)
        with self._read() as session:
            return session.exec(query).all()

    def delete_hook(self, hook_id: int) -> Hook | None:
        with self._write() as session:
            hook = session.get(Hook, hook_id)
            if hook is not None:
                session.delete(hook)
                self._known_hooks.pop(hook.token_digest, None)
            return hook

    # -- deployments --------------------------------------------------------

    def add_deployment(self, new: DeploymentCreate) -> None:
        """Commit one queued deployment that no hook request made (a rollback on demand)."""
        self.add_deployments([Accepted(new)])

    def add_deployments(self, batch: Sequence[Accepted]) -> set[str]:
        """Commit queued deployments in one transaction; return the ids of those not recorded
        because their hook no longer exists (checked once per hook, in the same transaction).
        Raises `KeyTaken` (committing nothing) when an idempotency key is already held."""
        hooks = {a.hook_digest: a.new.hook_id for a in batch if a.hook_digest is not None}
        with self._lock(), self._direct.cursor() as cursor:
            cursor.execute(self._begin)
            gone = {
                digest
                for digest, hook_id in hooks.items()
                if not self._alive(cursor, hook_id, digest)
            }
            kept = [a for a in batch if a.hook_digest not in gone] if gone else batch
            try:
                cursor.executemany(
                    self._insert_deployment.sql,
                    [self._insert_deployment.params(a.row()) for a in kept],
                )
            except self.engine.dialect.loaded_dbapi.IntegrityError:
                keys = [a.new.idempotency_key for a in batch if a.new.idempotency_key]
                if not keys:
                    raise
                raise KeyTaken(", ".join(keys)) from None
            stamps = [
                self._stamp_hook.params({"hook_id": a.new.hook_id, "at": a.new.created_at})
                for a in kept
                if a.stamp_hook
            ]
            if stamps:
                cursor.executemany(self._stamp_hook.sql, stamps)
            cursor.execute("COMMIT")
        for digest in gone:
            self._known_hooks.pop(digest, None)
        return {a.new.id for a in batch if a.hook_digest in gone}

    def _alive(self, cursor: Any, hook_id: int | None, digest: str) -> bool:
        cursor.execute(
            self._hook_alive.sql, self._hook_alive.params({"hook_id": hook_id, "digest": digest})
        )
        return cursor.fetchone() is not None

    def deployment_by_key(self, *, hook_id: int, idempotency_key: str) -> Deployment | None:
        query = select(Deployment).where(
            Deployment.hook_id == hook_id, Deployment.idempotency_key == idempotency_key
        )
        with self._read() as session:
            return session.exec(query).first()

    def release_key(self, deployment_id: str) -> None:
        """Let an expired idempotency key be used again."""
        with self._write() as session:
            session.exec(
                update(Deployment)
                .where(Deployment.id == deployment_id)
                .values(idempotency_key=None)
            )

    def last_success(self, *, target: str, before: str) -> Deployment | None:
        """The newest deployment of `target` older than `before` that succeeded."""
        query = (
            select(Deployment)
            .where(
                Deployment.target == target,
                Deployment.status == Status.succeeded,
                col(Deployment.id) < before,
                col(Deployment.image_tag).is_not(None),
            )
            .order_by(col(Deployment.id).desc())
            .limit(1)
        )
        with self._read() as session:
            return session.exec(query).first()

    def get_deployment(self, deployment_id: str) -> Deployment | None:
        with self._read() as session:
            return session.get(Deployment, deployment_id)

    def histories(self, deployment_ids: Sequence[str]) -> dict[str, list[DeploymentEvent]]:
        """The recorded transitions of each deployment, oldest first, in one query."""
        query = (
            select(DeploymentEvent)
            .where(col(DeploymentEvent.deployment_id).in_(deployment_ids))
            .order_by(DeploymentEvent.id)
        )
        found: dict[str, list[DeploymentEvent]] = {i: [] for i in deployment_ids}
        with self._read() as session:
            for event in session.exec(query):
                found[event.deployment_id].append(event)
        return found

    def list_deployments(
        self,
        *,
        target: str | None = None,
        status: str | None = None,
        limit: int = 50,
    ) -> Sequence[Deployment]:
        query = select(Deployment).order_by(col(Deployment.id).desc()).limit(limit)
        if target is not None:
            query = query.where(Deployment.target == target)
        if status is not None:
            query = query.where(Deployment.status == status)
        with self._read() as session:
            return session.exec(query).all()

    def statuses(self, deployment_ids: Sequence[str]) -> dict[str, str]:
        """Status by id, for the waiters' poll (a Core query: it runs on the event loop)."""
        query = select(DEPLOYMENT.c.id, DEPLOYMENT.c.status).where(
            DEPLOYMENT.c.id.in_(deployment_ids)
        )
        with self.engine.connect() as connection:
            return {deployment_id: status for deployment_id, status in connection.execute(query)}

    def update_deployment(
        self, deployment_id: str, *, now: datetime, event: str | None = None, **values
    ) -> None:
        """Set `values` on the deployment; with `event`, record it in the history."""
        with self._core() as connection:
            connection.execute(
                update(DEPLOYMENT).where(DEPLOYMENT.c.id == deployment_id).values(**values)
            )
            if event is not None:
                connection.execute(
                    insert(EVENT).values(
                        deployment_id=deployment_id,
                        at=now,
                        status=values.get("status", event),
                        message=values.get("message", ""),
                    )
                )

    # -- the deployer's work queue -------------------------------------------------
    # Core statements, not ORM sessions: dispatch latency is a handful of these, and a session
    # costs ten times the statement.

    @contextlib.contextmanager
    def _core(self) -> Iterator[Connection]:
        """One write transaction on a Core connection, under the write lock."""
        with self._lock(), self.engine.begin() as connection:
            yield connection

    def pending_targets(self) -> list[PendingTarget]:
        """Targets with queued or in-progress deployments."""
        query = (
            select(DEPLOYMENT.c.target, DEPLOYMENT.c.status, DEPLOYMENT.c.slot, func.count())
            .where(DEPLOYMENT.c.status.in_([Status.queued, Status.in_progress]))
            .group_by(DEPLOYMENT.c.target, DEPLOYMENT.c.status, DEPLOYMENT.c.slot)
        )
        queued: dict[str, int] = {}
        active: dict[str, set[int]] = {}
        with self.engine.connect() as connection:
            for target, status, slot, count in connection.execute(query):
                if status == Status.queued:
                    queued[target] = queued.get(target, 0) + count
                else:
                    active.setdefault(target, set()).add(slot or 0)
        return [
            PendingTarget(
                target=t, queued=queued.get(t, 0), active_slots=frozenset(active.get(t, ()))
            )
            for t in sorted(queued.keys() | active.keys())
        ]

    def held_slots(self, *, now: datetime) -> dict[tuple[str, int], str]:
        """The owner of each slot whose lease has not expired."""
        query = select(LEASE.c.target, LEASE.c.slot, LEASE.c.owner).where(LEASE.c.expires_at > now)
        with self.engine.connect() as connection:
            return {(target, slot): owner for target, slot, owner in connection.execute(query)}

    def claim_lease(
        self,
        *,
        target: str,
        slot: int,
        owner: str,
        now: datetime,
        until: datetime,
        takeover: str | None = None,
    ) -> bool:
        """Take the slot if it is free, expired, already ours, or (with `takeover`) still held
        by that owner, known to be gone; True when we hold it."""
        holders = [owner] if takeover is None else [owner, takeover]
        with self._core() as connection:
            taken = connection.execute(
                update(LEASE)
                .where(
                    LEASE.c.target == target,
                    LEASE.c.slot == slot,
                    or_(LEASE.c.expires_at <= now, LEASE.c.owner.in_(holders)),
                )
                .values(owner=owner, expires_at=until)
            )
            if taken.rowcount:
                return True
            try:
                with connection.begin_nested():
                    connection.execute(
                        insert(LEASE).values(
                            target=target, slot=slot, owner=owner, expires_at=until
                        )
                    )
            except IntegrityError:
                return False
            return True

    def renew_lease(self, *, target: str, slot: int, owner: str, until: datetime) -> bool:
        with self._core() as connection:
            renewed = connection.execute(
                update(LEASE)
                .where(LEASE.c.target == target, LEASE.c.slot == slot, LEASE.c.owner == owner)
                .values(expires_at=until)
            )
            return bool(renewed.rowcount)

    def release_lease(self, *, target: str, slot: int, owner: str) -> None:
        with self._core() as connection:
            connection.execute(
                delete(LEASE).where(
                    LEASE.c.target == target, LEASE.c.slot == slot, LEASE.c.owner == owner
                )
            )

    def next_deployment(
        self, *, target: str, slot: int, kind: str, now: datetime
    ) -> tuple[Deployment | None, list[str], bool]:
        """The deployment the holder of this slot works on next, the ids it superseded, and
        whether it was already in progress.

        First one already in progress on the slot (resumed after a crash or a lost lease);
        otherwise it starts a queued one: for an app the newest, after superseding the older
        ones; for a job the oldest.
        """
        order = DEPLOYMENT.c.id.desc() if kind == "app" else DEPLOYMENT.c.id
        query = (
            select(DEPLOYMENT)
            .where(
                DEPLOYMENT.c.target == target,
                or_(
                    and_(DEPLOYMENT.c.status == Status.in_progress, DEPLOYMENT.c.slot == slot),
                    DEPLOYMENT.c.status == Status.queued,
                ),
            )
            .order_by(case((DEPLOYMENT.c.status == Status.in_progress, 0), else_=1), order)
            .limit(1)
        )
        with self.engine.connect() as connection:
            row = connection.execute(query).first()
        if row is None:
            return None, [], False
        chosen = Deployment(**row._mapping)
        if chosen.status == Status.in_progress:
            return chosen, [], True
        superseded: list[str] = []
        supersede = _supersede(chosen, now) if kind == "app" else None
        while True:
            with self._core() as connection:
                # an app's older queued deployments are superseded before it starts, in chunks
                # (a burst never holds the write lock long), so a crash in between leaves it
                # the newest; the last chunk and the start share one transaction
                chunk = [] if supersede is None else list(connection.execute(supersede).scalars())
                superseded += chunk
                if len(chunk) == SUPERSEDE_CHUNK:
                    continue
                started = connection.execute(
                    update(DEPLOYMENT)
                    .where(DEPLOYMENT.c.id == chosen.id, DEPLOYMENT.c.status == Status.queued)
                    .values(status=Status.in_progress, slot=slot, started_at=now)
                )
                if not started.rowcount:
                    return None, superseded, False
                connection.execute(
                    insert(EVENT).values(
                        deployment_id=chosen.id, at=now, status=Status.in_progress, message=""
                    )
                )
            chosen.status, chosen.slot, chosen.started_at = Status.in_progress, slot, now
            return chosen, superseded, False

    def supersede_queued(
        self, *, target: str, now: datetime
    ) -> tuple[Deployment | None, list[str]]:
        """Supersede the queued deployments of an app target by the newest queued one, in
        chunks; return that one (None when fewer than two are queued) and the ids superseded."""
        query = (
            select(DEPLOYMENT.c.id, DEPLOYMENT.c.image_tag)
            .where(DEPLOYMENT.c.target == target, DEPLOYMENT.c.status == Status.queued)
            .order_by(DEPLOYMENT.c.id.desc())
            .limit(2)
        )
        with self.engine.connect() as connection:
            rows = connection.execute(query).all()
        if len(rows) < 2:
            return None, []
        newest = Deployment(**rows[0]._mapping, target=target, kind="app")
        supersede = _supersede(newest, now)
        superseded: list[str] = []
        while True:
            with self._core() as connection:
                chunk = list(connection.execute(supersede).scalars())
            superseded += chunk
            if len(chunk) < SUPERSEDE_CHUNK:
                return newest, superseded


def _supersede(newest: Deployment, now: datetime) -> Update:
    """The statement that marks up to SUPERSEDE_CHUNK queued deployments older than `newest`
    superseded by it and returns their ids; built once per start, outside the write lock.
    It marks none once `newest` is itself superseded (by a newer one, from another process)."""
    older = (
        select(DEPLOYMENT.c.id)
        .where(
            DEPLOYMENT.c.target == newest.target,
            DEPLOYMENT.c.status == Status.queued,
            DEPLOYMENT.c.id < newest.id,
        )
        .limit(SUPERSEDE_CHUNK)
    )
    newest_live = (
        select(DEPLOYMENT.c.id)
        .where(DEPLOYMENT.c.id == newest.id, DEPLOYMENT.c.status != Status.superseded)
        .exists()
    )
    return (
        update(DEPLOYMENT)
        .where(DEPLOYMENT.c.id.in_(older.scalar_subquery()), newest_live)
        .values(
            status=Status.superseded,
            superseded_by=newest.id,
            message=f"superseded by deployment {newest.id} (tag {newest.image_tag})",
            finished_at=now,
        )
        .returning(DEPLOYMENT.c.id)
    )


class GroupCommit:
    """Commits the deployments accepted in three turns of the event loop in one transaction, in
    a database thread, one transaction at a time.

    When many CI jobs call at once, a transaction per request spends most of its time in BEGIN,
    COMMIT and the write lock; a transaction for all the requests read in one turn, and in the
    turns after it, costs little more than one of them. The later turns matter when each CI job
    opens its own connection: its request often arrives a turn or two after the one before
    (three turns measured best: 11-15 % more req/s than two and a lower p99; four or six raised
    the p99). While a transaction commits (waiting for the write lock or the disk's sync), the
    event loop reads more requests: they form the next batch, committed when this one is, so
    that deployments commit in the order they were accepted. Every caller is answered only after
    the commit holding its row, or with `DatabaseUnavailable` when that took longer than the
    storage's `timeout` (a batch then still waiting is dropped; one in flight may yet commit).
    Used from the event loop's thread only.
    """

    TURNS = 3

    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        self._batch: list[tuple[Accepted, asyncio.Future[None]]] = []
        self._expiry: asyncio.TimerHandle | None = None
        self._committing = False

    async def add(self, accepted: Accepted) -> None:
        """Return once `accepted` is committed; raise `HookGone`, `KeyTaken` or
        `DatabaseUnavailable` if it was not."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        if not self._batch:
            # after this turn and the ones after it: each call_soon defers by one turn
            loop.call_soon(*[loop.call_soon] * (self.TURNS - 1), self._commit)
            self._expiry = loop.call_later(self.storage.timeout, self._expire, self._batch)
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
        committed = self.storage.in_thread(
            functools.partial(self.storage.add_deployments, [a for a, _ in waiting])
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
            for accepted, future in waiting:
                _settle(future, HookGone() if accepted.new.id in committed.result() else None)
        elif self.storage.unavailable(error):
            unavailable = self.storage.reachability.failed(error)
            for _, future in waiting:
                _settle(future, unavailable)
        else:  # each alone, so that only the holder of a taken key (or whatever failed) fails
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
                missing = self.storage.add_deployments([accepted])
            except Exception as error:
                outcomes.append(error)
            else:
                outcomes.append(HookGone() if missing else None)
        return outcomes


def _settle(future: asyncio.Future[None], error: BaseException | None) -> None:
    if future.done():  # its request timed out or was cancelled
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)
