"""The scripted backend without rollback (`can_rollback = False`), as a plugin of its own: the
conformance suite's scenarios for a backend that can only roll forward run on it."""

from __future__ import annotations

from scripted_backend import ScriptedBackend
from shiphook import hookimpl


class ForwardOnlyBackend(ScriptedBackend):
    name = "scripted-forward"
    description = "the scripted test backend, without rollback"
    can_rollback = False


@hookimpl
def register_backends(register) -> None:
    register(ForwardOnlyBackend)
