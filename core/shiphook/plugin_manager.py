"""The plugin manager: a fresh one per server or CLI instance, never a module global."""

from __future__ import annotations

import importlib
import importlib.metadata
import os
from collections.abc import Iterable
from dataclasses import dataclass

import pluggy

from shiphook import hookspecs
from shiphook.backends import BackendRegistry
from shiphook.errors import ConfigError, one_line

ENTRY_POINT_GROUP = "shiphook"


def make_plugin_manager(
    *,
    disabled: Iterable[str] = (),
    modules: Iterable[str] | None = None,
    config: os.PathLike[str] | str = "",
) -> pluggy.PluginManager:
    """Load the plugins of the `shiphook` entry-point group, minus `disabled`.

    `modules` are extra plugin modules imported by dotted name; by default they come from the
    comma-separated `SHIPHOOK_PLUGINS` environment variable (like `PYTEST_PLUGINS`). `config`
    is the file `disabled` comes from, for its errors.
    """
    pm = pluggy.PluginManager("shiphook")
    pm.add_hookspecs(hookspecs)
    if modules is None:
        modules = [m for m in os.environ.get("SHIPHOOK_PLUGINS", "").split(",") if m.strip()]
    modules = [m.strip() for m in modules]
    entry_points = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
    known = sorted({e.name for e in entry_points} | set(modules))
    where = f"{config}: " if config else ""
    for name in disabled:
        if name not in known:
            raise ConfigError(
                f"{where}server.disabled_plugins: no plugin named {name!r} is installed or in "
                f"SHIPHOOK_PLUGINS (there are: {', '.join(known) or 'none'})"
            )
        pm.set_blocked(name)
    for entry_point in entry_points:
        if pm.is_blocked(entry_point.name):
            continue
        try:  # import here first, so a broken plugin is named rather than a traceback
            entry_point.load()
        except (Exception, SystemExit) as exc:
            raise ConfigError(
                f"plugin {entry_point.name} ({entry_point.value}) failed to load: "
                f"{plugin_error(exc)}; fix or uninstall it, or block it with "
                f'[server] disabled_plugins = ["{entry_point.name}"]'
            ) from None
    pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
    for dotted in modules:
        if pm.is_blocked(dotted) or pm.has_plugin(dotted):
            continue
        try:
            module = importlib.import_module(dotted)
        except ImportError as exc:
            raise ConfigError(
                f"SHIPHOOK_PLUGINS: cannot import plugin module {dotted!r}: {exc}"
            ) from None
        except (Exception, SystemExit) as exc:
            raise ConfigError(
                f"SHIPHOOK_PLUGINS: plugin module {dotted!r} failed to load: {plugin_error(exc)}"
            ) from None
        pm.register(module, name=dotted)
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:  # "unknown hook 'x' in plugin <module ...>"
        unknown = str(exc).split(" in plugin ")[0]
        raise ConfigError(
            f"plugin {pm.get_name(exc.plugin)}: {unknown}; shiphook's one hook is "
            "register_backends (see `shiphook.hookspecs`)"
        ) from None
    return pm


def collect_backends(pm: pluggy.PluginManager) -> BackendRegistry:
    """Ask every plugin for its backends."""
    registry = BackendRegistry()
    for impl in pm.hook.register_backends.get_hookimpls():
        source = pm.get_name(impl.plugin) or repr(impl.plugin)
        try:
            impl.function(register=lambda cls, source=source: registry.register(cls, source=source))
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"plugin {source}: {exc}") from None
        except (Exception, SystemExit) as exc:
            raise ConfigError(
                f"plugin {source}: register_backends failed: {plugin_error(exc)}"
            ) from None
    for plugin in pm.get_plugins():
        name = pm.get_name(plugin)
        if name not in registry.sources.values():
            raise ConfigError(
                f"plugin {name} registers no backend: its register_backends(register) must be "
                "marked @shiphook.hookimpl and call register(YourBackend); or block it with "
                f'[server] disabled_plugins = ["{name}"]'
            )
    return registry


def plugin_error(exc: BaseException) -> str:
    """What plugin code raised, in one line; `sys.exit` in a plugin is a failure, not an exit."""
    if isinstance(exc, SystemExit):
        return f"it called sys.exit({exc.code!r})"
    return f"{type(exc).__name__}: {one_line(str(exc))}"


@dataclass(frozen=True)
class PluginInfo:
    name: str
    distribution: str | None
    version: str | None
    backends: tuple[str, ...]


def describe_plugins(pm: pluggy.PluginManager, registry: BackendRegistry) -> list[PluginInfo]:
    """What is loaded, from which distribution, providing which backends."""
    dists = {pm.get_name(plugin): dist for plugin, dist in pm.list_plugin_distinfo()}
    infos = []
    for plugin in pm.get_plugins():
        name = pm.get_name(plugin)
        dist = dists.get(name)
        infos.append(
            PluginInfo(
                name=name,
                distribution=dist.metadata["Name"] if dist else None,
                version=dist.version if dist else None,
                backends=tuple(b for b, src in registry.sources.items() if src == name),
            )
        )
    return sorted(infos, key=lambda info: info.name)
