"""shiphook's Docker Swarm backend: rolls Swarm services to a new image tag and runs Swarm jobs.

Registered through the `shiphook` entry-point group (`swarm = "shiphook_swarm"`), exactly as a
third-party backend package would be.
"""

from __future__ import annotations

from collections.abc import Callable

from shiphook import Backend, hookimpl

from shiphook_swarm.backend import SwarmBackend, SwarmOptions, SwarmTargetOptions

__all__ = ["SwarmBackend", "SwarmOptions", "SwarmTargetOptions"]


@hookimpl
def register_backends(register: Callable[[type[Backend]], None]) -> None:
    register(SwarmBackend)
