"""What the Swarm tests share: a Docker Engine that is a swarm manager, and services on it.

Loaded as a pytest plugin (`pytest_plugins = ["swarm_support"]` in each Swarm test module), so
that its session-scoped `engine` fixture is one for the whole run, however many modules use it.

A private dockerd (tests/dockerd.py) is started once for the session, unless
SHIPHOOK_TEST_DOCKER_HOST names an engine (a swarm manager) to use instead; then the tests that
stop the engine are skipped. Without dockerd the tests that use `engine` are skipped, or fail when
SHIPHOOK_REQUIRE_DOCKER=1 (as in CI). Services are created without asking a registry, and every
target sets `resolve_image = false`: no registry is reachable here.

PYTEST_DONT_REWRITE: the test modules import their helpers from here before pytest loads it as
a plugin, too late to rewrite its asserts (it has none), and pytest would warn about that.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import docker
import docker.errors
import docker.types
import pytest
from conftest import write_config
from dockerd import APP, JOB, PrivateDockerd, build_test_images, unavailable_reason
from http_proxy import Answer, FaultProxy, UnixConnection, UnixServer
from shiphook.testing import eventually

T = TypeVar("T")
SECOND = 1_000_000_000  # Swarm durations are nanoseconds


def skip_or_fail(reason: str) -> None:
    if os.environ.get("SHIPHOOK_REQUIRE_DOCKER") == "1":
        pytest.fail(f"SHIPHOOK_REQUIRE_DOCKER=1, but {reason}", pytrace=False)
    pytest.skip(reason)


@dataclass
class Engine:
    """The engine under test; `daemon` is None when SHIPHOOK_TEST_DOCKER_HOST was given."""

    host: str
    daemon: PrivateDockerd | None

    def client(self) -> docker.APIClient:
        return docker.APIClient(base_url=self.host, version="auto", timeout=30)

    def private(self) -> PrivateDockerd:
        """The private daemon, for tests that stop it; skipped on a given engine."""
        if self.daemon is None:
            pytest.skip("stops the engine: runs only on the private dockerd")
        return self.daemon


@pytest.fixture(scope="session")
def engine() -> Iterator[Engine]:
    given = os.environ.get("SHIPHOOK_TEST_DOCKER_HOST")
    if given:
        try:
            client = docker.APIClient(base_url=given, version="auto", timeout=30)
            client.inspect_swarm()
            build_test_images(client)
        except Exception as exc:
            skip_or_fail(f"SHIPHOOK_TEST_DOCKER_HOST={given} is not a usable swarm manager: {exc}")
        yield Engine(given, None)
        return
    reason = unavailable_reason()
    if reason:
        skip_or_fail(reason)
    daemon = PrivateDockerd.create()
    try:
        try:
            daemon.start()
            daemon.init_swarm()
            build_test_images(daemon.client())
        except Exception as exc:
            skip_or_fail(f"a private dockerd could not be started: {exc}")
        yield Engine(daemon.host, daemon)
    finally:
        daemon.remove()


class Services:
    """Test services on the engine, each with a fresh name, removed after the test."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.names: list[str] = []

    @property
    def client(self) -> docker.APIClient:
        return self.engine.client()  # a fresh client: the engine may have been restarted

    def _name(self, prefix: str) -> str:
        name = f"shiphook-test-{prefix}-{uuid.uuid4().hex[:8]}"
        self.names.append(name)
        return name

    def app(
        self,
        *,
        replicas: int = 1,
        failure_action: str = "pause",
        monitor: float = 1,
        stop_signal: str | None = "SIGKILL",
    ) -> str:
        """A replicated service on APP:v1, with quick failure detection, running when returned.
        Its tasks stop at once; with `stop_signal=None` they ignore the SIGTERM they get (busybox
        as pid 1) and are killed after a 3 s grace period, as a slow-stopping service would."""
        name = self._name("web")
        grace = None if stop_signal else 3 * SECOND
        self.client.create_service(
            docker.types.TaskTemplate(
                container_spec=docker.types.ContainerSpec(
                    f"{APP}:v1", stop_signal=stop_signal, stop_grace_period=grace
                ),
                restart_policy=docker.types.RestartPolicy(condition="any", delay=SECOND // 2),
            ),
            name=name,
            mode=docker.types.ServiceMode("replicated", replicas=replicas),
            update_config=docker.types.UpdateConfig(
                parallelism=1, monitor=int(monitor * SECOND), failure_action=failure_action
            ),
            rollback_config=docker.types.RollbackConfig(parallelism=1, monitor=SECOND),
        )
        eventually(lambda: len(self.running_images(name)) == replicas, f"{name} running")
        return name

    def job(self, *, env: list[str], image: str = f"{JOB}:ok") -> str:
        """A replicated-job service (on JOB:ok) that Swarm does not restart on failure; a run
        that the next replaces stops at once."""
        name = self._name("job")
        self.client.create_service(
            docker.types.TaskTemplate(
                container_spec=docker.types.ContainerSpec(image, env=env, stop_signal="SIGKILL"),
                restart_policy=docker.types.RestartPolicy(condition="none"),
            ),
            name=name,
            mode=docker.types.ServiceMode("replicated-job", concurrency=1, replicas=1),
        )
        return name

    def inspect(self, name: str) -> dict[str, Any]:
        return self.client.inspect_service(name)

    def image(self, name: str) -> str:
        return self.inspect(name)["Spec"]["TaskTemplate"]["ContainerSpec"]["Image"]

    def running_images(self, name: str) -> list[str]:
        """Images of the service's tasks that run now and are meant to."""
        tasks = self.client.tasks(filters={"service": name, "desired-state": "running"})
        return sorted(
            t["Spec"]["ContainerSpec"]["Image"] for t in tasks if t["Status"]["State"] == "running"
        )

    def job_output(self, name: str, iteration: int) -> str:
        """What the task of one job iteration printed."""
        tasks = self.client.tasks(filters={"service": name})
        (task,) = [t for t in tasks if (t.get("JobIteration") or {}).get("Index", 0) == iteration]
        container = task["Status"]["ContainerStatus"]["ContainerID"]
        return self.client.logs(container, stdout=True, stderr=True).decode()

    def remove_all(self) -> None:
        client = self.client
        for name in self.names:
            with contextlib.suppress(docker.errors.NotFound):
                client.remove_service(name)


@pytest.fixture
def services(engine: Engine) -> Iterator[Services]:
    made = Services(engine)
    yield made
    made.remove_all()


def swarm_config(tmp_path: Path, engine: Engine, *targets: str, host: str | None = None) -> Path:
    """A config on the engine (or on `host`, say a proxy in front of it) with `targets`."""
    text = f"""
[server]
database_url = "sqlite:///{tmp_path}/shiphook.db"

[backends.swarm]
plugin = "swarm"
host = "{host or engine.host}"
timeout = 10
poll_interval = 0.2
"""
    return write_config(tmp_path, text + "".join(targets))


def target(name: str, kind: str, service: str, **keys: Any) -> str:
    """A `[targets.<name>]` table on the swarm backend; no registry, so no image resolution."""
    keys = {"rollout_timeout": 90, "retry_budget": 10, **keys}
    lines = [f"[targets.{name}]", f'kind = "{kind}"', 'backend = "swarm"']
    lines += [f'service = "{service}"', "resolve_image = false"]
    lines += [f"{key} = {json.dumps(value)}" for key, value in keys.items()]
    return "\n" + "\n".join(lines) + "\n"


def job_body(**env: str) -> dict:
    return {"instanceEnvironmentVariables": [{"name": k, "value": v} for k, v in env.items()]}


# What a swarm manager's dockerd answers to swarm calls for a few seconds of a graceful stop
# (SIGTERM, as `systemctl restart docker` sends): its cluster component has stopped while its API
# still serves the connections it had. Recorded from the private dockerd (Docker 20.10) during
# a restart; a node that never was a manager gives the very same answer.
NOT_A_MANAGER_BODY = (
    b'{"message":"This node is not a swarm manager. Use \\"docker swarm init\\" or '
    b'\\"docker swarm join\\" to connect this node to swarm and try again."}\n'
)
SWARM_PATHS = ("/services", "/tasks", "/swarm", "/nodes")


class NotAManagerProxy(FaultProxy):
    """A unix-socket HTTP proxy in front of the engine that answers swarm calls with dockerd's
    "not a swarm manager" 503, as often as `answer_not_a_manager` says, and relays the rest."""

    def __init__(self, upstream: str) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="shp-", dir="/tmp"))  # short: a socket path
        self.answered = 0  # 503s given so far
        self._left: float = 0
        self._lock = threading.Lock()
        super().__init__(
            lambda handler: UnixServer(str(self.socket), handler),
            lambda: UnixConnection(upstream.removeprefix("unix://")),
        )

    @property
    def socket(self) -> Path:
        return self.root / "proxy.sock"

    @property
    def host(self) -> str:
        return f"unix://{self.socket}"

    def answer_not_a_manager(self, times: float) -> None:
        """The next `times` swarm calls (`math.inf`: all) get the 503."""
        with self._lock:
            self._left = times

    def fault(self, method: str, path: str) -> Answer | None:
        with self._lock:
            if self._left <= 0 or not any(p in path for p in SWARM_PATHS):
                return None
            self._left -= 1
            self.answered += 1
            return Answer(503, NOT_A_MANAGER_BODY, (("Content-Type", "application/json"),))

    def close(self) -> None:
        super().close()
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture
def not_a_manager_proxy(engine: Engine) -> Iterator[NotAManagerProxy]:
    if not engine.host.startswith("unix://"):
        pytest.skip("the proxy sits in front of a unix-socket engine")
    proxy = NotAManagerProxy(engine.host)
    yield proxy
    proxy.close()
