"""shiphook: turn one authenticated deploy-hook request into a tracked rollout."""

from shiphook.backends import (
    Backend,
    BackendError,
    ConnectionOptions,
    NoOptions,
    Progress,
    Ref,
    Target,
    TargetState,
)
from shiphook.hookspecs import hookimpl
from shiphook.images import ImageRepository, repository_of, tag_of

__all__ = [
    "Backend",
    "BackendError",
    "ConnectionOptions",
    "ImageRepository",
    "NoOptions",
    "Progress",
    "Ref",
    "Target",
    "TargetState",
    "hookimpl",
    "repository_of",
    "tag_of",
]
