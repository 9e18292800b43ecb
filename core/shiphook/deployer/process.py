"""`shiphook serve` runs the deployer in a process of its own, next to the HTTP worker(s).

Orchestrator clients parse large JSON documents and the deployer supersedes bursts of deployments;
inside an HTTP worker that work would hold the GIL the event loop needs, and every hook request
would wait for it. The deployer process shares nothing with the workers but the database and one
datagram socket, on which a worker names a target that has new work so that dispatch is
immediate. It is a hint: the deployer also scans the database, and `?wait` reads outcomes from the
database, so a lost message only delays.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import socket
import struct
import threading
from multiprocessing import resource_tracker
from multiprocessing.connection import Connection
from pathlib import Path

from shiphook.backends import BackendError
from shiphook.db import describe_failure
from shiphook.deployer.deployer import Deployer
from shiphook.errors import one_line
from shiphook.fastpath import checkpoint
from shiphook.instance import ADMIN_DIGEST_ENV, Instance, open_instance
from shiphook.plugin_manager import plugin_error
from shiphook.wakeup import bind_deployer_address

log = logging.getLogger("shiphook.deployer")

RESTART_DELAY = 1.0
STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}  # what stops serve in order
# seconds between checkpoints of the HTTP workers' SQLite writes (`shiphook.fastpath`): a short
# write-ahead log copied often, not a long one copied in bursts; one with nothing to copy costs
# no disk sync
CHECKPOINT_INTERVAL = 0.2


class DeployerSupervisor:
    """Owned by `shiphook serve`: starts the deployer process, restarts it if it dies, stops it.

    The deployer lets SIGTERM and SIGINT pass (a handler that does nothing): systemd and a
    terminal send them to every process of the service, and the deployer is to stop when
    `serve` says so, after its HTTP workers, not before; to its supervisor a deployer that went
    away on a signal would look like a crash. `serve` says so by closing its end of a pipe of
    that process's own: a pipe, unlike a `multiprocessing.Event`, cannot be left waiting on a
    process that was killed while it waited (the Event's `set` then blocks for ever), and it
    closes by itself when `serve` dies.
    """

    def __init__(self, config_path: Path, address: str, log_level: str) -> None:
        self.config_path = config_path
        self.address = address
        self.log_level = log_level
        self._context = multiprocessing.get_context("spawn")
        self._process: multiprocessing.process.BaseProcess | None = None
        self._stop: Connection | None = None  # our end of the deployer's pipe: closed, it stops
        self._stopping = threading.Event()
        self._lock = threading.Lock()  # a restart and a stop do not cross
        self._watcher = threading.Thread(target=self._watch, name="deployer-watcher", daemon=True)

    def start(self) -> None:
        self._spawn()
        self._watcher.start()

    def stop(self, timeout: float) -> None:
        """Have the deployer let go of its work (what runs stays in progress for the next start);
        kill it if it has not within `timeout` seconds."""
        with self._lock:
            self._stopping.set()
            process = self._process
            if self._stop is not None:
                self._stop.close()
        if process is None:
            return
        process.join(timeout)
        if process.is_alive():
            log.warning(
                "the deployer process did not stop within %gs ([server] shutdown_timeout); killing "
                "it: its work resumes at the next start",
                timeout,
            )
            process.kill()
            process.join()

    def _spawn(self) -> None:
        if self._stop is not None:  # the pipe of a deployer that died
            self._stop.close()
        stop, self._stop = self._context.Pipe(duplex=False)
        self._process = self._context.Process(
            target=run_deployer,
            args=(str(self.config_path), self.address, self.log_level, stop),
            name="shiphook-deployer",
        )
        # blocked here, the signals are blocked in the child until it ignores them: one sent to
        # the process group while it starts cannot end it (as multiprocessing's resource tracker
        # does, which unblocks them when it starts: it is started first)
        resource_tracker.ensure_running()
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            self._process.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            stop.close()  # the deployer's end, which it holds now

    def _watch(self) -> None:
        while not self._stopping.wait(RESTART_DELAY):
            with self._lock:
                if self._stopping.is_set() or self._process is None:
                    return
                if not self._process.is_alive():
                    log.error(
                        "deployer process exited with status %s; starting a new one",
                        self._process.exitcode,
                    )
                    self._spawn()


def run_deployer(config_path: str, address: str, log_level: str, stop: Connection) -> None:
    """The deployer process: run until `serve` closes the other end of `stop` (or is gone)."""
    # only the HTTP workers check the admin token (`serve` hid it: hide_admin_token)
    os.environ.pop(ADMIN_DIGEST_ENV, None)
    # sent to the whole service; serve stops us once it is done. A handler that does nothing,
    # not SIG_IGN: an ignored signal stays ignored in every process a plugin starts
    for signum in STOP_SIGNALS:
        signal.signal(signum, _ignore)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    instance = open_instance(config_path)
    deployer = Deployer(
        instance.storage,
        instance.config.targets,
        instance.backends,
        settings=instance.config.deployer,
    )
    inbox = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    bind_deployer_address(inbox, address)
    deployer.start()
    threading.Thread(target=report_backends, args=(instance,), daemon=True).start()
    threading.Thread(target=_relay, args=(inbox, deployer), daemon=True).start()
    stopping = threading.Event()
    threading.Thread(target=_checkpoints, args=(instance, stopping), daemon=True).start()
    stop.poll(None)  # until the pipe's other end is closed (or written to)
    stopping.set()
    deployer.stop()
    inbox.close()
    instance.close()


def _ignore(_signum: int, _frame: object) -> None:
    pass


def _relay(inbox: socket.socket, deployer: Deployer) -> None:
    """Wake the deployer for each target named on `inbox` by a process of this user; anything
    else is dropped (the socket's directory lets no other user in; root still may)."""
    credentials = hasattr(socket, "SO_PASSCRED")  # Linux
    if credentials:
        inbox.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    while True:
        try:
            message, ancillary, _, _ = inbox.recvmsg(256, socket.CMSG_SPACE(UCRED.size))
        except OSError:
            return
        if credentials and _sender_uid(ancillary) != os.getuid():
            continue
        with contextlib.suppress(UnicodeDecodeError):
            deployer.notify(message.decode())


UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


def _sender_uid(ancillary: list[tuple[int, int, bytes]]) -> int | None:
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
            return UCRED.unpack(data[: UCRED.size])[1]
    return None


def _checkpoints(instance: Instance, stop: threading.Event) -> None:
    """Checkpoint the database for the HTTP workers, which leave it to us."""
    failing = False  # log when checkpoints start and stop failing, not each one
    while not stop.wait(CHECKPOINT_INTERVAL):
        try:
            checkpoint(instance.storage.engine)
        except Exception as exc:  # the next one will do
            if not failing:
                cause = describe_failure(instance.storage.engine, exc)
                log.warning("checkpointing the database failed: %s; retrying", cause)
            failing = True
        else:
            if failing:
                log.warning("checkpointing the database works again")
            failing = False


def report_backends(instance: Instance) -> None:
    """Log whether each backend answers; an unreachable one is reported, never fatal."""
    for name, backend in instance.backends.items():
        try:
            log.info("backend %s (%s): %s", name, backend.name, one_line(backend.check()))
        except BackendError as exc:
            log.warning(
                "backend %s (%s) is not reachable: %s; hooks are still accepted and their "
                "deployments retried",
                name,
                backend.name,
                exc.message,
            )
        except Exception as exc:  # a plugin's bug: named, as `check` does, without a traceback
            log.warning("backend %s (%s): check failed: %s", name, backend.name, plugin_error(exc))
