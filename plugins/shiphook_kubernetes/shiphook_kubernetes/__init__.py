"""shiphook's Kubernetes backend: rolls Deployments, StatefulSets and DaemonSets to a new image tag
and runs Jobs from CronJobs.

Its own distribution (`plugins/shiphook_kubernetes`), registered through the `shiphook`
entry-point group (`kubernetes = "shiphook_kubernetes"`), exactly as a third-party backend would be.
"""

from __future__ import annotations

from collections.abc import Callable

from shiphook import Backend, hookimpl

from shiphook_kubernetes.backend import (
    KubernetesBackend,
    KubernetesOptions,
    KubernetesTargetOptions,
)

__all__ = ["KubernetesBackend", "KubernetesOptions", "KubernetesTargetOptions"]


@hookimpl
def register_backends(register: Callable[[type[Backend]], None]) -> None:
    register(KubernetesBackend)
