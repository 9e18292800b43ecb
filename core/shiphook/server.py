"""`shiphook serve`: HTTP workers on uvicorn (uvloop, httptools) and one deployer process."""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading

import uvicorn
from uvicorn.supervisors import Multiprocess

from shiphook.config import host_port
from shiphook.deployer.deployer import Deployer
from shiphook.deployer.process import STOP_SIGNALS, DeployerSupervisor
from shiphook.errors import ConfigError, ShiphookError
from shiphook.fastpath import SQLITE_FILE_ENV, DatabaseFileGone, SqliteFile
from shiphook.http.app import PlainHookPath
from shiphook.http.connections import connection_limits, protocol_factory
from shiphook.http.worker import app_for, stop_on_hangup
from shiphook.instance import Instance
from shiphook.wakeup import DEPLOYER_SOCKET, deployer_address, release_deployer_address

log = logging.getLogger("shiphook.server")


def build(instance: Instance) -> tuple[PlainHookPath, Deployer]:
    """The app of an HTTP worker with a deployer in threads of this process, not started: for
    tests and embedding. Its `?wait` callers learn outcomes as a worker's do, from the database;
    a commit calls `Deployer.notify` directly, which the deployer process of `shiphook serve`
    calls for each target name it receives on its wake-up socket. The Falcon app is the app's
    `app`: what is added to it does not see the plain hook request (`PlainHookPath`)."""
    deployer = Deployer(
        instance.storage,
        instance.config.targets,
        instance.backends,
        settings=instance.config.deployer,
    )
    return app_for(instance, deployer.notify), deployer


WORKER_HEALTHCHECK = 15  # seconds a worker may take to answer its supervisor, which kills it
FILE_CHECK_INTERVAL = 0.25  # seconds between two looks at the SQLite database file


def serve(instance: Instance, *, host: str | None = None, port: int | None = None) -> None:
    settings = instance.config.server
    listeners = listen(host or settings.host, port or settings.port)
    if (created := instance.migrate()) is not None:
        log.info("created a new database, %s", created)
    config_path = instance.config.path.resolve()
    limits = connection_limits(settings)
    address = deployer_address()
    deployer = DeployerSupervisor(config_path, address, settings.log_level)
    os.environ["SHIPHOOK_CONFIG"] = str(config_path)
    os.environ[DEPLOYER_SOCKET] = address
    database = instance.storage.sqlite_file
    if database.path is not None:
        os.environ[SQLITE_FILE_ENV] = database.identity()
    log.info(
        "shiphook serving on http://%s (config %s, %s, %s, admin API %s)",
        host_port(host or settings.host, listeners[0].getsockname()[1]),
        config_path,
        _count(len(instance.config.targets), "target"),
        _count(settings.workers, "HTTP worker"),
        "on" if instance.admin_digest else "off: SHIPHOOK_ADMIN_TOKEN is not set",
    )
    config = uvicorn.Config(
        "shiphook.http.worker:worker_app",
        factory=True,
        workers=settings.workers,
        loop="uvloop",
        http=protocol_factory(limits),
        ws="none",
        lifespan="off",
        access_log=False,
        log_config=None,
        timeout_graceful_shutdown=settings.shutdown_timeout,
        # uvicorn's 5 s killed workers still starting on a busy machine (bench/README.md)
        timeout_worker_healthcheck=WORKER_HEALTHCHECK,
    )
    # uvicorn re-raises the SIGTERM it caught once it has shut down; end with an exception
    # instead of the signal's default, so that the deployer below is stopped too
    signal.signal(signal.SIGTERM, _exit)
    signal.signal(signal.SIGHUP, stop_on_hangup)
    watch = None
    try:
        if database.path is not None:
            watch = FileWatch(database)
        deployer.start()
        if settings.workers > 1:
            Supervisor(config, sockets=listeners).run()
        else:
            uvicorn.Server(config).run(sockets=listeners)
    except SystemExit:  # SIGTERM's (`_exit`); FileWatch sent it when the file went
        if watch is None or watch.gone is None:
            raise
    finally:
        for signum in STOP_SIGNALS:  # the stop is under way, and bounded
            signal.signal(signum, signal.SIG_IGN)
        deployer.stop(settings.shutdown_timeout)
        release_deployer_address(address)
        for listener in listeners:
            listener.close()
        if watch is not None:
            watch.stop()
        log.info("shiphook stopped")
    if watch is not None and watch.gone is not None:
        raise ShiphookError(watch.gone)


class FileWatch:
    """Stops `serve` (as SIGTERM does) when its SQLite database file is removed or replaced:
    every connection open would go on writing to a file that no later start reads. Until it
    has stopped, each commit is checked too (`SqliteFile.check`): no 201 for what went there,
    and no deployment started from it."""

    def __init__(self, database: SqliteFile) -> None:
        self.database = database
        self.gone: str | None = None  # why it stopped serve, once it has
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="sqlite-file-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join()

    def _watch(self) -> None:
        while not self._stopping.wait(FILE_CHECK_INTERVAL):
            try:
                self.database.check()
            except DatabaseFileGone as exc:
                self.gone = (
                    f"{exc}: stopped, so that nothing more is written where no later start "
                    "reads it (stop shiphook before you move, remove or restore the file)"
                )
                log.error("%s", self.gone)
                os.kill(os.getpid(), signal.SIGTERM)
                return


class Supervisor(Multiprocess):
    """uvicorn's supervisor of several HTTP workers, stopping in order on SIGHUP as on SIGTERM
    (uvicorn's restarts the workers), as one worker does."""

    def handle_hup(self) -> None:
        log.info("SIGHUP: stopping as on SIGTERM")
        self.handle_term()


def listen(host: str, port: int) -> list[socket.socket]:
    """The listening sockets, one per address of `host` (as asyncio's `create_server` binds
    them), bound before anything starts, so that an address that cannot be had is one line
    (`ConfigError`) rather than a server that said it was serving."""
    listeners: list[socket.socket] = []
    try:
        found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        for family, kind, protocol, _, address in dict.fromkeys(found):
            listener = socket.socket(family, kind, protocol)
            listeners.append(listener)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:  # its IPv4 address, if any, has a socket of its own
                listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            listener.bind(address)
            listener.set_inheritable(True)  # the HTTP workers' processes take it over
    except OSError as exc:
        for listener in listeners:
            listener.close()
        raise ConfigError(
            f"cannot listen on {host_port(host, port)} ([server] host and port, or "
            f"--host and --port): {exc.strerror or exc}"
        ) from None
    return listeners


def _exit(signum: int, frame: object) -> None:
    raise SystemExit(0)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"
