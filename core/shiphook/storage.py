"""Data functions over the hook, deployment and lease tables. Nothing here knows HTTP or
orchestrators.

One style: SQLAlchemy Core statements on the table definitions of `shiphook.models`, every
function keyword-only and returning models, never rows. A read runs on a connection of its
own; a write runs in one transaction under the database's write lock
(`shiphook.fastpath.write_lock`). The two calls of a hook request are the exception, and live
in `shiphook.fastpath` with their reasons: `Storage.accept_path`.

The calls are blocking: an event loop makes them through `Storage.call`, which runs them in
threads; the accept path's insert goes through `shiphook.fastpath.GroupCommit`, in a thread too
but on PostgreSQL, where the event loop sends it itself.
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
    ColumnElement,
    Connection,
    Engine,
    Row,
    Select,
    Update,
    any_,
    delete,
    func,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import IntegrityError

from shiphook.db import DATABASE_TIMEOUT, connect_on_loop
from shiphook.errors import DatabaseUnavailable
from shiphook.fastpath import Accepted, AcceptPath, sqlite_file, write_lock
from shiphook.models import (
    Deployment,
    DeploymentCreate,
    DeploymentEvent,
    EventPublic,
    Hook,
    HookPublic,
    Lease,
    Status,
)

log = logging.getLogger("shiphook.storage")

HOOK, DEPLOYMENT, EVENT, LEASE = (
    Hook.__table__,
    Deployment.__table__,
    DeploymentEvent.__table__,
    Lease.__table__,
)
HOOK_PUBLIC = [HOOK.c[name] for name in HookPublic.model_fields]
SUPERSEDE_CHUNK = 200  # rows per transaction, so a burst never holds the write lock for long
DATABASE_THREADS = 8  # an HTTP worker's database calls in flight at once
T = TypeVar("T")


class TokenTaken(Exception):
    """Another hook has the new hook's token digest: the random source repeats itself."""


class Reachability:
    """Whether the database answered the last call: logs each change of state once, not each
    failed request. Any thread."""

    def __init__(self) -> None:
        self.reachable = True
        self._lock = threading.Lock()

    def failed(self, error: BaseException) -> DatabaseUnavailable:
        """Note the failure; return the error callers get, which names only its class."""
        cause = _cause(error)
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


def _cause(error: BaseException) -> BaseException:
    """The driver's error, not SQLAlchemy's wrapper."""
    return getattr(error, "orig", None) or error


def _conflict(error: BaseException) -> bool:
    """Whether the database aborted a transaction for its conflict with another (a deadlock,
    a serialization failure: SQLSTATE class 40): worth trying again, and nothing to say of the
    database's health."""
    return (getattr(_cause(error), "sqlstate", None) or "").startswith("40")


def _deployment(row: Row[Any]) -> Deployment:
    """A deployment read back, as a model bound to no session."""
    return Deployment(**row._mapping)


class Storage:
    """The database of one shiphook process: its data functions, the accept path's
    (`accept_path`), and the threads an event loop calls them in."""

    def __init__(self, engine: Engine, *, timeout: float = DATABASE_TIMEOUT) -> None:
        self.engine = engine
        self.timeout = timeout
        self.reachability = Reachability()
        self.accept_path = AcceptPath(engine, connect_on_loop=connect_on_loop(engine, timeout))
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
        self.sqlite_file = sqlite_file(engine)

    def close(self) -> None:
        """Close every connection to the database, the accept path's own and the pool's."""
        self.accept_path.close()
        self.engine.dispose()

    # -- calls from an event loop ---------------------------------------------------------

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
            if _conflict(error):  # worth trying again, as a caller is told (503)
                raise DatabaseUnavailable(type(_cause(error)).__name__) from None
            raise
        self.reachability.answered()
        return result

    def unavailable(self, error: BaseException) -> bool:
        """Whether `error` says the database is down, full, unreachable or too slow, rather
        than that a statement failed."""
        # SQLite reports a statement its schema does not fit ("no such table") this way too
        generic = getattr(_cause(error), "sqlite_errorcode", None) == sqlite3.SQLITE_ERROR
        return isinstance(error, self._unavailable) and not generic and not _conflict(error)

    def in_thread(self, function: Callable[[], T]) -> asyncio.Future[T]:
        """`function()` in one of this process's database threads."""
        if self._threads is None:
            self._threads = ThreadPoolExecutor(DATABASE_THREADS, thread_name_prefix="database")
        return asyncio.get_running_loop().run_in_executor(self._threads, function)

    @contextlib.contextmanager
    def _write(self) -> Iterator[Connection]:
        """One write transaction, under the write lock."""
        with self._lock(), self.engine.begin() as connection:
            yield connection
        self.sqlite_file.check()  # committed to a file removed or replaced: not done

    # -- hooks ----------------------------------------------------------------------------

    def create_hook(
        self, *, name: str, target: str, token_digest: str, now: datetime
    ) -> HookPublic:
        try:
            with self._write() as connection:
                hook_id = connection.execute(
                    insert(HOOK)
                    .values(name=name, target=target, token_digest=token_digest, created_at=now)
                    .returning(HOOK.c.id)
                ).scalar_one()
        except IntegrityError:  # PostgreSQL's message would quote the row, the digest with it
            raise TokenTaken("another hook has the new hook's token digest") from None
        return HookPublic(id=hook_id, name=name, target=target, created_at=now, last_used_at=None)

    def list_hooks(
        self, *, target: str | None = None, hook_id: int | None = None
    ) -> list[HookPublic]:
        query = select(*HOOK_PUBLIC).order_by(HOOK.c.id)
        if target is not None:
            query = query.where(HOOK.c.target == target)
        if hook_id is not None:
            query = query.where(HOOK.c.id == hook_id)
        with self.engine.connect() as connection:
            return [HookPublic(**row._mapping) for row in connection.execute(query)]

    def delete_hook(self, *, hook_id: int) -> HookPublic | None:
        """Delete the hook; its token stops working at once, in every process (the accept
        path's insert checks the hook)."""
        with self._write() as connection:
            row = connection.execute(
                delete(HOOK)
                .where(HOOK.c.id == hook_id)
                .returning(*HOOK_PUBLIC, HOOK.c.token_digest)
            ).first()
        if row is None:
            return None
        self.accept_path.forget(token_digest=row.token_digest)
        return HookPublic(**row._mapping)

    # -- deployments ------------------------------------------------------------------------

    def add_deployment(self, *, new: DeploymentCreate) -> None:
        """Commit one queued deployment that no hook request made (a rollback on demand), with
        the accept path's insert."""
        self.accept_path.add_deployments(batch=[Accepted(new)])

    def deployment_by_key(self, *, hook_id: int, idempotency_key: str) -> Deployment | None:
        query = select(DEPLOYMENT).where(
            DEPLOYMENT.c.hook_id == hook_id, DEPLOYMENT.c.idempotency_key == idempotency_key
        )
        with self.engine.connect() as connection:
            row = connection.execute(query).first()
        return None if row is None else _deployment(row)

    def release_key(self, *, deployment_id: str) -> None:
        """Let an expired idempotency key be used again."""
        with self._write() as connection:
            connection.execute(
                update(DEPLOYMENT)
                .where(DEPLOYMENT.c.id == deployment_id)
                .values(idempotency_key=None)
            )

    def last_success(
        self, *, target: str, before: str, other_than: str | None
    ) -> Deployment | None:
        """The newest deployment of `target` older than `before` that succeeded with another
        tag than `other_than`."""
        query = (
            select(DEPLOYMENT)
            .where(
                DEPLOYMENT.c.target == target,
                DEPLOYMENT.c.status == Status.succeeded,
                DEPLOYMENT.c.id < before,
                DEPLOYMENT.c.image_tag.is_not(None),
                DEPLOYMENT.c.image_tag != other_than,
            )
            .order_by(DEPLOYMENT.c.id.desc())
            .limit(1)
        )
        with self.engine.connect() as connection:
            row = connection.execute(query).first()
        return None if row is None else _deployment(row)

    def get_deployment(self, *, deployment_id: str) -> Deployment | None:
        with self.engine.connect() as connection:
            row = connection.execute(
                select(DEPLOYMENT).where(DEPLOYMENT.c.id == deployment_id)
            ).first()
        return None if row is None else _deployment(row)

    def histories(self, *, deployment_ids: Sequence[str]) -> dict[str, list[EventPublic]]:
        """The recorded transitions of each deployment, oldest first, in one query."""
        query = (
            select(EVENT.c.deployment_id, EVENT.c.at, EVENT.c.status, EVENT.c.message)
            .where(EVENT.c.deployment_id.in_(deployment_ids))
            .order_by(EVENT.c.id)
        )
        found: dict[str, list[EventPublic]] = {i: [] for i in deployment_ids}
        with self.engine.connect() as connection:
            for row in connection.execute(query):
                event = EventPublic(at=row.at, status=row.status, message=row.message)
                found[row.deployment_id].append(event)
        return found

    def list_deployments(
        self, *, target: str | None = None, status: str | None = None, limit: int = 50
    ) -> list[Deployment]:
        """The newest deployments first."""
        query = select(DEPLOYMENT).order_by(DEPLOYMENT.c.id.desc()).limit(limit)
        if target is not None:
            query = query.where(DEPLOYMENT.c.target == target)
        if status is not None:
            query = query.where(DEPLOYMENT.c.status == status)
        with self.engine.connect() as connection:
            return [_deployment(row) for row in connection.execute(query)]

    def statuses(self, *, deployment_ids: Sequence[str]) -> dict[str, str]:
        """Status by id, for the waiters' poll."""
        query = select(DEPLOYMENT.c.id, DEPLOYMENT.c.status).where(
            DEPLOYMENT.c.id.in_(deployment_ids)
        )
        with self.engine.connect() as connection:
            return {deployment_id: status for deployment_id, status in connection.execute(query)}

    def update_deployment(
        self, *, deployment_id: str, now: datetime, event: str | None = None, **values: Any
    ) -> None:
        """Set `values` on the deployment; with `event`, record it in the history."""
        with self._write() as connection:
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

    # -- the deployer's work queue --------------------------------------------------------

    def pending_targets(self) -> list[PendingTarget]:
        """Targets with queued or in-progress deployments."""
        self.sqlite_file.check()  # from a file removed or replaced, none: the deployer waits
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
        with self._write() as connection:
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
        with self._write() as connection:
            renewed = connection.execute(
                update(LEASE)
                .where(LEASE.c.target == target, LEASE.c.slot == slot, LEASE.c.owner == owner)
                .values(expires_at=until)
            )
            return bool(renewed.rowcount)

    def release_lease(self, *, target: str, slot: int, owner: str) -> None:
        with self._write() as connection:
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
        self.sqlite_file.check()  # none from a file removed or replaced
        with self.engine.connect() as connection:
            row = connection.execute(_in_progress_on(target, slot, kind)).first()
            if row is None:
                row = connection.execute(_next_queued(target, kind)).first()
        if row is None:
            return None, [], False
        chosen = _deployment(row)
        if chosen.status == Status.in_progress:
            return chosen, [], True
        superseded: list[str] = []
        supersede = _supersede(chosen, now, self.engine.dialect) if kind == "app" else None
        while True:
            with self._write() as connection:
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
        with self.engine.connect() as connection:
            rows = connection.execute(_next_queued(target, "app").limit(2)).all()
        if len(rows) < 2:
            return None, []
        newest = _deployment(rows[0])
        supersede = _supersede(newest, now, self.engine.dialect)
        superseded: list[str] = []
        while True:
            with self._write() as connection:
                chunk = list(connection.execute(supersede).scalars())
            superseded += chunk
            if len(chunk) < SUPERSEDE_CHUNK:
                return newest, superseded


# The deployer's queries of the queue, each a range of the status index (`Deployment`'s
# `ix_deployment_status_target_id`), however many deployments the table holds.


def _in_progress_on(target: str, slot: int, kind: str) -> Select:
    """The deployment in progress on this slot of the target, if any (if two, as only a lost
    lease can leave them, the one `_next_queued` would have chosen)."""
    return _in_order(
        DEPLOYMENT.c.status == Status.in_progress,
        DEPLOYMENT.c.target == target,
        DEPLOYMENT.c.slot == slot,
        kind=kind,
    )


def _next_queued(target: str, kind: str) -> Select:
    """The queued deployment to start next: an app's newest, a job's oldest."""
    return _in_order(DEPLOYMENT.c.status == Status.queued, DEPLOYMENT.c.target == target, kind=kind)


def _in_order(*where: ColumnElement[bool], kind: str) -> Select:
    """The first deployment matching `where`, in the order a target of `kind` takes them."""
    order = DEPLOYMENT.c.id.desc() if kind == "app" else DEPLOYMENT.c.id
    return select(DEPLOYMENT).where(*where).order_by(order).limit(1)


def _supersede(newest: Deployment, now: datetime, dialect: Dialect) -> Update:
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
        # locked oldest first, as every transaction that supersedes or starts a deployment
        # locks rows: two processes superseding one target at once (replicas, or a slot and
        # the dispatcher) would otherwise lock the same rows in different orders and deadlock
        # (PostgreSQL; SQLite has one writer). One waits for the other, then finds the rows
        # it superseded no longer queued.
        .order_by(DEPLOYMENT.c.id)
        .limit(SUPERSEDE_CHUNK)
        .with_for_update()
    )
    newest_live = (
        select(DEPLOYMENT.c.id)
        .where(DEPLOYMENT.c.id == newest.id, DEPLOYMENT.c.status != Status.superseded)
        .exists()
    )
    # PostgreSQL plans `id IN (subquery)` as a hash join over the whole table once the table
    # has statistics; compared with an array of the chunk's ids, it looks each one up instead
    in_chunk = (
        DEPLOYMENT.c.id == any_(func.array(older.scalar_subquery()))
        if dialect.name == "postgresql"
        else DEPLOYMENT.c.id.in_(older.scalar_subquery())
    )
    return (
        update(DEPLOYMENT)
        .where(in_chunk, newest_live)
        .values(
            status=Status.superseded,
            superseded_by=newest.id,
            message=f"superseded by deployment {newest.id} (tag {newest.image_tag})",
            finished_at=now,
        )
        .returning(DEPLOYMENT.c.id)
    )
