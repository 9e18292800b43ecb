"""shiphook's Nomad backend: rolls service jobs to a new image tag and dispatches parameterized
batch jobs.

Its own distribution (`shiphook-nomad`), registered through the `shiphook` entry-point group
(`nomad = "shiphook_nomad"`), exactly as a third-party backend package would be.
"""

from __future__ import annotations

from collections.abc import Callable

from shiphook import Backend, hookimpl

from shiphook_nomad.backend import NomadBackend, NomadOptions, NomadTargetOptions

__all__ = ["NomadBackend", "NomadOptions", "NomadTargetOptions"]


@hookimpl
def register_backends(register: Callable[[type[Backend]], None]) -> None:
    register(NomadBackend)
