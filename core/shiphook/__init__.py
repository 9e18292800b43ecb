"""shiphook: turn one authenticated deploy-hook request into a tracked rollout."""

from shiphook.backends import (
    Backend,
    BackendError,
    NoOptions,
    Progress,
    Ref,
    Target,
    TargetState,
)
from shiphook.hookspecs import hookimpl

__all__ = [
    "Backend",
    "BackendError",
    "NoOptions",
    "Progress",
    "Ref",
    "Target",
    "TargetState",
    "hookimpl",
]
