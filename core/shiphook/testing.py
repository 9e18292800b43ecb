"""The conformance suite: the hook semantics every backend is held to, run on its orchestrator.

A backend's tests opt in with the pytest plugin and subclass `BackendConformance`, saying how to
make workloads on their orchestrator and how to read back what runs::

    # tests/test_conformance.py of a backend package
    from shiphook.testing import BackendConformance

    pytest_plugins = ["shiphook.testing"]


    class TestEcsConformance(BackendConformance):
        plugin = "ecs"
        ...

Every scenario goes through the real shiphook deployer over a real database (one through a real
`shiphook serve` and HTTP), never by calling backend methods that change anything in an order
of its own. Which scenarios apply follows only from the backend's capability flags (`kinds`,
`can_rollback`, `concurrent_runs`), and for the orchestrator's own rollback from the harness's
`make_reverting_app`: a subclass cannot override a scenario, and the plugin refuses skip markers
on them. The guide is docs/plugins.md.

PYTEST_DONT_REWRITE: backend test modules import this before pytest loads it as a plugin; every
assert here carries its own message.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import pytest
from falcon import testing as falcon_testing

from shiphook.backends import Backend
from shiphook.deployer.deployer import Deployer
from shiphook.errors import ConfigError
from shiphook.images import tag_of
from shiphook.instance import Instance, open_instance
from shiphook.plugin_manager import collect_backends, make_plugin_manager
from shiphook.server import build

T = TypeVar("T")
ADMIN_TOKEN = "shiphook-conformance-admin-token"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
SHIPHOOK = str(Path(sys.executable).parent / "shiphook")
MARKER = "SHIPHOOK_CONFORMANCE"  # the environment name job runs set
DEPLOYER = "\n[deployer]\nscan_interval = 0.2\nlease_seconds = 5\n"


# -- a real `shiphook serve` ------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    """A `shiphook serve` subprocess in its own process group."""

    process: subprocess.Popen
    url: str
    log_path: Path

    def request(
        self, method: str, path: str, body: bytes | None = None, headers=None, timeout=30.0
    ):
        """(status, headers, body) without raising on HTTP errors."""
        req = urllib.request.Request(
            self.url + path, data=body, method=method, headers=headers or {}
        )
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.status, dict(resp.headers), resp.read()
        except urllib.error.HTTPError as err:
            return err.code, dict(err.headers), err.read()

    def log(self) -> str:
        return self.log_path.read_text()

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """SIGTERM stops it as an operator would; SIGKILL kills it and its deployer at once."""
        if self.process.poll() is None:
            if sig == signal.SIGKILL:
                os.killpg(self.process.pid, signal.SIGKILL)
            else:
                self.process.send_signal(sig)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        with contextlib.suppress(ProcessLookupError):  # nothing of it may outlive the test
            os.killpg(self.process.pid, signal.SIGKILL)


def start_server(
    config: Path,
    log_path: Path,
    env: dict[str, str],
    preexec: Callable[[], None] | None = None,
) -> Server:
    """`shiphook serve` on a free loopback port, answering /healthz when returned; `preexec`
    runs in the child before it starts (e.g. to set its limits)."""
    port = free_port()
    with open(log_path, "ab") as log:  # the child keeps its own descriptor
        process = subprocess.Popen(
            [SHIPHOOK, "--config", str(config), "serve", "--port", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=log_path.parent,
            start_new_session=True,  # its own process group, deployer included
            preexec_fn=preexec,
        )
    server = Server(process, f"http://127.0.0.1:{port}", log_path)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"shiphook serve exited {process.returncode}: {server.log()}")
        try:
            if server.request("GET", "/healthz")[0] == 200:
                return server
        except OSError:
            pass
        time.sleep(0.05)
    server.stop()
    raise AssertionError(f"shiphook serve did not answer /healthz: {server.log()}")


# -- an in-process shiphook ---------------------------------------------------------------------


@dataclass
class Shiphook:
    """An instance, its deployer (threads over the real storage) and its HTTP app."""

    instance: Instance
    deployer: Deployer
    app: object

    @property
    def client(self) -> falcon_testing.TestClient:
        return falcon_testing.TestClient(self.app)

    def new_hook(self, target: str) -> str:
        return self.instance.hooks.create(target=target, name="ci").token

    def post_hook(self, token: str, body: object = None, **kwargs: Any) -> falcon_testing.Result:
        headers = {"X-Deploy-Hook-Token": token, **kwargs.pop("headers", {})}
        if isinstance(body, (bytes, str)):
            return self.client.simulate_post("/api/v1/dh", body=body, headers=headers, **kwargs)
        return self.client.simulate_post("/api/v1/dh", json=body, headers=headers, **kwargs)

    def deploy(self, token: str, body: object) -> str:
        result = self.post_hook(token, body)
        assert result.status_code == 201, result.text
        return result.json["deployment"]["id"]

    def wait_for(self, deployment_id: str, timeout: float = 10) -> dict:
        """Poll the stored deployment until it is terminal (the deployer runs in threads)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            deployment = self.instance.deployments.get(deployment_id).to_json()
            if deployment["status"] not in ("queued", "in_progress"):
                return deployment
            time.sleep(0.02)
        raise AssertionError(f"deployment {deployment_id} did not end: {deployment}")

    def close(self) -> None:
        self.deployer.stop()
        self.instance.close()


def open_shiphook(
    config: Path, *, plugin_modules: list[str] | None = None, plugin_objects=()
) -> Shiphook:
    """Open an instance on `config`, migrate it and start its deployer."""
    instance = open_instance(config, plugin_modules=plugin_modules, plugin_objects=plugin_objects)
    instance.migrate()
    app, deployer = build(instance)
    deployer.start()
    return Shiphook(instance, deployer, app)


def eventually(check: Callable[[], T], what: str, timeout: float = 60) -> T:
    """Poll `check` until it returns something truthy; its last value goes in the failure."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout:g}s: last {value!r}")
        time.sleep(0.1)


def assert_tag(image: str, tag: str) -> None:
    assert tag_of(image) == tag, f"{image} is not of tag {tag}"


def toml_table(header: str, keys: dict[str, Any]) -> str:
    lines = [f"[{header}]"]
    for key, value in keys.items():
        lines.append(f"{json.dumps(key)} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    """JSON's strings, numbers, booleans and arrays are TOML too; an object is an inline table."""
    if isinstance(value, dict):
        pairs = (f"{json.dumps(str(k))} = {_toml_value(v)}" for k, v in value.items())
        return "{" + ", ".join(pairs) + "}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(map(_toml_value, value)) + "]"
    return json.dumps(value)


@contextlib.contextmanager
def silent_orchestrator() -> Iterator[str]:
    """`host:port` of a loopback socket that accepts connections and never answers."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        host, port = listener.getsockname()
        yield f"{host}:{port}"


@dataclass(frozen=True)
class JobRun:
    """What one job run ran: its image and the environment its workload saw."""

    image: str
    env: dict[str, str]


class _Crash(BaseException):
    """The deployer's process dies here (what no `except Exception` catches)."""


# -- the harness ----------------------------------------------------------------------------------


class BackendConformance:
    """Subclass it as `Test<Name>Conformance` and fill in what your orchestrator needs.

    Class attributes name the backend and the image tags of the workloads the harness makes;
    methods make fresh workloads and read back what the orchestrator runs. Methods about jobs are
    only called when the backend's `kinds` has "job" (likewise apps). Helper fixtures of your own
    go in an autouse fixture of the subclass; `self.tmp_path` is the test's directory.
    """

    plugin: ClassVar[str]
    """The backend's `name`, as `plugin = "..."` in a config selects it."""
    plugin_modules: ClassVar[tuple[str, ...]] = ()
    """Plugin modules to load by name (`SHIPHOOK_PLUGINS`) when the plugin is not installed
    with an entry point; the `shiphook serve` subprocess gets the tests' `sys.path`."""
    rollout_timeout: ClassVar[float] = 120
    """The targets' `rollout_timeout`: above what the orchestrator needs for one rollout."""

    initial_tag: ClassVar[str] = ""
    """The tag a fresh app runs."""
    healthy_tag: ClassVar[str] = ""
    """Another tag of the same repository that starts and stays healthy."""
    failing_tag: ClassVar[str] = ""
    """A tag of the same repository whose workload fails to start or turns unhealthy."""
    failing_reason: ClassVar[str] = ""
    """Part of the orchestrator's message about `failing_tag`, e.g. "exit code 1"."""
    other_failing_tag: ClassVar[str] = ""
    """Another tag of the same repository whose workload fails as `failing_tag`'s does."""
    stalling_tag: ClassVar[str] = ""
    """A tag of the same repository whose rollout neither completes nor fails (its instances
    start and never turn healthy, or stay pending) until something ends it."""
    stall_timeout: ClassVar[float] = 10
    """The `rollout_timeout` of the targets that a rollout of `stalling_tag` or a run of
    `stalling_job_tag` stalls on: the rollback that follows, and the run after the stalled
    one, have as long to complete."""

    job_tag: ClassVar[str] = ""
    """The tag a fresh job runs; its workload prints its environment and exits with $EXIT."""
    other_job_tag: ClassVar[str] = ""
    """Another tag of the job's repository that also runs and succeeds."""
    job_variable: ClassVar[tuple[str, str]] = ("", "")
    """A variable the job of `make_job` defines itself, and its value."""
    failing_run_env: ClassVar[dict[str, str]] = {"EXIT": "3"}
    """Overrides that make a job run fail."""
    failing_run_reason: ClassVar[str] = ""
    """Part of the orchestrator's message about such a failed run."""
    stalling_job_tag: ClassVar[str] = ""
    """A tag of the job's repository whose run neither ends nor fails."""

    tmp_path: Path

    # -- what the backend's author writes --------------------------------------------------

    def backend_options(self) -> dict[str, Any]:
        """The keys of `[backends.<name>]` that reach the orchestrator under test."""
        raise NotImplementedError

    def unreachable_options(self) -> dict[str, Any]:
        """Backend keys for an orchestrator that is not there (nothing listens)."""
        raise NotImplementedError

    def silent_options(self, address: str) -> dict[str, Any]:
        """Backend keys for an orchestrator at `address` (`127.0.0.1:port`), which accepts
        connections and never answers, with the backend's own call timeout a few seconds."""
        raise NotImplementedError

    def make_app(self) -> dict[str, Any]:
        """Make a fresh app workload running `initial_tag`; return its target keys."""
        raise NotImplementedError

    def make_patient_app(self) -> dict[str, Any]:
        """`make_app`, for the scenario whose rollout stalls: where the orchestrator has a
        progress deadline of its own, it is longer than `stall_timeout` here (make_app's may
        be short, for a failing rollout to fail fast), so that shiphook's timeout passes first."""
        return self.make_app()

    def make_reverting_app(self) -> dict[str, Any] | None:
        """`make_app`'s workload, but one the orchestrator rolls back on its own when a
        rollout fails (Swarm's update failure action `rollback`, Nomad's `auto_revert`); None,
        the default, where the orchestrator never does."""
        return None

    def make_job(self) -> dict[str, Any]:
        """Make a fresh job workload on `job_tag`; return its target keys."""
        raise NotImplementedError

    def missing_workload(self, kind: str) -> dict[str, Any]:
        """Target keys of a workload of `kind` that does not exist; the orchestrator's
        not-found message names one of their values."""
        raise NotImplementedError

    def workload_image(self, options: dict[str, Any]) -> str:
        """The image the app workload is configured to run now."""
        raise NotImplementedError

    def running_images(self, options: dict[str, Any]) -> list[str]:
        """The image of each instance of the app workload that is running now."""
        raise NotImplementedError

    def workload_version(self, options: dict[str, Any]) -> str:
        """Anything that changes whenever the orchestrator changes or restarts the app
        workload (a spec digest, a container id, a generation)."""
        raise NotImplementedError

    def job_run(self, options: dict[str, Any], deployment: dict[str, Any]) -> JobRun:
        """What the run of `deployment` (as the API shows it, `backendRef` included) ran."""
        raise NotImplementedError

    def job_runs(self, options: dict[str, Any]) -> int:
        """How many runs the orchestrator has started of the job workload so far."""
        raise NotImplementedError

    def change_by_hand(self, options: dict[str, Any]) -> None:
        """Change the app workload as its operator would by hand, with the orchestrator's own
        tools and not through shiphook (set an environment variable, recreate a container),
        in effect when it returns; not back to the image that ran before the deployment."""
        raise NotImplementedError

    def changed_by_hand(self, options: dict[str, Any]) -> bool:
        """Whether the app workload still has the change `change_by_hand` made."""
        raise NotImplementedError

    # -- rules ------------------------------------------------------------------------------

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for name in vars(cls):
            if name.startswith("test_") or name == "pytestmark":
                raise TypeError(
                    f"{cls.__name__}.{name}: a conformance harness cannot override or mark "
                    "scenarios; the backend's capability flags select which ones run (and "
                    "make_reverting_app whether the orchestrator's own rollback does)"
                )
            if name in _VERDICTS:
                raise TypeError(
                    f"{cls.__name__}.{name}: a conformance harness cannot override the suite's "
                    "own machinery; give its own helpers names of their own"
                )

    @pytest.fixture(autouse=True)
    def _conformance(self, request: pytest.FixtureRequest, tmp_path: Path, monkeypatch) -> Any:
        if not request.config.pluginmanager.has_plugin("shiphook.testing"):
            pytest.fail(
                f'add pytest_plugins = ["shiphook.testing"] to the module of {type(self).__name__}',
                pytrace=False,
            )
        monkeypatch.setenv("SHIPHOOK_ADMIN_TOKEN", ADMIN_TOKEN)
        self.tmp_path = tmp_path
        self._opened: list[Shiphook] = []
        self._servers: list[Server] = []
        yield
        for server in self._servers:
            server.stop()
        for shiphook in self._opened:
            shiphook.close()

    @property
    def backend_class(self) -> type[Backend]:
        registry = collect_backends(make_plugin_manager(modules=self.plugin_modules))
        return registry.classes[self.plugin]

    def _requires(self, *, kind: str | None = None, rollback: bool = False) -> type[Backend]:
        backend = self.backend_class
        if kind is not None and kind not in backend.kinds:
            pytest.skip(f"the {self.plugin} backend runs no {kind} targets (kinds)")
        if rollback and not backend.can_rollback:
            pytest.skip(f"the {self.plugin} backend cannot roll back (can_rollback)")
        return backend

    def _config(
        self,
        targets: dict[str, dict[str, Any]],
        backend: dict[str, Any] | None = None,
        name: str = "shiphook.toml",
    ) -> Path:
        text = f'[server]\ndatabase_url = "sqlite:///{self.tmp_path}/shiphook.db"\n{DEPLOYER}\n'
        text += toml_table("backends.conformance", {"plugin": self.plugin, **(backend or {})})
        common = {"backend": "conformance", "rollout_timeout": self.rollout_timeout}
        common |= {"retry_budget": 30}
        if not self.backend_class.can_rollback:  # the default, "rollback", would be refused
            common |= {"on_failure": "leave"}
        for target, keys in targets.items():
            text += toml_table(f"targets.{target}", {**common, **keys})
        path = self.tmp_path / name
        path.write_text(text)
        return path

    def _open(self, targets: dict[str, dict[str, Any]], backend=None) -> Shiphook:
        config = self._config(targets, self.backend_options() if backend is None else backend)
        shiphook = open_shiphook(config, plugin_modules=list(self.plugin_modules))
        self._opened.append(shiphook)
        return shiphook

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
        env["SHIPHOOK_PLUGINS"] = ",".join(self.plugin_modules)
        env["SHIPHOOK_ADMIN_TOKEN"] = ADMIN_TOKEN
        return env

    def _cli(self, config: Path, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [SHIPHOOK, "--config", str(config), *args],
            capture_output=True,
            text=True,
            env=self._env(),
            cwd=self.tmp_path,
            timeout=120,
        )

    def _app(self, **keys: Any) -> dict[str, Any]:
        return {"kind": "app", **self.make_app(), **keys}

    def _job(self, **keys: Any) -> dict[str, Any]:
        return {"kind": "job", **self.make_job(), **keys}

    @staticmethod
    def _locator(target: dict[str, Any]) -> dict[str, Any]:
        """The backend's own keys of a target table (what the harness methods returned)."""
        core = {"kind", "backend", "rollout_timeout", "retry_budget", "on_failure"}
        core |= {"max_concurrent_runs", "call_timeout"}
        return {k: v for k, v in target.items() if k not in core}

    def _ended(self, shiphook: Shiphook, deployment_id: str) -> dict:
        return shiphook.wait_for(deployment_id, timeout=self.rollout_timeout + 60)

    # -- apps --------------------------------------------------------------------------------

    def test_a_new_tag_succeeds_and_the_same_tag_again_starts_no_rollout(self):
        """Through a real `shiphook serve`: POST ?wait answers when the orchestrator runs it."""
        self._requires(kind="app")
        app = self._app()
        config = self._config({"app": app}, self.backend_options())
        server = start_server(config, self.tmp_path / "serve.log", self._env())
        self._servers.append(server)
        status, _, body = server.request(
            "POST", "/api/v1/targets/app/hooks", json.dumps({"name": "ci"}).encode(), ADMIN
        )
        assert status == 201, body
        hook = {"X-Deploy-Hook-Token": json.loads(body)["hook"]["token"]}

        def post(tag: str) -> dict:
            wait = f"/api/v1/dh?wait={self.rollout_timeout + 30:g}"
            data = json.dumps({"imageTag": tag}).encode()
            status, _, answer = server.request(
                "POST", wait, data, hook, timeout=self.rollout_timeout + 60
            )
            assert status == 201, f"{status} {answer!r}\n{server.log()}"
            deployment = json.loads(answer)["deployment"]
            assert deployment["status"] == "succeeded", deployment
            return deployment

        first = post(self.healthy_tag)
        # what it rolled out, and what ran before it: the same meaning on every backend
        assert_tag(first["backendRef"]["image"], self.healthy_tag)
        assert_tag(first["previousImage"], self.initial_tag)
        locator = self._locator(app)
        assert_tag(self.workload_image(locator), self.healthy_tag)
        running = self.running_images(locator)
        assert running and {tag_of(i) for i in running} == {self.healthy_tag}, running
        version = self.workload_version(locator)
        again = post(self.healthy_tag)
        assert self.workload_version(locator) == version, "the same tag started a new rollout"
        # the ref's `image` is the one running: shiphook says so
        assert any("no rollout" in event["message"] for event in again["history"]), again
        assert_tag(again["backendRef"]["image"], self.healthy_tag)
        assert_tag(again["previousImage"], self.healthy_tag)
        running = self.running_images(locator)
        assert {tag_of(i) for i in running} == {self.healthy_tag}, running

    def test_a_failing_tag_is_rolled_back_with_the_orchestrators_reason(self):
        backend = self._requires(kind="app")
        app = self._app(on_failure="rollback")
        if not backend.can_rollback:  # refused, rather than left failed without a word
            with pytest.raises(ConfigError, match=r"targets\.app\.on_failure: .* cannot roll"):
                self._open({"app": app})
            return
        shiphook = self._open({"app": app})
        answer = shiphook.post_hook(
            shiphook.new_hook("app"),
            {"imageTag": self.failing_tag},
            params={"wait": str(self.rollout_timeout + 30)},
        )
        assert answer.status_code == 502, answer.text
        deployment = answer.json["deployment"]
        assert self.failing_reason, "set failing_reason to part of the orchestrator's message"
        assert self.failing_reason in deployment["message"], deployment
        locator = self._locator(app)
        assert deployment["status"] == "rolled_back", deployment
        self._runs_initial_tag_again(locator)

    def test_a_failing_tag_with_on_failure_leave_is_left_and_fails_again_when_sent_again(self):
        """Left as the orchestrator left it. A CI job retried on that tag then finds the image
        there: nothing rolls out, and the answer is the workload's health (a 502, not a 201
        while nothing healthy runs); even a target whose on_failure is "rollback" rolls back
        nothing it did not roll out."""
        self._requires(kind="app")
        app = self._app(on_failure="leave")
        retry = {k: v for k, v in app.items() if k != "on_failure"}  # the default
        shiphook = self._open({"app": app, "retry": retry})
        wait = {"wait": str(self.rollout_timeout + 30)}
        body = {"imageTag": self.failing_tag}
        answer = shiphook.post_hook(shiphook.new_hook("app"), body, params=wait)
        assert answer.status_code == 502, answer.text
        deployment = answer.json["deployment"]
        assert deployment["status"] == "failed", deployment
        assert self.failing_reason in deployment["message"], deployment
        locator = self._locator(app)
        assert_tag(self.workload_image(locator), self.failing_tag)

        version = self.workload_version(locator)
        answer = shiphook.post_hook(shiphook.new_hook("retry"), body, params=wait)
        assert answer.status_code == 502, answer.text
        again = answer.json["deployment"]
        assert again["status"] == "failed", again
        assert any("no rollout" in event["message"] for event in again["history"]), again
        assert_tag(again["backendRef"]["image"], self.failing_tag)
        assert_tag(again["previousImage"], self.failing_tag)
        assert self.failing_reason in again["message"], again
        assert again["message"].endswith("it ran before this deployment: not rolled back"), again
        assert self.workload_version(locator) == version, "the same tag started a new rollout"
        assert_tag(self.workload_image(locator), self.failing_tag)

    def test_a_rollout_the_orchestrator_rolls_back_itself_is_rolled_back_once(self):
        """The orchestrator undoes the failed rollout on its own: the deployment ends
        rolled_back with the orchestrator's reason, and shiphook asks for no rollback of its
        own (which would swap the workload a second time)."""
        self._requires(kind="app")
        reverting = self.make_reverting_app()
        if reverting is None:
            pytest.skip(
                f"the {self.plugin} harness makes no app that its orchestrator rolls back on its "
                "own: implement make_reverting_app where it can"
            )
        app = {"kind": "app", **reverting}
        shiphook = self._open({"app": app})
        calls, _ = self._before_first(shiphook, "rollback", lambda: None)
        deployment_id = shiphook.deploy(shiphook.new_hook("app"), {"imageTag": self.failing_tag})
        deployment = self._ended(shiphook, deployment_id)
        assert deployment["status"] == "rolled_back", deployment
        assert self.failing_reason in deployment["message"], deployment
        # with can_rollback false nothing would call it: the history says what shiphook did
        assert calls == [], "shiphook rolled back what the orchestrator had rolled back"
        steps = [event["message"] for event in deployment["history"]]
        assert not any(step.startswith("rolling back: ") for step in steps), steps
        locator = self._locator(app)
        self._runs_initial_tag_again(locator)

    @pytest.mark.parametrize("on_failure", ["rollback", "leave"])
    def test_a_rollout_that_stalls_past_rollout_timeout_fails_and_follows_on_failure(
        self, on_failure
    ):
        """The orchestrator neither completes nor fails the rollout of `stalling_tag`: once the
        target's rollout_timeout has passed, the deployment fails for it, and the app is
        rolled back to the image it ran before, or left on the stalled rollout."""
        self._requires(kind="app", rollback=on_failure == "rollback")
        if not self.stalling_tag:
            pytest.fail("set stalling_tag to a tag whose rollout stalls", pytrace=False)
        app = {"kind": "app", **self.make_patient_app(), "on_failure": on_failure}
        shiphook = self._open({"app": app | {"rollout_timeout": self.stall_timeout}})
        answer = shiphook.post_hook(
            shiphook.new_hook("app"),
            {"imageTag": self.stalling_tag},
            params={"wait": str(2 * self.stall_timeout + 30)},
        )
        assert answer.status_code == 502, answer.text
        deployment = answer.json["deployment"]
        timed_out = f"did not finish within {self.stall_timeout:g}s"
        assert deployment["message"].startswith(timed_out), deployment
        locator = self._locator(app)
        if on_failure == "leave":
            assert deployment["status"] == "failed", deployment
            left = "; left as it is (on_failure = leave)"
            assert deployment["message"].endswith(left), deployment
            assert_tag(self.workload_image(locator), self.stalling_tag)
            return
        assert deployment["status"] == "rolled_back", deployment
        self._runs_initial_tag_again(locator)

    @pytest.mark.parametrize("crash", [False, True], ids=["followed", "repeated after a crash"])
    def test_a_rollback_onto_a_failure_left_in_place_fails_and_one_on_demand_recovers(self, crash):
        """A rollback restores what ran before the deployment: when that is a failure left in
        place, the restored workload is no healthier, and the deployment fails saying that its
        rollback failed (not `rolled_back`, and not another image the backend chose), also when
        the process died right after asking for the rollback and the resumed deployer asked
        again. The way back to health is the rollback on demand of the deployment left in
        place."""
        self._requires(kind="app", rollback=True)
        assert self.other_failing_tag, "set other_failing_tag to a second failing tag"
        app = self._app(on_failure="leave")
        rolling_back = {k: v for k, v in app.items() if k != "on_failure"}  # the default
        shiphook = self._open({"app": app, "rolling-back": rolling_back})
        wait = {"wait": str(2 * self.rollout_timeout + 30)}
        answer = shiphook.post_hook(
            shiphook.new_hook("app"), {"imageTag": self.failing_tag}, params=wait
        )
        left = answer.json["deployment"]
        assert left["status"] == "failed", answer.text
        locator = self._locator(app)
        assert_tag(self.workload_image(locator), self.failing_tag)

        calls = self._crash_once(shiphook, "rollback") if crash else None
        answer = shiphook.post_hook(
            shiphook.new_hook("rolling-back"), {"imageTag": self.other_failing_tag}, params=wait
        )
        if crash:
            assert calls == ["rollback", "rollback"], calls
        assert answer.status_code == 502, answer.text
        deployment = answer.json["deployment"]
        assert deployment["status"] == "failed", deployment
        assert "; rollback failed: " in deployment["message"], deployment
        steps = [event["message"] for event in deployment["history"]]
        assert any(step.startswith("rolling back: ") for step in steps), steps
        assert_tag(self.workload_image(locator), self.failing_tag)

        self._roll_back_on_demand(shiphook, left["id"], locator)

    def test_a_workload_changed_by_hand_before_the_rollback_is_not_rolled_back(self):
        """Someone changed the workload after the rollout failed, just before shiphook asks for
        the rollback (`change_by_hand`): a rollback would undo their change too, so the backend
        refuses it, the workload keeps their change, and the deployment fails with the
        rollout's reason and the backend's ("...; not rolled back: ...")."""
        self._requires(kind="app", rollback=True)
        if type(self).change_by_hand is BackendConformance.change_by_hand:
            pytest.fail("implement change_by_hand and changed_by_hand", pytrace=False)
        app = self._app(on_failure="rollback")
        shiphook = self._open({"app": app})
        locator = self._locator(app)
        calls, raised = self._before_first(
            shiphook, "rollback", lambda: self.change_by_hand(locator)
        )
        deployment_id = shiphook.deploy(shiphook.new_hook("app"), {"imageTag": self.failing_tag})
        deployment = self._ended(shiphook, deployment_id)
        if raised:
            raise raised[0]
        assert calls == ["rollback"], calls
        assert deployment["status"] == "failed", deployment
        assert self.failing_reason in deployment["message"], deployment
        assert "; not rolled back: " in deployment["message"], deployment
        assert self.changed_by_hand(locator), "the rollback undid the change made by hand"

    def test_rollback_on_demand_returns_to_the_image_that_succeeded_before(self):
        self._requires(kind="app")
        app = self._app()
        shiphook = self._open({"app": app})
        first = shiphook.deploy(shiphook.new_hook("app"), {"imageTag": self.healthy_tag})
        assert self._ended(shiphook, first)["status"] == "succeeded"
        self._roll_back_on_demand(shiphook, first, self._locator(app))

    def _roll_back_on_demand(
        self, shiphook: Shiphook, deployment_id: str, locator: dict[str, Any]
    ) -> None:
        """The admin rolls `deployment_id` back: the app runs `initial_tag` again."""
        answer = shiphook.client.simulate_post(
            f"/api/v1/deployments/{deployment_id}/rollback", headers=ADMIN
        )
        assert answer.status_code == 201, answer.text
        rollback = answer.json["deployment"]
        assert rollback["imageTag"] == self.initial_tag, rollback
        assert self._ended(shiphook, rollback["id"])["status"] == "succeeded"
        self._runs_initial_tag_again(locator)

    def _runs_initial_tag_again(self, locator: dict[str, Any]) -> None:
        """The app is configured with `initial_tag` again, and every instance soon runs it."""
        assert_tag(self.workload_image(locator), self.initial_tag)
        eventually(
            lambda: {tag_of(i) for i in self.running_images(locator)} == {self.initial_tag},
            f"the app running {self.initial_tag} again",
        )

    def test_a_missing_workload_fails_at_once_with_the_orchestrators_message(self):
        kind = "app" if "app" in self.backend_class.kinds else "job"
        missing = self.missing_workload(kind)
        # a retry budget no test waits out: a failure within the test's time had no retries
        shiphook = self._open({"gone": {"kind": kind, **missing, "retry_budget": 3600}})
        body = {"imageTag": self.healthy_tag} if kind == "app" else {}
        deployment = self._ended(shiphook, shiphook.deploy(shiphook.new_hook("gone"), body))
        assert deployment["status"] == "failed", deployment
        assert "gave up" not in deployment["message"], deployment
        names = [str(v) for v in missing.values() if isinstance(v, str)]
        assert any(name in deployment["message"] for name in names), (names, deployment)

    def test_a_rollback_repeated_after_a_crash_rolls_back_once_with_the_rollouts_reason(self):
        """The process dies right after the orchestrator accepted the rollback, before shiphook
        stored its reference; the resumed deployer asks for the rollback again, which must find
        the first, and the deployment ends rolled back for the rollout's own reason (not one the
        rollback's changes seem to give)."""
        self._requires(kind="app", rollback=True)
        app = self._app(on_failure="rollback")
        shiphook = self._open({"app": app})
        calls = self._crash_once(shiphook, "rollback")
        deployment_id = shiphook.deploy(shiphook.new_hook("app"), {"imageTag": self.failing_tag})
        deployment = self._ended(shiphook, deployment_id)
        assert calls == ["rollback", "rollback"], calls
        assert deployment["status"] == "rolled_back", deployment
        assert self.failing_reason in deployment["message"], deployment
        locator = self._locator(app)
        self._runs_initial_tag_again(locator)

    def test_a_deploy_repeated_after_a_crash_rolls_out_once(self):
        """The process dies right after the orchestrator accepted `deploy`, before shiphook
        stored its reference; the resumed deployer calls `deploy` again for the same id."""
        backend = self._requires(kind="app")
        app = self._app()
        shiphook = self._open({"app": app})
        locator = self._locator(app)
        rolled_out: list[str] = []  # the workload's version once the first call returned
        calls = self._crash_once(
            shiphook, "deploy", then=lambda: rolled_out.append(self.workload_version(locator))
        )
        tag = self.failing_tag if backend.can_rollback else self.healthy_tag
        deployment_id = shiphook.deploy(shiphook.new_hook("app"), {"imageTag": tag})
        deployment = self._ended(shiphook, deployment_id)
        assert calls == [deployment_id, deployment_id], calls
        if not backend.can_rollback:
            assert deployment["status"] == "succeeded", deployment
            assert_tag(self.workload_image(locator), self.healthy_tag)
            assert rolled_out == [self.workload_version(locator)], "a second rollout"
            return
        # the repeated call followed the first rollout: its rollback returns to what ran before
        assert deployment["status"] == "rolled_back", deployment
        assert self.failing_reason in deployment["message"], deployment
        assert_tag(self.workload_image(locator), self.initial_tag)

    # -- jobs ------------------------------------------------------------------------------------

    def test_a_job_run_sees_its_overrides_and_the_next_run_does_not(self):
        """An override, also of a variable the job defines itself (`job_variable`), holds for
        that run only: the next run without it sees the job's own value again (in its
        environment, or where the orchestrator passes runs their variables when
        `run_env_as_given` is false)."""
        self._requires(kind="job")
        name, own = self.job_variable
        assert name, "set job_variable to a variable the job of make_job() defines, and its value"
        job = self._job()
        shiphook = self._open({"job": job})
        token = shiphook.new_hook("job")
        overrides = self._run_body({MARKER: "first", name: "overridden"})
        first = self._ended(shiphook, shiphook.deploy(token, overrides))
        assert first["status"] == "succeeded", first
        seen = self.job_run(self._locator(job), first).env
        assert seen.get(MARKER) == "first", seen
        assert seen.get(name) == "overridden", seen
        second = self._ended(shiphook, shiphook.deploy(token, {}))
        assert second["status"] == "succeeded", second
        seen = self.job_run(self._locator(job), second).env
        assert MARKER not in seen, seen
        assert seen.get(name) == own, seen

    def test_a_job_runs_image_tag_applies_to_that_run_only(self):
        self._requires(kind="job")
        job = self._job()
        shiphook = self._open({"job": job})
        token = shiphook.new_hook("job")
        first = shiphook.deploy(token, {"imageTag": self.other_job_tag})
        first_run = self._ended(shiphook, first)
        assert first_run["status"] == "succeeded", first_run
        assert_tag(self.job_run(self._locator(job), first_run).image, self.other_job_tag)
        assert_tag(first_run["backendRef"]["image"], self.other_job_tag)
        # what `shiphook check` shows the job running is its own image, not that run's
        target = shiphook.instance.config.targets["job"]
        assert_tag(shiphook.instance.backends[target.backend].describe(target).image, self.job_tag)
        second = self._ended(shiphook, shiphook.deploy(token, {}))
        assert second["status"] == "succeeded", second
        assert_tag(self.job_run(self._locator(job), second).image, self.job_tag)
        assert_tag(second["backendRef"]["image"], self.job_tag)

    def test_a_failing_job_run_fails_with_the_orchestrators_reason(self):
        self._requires(kind="job")
        shiphook = self._open({"job": self._job()})
        body = self._run_body(self.failing_run_env)
        run = self._ended(shiphook, shiphook.deploy(shiphook.new_hook("job"), body))
        assert run["status"] == "failed", run
        assert self.failing_run_reason, (
            "set failing_run_reason to part of the orchestrator's message"
        )
        assert self.failing_run_reason in run["message"], run

    def test_concurrent_runs_only_where_the_backend_allows_them(self):
        backend = self._requires(kind="job")
        job = self._job(max_concurrent_runs=2)
        if not backend.concurrent_runs:
            with pytest.raises(ConfigError, match="max_concurrent_runs"):
                self._open({"job": job})
            return
        shiphook = self._open({"job": job})
        token = shiphook.new_hook("job")
        ids = [shiphook.deploy(token, self._run_body({MARKER: f"run{n}"})) for n in range(2)]
        for n, deployment_id in enumerate(ids):
            run = self._ended(shiphook, deployment_id)
            assert run["status"] == "succeeded", run
            assert self.job_run(self._locator(job), run).env.get(MARKER) == f"run{n}"

    def test_a_job_run_past_rollout_timeout_fails_and_holds_up_no_later_run(self):
        """A run of `stalling_job_tag` has not ended when the target's rollout_timeout passes
        (`stall_timeout` here): the deployment fails for it, saying the run goes on (the
        contract has no call that stops one), and the next run starts and succeeds."""
        self._requires(kind="job")
        if not self.stalling_job_tag:
            pytest.fail("set stalling_job_tag to a tag whose job run never ends", pytrace=False)
        job = self._job(rollout_timeout=self.stall_timeout)
        shiphook = self._open({"job": job})
        token = shiphook.new_hook("job")
        stalled = self._ended(shiphook, shiphook.deploy(token, {"imageTag": self.stalling_job_tag}))
        assert stalled["status"] == "failed", stalled
        timed_out = f"did not finish within {self.stall_timeout:g}s"
        assert stalled["message"].startswith(timed_out), stalled
        assert "; the run is not stopped: " in stalled["message"], stalled
        after = self._ended(shiphook, shiphook.deploy(token, self._run_body({MARKER: "after"})))
        assert after["status"] == "succeeded", after
        assert self.job_run(self._locator(job), after).env.get(MARKER) == "after"

    def test_a_job_run_repeated_after_a_crash_runs_once(self):
        self._requires(kind="job")
        job = self._job()
        shiphook = self._open({"job": job})
        before = self.job_runs(self._locator(job))
        calls = self._crash_once(shiphook, "run_job")
        body = self._run_body({MARKER: "once"})
        run = self._ended(shiphook, shiphook.deploy(shiphook.new_hook("job"), body))
        assert calls == [run["id"], run["id"]], calls
        assert run["status"] == "succeeded", run
        runs = self.job_runs(self._locator(job))
        assert runs == before + 1, f"{runs - before} runs of one deployment"
        assert self.job_run(self._locator(job), run).env.get(MARKER) == "once"

    # -- an orchestrator that does not answer ------------------------------------------------

    def test_calls_return_within_the_backends_timeout_when_the_orchestrator_does_not_answer(
        self,
    ):
        backend = self.backend_class
        kind = "app" if "app" in backend.kinds else "job"
        with silent_orchestrator() as address:
            options = self.silent_options(address)
            # the deployer's own limit far away: the backend must give up by itself
            target = {"kind": kind, **self.missing_workload(kind), "retry_budget": 0}
            target["call_timeout"] = 3600
            shiphook = self._open({"silent": target}, backend=options)
            body = {"imageTag": self.healthy_tag} if kind == "app" else {}
            deployment = self._ended(shiphook, shiphook.deploy(shiphook.new_hook("silent"), body))
            # the backend gave up on its own (a transient error, no budget left to retry it)
            assert deployment["status"] == "failed", deployment
            assert deployment["message"].startswith("gave up after 1 attempt and"), deployment
            stopped = threading.Thread(target=shiphook.deployer.stop)
            stopped.start()
            stopped.join(60)
            assert not stopped.is_alive(), "a deployer thread still waits on the orchestrator"
            checked = self._cli(self._config({}, options, "silent.toml"), "check")
        self._assert_check_fails_in_one_line(checked)

    def test_deployments_to_an_unreachable_orchestrator_are_retried_then_give_up(self):
        """An orchestrator that is not there is a transient error, on every call: retried
        within `retry_budget`, then the deployment fails saying so (not at once, as for a
        workload that is not there)."""
        kinds = sorted(self.backend_class.kinds)
        targets = {kind: {"kind": kind, **self.missing_workload(kind)} for kind in kinds}
        for target in targets.values():
            target["retry_budget"] = 1  # the first backoff is 0.25 to 0.5 s: a retry or more
        shiphook = self._open(targets, backend=self.unreachable_options())
        for kind in kinds:
            body = {"imageTag": self.healthy_tag} if kind == "app" else {}
            deployment = self._ended(shiphook, shiphook.deploy(shiphook.new_hook(kind), body))
            assert deployment["status"] == "failed", deployment
            assert re.match(r"gave up after [2-9] attempts", deployment["message"]), deployment

    def test_check_against_an_unreachable_orchestrator_fails_in_one_line(self):
        checked = self._cli(self._config({}, self.unreachable_options()), "check")
        self._assert_check_fails_in_one_line(checked)

    # -- helpers of the scenarios ------------------------------------------------------------

    def _assert_check_fails_in_one_line(self, checked: subprocess.CompletedProcess) -> None:
        assert checked.returncode == 1, checked
        prefix = f"backend conformance ({self.plugin}): UNREACHABLE: "
        last = checked.stdout.splitlines()[-1]  # no targets: nothing follows the backend's line
        assert last.startswith(prefix) and len(last) > len(prefix), checked
        assert "Traceback" not in checked.stdout + checked.stderr, checked

    @staticmethod
    def _run_body(env: dict[str, str]) -> dict:
        return {"instanceEnvironmentVariables": [{"name": k, "value": v} for k, v in env.items()]}

    @staticmethod
    def _crash_once(
        shiphook: Shiphook, method: str, then: Callable[[], object] = lambda: None
    ) -> list[str]:
        """Make the first call of `method` kill its deployer thread after the orchestrator
        accepted it (and `then` looked at it), and the backend object with it: the resumed
        deployer calls a new one, which knows only what the stored reference and the
        orchestrator say, as after a restart. Return the deployment id of every call."""
        backends = shiphook.instance.backends
        calls: list[str] = []

        def crashing(backend: Backend, *args: Any, **kwargs: Any) -> Any:
            calls.append(kwargs.get("deployment_id", method))  # rollback(target, ref) has none
            ref = getattr(type(backend), method)(backend, *args, **kwargs)
            if len(calls) == 1:
                then()
                restarted = type(backend)(backend.options)
                setattr(restarted, method, functools.partial(crashing, restarted))
                backends["conformance"] = restarted  # each execution takes it when it starts
                backend.close()
                raise _Crash
            return ref

        backend = backends["conformance"]
        setattr(backend, method, functools.partial(crashing, backend))
        return calls

    @staticmethod
    def _before_first(
        shiphook: Shiphook, method: str, then: Callable[[], object]
    ) -> tuple[list[str], list[BaseException]]:
        """Make the first call of `method` run `then` before it reaches the orchestrator (in
        the deployer's thread, within the target's call_timeout). Return the name of every
        call, and what `then` raised: the harness's error, which the deployment would blame on
        the backend."""
        backend = shiphook.instance.backends["conformance"]
        real = getattr(type(backend), method)
        calls: list[str] = []
        raised: list[BaseException] = []

        @functools.wraps(real)  # the deployer knows a call by its name
        def first_then(*args: Any, **kwargs: Any) -> Any:
            calls.append(method)
            if len(calls) == 1:
                try:
                    then()
                except BaseException as exc:
                    raised.append(exc)
                    raise
            return real(backend, *args, **kwargs)

        setattr(backend, method, first_then)
        return calls, raised


# what decides a scenario's outcome, which a harness that replaced it could make pass anything
_VERDICTS = frozenset(
    {
        "_conformance",
        "_requires",
        "_ended",
        "_crash_once",
        "_before_first",
        "_roll_back_on_demand",
        "_runs_initial_tag_again",
    }
)


# -- the pytest plugin -------------------------------------------------------------------------


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Scenarios run wherever the capability flags (and `make_reverting_app`) say they apply:
    no skip marks on them."""
    for item in items:
        cls = getattr(item, "cls", None)
        if cls is None or not issubclass(cls, BackendConformance):
            continue
        for mark in item.iter_markers():
            if mark.name in ("skip", "skipif") or (
                mark.name == "xfail" and not mark.kwargs.get("strict")
            ):
                raise pytest.UsageError(
                    f"{item.nodeid}: conformance scenarios cannot be skipped (a strict xfail, "
                    "naming the fix, is the only mark allowed)"
                )
