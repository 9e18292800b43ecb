"""shiphook backend for plain Docker containers on one host (no Swarm), Watchtower-style.

A deploy recreates the target's named container from the new image, keeping its configuration;
the replaced container is kept, stopped, until the new one has run for `settle` seconds (and is
healthy, when its image has a health check), so a rollback puts it back as it was.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import Any, TypeVar

import docker
import docker.errors
import requests
from pydantic import BaseModel, ConfigDict, Field, field_validator
from shiphook import (
    Backend,
    BackendError,
    ConnectionOptions,
    Duration,
    Progress,
    Ref,
    Target,
    TargetState,
    connection_failure,
    hookimpl,
)

T = TypeVar("T")
LABEL = "io.shiphook.deployment"
# what a container inherits from its image, and must inherit from the new image instead
FROM_IMAGE = ("Cmd", "Entrypoint", "WorkingDir", "User", "Healthcheck", "StopSignal")


class DockerOptions(ConnectionOptions):
    host: str = Field("unix:///var/run/docker.sock", description="the Docker Engine to manage")
    settle: Duration = Field(10.0, description="seconds a new container runs to count as up")

    @field_validator("host")
    @classmethod
    def _holds_no_credentials(cls, value: str) -> str:
        if re.match(r"\w+://[^/]*@", value):  # they would be quoted wherever the host is
            raise ValueError("a host holds no credentials (the Engine API takes TLS client keys)")
        return value


class DockerTargetOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    container: str = Field(min_length=1, description="the container's name")


DockerTarget = Target[DockerTargetOptions]


class DockerBackend(Backend):
    name = "docker"
    description = "plain Docker containers on one host, recreated with the new image"
    Options = DockerOptions
    TargetOptions = DockerTargetOptions
    kinds = frozenset({"app"})
    can_rollback = True

    def __init__(self, options: DockerOptions) -> None:
        super().__init__(options)
        self.poll_interval = options.poll_interval
        self._api: docker.APIClient | None = None

    def call(self, function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        with self.errors():
            if self._api is None:  # made on first use: shiphook starts while Docker is down
                self._api = docker.APIClient(self.options.host, timeout=self.options.timeout)
            return function(self._api, *args, **kwargs)

    @contextmanager
    def errors(self) -> Iterator[None]:
        try:
            yield
        except docker.errors.APIError as exc:
            message = (exc.explanation or str(exc)).strip()
            raise BackendError(message, transient=(exc.status_code or 0) >= 500) from None
        except (requests.exceptions.RequestException, docker.errors.DockerException) as exc:
            raise BackendError(
                f"{self.options.host}: {connection_failure(exc)}", transient=True
            ) from None

    def close(self) -> None:
        if self._api is not None:
            self._api.close()

    def inspect(self, container: str) -> dict[str, Any]:
        return self.call(lambda api: api.inspect_container(container))

    def remove(self, container: str) -> None:
        def remove(api: docker.APIClient) -> None:
            with suppress(docker.errors.NotFound):  # an earlier call removed it
                api.remove_container(container, force=True)

        self.call(remove)

    def check(self) -> str:
        version = self.call(lambda api: api.version())
        return f"Docker Engine {version.get('Version')} (API {version.get('ApiVersion')})"

    def describe(self, target: DockerTarget) -> TargetState:
        return TargetState(image=self.inspect(target.options.container)["Config"]["Image"])

    def deploy(self, target: DockerTarget, *, image_tag: str, deployment_id: str) -> Ref:
        name = target.options.container
        new_name, old_name = f"{name}-{deployment_id}", f"{name}-{deployment_id}-old"
        try:
            current = self.inspect(name)
        except BackendError:
            current = self.inspect(new_name)  # a crash left it between the renames below
        labels = current["Config"]["Labels"] or {}
        if labels.get(LABEL) == deployment_id:  # an earlier call for this deployment did it
            if current["Name"] != f"/{name}":
                self.call(lambda api: api.rename(current["Id"], name))
            return self.ref(current, labels[f"{LABEL}.replaced"])
        image = current["Config"]["Image"]
        wanted = f"{image.split('@')[0].rsplit(':', 1)[0]}:{image_tag}"
        if wanted == image:
            return {"container": current["Id"], "image": image, "unchanged": True}
        try:
            new = self.inspect(new_name)  # an earlier call made it, then the process died
        except BackendError:
            config = self.recreated(current, wanted, {LABEL: deployment_id})
            config["Labels"][f"{LABEL}.replaced"] = current["Id"]
            new = self.call(lambda api: api.create_container_from_config(config, new_name))
        self.call(lambda api: api.stop(current["Id"]))
        self.call(lambda api: api.rename(current["Id"], old_name))
        self.call(lambda api: api.rename(new["Id"], name))
        self.call(lambda api: api.start(new["Id"]))
        return self.ref(self.inspect(new["Id"]), current["Id"])

    def ref(self, container: dict[str, Any], replaced: str) -> Ref:
        image = container["Config"]["Image"]
        return {"container": container["Id"], "image": image, "replaced": replaced} | {
            "started": time.time()  # the settle period counts from here, also after a restart
        }

    def recreated(self, old: dict[str, Any], image: str, labels: dict[str, str]) -> dict:
        """The old container's configuration on `image`, minus what it had from its image."""
        config = dict(old["Config"])
        defaults = self.call(lambda api: api.inspect_image(old["Image"]))["Config"]
        for key in FROM_IMAGE:
            if config.get(key) == defaults.get(key):
                config.pop(key, None)
        config["Env"] = [e for e in config.get("Env") or () if e not in (defaults["Env"] or ())]
        inherited = defaults.get("Labels") or {}
        config["Labels"] = {
            k: v for k, v in (config.get("Labels") or {}).items() if inherited.get(k) != v
        } | labels
        if config.get("Hostname") == old["Id"][:12]:
            config.pop("Hostname")  # Docker's default: the new container gets its own
        return config | {"Image": image, "HostConfig": old["HostConfig"]}

    def progress(self, target: DockerTarget, ref: Ref) -> Progress:
        """A rollout and a rollback alike: up once the container has run `settle` seconds."""
        state = self.inspect(ref["container"])["State"]
        health = (state.get("Health") or {}).get("Status")
        if state["Status"] in ("exited", "dead") or state.get("Restarting"):
            why = f": {state['Error']}" if state.get("Error") else ""
            return Progress("failed", f"the container exited with code {state['ExitCode']}{why}")
        if health == "unhealthy":
            log = (state["Health"].get("Log") or [{}])[-1].get("Output", "").strip()
            which = "restored" if ref.get("op") == "rollback" else "new"
            return Progress("failed", f"the {which} container is unhealthy: {log}")
        if ref.get("unchanged") and state["Running"]:  # no rollout: its health is the answer
            return Progress("succeeded", f"{target.options.container} already runs {ref['image']}")
        started = time.time() - ref.get("started", time.time())
        if not state["Running"] or health == "starting" or started < self.options.settle:
            return Progress("running", f"container {state['Status']}, health {health or 'none'}")
        if "replaced" in ref:
            self.remove(ref["replaced"])  # kept until the new container proved itself
        return Progress("succeeded", f"{ref['image']} up, health {health or 'none'}")

    def rollback(self, target: DockerTarget, ref: Ref) -> Ref:
        name = target.options.container
        restored = ref["container"] if ref.get("unchanged") else ref["replaced"]
        try:
            current = self.inspect(name)["Id"]
        except BackendError as exc:
            if exc.transient:
                raise
            current = None  # a crash between the removal and the rename below
        if current not in (ref["container"], restored, None):
            raise BackendError(
                f"container {name} is {current[:12]}, not {ref['container'][:12]} as this "
                "deployment left it: something else replaced it, so it is not rolled back"
            )
        if current != restored:
            if ref["container"] != restored:
                self.remove(ref["container"])
            self.call(lambda api: api.rename(restored, name))
        self.call(lambda api: api.start(restored))
        image = self.inspect(restored)["Config"]["Image"]
        return {"op": "rollback", "container": restored, "image": image, "started": time.time()}


@hookimpl
def register_backends(register: Callable[[type[Backend]], None]) -> None:
    register(DockerBackend)
