"""`shiphook serve`: the API on uvicorn (uvloop, httptools) with the engine in the same process."""

from __future__ import annotations

import asyncio
import logging
import threading

import falcon.asgi
import uvicorn

from shiphook.app import create_app
from shiphook.backends import BackendError
from shiphook.engine import Engine
from shiphook.instance import Instance
from shiphook.waiters import Waiters

log = logging.getLogger("shiphook.server")


class EngineLifespan:
    """Starts the engine with the server and stops it with the server (Falcon middleware)."""

    def __init__(self, engine: Engine, instance: Instance) -> None:
        self.engine = engine
        self.instance = instance

    async def process_startup(self, scope, event) -> None:
        self.engine.start()
        threading.Thread(target=report_backends, args=(self.instance,), daemon=True).start()

    async def process_shutdown(self, scope, event) -> None:
        await asyncio.to_thread(self.engine.stop)


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


def build(instance: Instance, *, lifespan: bool = True) -> tuple[falcon.asgi.App, Engine]:
    """The app and its engine; with `lifespan`, the server's start and stop drive the engine."""
    engine = Engine(
        instance.storage,
        instance.config.targets,
        instance.backends,
        settings=instance.config.engine,
    )
    waiters = Waiters(instance.storage, poll_interval=instance.config.engine.scan_interval)
    engine.listeners.append(waiters.announce)
    app = create_app(
        hooks=instance.hooks,
        deployments=instance.deployments,
        targets=instance.config.targets,
        notify=engine.notify,
        waiters=waiters,
        max_wait=instance.config.server.max_wait,
        admin_token=instance.admin_token,
        middleware=[EngineLifespan(engine, instance)] if lifespan else [],
    )
    return app, engine


def serve(instance: Instance, *, host: str | None = None, port: int | None = None) -> None:
    settings = instance.config.server
    instance.migrate()
    app, _ = build(instance)
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host=host or settings.host,
            port=port or settings.port,
            loop="uvloop",
            http="httptools",
            lifespan="on",
            access_log=False,
            log_config=None,
        )
    )
    log.info(
        "shiphook serving on http://%s:%d (config %s, %d targets)",
        host or settings.host,
        port or settings.port,
        instance.config.path,
        len(instance.config.targets),
    )
    server.run()
