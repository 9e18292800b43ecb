"""`shiphook serve`: HTTP workers on uvicorn (uvloop, httptools) and one engine process."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import sys
from collections.abc import Callable

import falcon.asgi
import uvicorn

from shiphook.app import create_app
from shiphook.connections import connection_limits, protocol_factory
from shiphook.engine import Engine
from shiphook.engine_process import (
    EngineNotifier,
    EngineSupervisor,
    engine_address,
    release_engine_address,
)
from shiphook.instance import Instance, open_instance
from shiphook.waiters import Waiters

log = logging.getLogger("shiphook.server")

ENGINE_SOCKET = "SHIPHOOK_ENGINE_SOCKET"
WAIT_POLL = 0.2  # seconds between a worker's reads of the outcomes its ?wait callers await


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class BufferedLogHandler(logging.StreamHandler):
    """stderr, written once per turn of the event loop: an HTTP worker logs a line per hook
    request, and a write each would cost the accept path (bench/README.md). Warnings, and lines
    logged off the loop's thread or at exit, are written at once."""

    def __init__(self) -> None:
        super().__init__(
            open(  # noqa: SIM115 - stderr's descriptor, kept for the process's life
                sys.stderr.fileno(), "w", buffering=1 << 16, closefd=False, errors="replace"
            )
        )
        self._flush_due = False

    def emit(self, record: logging.LogRecord) -> None:
        super().emit(record)
        if record.levelno >= logging.WARNING:
            super().flush()

    def flush(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            super().flush()
            return
        if not self._flush_due:
            self._flush_due = True
            loop.call_soon(self._flush_turn)

    def _flush_turn(self) -> None:
        self._flush_due = False
        super().flush()


def _app(instance: Instance, notify: Callable[[str], None], waiters: Waiters) -> falcon.asgi.App:
    return create_app(
        hooks=instance.hooks,
        deployments=instance.deployments,
        targets=instance.config.targets,
        notify=notify,
        waiters=waiters,
        max_wait=instance.config.server.max_wait,
        admin_token=instance.admin_token,
    )


def build(instance: Instance) -> tuple[falcon.asgi.App, Engine]:
    """The app with an engine in this process, not started: for tests and embedding."""
    engine = Engine(
        instance.storage,
        instance.config.targets,
        instance.backends,
        settings=instance.config.engine,
    )
    waiters = Waiters(instance.storage, poll_interval=instance.config.engine.scan_interval)
    engine.listeners.append(waiters.announce)
    return _app(instance, engine.notify, waiters), engine


def worker_app() -> falcon.asgi.App:
    """The app of one HTTP worker of `shiphook serve` (uvicorn calls this in each worker)."""
    instance = open_instance(os.environ["SHIPHOOK_CONFIG"])
    instance.storage.defer_checkpoints()  # the engine process checkpoints
    logging.basicConfig(
        level=instance.config.server.log_level.upper(),
        format=LOG_FORMAT,
        handlers=[BufferedLogHandler()],
        force=True,
    )
    notify = EngineNotifier(os.environ[ENGINE_SOCKET])
    app = _app(instance, notify, Waiters(instance.storage, poll_interval=WAIT_POLL))
    gc.freeze()  # the many long-lived objects of start-up need no garbage collection passes
    return app


def serve(instance: Instance, *, host: str | None = None, port: int | None = None) -> None:
    settings = instance.config.server
    instance.migrate()
    config_path = instance.config.path.resolve()
    limits = connection_limits(settings)
    address = engine_address()
    engine = EngineSupervisor(config_path, address, settings.log_level)
    os.environ["SHIPHOOK_CONFIG"] = str(config_path)
    os.environ[ENGINE_SOCKET] = address
    log.info(
        "shiphook serving on http://%s:%d (config %s, %s, %s)",
        host or settings.host,
        port or settings.port,
        config_path,
        _count(len(instance.config.targets), "target"),
        _count(settings.workers, "HTTP worker"),
    )
    # uvicorn re-raises the SIGTERM it caught once it has shut down; end with an exception
    # instead of the signal's default, so that the engine below is stopped too
    signal.signal(signal.SIGTERM, _exit)
    engine.start()
    try:
        uvicorn.run(
            "shiphook.server:worker_app",
            factory=True,
            host=host or settings.host,
            port=port or settings.port,
            workers=settings.workers,
            loop="uvloop",
            http=protocol_factory(limits),
            ws="none",
            lifespan="off",
            access_log=False,
            log_config=None,
            timeout_graceful_shutdown=settings.shutdown_timeout,
        )
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):  # the stop is under way, and bounded
            signal.signal(signum, signal.SIG_IGN)
        engine.stop(settings.shutdown_timeout)
        release_engine_address(address)
        log.info("shiphook stopped")


def _exit(signum: int, frame: object) -> None:
    raise SystemExit(0)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"
