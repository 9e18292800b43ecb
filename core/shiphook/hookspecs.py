"""The shiphook plugin API: every plugin hook a plugin can implement, each documented here.

("Plugin hooks" are pluggy's; a "hook" alone is a deploy hook, a token and its target.)

A plugin is a module or object with functions decorated by `shiphook.hookimpl` whose names match
the plugin hooks below. Packages expose plugins through the `shiphook` entry-point group::

    [project.entry-points.shiphook]
    ecs = "shiphook_ecs"

and a local module can be loaded without packaging through `SHIPHOOK_PLUGINS=module[,module]`.
The built-in backends load exactly like third-party ones, and `[server] disabled_plugins` blocks
any of them by entry-point name.
"""

from __future__ import annotations

from collections.abc import Callable

import pluggy

from shiphook.backends import Backend

hookspec = pluggy.HookspecMarker("shiphook")
hookimpl = pluggy.HookimplMarker("shiphook")


# -------------------------------------------------------------------------
# backends
# -------------------------------------------------------------------------


@hookspec
def register_backends(register: Callable[[type[Backend]], None]) -> None:
    """Register the orchestrator backends this plugin provides.

    Call ``register(BackendClass)`` once for each subclass of `shiphook.Backend`; its `name`
    is what `plugin = "<name>"` in a `[backends.<name>]` table selects. Two plugins registering
    the same name is a configuration error naming both. Called once per shiphook instance
    (server or CLI), before the configuration is validated; must not contact any orchestrator.
    """
