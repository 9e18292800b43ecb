"""`shiphook serve` runs the engine in a child process.

Orchestrator clients parse large JSON documents and the engine supersedes bursts of deployments;
in the server's own process that work would hold the GIL the event loop needs, and every hook
request would wait for it. The child shares nothing with the server but the database and two
sockets: the server sends the name of a target that has new work (so dispatch is immediate), the
engine sends each deployment's end (so `?wait` answers at once). Both are hints: the engine also
scans the database, and the waiters also poll it, so a lost message only delays.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import signal
import socket
import threading
import time
from pathlib import Path

from shiphook.backends import BackendError
from shiphook.engine import Engine
from shiphook.instance import Instance, open_instance
from shiphook.waiters import Waiters

log = logging.getLogger("shiphook.engine")

RESTART_DELAY = 1.0
NOTIFY_INTERVAL = 0.05


class EngineProcess:
    """The server's handle on its engine child: start, notify, hear of ends, restart, stop."""

    def __init__(self, config_path: Path, waiters: Waiters, log_level: str = "info") -> None:
        self.config_path = config_path
        self.waiters = waiters
        self.log_level = log_level
        self._process: multiprocessing.process.BaseProcess | None = None
        self._to_engine: socket.socket | None = None
        self._from_engine: socket.socket | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._stopping = False
        self._notified: dict[str, float] = {}
        self._deferred: set[str] = set()

    async def start(self) -> None:
        self._spawn()
        self._watcher = asyncio.get_running_loop().create_task(self._watch())

    def notify(self, target: str) -> None:
        """Tell the engine a target has new work; never blocks the event loop.

        At most one message per target per NOTIFY_INTERVAL, the rest deferred to its end: in a
        burst the engine is already busy with the target, and one wake-up is all it needs.
        """
        if target in self._deferred:
            return
        wait = self._notified.get(target, -NOTIFY_INTERVAL) + NOTIFY_INTERVAL - time.monotonic()
        if wait > 0:
            self._deferred.add(target)
            asyncio.get_running_loop().call_later(wait, self._send, target)
        else:
            self._send(target)

    def _send(self, target: str) -> None:
        self._deferred.discard(target)
        self._notified[target] = time.monotonic()
        if self._to_engine is not None:
            with contextlib.suppress(OSError):  # full or restarting: its next scan finds it
                self._to_engine.send(target.encode())

    async def stop(self) -> None:
        self._stopping = True
        if self._watcher is not None:
            self._watcher.cancel()
        process = self._process
        if process is not None and process.is_alive():
            os.kill(process.pid, signal.SIGTERM)
            await asyncio.to_thread(process.join, 30)
            if process.is_alive():
                process.kill()
        self._close_sockets()

    def _spawn(self) -> None:
        self._close_sockets()
        to_engine, engine_in = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        from_engine, engine_out = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        to_engine.setblocking(False)
        from_engine.setblocking(False)
        context = multiprocessing.get_context("spawn")
        self._process = context.Process(
            target=run_engine,
            args=(str(self.config_path), engine_in, engine_out, self.log_level),
            name="shiphook-engine",
        )
        self._process.start()
        engine_in.close()
        engine_out.close()
        self._to_engine, self._from_engine = to_engine, from_engine
        asyncio.get_running_loop().add_reader(from_engine.fileno(), self._hear, from_engine)

    def _hear(self, channel: socket.socket) -> None:
        while True:
            try:
                message = channel.recv(256)
            except BlockingIOError:
                return
            except OSError:
                message = b""
            if not message:  # the engine is gone; the watcher restarts it
                asyncio.get_running_loop().remove_reader(channel.fileno())
                return
            deployment_id, _, status = message.decode().partition(" ")
            self.waiters.announce(deployment_id, status)

    async def _watch(self) -> None:
        while not self._stopping:
            await asyncio.sleep(RESTART_DELAY)
            if self._process is not None and not self._process.is_alive() and not self._stopping:
                log.error(
                    "engine process exited with status %s; starting a new one",
                    self._process.exitcode,
                )
                self._spawn()

    def _close_sockets(self) -> None:
        for channel in (self._to_engine, self._from_engine):
            if channel is not None:
                with contextlib.suppress(Exception):
                    asyncio.get_running_loop().remove_reader(channel.fileno())
                channel.close()
        self._to_engine = self._from_engine = None


def run_engine(
    config_path: str, inbox: socket.socket, outbox: socket.socket, log_level: str
) -> None:
    """The child process: run the engine until SIGTERM or until the server goes away."""
    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    instance = open_instance(config_path)
    engine = Engine(
        instance.storage,
        instance.config.targets,
        instance.backends,
        settings=instance.config.engine,
    )

    def tell_server(deployment_id: str, status: str) -> None:
        with contextlib.suppress(OSError):
            outbox.send(f"{deployment_id} {status}".encode())

    engine.listeners.append(tell_server)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the server, which stops us
    engine.start()
    threading.Thread(target=report_backends, args=(instance,), daemon=True).start()
    threading.Thread(target=_relay, args=(inbox, engine, stop), daemon=True).start()
    stop.wait()
    engine.stop()
    instance.close()


def _relay(inbox: socket.socket, engine: Engine, stop: threading.Event) -> None:
    """Pass the server's hints to the engine; the server closing its end means it is gone."""
    while True:
        try:
            message = inbox.recv(256)
        except OSError:
            message = b""
        if not message:
            stop.set()
            return
        engine.notify(message.decode())


def report_backends(instance: Instance) -> None:
    """Log whether each backend answers; an unreachable one is reported, never fatal."""
    for name, backend in instance.backends.items():
        try:
            log.info("backend %s (%s): %s", name, backend.name, backend.check())
        except BackendError as exc:
            log.warning(
                "backend %s (%s) is not reachable: %s; hooks are still accepted and their "
                "deployments retried",
                name,
                backend.name,
                exc.message,
            )
