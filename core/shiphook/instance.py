"""The composition root: config, plugins, backends, storage and services for one instance.

The server and every CLI command open their own instance; nothing is a module global, so tests
can build as many isolated instances as they like.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pluggy

from shiphook.backends import Backend, BackendError, BackendRegistry
from shiphook.config import Config, config_path, read_config_file, resolve_config
from shiphook.db import create_db_engine, upgrade
from shiphook.errors import ConfigError
from shiphook.plugin_manager import collect_backends, make_plugin_manager, plugin_error
from shiphook.services import Deployments, Hooks
from shiphook.storage import Storage
from shiphook.tokens import digest

ADMIN_TOKEN_ENV = "SHIPHOOK_ADMIN_TOKEN"  # the admin API's token; unset, the admin API is off
ADMIN_DIGEST_ENV = "SHIPHOOK_ADMIN_TOKEN_SHA256"  # or its SHA-256, hex: what `serve` keeps of it
MIN_ADMIN_TOKEN = 16  # characters


@dataclass
class Instance:
    config: Config
    plugins: pluggy.PluginManager
    registry: BackendRegistry
    storage: Storage
    backends: dict[str, Backend] = field(default_factory=dict)
    admin_digest: str | None = None  # the admin token's SHA-256; None, the admin API is off

    @property
    def hooks(self) -> Hooks:
        return Hooks(self.storage, self.config.targets)

    @property
    def deployments(self) -> Deployments:
        return Deployments(self.storage, self.config.targets)

    def migrate(self) -> str | None:
        """Bring the database to the latest schema; the path of the SQLite file if this made it
        (a relative `sqlite:///` path is the working directory's: a command run elsewhere than
        `serve` would use another database)."""
        new = self.new_database_file()
        upgrade(self.storage.engine)
        return new

    def new_database_file(self) -> str | None:
        """The absolute path of the SQLite file `migrate` would create: None when there is one,
        or the database is no file."""
        url = self.storage.engine.url
        path = url.database or ""
        new = (
            url.get_backend_name() == "sqlite"
            and path not in ("", ":memory:")
            and not os.path.exists(path)
        )
        return os.path.abspath(path) if new else None

    def close(self) -> None:
        for backend in self.backends.values():
            backend.close()
        self.storage.close()


def open_instance(
    path: str | os.PathLike[str] | None = None,
    *,
    plugin_modules: Iterable[str] | None = None,
    plugin_objects: Iterable[object] = (),
) -> Instance:
    """Read and validate the config, load plugins, build backends and open the database.

    `plugin_objects` are registered on the fresh plugin manager directly (tests use this for
    throwaway backends). Raises `ConfigError` for anything wrong, naming what and where.
    """
    file = config_path(path)
    parsed = read_config_file(file)
    admin = admin_digest()
    pm = make_plugin_manager(
        disabled=parsed.server.disabled_plugins, modules=plugin_modules, config=file
    )
    for plugin in plugin_objects:
        pm.register(plugin)
    registry = collect_backends(pm)
    config = resolve_config(Path(file), parsed, registry)
    backends = {}
    for name, backend_config in config.backends.items():
        plugin = backend_config.plugin
        try:
            backends[name] = registry.classes[plugin](backend_config.options)
        except (BackendError, ValueError, OSError) as exc:
            raise ConfigError(f"{file}: backends.{name}: {exc}") from None
        except (Exception, SystemExit) as exc:
            raise ConfigError(
                f"{file}: backends.{name}: the {plugin} backend (plugin "
                f"{registry.sources[plugin]}) failed to start: {plugin_error(exc)}"
            ) from None
    settings = config.server
    engine = create_db_engine(
        settings.database_url,
        timeout=settings.database_timeout,
        synchronous=settings.sqlite_synchronous,
    )
    storage = Storage(engine, timeout=settings.database_timeout)
    return Instance(
        config=config,
        plugins=pm,
        registry=registry,
        storage=storage,
        backends=backends,
        admin_digest=admin,
    )


def admin_digest() -> str | None:
    """The admin token's SHA-256 (hex), from `SHIPHOOK_ADMIN_TOKEN` or from
    `SHIPHOOK_ADMIN_TOKEN_SHA256`; None when neither is set (the admin API is off)."""
    token = os.environ.get(ADMIN_TOKEN_ENV) or ""
    given = os.environ.get(ADMIN_DIGEST_ENV) or ""
    if token and given:
        raise ConfigError(f"set {ADMIN_TOKEN_ENV} or {ADMIN_DIGEST_ENV}, not both")
    if token and not re.fullmatch(rf"[!-~]{{{MIN_ADMIN_TOKEN},}}", token):
        raise ConfigError(
            f"{ADMIN_TOKEN_ENV}: expected at least {MIN_ADMIN_TOKEN} printable ASCII characters "
            "and no spaces or line breaks, which a client could not send (make one with "
            "`openssl rand -hex 32`)"
        )
    if given and not re.fullmatch(r"[0-9a-f]{64}", given):
        raise ConfigError(
            f"{ADMIN_DIGEST_ENV}: expected the admin token's SHA-256 as 64 lowercase hex digits "
            '(`printf %s "$TOKEN" | sha256sum`)'
        )
    return digest(token) if token else given or None


def hide_admin_token() -> None:
    """Replace `SHIPHOOK_ADMIN_TOKEN` in this process's environment by its SHA-256 before a
    plugin is loaded: `serve`'s HTTP workers compare digests, so no plugin, in any of its
    processes, nor any program one starts, sees the token."""
    admin = admin_digest()
    if os.environ.pop(ADMIN_TOKEN_ENV, None) and admin:
        os.environ[ADMIN_DIGEST_ENV] = admin
