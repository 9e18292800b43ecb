"""`shiphook serve`: the API on uvicorn (uvloop, httptools); the engine in a child process."""

from __future__ import annotations

import logging

import falcon.asgi
import uvicorn

from shiphook.app import create_app
from shiphook.engine import Engine
from shiphook.engine_process import EngineProcess
from shiphook.instance import Instance
from shiphook.waiters import Waiters

log = logging.getLogger("shiphook.server")


class EngineLifespan:
    """Starts the engine process with the server and stops it with the server."""

    def __init__(self, engine: EngineProcess) -> None:
        self.engine = engine

    async def process_startup(self, scope, event) -> None:
        await self.engine.start()

    async def process_shutdown(self, scope, event) -> None:
        await self.engine.stop()


def _app(instance: Instance, notify, waiters: Waiters, middleware=()) -> falcon.asgi.App:
    return create_app(
        hooks=instance.hooks,
        deployments=instance.deployments,
        targets=instance.config.targets,
        notify=notify,
        waiters=waiters,
        max_wait=instance.config.server.max_wait,
        admin_token=instance.admin_token,
        middleware=list(middleware),
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


def serve(instance: Instance, *, host: str | None = None, port: int | None = None) -> None:
    settings = instance.config.server
    instance.migrate()
    waiters = Waiters(instance.storage, poll_interval=instance.config.engine.scan_interval)
    engine = EngineProcess(instance.config.path.resolve(), waiters, settings.log_level)
    app = _app(instance, engine.notify, waiters, [EngineLifespan(engine)])
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
