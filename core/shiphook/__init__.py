"""shiphook: turn one authenticated deploy-hook request into a tracked rollout."""

from shiphook.backends import (
    Backend,
    BackendError,
    ConnectionOptions,
    Duration,
    Flag,
    NoOptions,
    Progress,
    Ref,
    Seconds,
    Target,
    TargetState,
    connection_failure,
    file_stamp,
)
from shiphook.hookspecs import hookimpl
from shiphook.images import ImageRepository, repository_of, tag_of

__all__ = [
    "Backend",
    "BackendError",
    "ConnectionOptions",
    "Duration",
    "Flag",
    "ImageRepository",
    "NoOptions",
    "Progress",
    "Ref",
    "Seconds",
    "Target",
    "TargetState",
    "connection_failure",
    "file_stamp",
    "hookimpl",
    "repository_of",
    "tag_of",
]
