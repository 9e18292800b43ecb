"""A proxy in front of the test cluster's kube-apiserver that makes chosen requests fail as the
API server (or the network) can make them fail, and relays every other request to it.

It serves TLS on a loopback port with the API server's own serving certificate (issued for
127.0.0.1 by the cluster's CA), so a kubeconfig naming it differs from the cluster's only by
its address, and forwards over TLS to the real server. A test scripts the faults in order: each
step applies to the first request that matches its method and path once the steps before it
are used up. The answers are the API server's own: a metav1.Status as its handlers write one
(responsewriters.ErrorNegotiated: JSON, `Retry-After` when the Status asks for a delay), or the
plain text its in-flight limit answers.
"""

from __future__ import annotations

import http.client
import json
import ssl
import threading
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from http_proxy import Answer, Cut, Fault, FaultProxy, TlsServer

# k8s.io/apiserver/pkg/server/filters: the in-flight limit's answer (http.Error: plain text)
TOO_MANY_REQUESTS = Answer(
    429,
    b"Too many requests, please try again later.\n",
    (
        ("Content-Type", "text/plain; charset=utf-8"),
        ("X-Content-Type-Options", "nosniff"),
        ("Retry-After", "1"),
    ),
)


def status(
    code: int,
    reason: str,
    message: str,
    details: dict[str, Any] | None = None,
    retry_after: int | None = None,
) -> Answer:
    """A metav1.Status as the API server writes an error (an empty `reason` is Unknown, which
    the JSON leaves out)."""
    body: dict[str, Any] = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
    }
    if reason:
        body["reason"] = reason
    if details:
        body["details"] = details
    body["code"] = code
    headers = [("Content-Type", "application/json")]
    if retry_after is not None:
        headers.append(("Retry-After", str(retry_after)))
    return Answer(code, json.dumps(body).encode() + b"\n", tuple(headers))


@dataclass(frozen=True)
class Step:
    """The next request of `method` to `path` (without its query) meets `fault`; with None it
    is relayed (a step that lets a known request through before the next fault)."""

    method: str
    path: str
    fault: Fault | None


class ApiServerProxy(FaultProxy):
    def __init__(self, cluster: Any) -> None:  # tests/k8s/cluster.py's ControlPlane
        serving = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        serving.load_cert_chain(*cluster.serving_cert)
        upstream = ssl.create_default_context(cafile=str(cluster.ca))
        self.cluster = cluster
        self.requests: list[tuple[str, str, str]] = []
        """Every request: method, path without the query, and what it met."""
        self._steps: deque[Step] = deque()
        self._lock = threading.Lock()
        super().__init__(
            lambda handler: TlsServer(handler, serving),
            lambda: http.client.HTTPSConnection(
                "127.0.0.1", cluster.api_port, context=upstream, timeout=30
            ),
        )

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self._server.port}"

    def kubeconfig(self, path: Path, namespace: str) -> Path:
        """The admin's kubeconfig, through this proxy."""
        return self.cluster.write_kubeconfig(
            path, self.cluster.admin_token, namespace, server=self.server
        )

    def script(self, *steps: Step) -> None:
        with self._lock:
            self._steps.extend(steps)

    @property
    def steps_left(self) -> list[Step]:
        with self._lock:
            return list(self._steps)

    def met(self, method: str, path: str) -> list[str]:
        """What each request of `method` to `path` met, in order."""
        return [what for m, p, what in self.requests if (m, p) == (method, path)]

    def fault(self, method: str, path: str) -> Fault | None:
        bare = path.split("?")[0]
        with self._lock:
            step = self._steps[0] if self._steps else None
            if step is None or (step.method, step.path) != (method, bare):
                self.requests.append((method, bare, "relayed"))
                return None
            self._steps.popleft()
            fault = step.fault
            if isinstance(fault, Answer):
                self.requests.append((method, bare, str(fault.status)))
            else:
                self.requests.append((method, bare, f"cut {fault.value}" if fault else "relayed"))
            return fault


__all__ = ["TOO_MANY_REQUESTS", "ApiServerProxy", "Cut", "Step", "status"]
