"""One HTTP worker of `shiphook serve`: uvicorn calls `worker_app` in each worker process."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import multiprocessing
import os
import signal
import sys
import threading
from collections.abc import Callable

from shiphook.http.app import PlainHookPath, create_app
from shiphook.http.notifier import DeployerNotifier
from shiphook.http.waiters import Waiters
from shiphook.instance import Instance, open_instance
from shiphook.wakeup import DEPLOYER_SOCKET

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
            self._write()

    def flush(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._write()
            return
        if not self._flush_due:
            self._flush_due = True
            loop.call_soon(self._flush_turn)

    def _flush_turn(self) -> None:
        self._flush_due = False
        self._write()

    def _write(self) -> None:
        """The buffer to stderr. Where stderr is gone (the log collector at the other end of
        its pipe stopped) the lines are lost, as they would be unbuffered, but nothing else:
        raised, the error would be logged by asyncio, through this handler, without end."""
        with contextlib.suppress(OSError, ValueError):
            super().flush()


def app_for(instance: Instance, notify: Callable[[str], None]) -> PlainHookPath:
    """The API of `instance`; `notify` wakes the deployer after each commit. `?wait` callers are
    released by the waiters' poll of the database, wherever the deployer runs."""
    return create_app(
        hooks=instance.hooks,
        deployments=instance.deployments,
        targets=instance.config.targets,
        notify=notify,
        waiters=Waiters(instance.storage),
        max_wait=instance.config.server.max_wait,
        admin_digest=instance.admin_digest,
    )


def worker_app() -> PlainHookPath:
    """The app of one HTTP worker of `shiphook serve` (uvicorn calls this in each worker)."""
    instance = open_instance(os.environ["SHIPHOOK_CONFIG"])
    instance.storage.accept_path.defer_checkpoints()  # the deployer process checkpoints
    logging.basicConfig(
        level=instance.config.server.log_level.upper(),
        format=LOG_FORMAT,
        handlers=[BufferedLogHandler()],
        force=True,
    )
    notify = DeployerNotifier(os.environ[DEPLOYER_SOCKET])
    app = app_for(instance, notify)
    signal.signal(signal.SIGHUP, stop_on_hangup)
    _stop_with_serve()
    gc.freeze()  # the many long-lived objects of start-up need no garbage collection passes
    return app


def stop_on_hangup(signum: int, frame: object) -> None:
    """SIGHUP (the terminal closed, or a `kill -HUP`) stops in order, as SIGTERM does, rather
    than end the process at once: uvicorn handles only SIGTERM and SIGINT."""
    signal.raise_signal(signal.SIGTERM)


def _stop_with_serve() -> None:
    """One HTTP worker of several is a process of its own, which `serve` stops; if `serve` is
    gone without doing so (SIGKILL, the OOM killer), the worker stops itself, as on SIGTERM,
    rather than take hooks for a deployer that is gone too."""
    serve = multiprocessing.parent_process()
    if serve is None:  # one worker: serve itself
        return

    def watch() -> None:
        serve.join()
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="serve-watch", daemon=True).start()
