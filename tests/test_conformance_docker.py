"""The conformance suite against examples/shiphook_docker, the third-party example plugin, on
plain containers of the tests' private dockerd (tests/swarm_support.py's `engine` fixture)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import docker
import docker.errors
import pytest
from conftest import write_config
from dockerd import APP
from shiphook import BackendError, Target
from shiphook.testing import BackendConformance, eventually
from shiphook_docker import DockerBackend, DockerOptions, DockerTargetOptions
from swarm_support import Engine

pytest_plugins = ["shiphook.testing", "swarm_support"]


class TestDockerConformance(BackendConformance):
    plugin = "docker"
    rollout_timeout = 60
    initial_tag = "v1"
    healthy_tag = "v2"
    failing_tag = "broken-later"  # a container is up only once it has run `settle` seconds
    failing_reason = "exited with code 1"
    other_failing_tag = "also-broken"
    stalling_tag = "stalled"  # its health stays "starting"

    @pytest.fixture(autouse=True)
    def _docker(self, engine: Engine) -> Iterator[None]:
        self.engine = engine
        self.prefix = f"shiphook-test-ctr-{uuid.uuid4().hex[:8]}"
        yield
        client = engine.client()
        for container in client.containers(all=True, filters={"name": self.prefix}):
            client.remove_container(container["Id"], force=True)

    @property
    def client(self) -> docker.APIClient:
        return self.engine.client()

    def backend_options(self) -> dict[str, Any]:
        # settle well above the half second `failing_tag` runs before it fails
        return {"host": self.engine.host, "timeout": 10, "settle": 2, "poll_interval": 0.2}

    def unreachable_options(self) -> dict[str, Any]:
        return {"host": f"unix://{self.tmp_path}/no-docker.sock", "timeout": 5}

    def silent_options(self, address: str) -> dict[str, Any]:
        return {"host": f"tcp://{address}", "timeout": 2}

    def make_app(self) -> dict[str, Any]:
        name = f"{self.prefix}-{uuid.uuid4().hex[:6]}"
        self._create(name, self.initial_tag, {"GREETING": "kept"})
        return {"container": name}

    def _create(self, name: str, tag: str, environment: dict[str, str]) -> str:
        host_config = self.client.create_host_config(network_mode="none")
        made = self.client.create_container(
            f"{APP}:{tag}",
            name=name,
            host_config=host_config,
            environment=environment,
            stop_signal="SIGKILL",
        )
        self.client.start(made["Id"])
        eventually(lambda: self.client.inspect_container(name)["State"]["Running"], "running")
        return made["Id"]

    def missing_workload(self, kind: str) -> dict[str, Any]:
        return {"container": f"{self.prefix}-missing"}

    def workload_image(self, options: dict[str, Any]) -> str:
        return self.client.inspect_container(options["container"])["Config"]["Image"]

    def running_images(self, options: dict[str, Any]) -> list[str]:
        try:
            container = self.client.inspect_container(options["container"])
        except docker.errors.NotFound:
            return []
        return [container["Config"]["Image"]] if container["State"]["Running"] else []

    def workload_version(self, options: dict[str, Any]) -> str:
        return self.client.inspect_container(options["container"])["Id"]

    def change_by_hand(self, options: dict[str, Any]) -> None:  # docker rm -f, docker run
        self.client.remove_container(options["container"], force=True)
        hotfix = {"GREETING": "kept", "HOTFIX": "1"}
        self.made_by_hand = self._create(options["container"], self.healthy_tag, hotfix)

    def changed_by_hand(self, options: dict[str, Any]) -> bool:
        return self.workload_version(options) == self.made_by_hand


def test_a_recreated_container_keeps_its_configuration(engine, harness_factory, tmp_path):
    """What the suite cannot know: the environment, host config and stop signal the container
    was created with are on its replacement, and the command is the new image's own."""
    client = engine.client()
    name = f"shiphook-test-ctr-{uuid.uuid4().hex[:8]}"
    client.create_container(
        f"{APP}:v1",
        name=name,
        host_config=client.create_host_config(network_mode="none"),
        environment={"GREETING": "kept"},
        stop_signal="SIGKILL",
    )
    client.start(name)
    config = write_config(
        tmp_path,
        f"""
        [server]
        database_url = "sqlite:///{tmp_path}/shiphook.db"
        [backends.local]
        plugin = "docker"
        host = "{engine.host}"
        settle = 1
        [targets.web]
        kind = "app"
        backend = "local"
        container = "{name}"
        """,
    )
    try:
        harness = harness_factory(config)
        token = harness.new_hook("web")
        deployment = harness.wait_for(harness.deploy(token, {"imageTag": "v2"}), timeout=60)
        assert deployment["status"] == "succeeded", deployment
        after = client.inspect_container(name)
        assert after["Config"]["Image"] == f"{APP}:v2"
        assert "GREETING=kept" in after["Config"]["Env"]
        assert after["Config"]["Cmd"] == ["/bin/busybox", "sleep", "86401"]  # v2's, not v1's
        assert after["Config"]["StopSignal"] == "SIGKILL"
        assert after["HostConfig"]["NetworkMode"] == "none"
        assert [c["Names"] for c in client.containers(all=True, filters={"name": name})] == [
            [f"/{name}"]
        ]  # the replaced container is gone once the new one proved itself
    finally:
        for container in client.containers(all=True, filters={"name": name}):
            client.remove_container(container["Id"], force=True)


def test_a_replacement_that_turns_unhealthy_is_swapped_back_for_the_old_container(
    engine, harness_factory, tmp_path
):
    client = engine.client()
    name = f"shiphook-test-ctr-{uuid.uuid4().hex[:8]}"
    client.create_container(
        f"{APP}:v1",
        name=name,
        host_config=client.create_host_config(network_mode="none"),
        stop_signal="SIGKILL",
        healthcheck={  # healthy while the container runs v1's command (sleep 86400)
            "Test": ["CMD", "/bin/busybox", "grep", "-q", "86400", "/proc/1/cmdline"],
            "Interval": 200_000_000,
            "Retries": 1,
        },
    )
    client.start(name)
    old = client.inspect_container(name)["Id"]
    config = write_config(
        tmp_path,
        f"""
        [server]
        database_url = "sqlite:///{tmp_path}/shiphook.db"
        [backends.local]
        plugin = "docker"
        host = "{engine.host}"
        settle = 0
        [targets.web]
        kind = "app"
        backend = "local"
        container = "{name}"
        """,
    )
    try:
        harness = harness_factory(config)
        token = harness.new_hook("web")
        deployment = harness.wait_for(harness.deploy(token, {"imageTag": "v2"}), timeout=60)
        assert deployment["status"] == "rolled_back", deployment
        assert "the new container is unhealthy" in deployment["message"]
        restored = client.inspect_container(name)
        assert restored["Id"] == old
        assert restored["State"]["Running"]
        assert len(client.containers(all=True, filters={"name": name})) == 1
    finally:
        for container in client.containers(all=True, filters={"name": name}):
            client.remove_container(container["Id"], force=True)


def test_a_host_with_credentials_is_refused_without_quoting_them():
    from shiphook_docker import DockerOptions

    for host in ("tcp://s3cret@127.0.0.1:2375", "ssh://user:s3cret@127.0.0.1"):
        with pytest.raises(ValueError, match="a host holds no credentials"):
            DockerOptions(host=host)


def test_a_rollback_of_a_container_replaced_since_is_refused_and_changes_nothing(engine):
    """Someone recreated the container after the deploy: the rollback says so and leaves it."""
    client = engine.client()
    name = f"shiphook-test-ctr-{uuid.uuid4().hex[:8]}"

    def create() -> str:
        host_config = client.create_host_config(network_mode="none")
        made = client.create_container(f"{APP}:v1", name=name, host_config=host_config)
        client.start(made["Id"])
        return made["Id"]

    create()
    backend = DockerBackend(DockerOptions(host=engine.host, timeout=10, settle=1))
    target = Target(
        name="web", kind="app", backend="local", options=DockerTargetOptions(container=name)
    )
    try:
        ref = backend.deploy(target, image_tag="v2", deployment_id="d1")
        client.remove_container(name, force=True)
        theirs = create()
        with pytest.raises(BackendError, match="something else replaced it") as raised:
            backend.rollback(target, ref)
        assert not raised.value.transient
        assert client.inspect_container(name)["Id"] == theirs
        assert client.inspect_container(ref["replaced"])["State"]["Running"] is False
    finally:
        backend.close()
        for container in client.containers(all=True, filters={"name": name}):
            client.remove_container(container["Id"], force=True)
