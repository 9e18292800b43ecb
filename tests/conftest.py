from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest
from falcon import testing
from shiphook.instance import open_instance
from shiphook.server import build

# Server and free_port: test modules import them from here
from shiphook.testing import Server, Shiphook, eventually, free_port  # noqa: F401
from shiphook.testing import start_server as testing_start_server

PLUGIN_DIR = Path(__file__).parent / "scripted"
sys.path.insert(0, str(PLUGIN_DIR))

import scripted_backend  # noqa: E402

ROOT = Path(__file__).parent.parent
SHIPHOOK = str(Path(sys.executable).parent / "shiphook")
ADMIN_TOKEN = "test-admin-token"
POSTGRES_URL = os.environ.get(
    "SHIPHOOK_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"
)

SCRIPTED_CONFIG = """
[backends.fake]
plugin = "scripted"
{backend_extra}

[targets.web]
kind = "app"
backend = "fake"
name = "web"
rollout_timeout = {timeout}
retry_budget = 1

[targets.api]
kind = "app"
backend = "fake"
name = "api"
on_failure = "leave"
rollout_timeout = {timeout}

[targets.strict]
kind = "app"
backend = "fake"
name = "strict"
allowed_tags = 'v\\d+\\.\\d+\\.\\d+'

[targets.gone]
kind = "app"
backend = "fake"
name = "missing-service"

[targets.migrate]
kind = "job"
backend = "fake"
name = "migrate"
parameters = ["EXIT", "GREETING"]

[targets.report]
kind = "job"
backend = "fake"
name = "report"
max_concurrent_runs = 2
"""


def scripted_config(
    tmp_path: Path, *, backend_extra: str = "", timeout: float = 5, server: str = ""
) -> Path:
    """A config with the scripted test backend and four targets, database in tmp_path."""
    path = tmp_path / "shiphook.toml"
    text = f'[server]\ndatabase_url = "sqlite:///{tmp_path}/shiphook.db"\n{server}\n'
    text += SCRIPTED_CONFIG.format(backend_extra=backend_extra, timeout=timeout)
    path.write_text(text)
    return path


def write_config(tmp_path: Path, text: str, name: str = "shiphook.toml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def replaced_by(deployments: dict[str, dict], deployment_id: str) -> str:
    """The deployment that ran instead of a superseded one: `supersededBy` names the newest
    queued deployment when it was superseded, which a newer one may have superseded in turn."""
    successor = deployments[deployment_id]["supersededBy"]
    while deployments[successor]["status"] == "superseded":
        successor = deployments[successor]["supersededBy"]
    return successor


class Harness(Shiphook):
    """An in-process shiphook on the scripted backend (shiphook.testing's, plus test helpers)."""

    def gather(self, *calls: Callable[[testing.ASGIConductor], Awaitable]) -> list:
        """Run requests concurrently on one event loop, as a server would."""

        async def main():
            async with testing.ASGIConductor(self.app) as conductor:
                return await asyncio.gather(*(call(conductor) for call in calls))

        return asyncio.run(main())

    @property
    def backend(self) -> scripted_backend.ScriptedBackend:
        return self.instance.backends["fake"]

    def new_hook(self, target: str = "web") -> str:
        return super().new_hook(target)

    def wait_started(self, deployment_id: str, timeout: float = 10) -> None:
        """Until the deployer has started the rollout (it holds its target from then on)."""
        eventually(
            lambda: self.instance.deployments.get(deployment_id).to_json()["backendRef"],
            f"the start of deployment {deployment_id}",
            timeout,
        )


@pytest.fixture
def harness_factory(tmp_path, monkeypatch) -> Iterator[Callable[..., Harness]]:
    monkeypatch.setenv("SHIPHOOK_ADMIN_TOKEN", ADMIN_TOKEN)
    made: list[Harness] = []

    def make(config: Path | None = None, *, start: bool = True, **config_kwargs) -> Harness:
        path = config or scripted_config(tmp_path, **config_kwargs)
        instance = open_instance(path, plugin_modules=[], plugin_objects=[scripted_backend])
        instance.migrate()
        app, deployer = build(instance)
        if start:
            deployer.start()
        harness = Harness(instance, deployer, app)
        made.append(harness)
        return harness

    yield make
    for harness in made:
        harness.deployer.stop()
        harness.instance.close()


@pytest.fixture
def harness(harness_factory) -> Harness:
    return harness_factory()


@pytest.fixture
def postgres_url():
    """A fresh schema on the machine's PostgreSQL for one test, dropped afterwards."""
    psycopg = pytest.importorskip("psycopg")
    try:
        admin = psycopg.connect(POSTGRES_URL, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as exc:
        if os.environ.get("SHIPHOOK_REQUIRE_POSTGRES") == "1":
            pytest.fail(f"SHIPHOOK_REQUIRE_POSTGRES=1 but PostgreSQL is not reachable: {exc}")
        pytest.skip(f"PostgreSQL not reachable at {POSTGRES_URL}: {exc}")
    schema = f"shiphook_{uuid.uuid4().hex[:12]}"
    admin.execute(f"CREATE SCHEMA {schema}")
    try:
        yield f"{POSTGRES_URL}?options=-csearch_path%3D{schema}"
    finally:
        admin.execute(f"DROP SCHEMA {schema} CASCADE")
        admin.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path) -> str:
    """The test runs on a new SQLite file, then on a fresh PostgreSQL schema."""
    if request.param == "postgresql":
        return request.getfixturevalue("postgres_url")
    return f"sqlite:///{tmp_path}/shiphook.db"


# -- a real `shiphook serve` subprocess ---------------------------------------------------


def plugin_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PLUGIN_DIR), env.get("PYTHONPATH")]))
    env["SHIPHOOK_PLUGINS"] = "scripted_backend"
    env["SHIPHOOK_ADMIN_TOKEN"] = ADMIN_TOKEN
    env.update(extra)
    return env


def run_cli(
    *args: str,
    config: Path,
    env: dict[str, str] | None = None,
    check: bool = True,
    cwd: Path | None = None,
):
    result = subprocess.run(
        [SHIPHOOK, "--config", str(config), *args],
        capture_output=True,
        text=True,
        env=env or plugin_env(),
        cwd=cwd or config.parent,
        timeout=60,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"shiphook {' '.join(args)} failed: {result.stderr}{result.stdout}")
    return result


def start_server(
    config: Path,
    log_path: Path,
    env: dict[str, str] | None = None,
    preexec: Callable[[], None] | None = None,
) -> Server:
    """`preexec` runs in the child before `shiphook serve` starts (e.g. to set its limits)."""
    return testing_start_server(config, log_path, env or plugin_env(), preexec)


@pytest.fixture
def serve(tmp_path) -> Iterator[Callable[..., Server]]:
    started: list[Server] = []

    def start(
        config: Path,
        env: dict[str, str] | None = None,
        name: str = "serve",
        preexec: Callable[[], None] | None = None,
    ) -> Server:
        server = start_server(config, tmp_path / f"{name}.log", env, preexec)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


# -- a real Kubernetes control plane (tests/k8s) -------------------------------------------


@pytest.fixture(scope="session")
def kube_cluster():
    """One control plane for the session (tests/k8s/cluster.py). Skipped when its binaries are
    not built (`bash tests/k8s/build.sh`); failing instead when SHIPHOOK_REQUIRE_KUBERNETES=1."""
    from k8s.cluster import ControlPlane, built

    home, ready = built()
    if not ready:
        reason = f"the Kubernetes binaries are not built in {home} (bash tests/k8s/build.sh)"
        if os.environ.get("SHIPHOOK_REQUIRE_KUBERNETES") == "1":
            pytest.fail(f"SHIPHOOK_REQUIRE_KUBERNETES=1, but {reason}", pytrace=False)
        pytest.skip(reason)
    cluster = ControlPlane(home)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()
