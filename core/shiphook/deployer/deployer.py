"""The deployer: takes queued deployments to their end on the target's backend.

One dispatcher thread finds targets with work and claims a lease on a slot of each (one slot per
app target, `max_concurrent_runs` per job target); a pool of worker threads runs the claimed
slots. Leases live in the database and expire, so several shiphook processes share one queue,
and the work of a process that died is taken over when its leases run out, or at once when the
process is provably gone (see `lease_owner`). Nothing here runs on the thread that answers HTTP
requests.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import random
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy.exc import DBAPIError

from shiphook.backends import (
    Backend,
    BackendError,
    PluginBug,
    PluginCall,
    Progress,
    Ref,
    Target,
    checked_return,
)
from shiphook.config import DeployerSettings
from shiphook.db import describe_failure
from shiphook.fastpath import DatabaseFileGone
from shiphook.models import Deployment, Status, utcnow
from shiphook.plugin_manager import plugin_error
from shiphook.storage import Storage

log = logging.getLogger("shiphook.deployer")
T = TypeVar("T")

BACKOFF_FIRST = 0.5
BACKOFF_MAX = 30.0
SCAN_BACKOFF_MAX = 30.0  # seconds between scans while the database fails
ROLLING_BACK = "rolling back: "
CHANGES_WORKLOAD = frozenset({"deploy", "rollback", "run_job"})  # the backend calls that do
# a job run given up (past rollout_timeout, or its progress unreadable): the contract has no
# call that stops a run, so it is said; where runs go one at a time (concurrent_runs False), the
# next one replaces it
RUN_LEFT = {
    True: "; the run is not stopped: {it} goes on in the orchestrator, no longer counted against "
    "max_concurrent_runs (stop it there if it must not)",
    False: "; the run is not stopped: {it} goes on in the orchestrator until the next run of "
    "this target replaces it",
}
# an app rollout whose progress could not be read within retry_budget: its end is unknown
ROLLOUT_LEFT = (
    "; the rollout is neither stopped nor rolled back: the orchestrator may yet complete it "
    "(look at the workload)"
)
# seconds between the supersede passes notifications ask for, per target: a pass's own cost is
# spread over a burst's rows, not paid per request (bench/README.md); a scan catches the rest
SUPERSEDE_EVERY = 0.25


class GaveUp(BackendError):
    """A transient failure that outlasted the target's retry_budget: what the call would have
    done or read is unknown."""


def _slots(target: Target) -> range:
    return range(1 if target.kind == "app" else target.max_concurrent_runs)


@functools.cache
def _machine() -> str | None:
    """This kernel boot and pid namespace, in which a pid names one process; None off Linux."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        return None
    return hashlib.sha256(f"{boot} {namespace}".encode()).hexdigest()[:12]


def _started(pid: int) -> str | None:
    """When the process `pid` started (clock ticks since boot); None if it is gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()  # the command name may hold spaces
    return None if fields[0] in ("Z", "X") else fields[19]


def lease_owner() -> str:
    """The name this process holds leases under: `<machine>:<pid>:<start>:<instance>`, so that
    a later process on the same machine can prove it gone (`owner_is_gone`)."""
    pid = os.getpid()
    return f"{_machine() or '-'}:{pid}:{_started(pid) or '-'}:{uuid.uuid4().hex[:8]}"


def owner_is_gone(owner: str) -> bool:
    """True only when `owner` provably runs no more: a process of this machine whose pid is gone
    or now names a process started at another time. Owners elsewhere may be alive."""
    parts = owner.split(":")
    if len(parts) != 4:  # a name of another form
        return False
    machine, pid, start, _ = parts
    if "-" in (machine, start) or machine != _machine() or not pid.isdigit():
        return False
    return _started(int(pid)) != start


class Stopping(Exception):
    """The deployer is shutting down: leave the deployment for whoever resumes it."""


class LeaseLost(Exception):
    """Another process took over this slot: stop touching its deployments."""


class Deployer:
    def __init__(
        self,
        storage: Storage,
        targets: dict[str, Target],
        backends: dict[str, Backend],
        *,
        settings: DeployerSettings | None = None,
        clock: Callable[[], datetime] = utcnow,
        owner: str | None = None,
    ) -> None:
        self.storage = storage
        self.targets = targets
        self.backends = backends
        self.settings = settings or DeployerSettings()
        self.clock = clock
        self.owner = owner or lease_owner()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._running: set[tuple[str, int]] = set()
        self._running_lock = threading.Lock()
        self._hinted: set[str] = set()
        self._supersede_due: dict[str, float] = {}
        self._pool: ThreadPoolExecutor | None = None
        self._dispatcher: threading.Thread | None = None

    # -- life cycle ----------------------------------------------------------------

    def start(self) -> None:
        self._pool = ThreadPoolExecutor(self.settings.threads, thread_name_prefix="shiphook-worker")
        self._dispatcher = threading.Thread(
            target=self._dispatch_loop, name="shiphook-dispatcher", daemon=True
        )
        self._dispatcher.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop taking work; running deployments stay in progress for the next start."""
        self._stopping.set()
        self._wake.set()
        if self._dispatcher is not None:
            self._dispatcher.join(timeout)
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def notify(self, target: str | None = None) -> None:
        """New work was committed: look for it now rather than at the next scan.

        When every slot of a job target is already worked on here, its worker takes the new
        run when it is done, so the dispatcher is left asleep. An app target's older queued
        deployments are superseded at once, so that their `?wait` callers learn it now.
        """
        config = self.targets.get(target) if target is not None else None
        if config is not None:
            with self._running_lock:
                busy = all((target, slot) in self._running for slot in _slots(config))
                if busy and config.kind != "app":
                    return
                self._hinted.add(target)
        self._wake.set()

    # -- dispatching ---------------------------------------------------------------

    def _dispatch_loop(self) -> None:
        next_scan = 0.0
        backoff = 0.0  # while scans fail: the wait before the next, doubled each time up to a cap
        while not self._stopping.is_set():
            self._wake.wait(max(0.0, next_scan - time.monotonic()))
            self._wake.clear()
            if self._stopping.is_set():
                return
            with self._running_lock:
                hinted, self._hinted = self._hinted, set()
            try:
                if hinted and time.monotonic() < next_scan:
                    self.dispatch_hinted(hinted)
                else:
                    self.dispatch_once()
                    next_scan = time.monotonic() + self.settings.scan_interval
            except Exception as exc:  # logged when scans start failing, not on each attempt
                if self.storage.unavailable(exc):
                    self.storage.reachability.failed(exc)
                elif not backoff:
                    log.exception("deployer: looking for work failed; retrying with backoff")
                backoff = min(SCAN_BACKOFF_MAX, 2 * backoff or self.settings.scan_interval)
                next_scan = time.monotonic() + backoff
            else:
                self.storage.reachability.answered()
                backoff = 0.0

    def dispatch_hinted(self, targets: set[str]) -> None:
        """The fast path for targets this process was told about: supersede an app target's
        older queued deployments (at most every SUPERSEDE_EVERY seconds) and claim free slots
        without scanning the database (a worker that finds nothing lets its slot go)."""
        now = self.clock()
        for name in targets:
            target = self.targets[name]
            if target.kind == "app" and time.monotonic() >= self._supersede_due.get(name, 0.0):
                self._supersede_due[name] = time.monotonic() + SUPERSEDE_EVERY
                self._supersede(target)
            for slot in _slots(target):
                self._claim(target, slot, now)

    def dispatch_once(self) -> None:
        """Scan the database for every target with work: queued deployments (also those other
        processes accepted) and in-progress ones whose holder is gone."""
        now = self.clock()
        held = self.storage.held_slots(now=now)
        for pending in self.storage.pending_targets():
            target = self.targets.get(pending.target)
            if target is None:
                self._fail_unconfigured(pending.target)
                continue
            if target.kind == "app":
                if pending.queued > 1:
                    self._supersede(target)
                wanted = [0]
            else:
                free = [s for s in _slots(target) if s not in pending.active_slots]
                wanted = sorted(pending.active_slots) + free[: pending.queued]
            for slot in wanted:
                holder = held.get((target.name, slot))
                if holder is None:
                    self._claim(target, slot, now)
                elif holder != self.owner and owner_is_gone(holder):
                    self._claim(target, slot, now, takeover=holder)

    def _supersede(self, target: Target) -> None:
        """Supersede the target's older queued deployments by its newest queued one."""
        newest, superseded = self.storage.supersede_queued(target=target.name, now=self.clock())
        if newest is not None:
            self._superseded(newest, superseded)

    def _superseded(self, newest: Deployment, superseded: list[str]) -> None:
        if not superseded:
            return
        log.info(
            "deployment %s of %s (%s): superseded %d queued deployment(s)",
            newest.id,
            newest.target,
            newest.image_tag,
            len(superseded),
        )

    def _claim(
        self, target: Target, slot: int, now: datetime, *, takeover: str | None = None
    ) -> None:
        """Take the slot's lease unless this process works on it already, and work on it;
        `takeover` names a holder that is gone."""
        key = (target.name, slot)
        lease = timedelta(seconds=self.settings.lease_seconds)
        with self._running_lock:
            if key in self._running or len(self._running) >= self.settings.threads:
                return  # hold no slot it cannot work on; other replicas may take it
            until = self.clock() + lease  # not `now`: the scan may have waited on the database
            if not self.storage.claim_lease(
                target=target.name,
                slot=slot,
                owner=self.owner,
                now=now,
                until=until,
                takeover=takeover,
            ):
                return
            if self.clock() > until - lease / 2:
                # the claim itself waited on the database: its lease may expire before the
                # first renewal and another process take the slot, so leave it to expire
                log.warning(
                    "deployer: slot %s/%d claimed %s late, the database slow to answer; left "
                    "to its lease's expiry (another process, or this one, takes it then)",
                    target.name,
                    slot,
                    self.clock() - (until - lease),
                )
                return
            self._running.add(key)
        assert self._pool is not None
        self._pool.submit(self._work_slot, target, slot)

    def _fail_unconfigured(self, target: str) -> None:
        for deployment in self.storage.list_deployments(target=target, limit=1000):
            if not Status(deployment.status).terminal:
                self._finish(
                    deployment,
                    Status.failed,
                    f"target {target!r} is no longer in the configuration",
                )

    # -- one slot --------------------------------------------------------------------

    def _work_slot(self, target: Target, slot: int) -> None:
        lease = _Lease(self, target.name, slot)
        try:
            while not self._stopping.is_set():
                deployment, superseded, resumed = self.storage.next_deployment(
                    target=target.name, slot=slot, kind=target.kind, now=self.clock()
                )
                if deployment is None:
                    break
                self._superseded(deployment, superseded)
                if resumed:
                    log.info(
                        "resuming deployment %s of target %s after a restart",
                        deployment.id,
                        target.name,
                    )
                else:
                    what = deployment.image_tag or "job run"
                    if deployment.rollback_of:
                        what += f", the rollback of {deployment.rollback_of}"
                    log.info(
                        "deployment %s of %s: in progress (%s)", deployment.id, target.name, what
                    )
                Execution(self, target, deployment, lease).execute()
        except Stopping:
            log.info(
                "deployment %s of %s: left in progress by the stop; it resumes at the next start",
                deployment.id,
                target.name,
            )
        except LeaseLost:
            log.warning(
                "deployer: slot %s/%d was taken over by another process (its lease expired "
                "while the database did not answer); its work goes on there",
                target.name,
                slot,
            )
        except (DBAPIError, DatabaseFileGone) as exc:
            log.error(
                "deployer: slot %s/%d stopped: %s: %s; its work resumes later",
                target.name,
                slot,
                "database unreachable" if self.storage.unavailable(exc) else "database error",
                describe_failure(self.storage.engine, exc),
            )
        except Exception:
            log.exception("deployer: slot %s/%d failed; its work resumes later", target.name, slot)
        finally:
            with self._running_lock:
                self._running.discard((target.name, slot))
            try:
                self.storage.release_lease(target=target.name, slot=slot, owner=self.owner)
            except Exception as exc:  # it expires
                log.warning(
                    "deployer: could not release lease %s/%d: %s",
                    target.name,
                    slot,
                    describe_failure(self.storage.engine, exc),
                )
            self._wake.set()  # work may have arrived while this slot was being let go

    def _finish(self, deployment: Deployment, status: Status, message: str) -> None:
        now = self.clock()
        self.storage.update_deployment(
            deployment_id=deployment.id,
            now=now,
            event=status,
            status=status,
            message=message,
            finished_at=now,
        )
        level = logging.WARNING if status in (Status.failed, Status.rolled_back) else logging.INFO
        log.log(
            level, "deployment %s of %s: %s: %s", deployment.id, deployment.target, status, message
        )


class _Lease:
    """The slot a worker holds; renewed as the work goes on, lost if another process took it."""

    def __init__(self, deployer: Deployer, target: str, slot: int) -> None:
        self.deployer = deployer
        self.target = target
        self.slot = slot
        self.renew_at = deployer.clock() + timedelta(seconds=deployer.settings.lease_seconds / 3)

    def keep(self) -> None:
        now = self.deployer.clock()
        if now < self.renew_at:
            return
        seconds = self.deployer.settings.lease_seconds
        if not self.deployer.storage.renew_lease(
            target=self.target,
            slot=self.slot,
            owner=self.deployer.owner,
            until=now + timedelta(seconds=seconds),
        ):
            raise LeaseLost(f"{self.target}/{self.slot}")
        self.renew_at = now + timedelta(seconds=seconds / 3)


class Execution:
    """One deployment taken from in progress to a terminal state (or left for a resume)."""

    def __init__(self, deployer: Deployer, target: Target, deployment: Deployment, lease: _Lease):
        self.deployer = deployer
        self.target = target
        self.deployment = deployment
        self.lease = lease
        self.backend = deployer.backends[target.backend]
        self.retry_spent = 0.0
        # a call past call_timeout, still running: its retry waits for it rather than make it
        # again, so that a plugin never has two calls of one deployment at once
        self._abandoned: dict[str, tuple[tuple[Any, ...], PluginCall]] = {}

    def execute(self) -> None:
        try:
            if self.target.kind == "app":
                self._rollout()
            else:
                self._job()
        except BackendError as exc:
            self._finish(Status.failed, exc.message)

    # -- app ---------------------------------------------------------------------

    def _rollout(self) -> None:
        d = self.deployment
        if d.rollback_ref is not None:  # resumed while rolling back
            self._finish_rollback(self._rollback_reason() or "rollout failed", d.rollback_ref)
            return
        ref = d.backend_ref
        if ref is not None and (reason := self._rollback_reason()) is not None:
            # stopped after asking for the rollback, before its reference was stored: ask again
            # (rollback is idempotent per rollout) rather than follow the rollout, which the
            # rollback has changed under it
            self._roll_back(reason, ref)
            return
        if ref is None:
            if d.previous_image is None:  # kept from before a crash: describe would see the new
                current = self._call(self.backend.describe, self.target)
                self._record(previous_image=current.image)
            ref = self._call(
                self.backend.deploy, self.target, image_tag=d.image_tag, deployment_id=d.id
            )
            if self._no_rollout(ref):
                message = f"already runs {d.previous_image}: no rollout"
            else:
                message = f"rolling out {d.image_tag} (was {d.previous_image or 'unknown'})"
            self._progress(message, backend_ref=ref)
        outcome = self._track(ref, given_up=ROLLOUT_LEFT)
        if outcome.state == "succeeded":
            self._finish(Status.succeeded, outcome.message or "rollout completed")
            return
        if outcome.state == "rolled_back":  # the orchestrator rolled back on its own
            self._finish(Status.rolled_back, outcome.message or "rolled back by the orchestrator")
            return
        reason = outcome.message or "rollout failed"
        if self._no_rollout(ref):  # an earlier rollout of this image failed and was left
            self._finish(Status.failed, f"{reason}; it ran before this deployment: not rolled back")
            return
        if self.target.on_failure != "rollback":
            self._finish(Status.failed, f"{reason}; left as it is (on_failure = leave)")
            return
        log.warning(
            "deployment %s of %s: %s%s", self.deployment.id, self.target.name, ROLLING_BACK, reason
        )
        self._record(message=f"{ROLLING_BACK}{reason}")
        self._roll_back(reason, ref)

    def _roll_back(self, reason: str, ref: Ref) -> None:
        try:
            rollback_ref = self._call(self.backend.rollback, self.target, ref)
        except (GaveUp, PluginBug) as exc:  # whether the rollback was made is unknown
            self._finish(Status.failed, f"{reason}; rollback failed: {exc.message}")
            return
        except BackendError as exc:  # refused: changed since, paused, nothing to return to
            self._finish(Status.failed, f"{reason}; not rolled back: {exc.message}")
            return
        self._record(rollback_ref=rollback_ref)
        self._finish_rollback(reason, rollback_ref)

    def _rollback_reason(self) -> str | None:
        """Why a resumed deployment is rolled back, if it was asked before the stop: its history
        says (its message may have moved on to retries or the rollback's progress since)."""
        history = self.deployer.storage.histories(deployment_ids=[self.deployment.id])[
            self.deployment.id
        ]
        for event in reversed(history):
            if event.message.startswith(ROLLING_BACK):
                return event.message.removeprefix(ROLLING_BACK)
        return None

    def _no_rollout(self, ref: Ref) -> bool:
        """Whether `deploy` found the image already there: the workload's health is then the
        outcome, and a failure is not this deployment's to roll back."""
        return ref.get("image") is not None and ref.get("image") == self.deployment.previous_image

    def _finish_rollback(self, reason: str, rollback_ref: Ref) -> None:
        try:
            outcome = self._track(rollback_ref, deadline_from=self.deployer.clock())
        except BackendError as exc:
            outcome = Progress("failed", exc.message)
        if outcome.state == "succeeded":
            self._finish(Status.rolled_back, f"{reason}; rolled back ({outcome.message})")
        else:
            self._finish(Status.failed, f"{reason}; rollback failed: {outcome.message}")

    # -- job ---------------------------------------------------------------------

    def _job(self) -> None:
        d = self.deployment
        ref = d.backend_ref
        if ref is None:
            env = {v["name"]: v["value"] for v in d.env or ()}
            ref = self._call(
                self.backend.run_job,
                self.target,
                env=env,
                image_tag=d.image_tag,
                deployment_id=d.id,
            )
            self._progress("job run started", backend_ref=ref)
        left = RUN_LEFT[self.backend.concurrent_runs]
        outcome = self._track(
            ref,
            past_deadline=left.format(it="it"),
            given_up=left.format(it="if it still runs, it"),
        )
        status = Status.succeeded if outcome.state == "succeeded" else Status.failed
        fallback = "run completed" if status == Status.succeeded else "run failed"
        self._finish(status, outcome.message or fallback)

    # -- shared ------------------------------------------------------------------

    def _progress(self, message: str, **values: Any) -> None:
        """A new message of the running deployment: into its history and the log."""
        log.info("deployment %s of %s: %s", self.deployment.id, self.target.name, message)
        self._record(message=message, **values)

    def _track(
        self,
        ref: Ref,
        *,
        deadline_from: datetime | None = None,
        past_deadline: str = "",
        given_up: str = "",
    ) -> Progress:
        """Poll progress until the work ends or the target's rollout timeout passes (then a
        failure, `past_deadline` added to its message). Progress that cannot be read within
        the retry budget raises, `given_up` added to the message: where the work stands is
        unknown."""
        start = deadline_from or self.deployment.started_at or self.deployer.clock()
        deadline = start + timedelta(seconds=self.target.rollout_timeout)
        while True:
            self.lease.keep()
            try:
                progress = self._call(self.backend.progress, self.target, ref)
            except GaveUp as exc:
                raise BackendError(exc.message + given_up) from exc
            if progress.state != "running":
                return progress
            if progress.message and progress.message != self.deployment.message:
                self._progress(progress.message)
            if self.deployer.clock() >= deadline:
                last = f" (last state: {progress.message})" if progress.message else ""
                return Progress(
                    "failed",
                    f"did not finish within {self.target.rollout_timeout:g}s{last}{past_deadline}",
                )
            self._pause(self.backend.poll_interval)

    def _call(self, function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Call the backend; retry transient errors with backoff and jitter within the budget."""
        name = getattr(function, "__name__", "call")
        attempt = 0
        while True:
            self.lease.keep()
            try:
                called = self._within_call_timeout(name, function, *args, **kwargs)
                return checked_return(self.backend, name, called)
            except (Stopping, LeaseLost):
                raise
            except BackendError as exc:
                if not exc.transient:
                    raise
                delay = min(BACKOFF_MAX, BACKOFF_FIRST * 2**attempt) * random.uniform(0.5, 1.0)
                delay = max(delay, exc.retry_after or 0)
                if self.retry_spent + delay > self.target.retry_budget:
                    still = self._left_running(name)
                    raise GaveUp(
                        f"gave up after {attempt + 1} attempt{'s' if attempt else ''} and "
                        f"{self.retry_spent:.1f}s of backoff: {exc.message}{still}"
                    ) from exc
                attempt += 1
                self.retry_spent += delay
                retry = f"retry {attempt} in {round(delay, 1):g} s: {exc.message}"
                log.warning("deployment %s of %s: %s", self.deployment.id, self.target.name, retry)
                self._record(message=retry)
                self._pause(delay)
            except (Exception, SystemExit) as exc:  # a plugin bug ends this deployment, not loops
                log.exception(
                    "deployment %s: the %s backend failed", self.deployment.id, self.backend.name
                )
                raise PluginBug(
                    f"the {self.backend.name} backend failed unexpectedly: {plugin_error(exc)}"
                ) from exc

    def _within_call_timeout(
        self, name: str, function: Callable[..., T], *args: Any, **kwargs: Any
    ) -> T:
        """Run the call on a thread of its own and wait for it at most the target's
        `call_timeout`, renewing the slot's lease meanwhile; a call that does not return is
        left to its thread (a daemon) and counts as a transient failure. The same call made
        again (a retry) waits for that thread once more instead of calling again. `name` is
        the backend method's."""
        call_args = (args, kwargs)
        earlier = self._abandoned.pop(name, None)
        if earlier is not None and earlier[0] == call_args:
            call = earlier[1]
        else:
            thread = f"shiphook-call-{self.target.name}-{name}"
            call = PluginCall(thread, function, *args, **kwargs)
        deadline = time.monotonic() + self.target.call_timeout
        step = self.deployer.settings.lease_seconds / 6
        while not call.done.wait(max(0.0, min(step, deadline - time.monotonic()))):
            if self.deployer._stopping.is_set():
                raise Stopping
            if time.monotonic() >= deadline:
                self._abandoned[name] = (call_args, call)
                raise BackendError(
                    f"the {self.backend.name} backend's {name} did not return within "
                    f"{self.target.call_timeout:g}s (the target's call_timeout)",
                    transient=True,
                )
            self.lease.keep()
        return call.result()

    def _left_running(self, name: str) -> str:
        """What to add to the message of a deployment given up while a call that changes the
        workload still runs past its call_timeout: that it may yet change it. Its end will be
        logged."""
        left = self._abandoned.get(name)
        if name not in CHANGES_WORKLOAD or left is None:
            return ""
        call = left[1]

        def ended() -> None:
            log.warning(
                "deployment %s of %s: the %s backend's %s ended %.0f s after it was made, after "
                "the deployment had been given up: it may have changed the workload",
                self.deployment.id,
                self.target.name,
                self.backend.name,
                name,
                time.monotonic() - call.started,
            )

        if not call.then(ended):
            return "; that call has ended since, and may have changed the workload"
        return "; that call still runs and may yet change the workload (logged if it ends)"

    def _pause(self, seconds: float) -> None:
        if self.deployer._stopping.wait(seconds):
            raise Stopping

    def _record(self, **values: Any) -> None:
        """Store progress on the deployment; a new message also goes into its history."""
        self.lease.keep()
        event = Status.in_progress if "message" in values else None
        self.deployer.storage.update_deployment(
            deployment_id=self.deployment.id, now=self.deployer.clock(), event=event, **values
        )
        for key, value in values.items():
            setattr(self.deployment, key, value)

    def _finish(self, status: Status, message: str) -> None:
        self.lease.keep()
        self.deployer._finish(self.deployment, status, message)
