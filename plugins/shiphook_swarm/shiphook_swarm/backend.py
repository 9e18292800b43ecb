"""The Docker Swarm backend.

An app target is a replicated or global Swarm service: a deploy sets `<repository>:<imageTag>` on
its container spec and Swarm's own rolling update does the rest. A job target is a
replicated-job or global-job service: a run merges environment overrides into its spec and forces
a new job iteration. It all follows the docker CLI (shared reference, orchestrators.md section 2):
read the service, change the spec locally, send the COMPLETE spec back with the `Version.Index`
just read, follow `UpdateStatus` and the tasks to the end, and roll back with the engine's own
`rollback=previous`.

Only the SDK's low-level `APIClient` is used: the high-level models cache versions and rebuild
specs, and the SDK has no call for a server-side rollback.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any, TypeVar

import docker
import docker.errors
import docker.tls
import requests
from pydantic import BaseModel, ConfigDict, Field, FilePath, field_validator, model_validator
from shiphook import (
    Backend,
    BackendError,
    ConnectionOptions,
    Flag,
    ImageRepository,
    Progress,
    Ref,
    Target,
    TargetState,
    connection_failure,
    repository_of,
)

log = logging.getLogger("shiphook.swarm")
T = TypeVar("T")

DEFAULT_HOST = "unix:///var/run/docker.sock"

# Labels shiphook writes into the service spec in the same update as its change, so that a
# repeated call for the same deployment finds the work the first one started.
LABEL_DEPLOYMENT = "io.shiphook.deployment"
LABEL_JOB_ITERATION = "io.shiphook.job-iteration"
LABEL_ENV_BASE = "io.shiphook.env-base"
LABEL_ENV_APPLIED = "io.shiphook.env-applied"
LABEL_IMAGE_BASE = "io.shiphook.image-base"
LABEL_IMAGE_APPLIED = "io.shiphook.image-applied"

UPDATE_ATTEMPTS = 5
"""How often an update answered "update out of sequence" is re-read and sent again."""

APP_MODES = {"Replicated": "replicated", "Global": "global"}
JOB_MODES = {"ReplicatedJob": "replicated-job", "GlobalJob": "global-job"}

# Task states in the order the docker CLI ranks them; above `running` a task has ended.
TASK_STATE_RANK = {
    state: rank
    for rank, state in enumerate(
        [
            *("new", "allocated", "pending", "assigned", "accepted", "preparing", "ready"),
            *("starting", "running", "complete", "shutdown", "failed", "rejected"),
        ],
        start=1,
    )
}
RUNNING_RANK = TASK_STATE_RANK["running"]
FAILED_TASK_STATES = ("failed", "rejected")
SECOND = 1_000_000_000  # Swarm's durations are in nanoseconds
MONITORED_BY = {"deploy": "UpdateConfig", "rollback": "RollbackConfig"}
COMPLETED = {"deploy": "completed", "rollback": "rollback_completed"}  # UpdateStatus.State
DEFAULT_MONITOR = 5 * SECOND  # an UpdateConfig's or RollbackConfig's Monitor when unset


def _engine_time(timestamp: str) -> datetime:
    """A Docker Engine timestamp (RFC 3339, nanoseconds) as a datetime (to the microsecond)."""
    return datetime.fromisoformat(timestamp)


OUT_OF_SEQUENCE = "update out of sequence"
# 5xx answers that no retry can fix (besides any 501) on a node that never was a manager; a
# manager's engine also gives them for a few seconds while it stops (a restart, an upgrade)
NOT_A_MANAGER = ("not a swarm manager", "not part of a swarm")
PAUSED_BY_TASK = re.compile(r"\btask ([0-9a-z]{25})\b")


class SwarmOptions(ConnectionOptions):
    """`[backends.<name>]` with `plugin = "swarm"`: how to reach a Docker Engine that is a swarm
    manager. DOCKER_HOST, DOCKER_TLS_VERIFY, DOCKER_CERT_PATH and the proxy and CA-bundle variables
    are never read: the config file alone says how the engine is reached."""

    host: str = Field(DEFAULT_HOST, description="unix:///path/to/docker.sock or tcp://host:port")
    tls: Flag = Field(False, description="use TLS; implied by any tls_* file")
    tls_verify: Flag = Field(True, description="verify the engine's certificate")
    tls_ca_cert: FilePath | None = Field(None, description="CA that signed the engine's cert")
    tls_client_cert: FilePath | None = Field(None, description="client certificate (PEM)")
    tls_client_key: FilePath | None = Field(None, description="client certificate's key (PEM)")
    api_version: str = Field("auto", description='"auto" negotiates, or e.g. "1.41"')

    @field_validator("host")
    @classmethod
    def _is_a_docker_host(cls, value: str) -> str:
        if re.match(r"tcp://[^/]*@", value):
            raise ValueError("a host holds no credentials: the Docker API takes TLS client keys")
        if not re.fullmatch(r"unix:///\S+|tcp://(\[[0-9A-Fa-f:.]+\]|[^/\s:\[\]]+):\d+/?", value):
            raise ValueError("expected unix:///path/to/docker.sock or tcp://host:port")
        return value

    @field_validator("api_version")
    @classmethod
    def _is_an_api_version(cls, value: str) -> str:
        if value != "auto" and not re.fullmatch(r"1\.\d+", value):
            raise ValueError('expected "auto" or an Engine API version such as "1.41"')
        return value

    @model_validator(mode="after")
    def _tls_fits_the_host(self) -> SwarmOptions:
        if self.uses_tls and self.host.startswith("unix://"):
            raise ValueError(
                "TLS options apply to tcp:// hosts only (a unix socket is guarded by its file "
                'permissions): remove the tls keys, or set host = "tcp://<host>:2376"'
            )
        if (self.tls_client_cert is None) != (self.tls_client_key is None):
            raise ValueError("tls_client_cert and tls_client_key go together: set both or neither")
        return self

    @property
    def uses_tls(self) -> bool:
        files = (self.tls_ca_cert, self.tls_client_cert, self.tls_client_key)
        return self.tls or any(path is not None for path in files)


class SwarmTargetOptions(BaseModel):
    """Locator keys of a `[targets.<name>]` on a swarm backend."""

    model_config = ConfigDict(extra="forbid")

    service: str = Field(min_length=1, description="the Swarm service's name or id")
    image: ImageRepository | None = Field(
        None, description="repository to deploy from; default: the one the service runs now"
    )
    resolve_image: Flag = Field(
        True, description="pin the tag's digest from the registry, as `docker service update` does"
    )


class EngineClient(docker.APIClient):
    """The SDK's APIClient, deaf to the environment: requests would otherwise let
    REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE replace the `tls_ca_cert` given here, and HTTP(S)_PROXY
    reroute the engine connection. The config file alone says how the engine is reached."""

    @property
    def trust_env(self) -> bool:
        return False

    @trust_env.setter
    def trust_env(self, value: bool) -> None:
        pass  # requests.Session.__init__ sets it; it stays off


SwarmTarget = Target[SwarmTargetOptions]


class SwarmBackend(Backend):
    """Swarm services through the Docker Engine API (1.41+, i.e. Docker Engine 20.10 or later)."""

    name = "swarm"
    description = "Docker Swarm: services rolled to a new tag, replicated-job services run"
    Options = SwarmOptions
    TargetOptions = SwarmTargetOptions
    kinds = frozenset({"app", "job"})
    can_rollback = True
    concurrent_runs = False  # each update of a job service replaces the running iteration

    def __init__(self, options: SwarmOptions) -> None:
        super().__init__(options)
        self.options: SwarmOptions = options
        self.poll_interval = options.poll_interval
        self._client: EngineClient | None = None
        self._client_lock = threading.Lock()
        # set once the engine answered as a swarm manager, or a ref says it did: from then on
        # "not a swarm manager" is the engine restarting, not a misconfiguration
        self._was_manager = False
        # service id -> (its update's start and last failed task, when its tasks were then
        # first seen all running): the period `_verify` waits
        self._settling: dict[str, tuple[tuple[str, str | None], float]] = {}

    # -- the engine connection -------------------------------------------------------------

    @property
    def api(self) -> EngineClient:
        """The client, made on first use: shiphook starts, and takes hooks, while Docker is down
        (with api_version "auto" making it asks the engine for its version)."""
        with self._client_lock:
            if self._client is None:
                with self._engine_errors():
                    self._client = EngineClient(
                        base_url=self.options.host,
                        version=self.options.api_version,
                        timeout=self.options.timeout,
                        tls=self._tls_config(),
                    )
            return self._client

    def _tls_config(self) -> docker.tls.TLSConfig | bool:
        o = self.options
        if not o.uses_tls:
            return False
        client_cert = (str(o.tls_client_cert), str(o.tls_client_key)) if o.tls_client_cert else None
        ca_cert = str(o.tls_ca_cert) if o.tls_ca_cert else None
        return docker.tls.TLSConfig(client_cert=client_cert, ca_cert=ca_cert, verify=o.tls_verify)

    def close(self) -> None:
        with self._client_lock:
            if self._client is not None:
                self._client.close()
                self._client = None

    @contextmanager
    def _engine_errors(self) -> Iterator[None]:
        """Turn what the SDK raises into BackendError, transient where a retry can help."""
        try:
            yield
        except docker.errors.NotFound as exc:
            raise BackendError(_explain(exc)) from None
        except docker.errors.APIError as exc:
            message = _explain(exc)
            status = exc.status_code or 0
            permanent = status < 500 or status == 501
            if any(p in message for p in NOT_A_MANAGER) and not self._was_manager:
                permanent = True
            raise BackendError(message, transient=not permanent) from None
        except (requests.exceptions.RequestException, docker.errors.DockerException) as exc:
            # refused, socket gone, timed out, "Error while fetching server API version": the
            # engine may be restarting, so the target's retry budget decides
            raise BackendError(
                f"cannot reach the Docker engine at {self.options.host}: {connection_failure(exc)}",
                transient=True,
            ) from None

    def _call(self, function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        with self._engine_errors():
            return function(*args, **kwargs)

    def _inspect(self, service: str, name: str | None = None) -> dict[str, Any]:
        """The service by name or id; `name` names it in the error if it is gone by now."""
        with self._engine_errors():
            try:
                found = self.api.inspect_service(service)
            except docker.errors.NotFound:
                if name is None:
                    raise
                raise BackendError(f"service {name} was removed") from None
        self._was_manager = True  # only a manager lists services
        return found

    def _post_update(self, service: dict[str, Any], **params: str) -> None:
        """POST `service["Spec"]`, complete, with the Version.Index it was read at. Raw, because
        the SDK's update_service rebuilds the spec from its arguments and has no `rollback`."""
        api = self.api
        url = api._url("/services/{0}/update", service["ID"])
        query = {"version": service["Version"]["Index"], **params}
        answer = self._call(
            lambda: api._result(api._post_json(url, data=service["Spec"], params=query), json=True)
        )
        for warning in (answer or {}).get("Warnings") or ():
            log.warning("service %s: the engine warns: %s", service["Spec"]["Name"], warning)

    def _update(
        self,
        service_ref: str,
        name: str,
        change: Callable[[dict[str, Any]], T | None],
        **params: str,
    ) -> tuple[dict[str, Any], T | None]:
        """Read the service, let `change` edit its Spec in place, and send the update.

        `change` gets the service as just read and returns non-None to mean "nothing to send,
        here is the answer" (the service already carries the change). "update out of sequence"
        means the service changed after it was read: read it again and redo the change.
        """
        for _attempt in range(UPDATE_ATTEMPTS):
            service = self._inspect(service_ref, name)
            done = change(service)
            if done is not None:
                return service, done
            try:
                self._post_update(service, **params)
            except BackendError as exc:
                if OUT_OF_SEQUENCE in exc.message:
                    continue
                raise
            return service, None
        raise BackendError(
            f"service {name}: {OUT_OF_SEQUENCE} {UPDATE_ATTEMPTS} times in a row "
            "(something else keeps changing it)",
            transient=True,
        )

    # -- check and describe -------------------------------------------------------------------

    def check(self) -> str:
        version = self._call(self.api.version)
        self._call(self.api.inspect_swarm)  # a 503 in Swarm's own words unless a manager
        self._was_manager = True
        info = self._call(self.api.info)
        swarm = info.get("Swarm") or {}
        return (
            f"Docker Engine {version.get('Version', '?')} (API {self.api.api_version}), "
            f"swarm manager {info.get('Name', '?')} (node {str(swarm.get('NodeID'))[:12]}; "
            f"swarm nodes: {swarm.get('Nodes', '?')}, managers: {swarm.get('Managers', '?')})"
        )

    def describe(self, target: SwarmTarget) -> TargetState:
        spec = self._service_of_kind(target)["Spec"]
        replicas = (spec["Mode"].get("Replicated") or {}).get("Replicas")
        detail = f"{_mode(spec)} service {spec['Name']}"
        if replicas is not None:
            detail += f", {replicas} replica{'' if replicas == 1 else 's'}"
        image = _image(spec) if target.kind == "app" else _own_image(spec)
        return TargetState(image=image, detail=detail)

    def _service_of_kind(self, target: SwarmTarget) -> dict[str, Any]:
        service = self._inspect(target.options.service)
        modes = APP_MODES if target.kind == "app" else JOB_MODES
        mode = _mode(service["Spec"])
        if mode not in modes.values():
            raise BackendError(
                f"service {service['Spec']['Name']} is a {mode} service, but target "
                f"{target.name} is of kind {target.kind!r}, which needs a "
                f"{' or '.join(modes.values())} service: point the target at such a service "
                "or change its kind"
            )
        return service

    def _image_for(self, target: SwarmTarget, current: str, image_tag: str) -> str:
        """`<repository>:<tag>`, pinned to the registry's digest when resolve_image is on."""
        image = f"{target.options.image or repository_of(current)}:{image_tag}"
        if not target.options.resolve_image:
            return image
        with self._engine_errors():
            try:
                found = self.api.inspect_distribution(image)
            except docker.errors.APIError as exc:
                # as the docker CLI does: warn, and let each node pull the tag on its own
                log.warning(
                    "image %s could not be accessed on a registry to record its digest (%s); "
                    "deploying the tag as it is",
                    image,
                    _explain(exc),
                )
                return image
        digest = (found.get("Descriptor") or {}).get("digest")
        return f"{image}@{digest}" if digest else image

    # -- app rollouts --------------------------------------------------------------------------

    def deploy(self, target: SwarmTarget, *, image_tag: str, deployment_id: str) -> Ref:
        found = self._service_of_kind(target)
        wanted = self._image_for(target, _image(found["Spec"]), image_tag)
        replaced: dict[str, str] = {}

        def ref(service: dict[str, Any], image: str, previous: str | None, updated: bool) -> Ref:
            return {
                "op": "deploy",
                "service": service["ID"],
                "name": service["Spec"]["Name"],
                "image": image,
                "previous_image": previous,
                "updated": updated,
                "deployment": deployment_id,
            }

        def change(service: dict[str, Any]) -> Ref | None:
            spec, previous = service["Spec"], service.get("PreviousSpec")
            current = _image(spec)
            if _labels(spec).get(LABEL_DEPLOYMENT) == deployment_id:
                # an earlier call for this deployment updated the service: follow that rollout
                return ref(service, current, previous and _image(previous), True)
            if previous and _labels(previous).get(LABEL_DEPLOYMENT) == deployment_id:
                # ... and it was rolled back since with rollback=previous
                return ref(service, _image(previous), current, True)
            ran = self._image_of_deployment_tasks(service, deployment_id)
            if ran is not None:
                # ... and Swarm rolled it back on its own, which also drops PreviousSpec
                return ref(service, ran, current, True)
            if same_image(current, wanted):
                return ref(service, current, current, False)
            replaced["image"] = current
            container = spec["TaskTemplate"]["ContainerSpec"]
            container["Image"] = wanted
            # on the service for a repeated call to find; on its tasks, which outlive the spec
            spec["Labels"] = _labels(spec) | {LABEL_DEPLOYMENT: deployment_id}
            container["Labels"] = _labels(container) | {LABEL_DEPLOYMENT: deployment_id}
            return None

        service, done = self._update(found["ID"], found["Spec"]["Name"], change)
        return done if done is not None else ref(service, wanted, replaced["image"], True)

    def _image_of_deployment_tasks(self, service: dict[str, Any], deployment_id: str) -> str | None:
        """The image of a task this deployment's update created, if Swarm still lists one."""
        tasks = self._call(lambda: self.api.tasks(filters={"service": service["ID"]}))
        for task in tasks:
            container = task["Spec"].get("ContainerSpec") or {}
            if _labels(container).get(LABEL_DEPLOYMENT) == deployment_id:
                return container["Image"]
        return None

    def rollback(self, target: SwarmTarget, ref: Ref) -> Ref:
        self._was_manager = True  # `ref` is work this engine took as a manager
        restore = ref["previous_image"]
        answer = {"op": "rollback", "service": ref["service"], "name": ref["name"]}
        answer |= {"image": restore, "requested": False}
        if not ref["updated"]:
            return answer  # this deployment changed nothing, so there is nothing to undo
        if restore is None:
            raise BackendError(
                f"service {ref['name']} has no previous spec to return to; roll it back by hand "
                f"(docker service update --image <image> {ref['name']})"
            )

        def change(service: dict[str, Any]) -> Ref | None:
            current, previous = _image(service["Spec"]), service.get("PreviousSpec")
            if current == restore:
                return answer  # Swarm rolled back on its own, or an earlier call did
            if current != ref["image"]:
                raise BackendError(
                    f"service {ref['name']} now runs {current}, not {ref['image']} as this "
                    "deployment left it: something else changed it, so shiphook does not roll "
                    "it back; look at the service and deploy again"
                )
            if previous is None or _image(previous) != restore:
                raise BackendError(
                    f"service {ref['name']}'s previous spec runs "
                    f"{_image(previous) if previous else 'nothing'}, not {restore}: it was "
                    "updated again since this deployment, so rollback=previous would not restore it"
                )
            return None  # rollback=previous swaps Spec and PreviousSpec on the engine

        _, done = self._update(ref["service"], ref["name"], change, rollback="previous")
        return done if done is not None else answer | {"requested": True}

    def progress(self, target: SwarmTarget, ref: Ref) -> Progress:
        self._was_manager = True  # `ref` is work this engine took as a manager
        if ref["op"] == "run":
            return self._job_progress(ref)
        service = self._inspect(ref["service"], ref["name"])
        status = service.get("UpdateStatus") or {}
        state, message = status.get("State"), status.get("Message") or ""
        # read the way the docker CLI does: paused and rollback_paused are errors; so is
        # rollback_completed after this deployment's own update (Swarm undid it)
        if state in ("paused", "rollback_paused"):
            running, wanted = self._running(service, up_to_date=False)
            return Progress(
                "failed",
                f"{self._with_task_error(message)}; service {ref['name']} is paused with "
                f"{running} of {wanted} replicas running",
            )
        if state == "rollback_completed" and ref["op"] == "deploy" and ref["updated"]:
            # by now Swarm's message is only "rollback completed": say what it undid, and why
            return Progress("rolled_back", self._why_rolled_back(service, ref))
        converged, counts = self._convergence(service)
        if state in ("updating", "rollback_started"):
            return Progress("running", f"{message}: {counts}")
        if state == COMPLETED.get(ref["op"]) and ref.get("updated", True):
            unstable = self._verify(service, ref, status, converged, counts)
            if unstable is not None:
                return unstable
        # completed, rollback_completed, or none at all (an update that replaced no task)
        current = _image(service["Spec"])
        if current != ref["image"]:
            return Progress(
                "failed",
                f"service {ref['name']} runs {current}, not {ref['image']}: it was changed "
                "outside this deployment",
            )
        if not converged:
            return Progress("running", counts)
        if ref["op"] == "deploy" and not ref["updated"]:
            return Progress("succeeded", f"service {ref['name']} already runs {current}")
        return Progress("succeeded", message or f"service converged: {counts}")

    def _verify(
        self,
        service: dict[str, Any],
        ref: Ref,
        status: dict[str, Any],
        converged: bool,
        counts: str,
    ) -> Progress | None:
        """Under the FailureAction "continue" of the service's `UpdateConfig` (for a rollback,
        `RollbackConfig`), Swarm completes an update whatever its tasks do: a crash-looping
        image (a rollback onto a failure left in place restores one) is no healthy service.
        Like `docker service update` and `rollback`, shiphook then calls it done (None) only
        once every task has run for that config's Monitor period, starting the period again
        after each task of its image that fails; a service that never settles is ended by
        `rollout_timeout`, its last failed task in the message. Under "pause" or "rollback",
        Swarm's own monitoring judged it (None)."""
        config = service["Spec"].get(MONITORED_BY[ref["op"]]) or {}
        started = status.get("StartedAt")
        if config.get("FailureAction", "pause") != "continue" or started is None:
            return None
        failed = self._last_failed_task(service, ref["image"], since=started)
        said = ""
        if failed is not None:
            error = failed["Status"].get("Err") or failed["Status"]["State"]
            said = f"; task {failed['ID'][:12]} of {ref['image']} failed: {error}"
        if not converged:
            self._settling.pop(service["ID"], None)
            return Progress(
                "running", f"{status.get('Message') or status['State']}: {counts}{said}"
            )
        period = (config.get("Monitor") or DEFAULT_MONITOR) / SECOND
        settling = (started, failed and failed["ID"])
        since = self._settling.get(service["ID"])
        if since is None or since[0] != settling:
            since = self._settling[service["ID"]] = (settling, time.monotonic())
        if time.monotonic() - since[1] < period:
            return Progress(
                "running", f"{counts}; verifying that they stay running for {period:g} s{said}"
            )
        del self._settling[service["ID"]]
        return None

    def _last_failed_task(
        self, service: dict[str, Any], image: str, *, since: str | None = None
    ) -> dict[str, Any] | None:
        """The last created task of `image` that failed, of those created since `since` if
        given (times of the manager's clock both, so that a node's clock cannot shift them)."""
        failed = [
            (_engine_time(t["CreatedAt"]), t)
            for t in self._call(lambda: self.api.tasks(filters={"service": service["ID"]}))
            if t["Spec"]["ContainerSpec"]["Image"] == image
            and t["Status"]["State"] in FAILED_TASK_STATES
        ]
        if since is not None:
            earliest = _engine_time(since)
            failed = [(created, t) for created, t in failed if created >= earliest]
        return max(failed, key=lambda pair: pair[0], default=(None, None))[1]

    def _convergence(self, service: dict[str, Any]) -> tuple[bool, str]:
        """Whether each slot (replicated) or node (global) runs an up-to-date task: the count
        `docker service update` makes before it says "Service converged"."""
        running, wanted = self._running(service, up_to_date=True)
        where = "tasks" if service["Spec"]["Mode"].get("Replicated") is not None else "nodes"
        converged = running == wanted and (wanted > 0 or where == "tasks")
        return converged, f"{running} of {wanted} {where} running the current spec"

    def _running(self, service: dict[str, Any], *, up_to_date: bool) -> tuple[int, int]:
        """Slots (replicated) or nodes (global) with a running task, of those wanted; with
        `up_to_date`, counting only tasks of the current spec."""
        filters = {"service": service["ID"]} | ({"_up-to-date": "true"} if up_to_date else {})
        tasks = self._call(lambda: self.api.tasks(filters=filters))
        replicated = service["Spec"]["Mode"].get("Replicated")
        chosen: dict[Any, dict[str, Any]] = {}
        for task in tasks:
            desired = TASK_STATE_RANK.get(task["DesiredState"])
            actual = TASK_STATE_RANK.get(task["Status"]["State"])
            if desired is None or actual is None:
                continue
            key = task.get("Slot") if replicated is not None else task.get("NodeID")
            kept = chosen.get(key)
            # several tasks in one slot (restarts, start-first): the lowest desired state wins
            if kept is not None:
                kept_desired = TASK_STATE_RANK[kept["DesiredState"]]
                if kept_desired < desired or (
                    kept_desired == desired and TASK_STATE_RANK[kept["Status"]["State"]] <= actual
                ):
                    continue
            chosen[key] = task
        running = sum(
            1
            for task in chosen.values()
            if TASK_STATE_RANK[task["DesiredState"]] <= RUNNING_RANK
            and task["Status"]["State"] == "running"
        )
        if replicated is not None:
            return running, int(replicated.get("Replicas") or 0)
        return running, len(chosen)

    def _with_task_error(self, message: str) -> str:
        """Swarm names the task that paused an update; that task's error says why."""
        found = PAUSED_BY_TASK.search(message)
        if not found:
            return message
        try:
            task = self._call(lambda: self.api.inspect_task(found.group(1)))
        except BackendError:
            return message  # the task may be gone already; Swarm's message still stands
        error = (task.get("Status") or {}).get("Err")
        return f"{message} ({error})" if error else message

    def _why_rolled_back(self, service: dict[str, Any], ref: Ref) -> str:
        """What the rollback undid, and why: the last failed task of the deployed image, which
        made Swarm roll back; with none listed, most likely someone did (`docker service
        rollback`; Swarm also rolls back on a task that exits 0, and prunes old tasks)."""
        back = _image(service["Spec"])
        task = self._last_failed_task(service, ref["image"])
        if task is None:
            return (
                f"service {ref['name']} was rolled back to {back} while {ref['image']} rolled "
                "out, with no failed task of it listed: most likely by hand (docker service "
                "rollback)"
            )
        error = task["Status"].get("Err") or task["Status"]["State"]
        return (
            f"the update to {ref['image']} failed (task {task['ID'][:12]} "
            f"{task['Status']['State']}: {error}); Swarm rolled service {ref['name']} back to "
            f"{back} on its own"
        )

    # -- job runs ------------------------------------------------------------------------------

    def run_job(
        self,
        target: SwarmTarget,
        *,
        env: dict[str, str],
        image_tag: str | None,
        deployment_id: str,
    ) -> Ref:
        found = self._service_of_kind(target)
        tagged = None
        if image_tag is not None:
            tagged = self._image_for(target, _image(found["Spec"]), image_tag)
        started: dict[str, Any] = {}

        def change(service: dict[str, Any]) -> dict[str, Any] | None:
            spec = service["Spec"]
            labels = _labels(spec)
            container = spec["TaskTemplate"]["ContainerSpec"]
            if labels.get(LABEL_DEPLOYMENT) == deployment_id and LABEL_JOB_ITERATION in labels:
                # an earlier call started this run
                return {"iteration": int(labels[LABEL_JOB_ITERATION]), "image": container["Image"]}
            # an earlier run's overrides (env and image) stay in the spec: start from what the
            # service had before them, with what someone has changed since shiphook wrote it
            current_env = list(container.get("Env") or [])
            base_env = current_env
            if LABEL_ENV_APPLIED in labels:
                base_env = _rebased_env(
                    json.loads(labels.get(LABEL_ENV_BASE) or "[]"),
                    json.loads(labels[LABEL_ENV_APPLIED]),
                    current_env,
                )
            base_image = _own_image(spec)
            container["Env"] = _merge_env(base_env, env)
            container["Image"] = tagged or base_image
            task_template = spec["TaskTemplate"]
            task_template["ForceUpdate"] = int(task_template.get("ForceUpdate") or 0) + 1
            # every accepted update of a job service starts the next iteration
            started.update(iteration=_job_iteration(service) + 1, image=container["Image"])
            spec["Labels"] = labels | {
                LABEL_DEPLOYMENT: deployment_id,
                LABEL_JOB_ITERATION: str(started["iteration"]),
                LABEL_ENV_BASE: json.dumps(base_env),
                LABEL_ENV_APPLIED: json.dumps(container["Env"]),
                LABEL_IMAGE_BASE: base_image,
                LABEL_IMAGE_APPLIED: container["Image"],
            }
            return None

        _, done = self._update(found["ID"], found["Spec"]["Name"], change)
        return {
            "op": "run",
            "service": found["ID"],
            "name": found["Spec"]["Name"],
            **(done or started),
            "deployment": deployment_id,
        }

    def _job_progress(self, ref: Ref) -> Progress:
        """Only the tasks of this run's iteration count: complete, or failed / rejected."""
        service = self._inspect(ref["service"], ref["name"])
        iteration = ref["iteration"]
        tasks = self._call(lambda: self.api.tasks(filters={"service": ref["service"]}))
        mine = [t for t in tasks if _job_iteration_of(t) == iteration]
        for task in mine:
            state = task["Status"]["State"]
            if state in FAILED_TASK_STATES:
                why = task["Status"].get("Err") or task["Status"].get("Message") or state
                return Progress("failed", f"task {task['ID'][:12]} {state}: {why}")
        replicated = service["Spec"]["Mode"].get("ReplicatedJob")
        complete = [t for t in mine if t["Status"]["State"] == "complete"]
        if replicated is not None:
            total = int(replicated.get("TotalCompletions") or 1)
            done = len({t.get("Slot") for t in complete})
            if done >= total:
                return Progress("succeeded", f"job completed: {done} of {total} tasks complete")
            counts = f"{done} of {total} tasks complete"
        else:
            if mine and len(complete) == len(mine):
                return Progress("succeeded", f"job completed on {len(mine)} nodes")
            counts = f"{len(complete)} of {len(mine)} nodes complete"
        latest = _job_iteration(service)
        if latest > iteration and (not mine or any(t["DesiredState"] == "remove" for t in mine)):
            return Progress(
                "failed",
                f"run {iteration} of service {ref['name']} was replaced by run {latest} before "
                "it completed (Swarm runs one iteration of a job at a time)",
            )
        return Progress("running", counts)


def _explain(exc: docker.errors.APIError) -> str:
    return (exc.explanation or str(exc)).strip()


def _mode(spec: dict[str, Any]) -> str:
    for key, name in (APP_MODES | JOB_MODES).items():
        if key in (spec.get("Mode") or {}):
            return name
    return "unknown-mode"


def _image(spec: dict[str, Any]) -> str:
    return spec["TaskTemplate"]["ContainerSpec"]["Image"]


def same_image(current: str, wanted: str) -> bool:
    """Whether a service on `current` already runs `wanted`: the same `<repository>:<tag>`, and
    the same digest unless the registry could not be asked for one (`wanted` unpinned: dropping
    the service's digest would restart every task for the tag it runs). A service on the bare
    tag is pinned when the registry names a digest, as `docker service update` does: the tag
    may have been pushed again."""
    current_name, _, current_digest = current.partition("@")
    wanted_name, _, wanted_digest = wanted.partition("@")
    return current_name == wanted_name and wanted_digest in ("", current_digest)


def _own_image(spec: dict[str, Any]) -> str:
    """The image of a job service without the last run's `imageTag`, which applied to that run
    only (unless someone has changed the image since shiphook wrote it)."""
    labels = _labels(spec)
    if labels.get(LABEL_IMAGE_APPLIED) == _image(spec):
        return labels.get(LABEL_IMAGE_BASE) or _image(spec)
    return _image(spec)


def _labels(spec: dict[str, Any]) -> dict[str, str]:
    return dict(spec.get("Labels") or {})


def _job_iteration(service: dict[str, Any]) -> int:
    return int(((service.get("JobStatus") or {}).get("JobIteration") or {}).get("Index") or 0)


def _job_iteration_of(task: dict[str, Any]) -> int:
    return int((task.get("JobIteration") or {}).get("Index") or 0)


def _rebased_env(base: list[str], applied: list[str], current: list[str]) -> list[str]:
    """The service's own `K=V` entries: `base` (before the last run's overrides) with the edits
    made to the env since shiphook `applied` it (entries added or changed, names removed), so
    that neither the overrides stay nor the edits are lost."""

    def by_name(entries: list[str]) -> dict[str, str]:
        return {entry.split("=", 1)[0]: entry for entry in entries}

    was, now, rebased = by_name(applied), by_name(current), by_name(base)
    for name, entry in now.items():
        if was.get(name) != entry:
            rebased[name] = entry
    for name in was.keys() - now.keys():
        rebased.pop(name, None)
    return list(rebased.values())


def _merge_env(base: list[str], overrides: dict[str, str]) -> list[str]:
    """`K=V` entries of `base`, with `overrides` replacing same-named ones in place and new
    names appended."""
    left = dict(overrides)
    merged = []
    for entry in base:
        name = entry.split("=", 1)[0]
        merged.append(f"{name}={left.pop(name)}" if name in left else entry)
    merged.extend(f"{name}={value}" for name, value in left.items())
    return merged
