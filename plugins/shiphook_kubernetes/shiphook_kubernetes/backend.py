"""The Kubernetes backend.

An app target is a Deployment, StatefulSet or DaemonSet: a deploy sends the strategic-merge patch
`kubectl set image` sends (one container's image) and follows the rollout exactly as
`kubectl rollout status` decides it; a rollback is `kubectl rollout undo`'s: the previous
ReplicaSet's (Deployment) or ControllerRevision's (StatefulSet, DaemonSet) pod template, patched
back. A job target is a CronJob: a run creates a Job from its jobTemplate as
`kubectl create job --from=cronjob/NAME` does. It all follows kubectl (shared reference,
orchestrators.md section 1).

Objects are read and sent as the API server's own JSON (`_preload_content=False`), never through
the client's models: a pod template patched back must be the one the server keeps, field for field.
"""

from __future__ import annotations

import binascii
import hashlib
import json
import logging
import re
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import kubernetes.client
import kubernetes.config
import urllib3
import yaml
from kubernetes.client.exceptions import ApiException
from kubernetes.config.config_exception import ConfigException
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, FilePath, model_validator
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
    file_stamp,
    repository_of,
)

log = logging.getLogger("shiphook.kubernetes")

# Annotations shiphook writes on the workload in the same patch as the image, so that a repeated
# deploy of the same deployment finds the rollout the first one started, and what it replaced.
ANNOTATION_DEPLOYMENT = "shiphook.io/deployment"
ANNOTATION_PREVIOUS_IMAGE = "shiphook.io/previous-image"
ANNOTATION_PREVIOUS_REVISION = "shiphook.io/previous-revision"
REVISION = "deployment.kubernetes.io/revision"  # the Deployment controller's own
INSTANTIATE = "cronjob.kubernetes.io/instantiate"  # what `kubectl create job --from` writes
REVISION_HASH = "controller-revision-hash"  # a StatefulSet's pod: the revision it runs
# seconds a finished run's Job is kept: a day, or the jobTemplate's ttlSecondsAfterFinished, but
# at least an hour, so that the run's outcome is read before the TTL controller deletes it
RUN_TTL = 24 * 3600
RUN_TTL_MIN = 3600
IN_CLUSTER_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")

FIELD_MANAGER = "shiphook"  # whose patches managedFields time-stamps (server time)
PATCH_ATTEMPTS = 5
"""How often a patch answered 409 Conflict (the object changed since it was read) is redone."""
STRATEGIC = "application/strategic-merge-patch+json"
JSON_PATCH = "application/json-patch+json"
PODS_NAMED = 3  # failing pods whose reasons go into a message

# What the backend does with its credentials: (verb, API group, resource). README.md's Role
# grants exactly these; check() asks the API server about each (SelfSubjectAccessReview) in the
# backend's namespace.
NEEDED = [
    ("get", "apps", "deployments"),
    ("patch", "apps", "deployments"),
    ("get", "apps", "statefulsets"),
    ("patch", "apps", "statefulsets"),
    ("get", "apps", "daemonsets"),
    ("patch", "apps", "daemonsets"),
    ("list", "apps", "replicasets"),
    ("list", "apps", "controllerrevisions"),
    ("list", "", "pods"),
    ("delete", "", "pods"),  # a StatefulSet's: its pods stuck on a failed template
    ("get", "batch", "cronjobs"),
    ("get", "batch", "jobs"),
    ("create", "batch", "jobs"),
]
# What a deploy to one target (and the rollout, run or rollback that follows) needs, by the key
# naming its workload; describe() asks about these in the target's own namespace. The second
# list is what only a rollback needs, not asked of a target with on_failure = "leave".
TARGET_NEEDS = {
    "deployment": (
        [("get", "apps", "deployments"), ("patch", "apps", "deployments"), ("list", "", "pods")],
        [("list", "apps", "replicasets")],
    ),
    "statefulset": (
        [("get", "apps", "statefulsets"), ("patch", "apps", "statefulsets"),
         ("list", "apps", "controllerrevisions"), ("list", "", "pods"), ("delete", "", "pods")],
        [],
    ),
    "daemonset": (
        [("get", "apps", "daemonsets"), ("patch", "apps", "daemonsets"),
         ("list", "apps", "controllerrevisions"), ("list", "", "pods")],
        [],
    ),
    "cronjob": (
        [("get", "batch", "cronjobs"), ("create", "batch", "jobs"), ("get", "batch", "jobs"),
         ("list", "", "pods")],
        [],
    ),
}  # fmt: skip
ROLE = "README.md, Kubernetes: the Role shiphook needs"

# The annotations `kubectl rollout undo` keeps on the Deployment instead of copying them from the
# ReplicaSet it returns to (k8s.io/kubectl/pkg/polymorphichelpers/rollback.go, annotationsToSkip).
UNDO_KEEPS = frozenset(
    {
        "kubectl.kubernetes.io/last-applied-configuration",
        REVISION,
        "deployment.kubernetes.io/revision-history",
        "deployment.kubernetes.io/desired-replicas",
        "deployment.kubernetes.io/max-replicas",
        "deprecated.deployment.rollback.to",
    }
)
# kubectl's own words (rollback.go); the controller rolls out nothing while a Deployment is paused
PAUSED_UNDO = (
    "you cannot rollback a paused deployment; resume it first with 'kubectl rollout resume' and "
    "try again"
)


@dataclass(frozen=True)
class Workload:
    """One kind of app workload: its target key, API resource and client methods."""

    key: str  # the target key naming it, and the word in messages
    resource: str
    method: str  # AppsV1Api's read_namespaced_<method> / patch_namespaced_<method>


WORKLOADS = {
    w.key: w
    for w in (
        Workload("deployment", "deployments", "deployment"),
        Workload("statefulset", "statefulsets", "stateful_set"),
        Workload("daemonset", "daemonsets", "daemon_set"),
    )
}


def _namespace_name(value: str | None) -> str | None:
    if value is not None and not re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?", value):
        raise ValueError(
            "expected a namespace's name: 1 to 63 lowercase letters, digits and '-', the first "
            "and last a letter or digit"
        )
    return value


Namespace = Annotated[str | None, AfterValidator(_namespace_name)]


class KubernetesOptions(ConnectionOptions):
    """`[backends.<name>]` with `plugin = "kubernetes"`: how to reach the API server. KUBECONFIG
    and the proxy variables are never read: the config file alone says how it is reached."""

    kubeconfig: FilePath | None = Field(None, description="the kubeconfig file to use")
    context: str | None = Field(None, description="its context; default: its current-context")
    in_cluster: Flag = Field(
        False, description="use the ServiceAccount of the pod shiphook runs in"
    )
    namespace: Namespace = Field(
        None,
        description="namespace of targets that name none; default: the context's namespace "
        "(in_cluster: the pod's own), else default",
    )

    @model_validator(mode="after")
    def _one_way_in(self) -> KubernetesOptions:
        if self.in_cluster == (self.kubeconfig is not None):
            raise ValueError(
                'set either kubeconfig = "/path/to/kubeconfig" (and optionally context) or '
                "in_cluster = true; the KUBECONFIG variable is not read"
            )
        if self.in_cluster and self.context is not None:
            raise ValueError("context applies to a kubeconfig only: remove it with in_cluster")
        return self


class KubernetesTargetOptions(BaseModel):
    """Locator keys of a `[targets.<name>]` on a kubernetes backend."""

    model_config = ConfigDict(extra="forbid")

    namespace: Namespace = Field(None, description="default: the backend's namespace")
    deployment: str | None = Field(None, description="an app: the Deployment's name")
    statefulset: str | None = Field(None, description="an app: the StatefulSet's name")
    daemonset: str | None = Field(None, description="an app: the DaemonSet's name")
    cronjob: str | None = Field(None, description="a job: the CronJob whose jobTemplate runs")
    container: str | None = Field(
        None, description="the container to change; required when the pod has several"
    )
    image: ImageRepository | None = Field(
        None, description="repository to deploy from; default: the one the container runs now"
    )

    @model_validator(mode="after")
    def _one_workload(self) -> KubernetesTargetOptions:
        named = [k for k in (*WORKLOADS, "cronjob") if getattr(self, k) is not None]
        if len(named) != 1:
            raise ValueError(
                "set exactly one of deployment, statefulset, daemonset (an app target) or "
                f"cronjob (a job target); got {', '.join(named) or 'none'}"
            )
        return self


class ApiError(BackendError):
    """An answer of the API server other than 2xx, with its HTTP status and Status.reason."""

    def __init__(
        self,
        message: str,
        *,
        status: int,
        reason: str,
        transient: bool,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, transient=transient, retry_after=retry_after)
        self.status = status
        self.reason = reason


@dataclass
class Client:
    api: kubernetes.client.ApiClient
    apps: kubernetes.client.AppsV1Api
    batch: kubernetes.client.BatchV1Api
    core: kubernetes.client.CoreV1Api
    namespace: str  # the backend's default namespace


KubernetesTarget = Target[KubernetesTargetOptions]


class KubernetesBackend(Backend):
    """Deployments, StatefulSets, DaemonSets and CronJobs through the Kubernetes API."""

    name = "kubernetes"
    description = (
        "Kubernetes: Deployments, StatefulSets and DaemonSets rolled to a new tag, Jobs run "
        "from CronJobs"
    )
    Options = KubernetesOptions
    TargetOptions = KubernetesTargetOptions
    kinds = frozenset({"app", "job"})
    can_rollback = True
    concurrent_runs = True  # each run is a Job of its own

    def __init__(self, options: KubernetesOptions) -> None:
        super().__init__(options)
        self.options: KubernetesOptions = options
        self.poll_interval = options.poll_interval
        self._client: Client | None = None
        self._client_lock = threading.Lock()
        self._made_from: tuple[int, int, int] | None = None  # the kubeconfig's file_stamp

    # -- the API connection ------------------------------------------------------------------

    @property
    def client(self) -> Client:
        """The client, made on first use: shiphook starts, and takes hooks, while the API
        server is down. Only the file named (or the pod's ServiceAccount) configures it, and it
        is made again once the kubeconfig file changes: a token rotated in it (`kubectl create
        token` again) is used from the next call on, without a restart."""
        with self._client_lock:
            # in the cluster the client reads the pod's rotated token again on its own
            seen = None if self.options.in_cluster else file_stamp(self.options.kubeconfig)
            if self._client is not None and seen != self._made_from:
                # not closed: another thread may be in a call on it; its pool goes with it
                log.info("%s changed: reading it again", self.options.kubeconfig)
                self._client = None
            if self._client is None:
                try:
                    with self._api_errors():
                        self._client = self._connect()
                except BackendError as exc:
                    if self._made_from is None:
                        raise
                    # it read well before: caught while being rewritten, perhaps
                    raise BackendError(exc.message, transient=True) from None
                self._made_from = seen
            return self._client

    def _connect(self) -> Client:
        o = self.options
        config = kubernetes.client.Configuration()
        config.proxy = None  # not from the environment; a kubeconfig's proxy-url sets it
        config.no_proxy = None
        config.retries = False  # one attempt per call: the deployer retries within its budget
        if o.in_cluster:
            kubernetes.config.load_incluster_config(client_configuration=config)
            namespace = _read(IN_CLUSTER_NAMESPACE)
        else:
            path = str(o.kubeconfig)
            try:  # the client's ConfigException is _api_errors'; these, a file it cannot read
                kubernetes.config.load_kube_config(
                    config_file=path, context=o.context, client_configuration=config,
                    persist_config=False,
                )  # fmt: skip
                contexts, current = kubernetes.config.list_kube_config_contexts(path)
            except binascii.Error as exc:  # decoding a *-data field
                raise BackendError(
                    f"{path}: a certificate or key (*-data) of the context is not base64 ({exc}); "
                    "expected the YAML that `kubectl config view --raw` prints"
                ) from None
            except (yaml.YAMLError, TypeError, AttributeError, KeyError) as exc:
                cause = " ".join(f"{type(exc).__name__}: {exc}".split())
                raise BackendError(
                    f"{path}: not a kubeconfig ({cause}); expected the YAML that "
                    "`kubectl config view --raw` prints"
                ) from None
            chosen = next((c for c in contexts if c["name"] == o.context), current)
            namespace = (chosen.get("context") or {}).get("namespace")
        api = kubernetes.client.ApiClient(config)
        return Client(
            api,
            kubernetes.client.AppsV1Api(api),
            kubernetes.client.BatchV1Api(api),
            kubernetes.client.CoreV1Api(api),
            o.namespace or namespace or "default",
        )

    @property
    def _where(self) -> str:
        if self.options.in_cluster:
            return "the in-cluster API server"
        return f"the API server of {self.options.kubeconfig}"

    def close(self) -> None:
        with self._client_lock:
            if self._client is not None:
                self._client.api.close()
                self._client = None

    @contextmanager
    def _api_errors(self) -> Iterator[None]:
        """Turn what the client raises into BackendError: the API's own Status.message,
        transient where a retry can help (409, 429, 5xx, no connection)."""
        try:
            yield
        except ApiException as exc:
            status = exc.status or 0
            if status == 0:  # the client's wrapping of a TLS error, as text
                cause = " ".join(str(exc.reason).split())  # one line
                # a retry may outlast a handshake cut short, never an untrusted certificate
                transient = "CERTIFICATE_VERIFY_FAILED" not in cause
                raise BackendError(
                    f"cannot reach {self._where}: {cause}", transient=transient
                ) from None
            message, reason = _status_of(exc)
            if status == 401:  # the API's whole message is "Unauthorized"
                message += f": {self._where} does not accept the credentials"
            transient = status in (409, 429) or status >= 500
            raise ApiError(
                message,
                status=status,
                reason=reason,
                transient=transient,
                retry_after=_retry_after(exc) if transient else None,
            ) from None
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise BackendError(
                f"cannot reach {self._where}: {connection_failure(exc)}", transient=True
            ) from None
        except ConfigException as exc:  # the kubeconfig or the pod's files do not serve
            source = "in-cluster config" if self.options.in_cluster else self.options.kubeconfig
            raise BackendError(f"{source}: {exc}") from None

    def _call(self, method: Callable[..., Any], *args: Any, **kwargs: Any) -> dict[str, Any]:
        """One API call with the configured timeout; the answer as the server sent it."""
        with self._api_errors():
            response = method(
                *args, _preload_content=False, _request_timeout=self.options.timeout, **kwargs
            )
            try:
                return json.loads(response.data)
            finally:
                response.release_conn()

    def _namespace(self, target: KubernetesTarget) -> str:
        return target.options.namespace or self.client.namespace

    # -- check and describe -----------------------------------------------------------------

    def check(self) -> str:
        """The server's version, and that it accepts the credentials (any review needs them);
        what each target needs is reviewed in its own namespace by `describe`."""
        client = self.client
        version = self._call(kubernetes.client.VersionApi(client.api).get_code)
        server = f"Kubernetes {version.get('gitVersion', '?')} at {client.api.configuration.host}"
        self._missing(client.namespace, NEEDED[:1])
        accepted = "the credentials are accepted"
        return f"{server}: {accepted}; targets default to namespace {client.namespace}"

    def _missing(
        self, namespace: str, needs: list[tuple[str, str, str]], named: tuple[str, str] = ("", "")
    ) -> list[str]:
        """Which of `needs` the credentials may not do in `namespace`, as the API server's
        authorizer answers a SelfSubjectAccessReview of each. `named` is the target's workload
        (its resource and name): a get or patch of it is reviewed for that name, so that a Role
        narrowed with `resourceNames` is allowed what it allows."""
        authorization = kubernetes.client.AuthorizationV1Api(self.client.api)
        missing = []
        for verb, group, resource in needs:
            attributes = {
                "namespace": namespace,
                "verb": verb,
                "group": group,
                "resource": resource,
            }
            if resource == named[0] and verb in ("get", "patch"):
                attributes["name"] = named[1]
            review = {
                "apiVersion": "authorization.k8s.io/v1",
                "kind": "SelfSubjectAccessReview",
                "spec": {"resourceAttributes": attributes},
            }
            answer = self._call(authorization.create_self_subject_access_review, review)
            if not (answer.get("status") or {}).get("allowed"):
                missing.append(f"{verb} {resource}{'.' + group if group else ''}")
        return missing

    def _review(self, target: KubernetesTarget, key: str, namespace: str) -> None:
        """Fail, naming what is missing, unless the credentials may do in the target's
        namespace all that a deploy to it (and its rollback) needs: before a rollout changes
        anything, and in `shiphook check` for each target."""
        needs, for_rollback = TARGET_NEEDS[key]
        if target.on_failure == "rollback":
            needs = needs + for_rollback
        missing = self._missing(namespace, needs, (f"{key}s", getattr(target.options, key)))
        if missing:
            raise BackendError(_may_not(missing, namespace, f"target {target.name}"))

    def describe(self, target: KubernetesTarget) -> TargetState:
        namespace = self._namespace(target)
        if target.kind == "job":
            if target.options.cronjob is not None:  # else _cronjob says what the kind needs
                self._review(target, "cronjob", namespace)
            cronjob = self._cronjob(target, namespace)
            template = cronjob["spec"]["jobTemplate"]["spec"]["template"]
            container = _container(target, template, f"cronjob {target.options.cronjob}")
            return TargetState(
                image=container["image"],
                detail=f"cronjob {target.options.cronjob} in namespace {namespace}",
            )
        workload, name = self._workload_of(target)
        self._review(target, workload.key, namespace)
        found = self._read(workload, namespace, name)
        container = _container(target, found["spec"]["template"], f"{workload.key} {name}")
        spec = found["spec"]
        detail = f"{workload.key} {name} in namespace {namespace}"
        if "replicas" in spec:
            detail += f", {spec['replicas']} replica{'' if spec['replicas'] == 1 else 's'}"
        # what makes every deploy of a new tag fail
        if spec.get("paused"):
            detail += "; paused: a new tag fails at once until `kubectl rollout resume`"
        if not _rolls_out_by_itself(found):
            detail += "; updates OnDelete: a new tag fails at once, as there is no rollout"
        return TargetState(image=container["image"], detail=detail)

    def _workload_of(self, target: KubernetesTarget) -> tuple[Workload, str]:
        o = target.options
        for key, workload in WORKLOADS.items():
            if getattr(o, key) is not None:
                return workload, getattr(o, key)
        raise BackendError(
            f"target {target.name} names cronjob {o.cronjob}, but it is of kind 'app', which "
            'needs a deployment, statefulset or daemonset: name one, or make it kind = "job"'
        )

    def _cronjob(self, target: KubernetesTarget, namespace: str) -> dict[str, Any]:
        if target.options.cronjob is None:
            raise BackendError(
                f"target {target.name} is of kind 'job', which needs a cronjob: name one, or "
                'make it kind = "app"'
            )
        with _not_found_in(namespace):
            return self._call(
                self.client.batch.read_namespaced_cron_job, target.options.cronjob, namespace
            )

    def _read(self, workload: Workload, namespace: str, name: str) -> dict[str, Any]:
        method = getattr(self.client.apps, f"read_namespaced_{workload.method}")
        with _not_found_in(namespace):
            return self._call(method, name, namespace)

    def _patch(
        self,
        workload: Workload,
        namespace: str,
        name: str,
        body: Any,
        content_type: str = STRATEGIC,
    ) -> dict[str, Any]:
        method = getattr(self.client.apps, f"patch_namespaced_{workload.method}")
        return self._call(
            method, name, namespace, body, field_manager=FIELD_MANAGER, _content_type=content_type
        )

    # -- app deploys ---------------------------------------------------------------------------

    def deploy(self, target: KubernetesTarget, *, image_tag: str, deployment_id: str) -> Ref:
        workload, name = self._workload_of(target)
        namespace = self._namespace(target)
        for _attempt in range(PATCH_ATTEMPTS):
            found = self._read(workload, namespace, name)
            container = _container(target, found["spec"]["template"], f"{workload.key} {name}")
            current = container["image"]
            wanted = f"{target.options.image or repository_of(current)}:{image_tag}"
            annotations = found["metadata"].get("annotations") or {}
            ref = {"op": "deploy", "workload": workload.key, "namespace": namespace}
            ref |= {"name": name, "container": container["name"], "image": wanted}
            ref |= {"deployment": deployment_id}
            if annotations.get(ANNOTATION_DEPLOYMENT) == deployment_id:
                # an earlier call for this deployment patched it: follow that rollout
                return ref | {
                    "updated": True,
                    "previous_image": annotations.get(ANNOTATION_PREVIOUS_IMAGE),
                    "previous_revision": annotations.get(ANNOTATION_PREVIOUS_REVISION) or None,
                    "template": _template_digest(found),
                }
            if current == wanted:
                return ref | {"updated": False, "previous_image": current}
            if found["spec"].get("paused"):
                raise BackendError(
                    f"{_paused(name)}; shiphook changed nothing: resume it and deploy again"
                )
            if not _rolls_out_by_itself(found):
                strategy = found["spec"]["updateStrategy"]["type"]
                raise BackendError(
                    f"{workload.key} {name} updates {strategy}: its pods take a new template "
                    "only when they are deleted, so there would be no rollout to follow; "
                    "shiphook changed nothing: set updateStrategy RollingUpdate, or update it "
                    "by hand"
                )
            previous = self._current_revision(workload, found)
            patch = {
                "metadata": {
                    # the image was decided on this version: a 409 if it changed since
                    "resourceVersion": found["metadata"]["resourceVersion"],
                    "annotations": {
                        ANNOTATION_DEPLOYMENT: deployment_id,
                        ANNOTATION_PREVIOUS_IMAGE: current,
                        ANNOTATION_PREVIOUS_REVISION: previous or "",
                    },
                },
                "spec": {
                    "template": {
                        "spec": {"containers": [{"name": container["name"], "image": wanted}]}
                    }
                },
            }
            try:
                patched = self._patch(workload, namespace, name, patch)
            except ApiError as exc:
                if exc.status == 409:
                    log.info(
                        "%s %s changed since it was read; reading it again", workload.key, name
                    )
                    continue
                raise
            return ref | {
                "updated": True,
                "previous_image": current,
                "previous_revision": previous,
                "template": _template_digest(patched),
            }
        raise BackendError(
            f"{workload.key} {name}: 409 Conflict {PATCH_ATTEMPTS} times in a row (something "
            "else keeps changing it)",
            transient=True,
        )

    def _current_revision(self, workload: Workload, found: dict[str, Any]) -> str | None:
        """What a rollback returns to: the Deployment's revision number, or the name of the
        StatefulSet's or DaemonSet's newest ControllerRevision."""
        if workload.key == "deployment":
            return (found["metadata"].get("annotations") or {}).get(REVISION)
        revisions = self._owned(
            self.client.apps.list_namespaced_controller_revision, found, found["metadata"]["uid"]
        )
        if not revisions:
            return None
        return max(revisions, key=lambda r: r.get("revision", 0))["metadata"]["name"]

    def _owned(
        self, method: Callable[..., Any], owner: dict[str, Any], uid: str
    ) -> list[dict[str, Any]]:
        """Objects listed by `method` in the owner's namespace, by its selector, that it owns."""
        listed = self._call(
            method,
            owner["metadata"]["namespace"],
            label_selector=_selector(owner["spec"]["selector"]),
        )
        return [
            item
            for item in listed.get("items") or ()
            if any(r.get("uid") == uid for r in item["metadata"].get("ownerReferences") or ())
        ]

    def rollback(self, target: KubernetesTarget, ref: Ref) -> Ref:
        workload = WORKLOADS[ref["workload"]]
        namespace, name, restore = ref["namespace"], ref["name"], ref["previous_image"]
        answer = {"op": "rollback", "workload": workload.key, "namespace": namespace}
        answer |= {"name": name, "container": ref["container"], "image": restore}
        answer |= {"deployment": ref.get("deployment")}
        if not ref["updated"]:
            return answer  # this deployment changed nothing, so there is nothing to undo
        what = f"{workload.key} {name}"
        for _attempt in range(PATCH_ATTEMPTS):
            found = self._read(workload, namespace, name)
            if found["spec"].get("paused"):
                raise BackendError(PAUSED_UNDO)
            current = _named_image(found, ref["container"])
            if current == restore:  # an earlier call rolled it back already
                return answer
            if current != ref["image"]:
                raise BackendError(
                    f"{what} now runs {current}, not {ref['image']} as this deployment left it: "
                    "something else changed it, so shiphook does not roll it back; look at it "
                    "and deploy again"
                )
            template = ref.get("template")  # a ref stored before it was kept has none
            if template is not None and template != _template_digest(found):
                raise BackendError(
                    f"{what}'s pod template changed since this deployment set {ref['image']} "
                    "(kubectl edit, set env, rollout restart): something else changed it, so "
                    "shiphook does not roll it back, which would undo that change too; look at "
                    "it and deploy again"
                )
            patch, content_type = self._undo_patch(workload, found, ref["previous_revision"])
            try:
                self._patch(workload, namespace, name, patch, content_type)
            except ApiError as exc:
                if exc.status == 409:
                    continue
                raise
            return answer
        raise BackendError(
            f"{what}: 409 Conflict {PATCH_ATTEMPTS} times in a row (something else keeps "
            "changing it)",
            transient=True,
        )

    def _unblock(self, found: dict[str, Any], ref: Ref, pods: list[dict[str, Any]]) -> None:
        """A StatefulSet's "forced rollback" (Kubernetes' StatefulSet docs): the controller
        waits for a pod of a failed template to become ready before it replaces anything, also
        once the template is patched away from it (back by a rollback, or forward by a deploy
        over a failure left in place). So once the controller has seen the patch, the pods that
        are not ready and of neither the revision rolling out nor the current one are deleted;
        it recreates them from the template as patched. Pods of the current revision (a healthy
        pod failing a probe, those below a partition) are never touched."""
        status = found.get("status") or {}
        if status.get("observedGeneration", 0) < found["metadata"].get("generation", 0):
            return
        kept = {status.get("updateRevision"), status.get("currentRevision")}
        namespace = found["metadata"]["namespace"]
        for pod in pods:
            meta = pod["metadata"]
            revision = (meta.get("labels") or {}).get(REVISION_HASH)
            if revision in kept or _ready(pod):
                continue
            try:
                self._call(self.client.core.delete_namespaced_pod, meta["name"], namespace)
            except ApiError as exc:
                if exc.status != 404:  # gone already
                    raise
            log.info(
                "deployment %s: statefulset %s: deleted pod %s, not ready at revision %s",
                ref.get("deployment"),
                ref["name"],
                meta["name"],
                revision,
            )

    def _undo_patch(
        self, workload: Workload, found: dict[str, Any], revision: str | None
    ) -> tuple[Any, str]:
        """What `kubectl rollout undo` sends to return to `revision`."""
        name, uid = found["metadata"]["name"], found["metadata"]["uid"]
        what, version = f"{workload.key} {name}", found["metadata"]["resourceVersion"]
        if workload.key == "deployment":
            sets = self._owned(self.client.apps.list_namespaced_replica_set, found, uid)
            chosen = [
                s
                for s in sets
                if (s["metadata"].get("annotations") or {}).get(REVISION) == revision
            ]
            if revision is None or not chosen:
                raise BackendError(
                    f"{what} has no ReplicaSet of revision {revision or '(none)'} to return to; "
                    f"roll it back by hand (kubectl rollout undo deployment/{name})"
                )
            template = chosen[0]["spec"]["template"]
            # the controller adds the hash label to each ReplicaSet's template, not the Deployment's
            (template.get("metadata") or {}).get("labels", {}).pop("pod-template-hash", None)
            # the ReplicaSet's annotations come back too (kubectl's getDeploymentPatch), but
            # those the Deployment keeps for itself
            kept = found["metadata"].get("annotations") or {}
            annotations = {k: v for k, v in kept.items() if k in UNDO_KEEPS} | {
                k: v
                for k, v in (chosen[0]["metadata"].get("annotations") or {}).items()
                if k not in UNDO_KEEPS
            }
            return [
                {"op": "replace", "path": "/metadata/resourceVersion", "value": version},
                {"op": "replace", "path": "/spec/template", "value": template},
                # "add" sets the member whether or not the Deployment has annotations yet
                {"op": "add", "path": "/metadata/annotations", "value": annotations},
            ], JSON_PATCH
        revisions = self._owned(self.client.apps.list_namespaced_controller_revision, found, uid)
        chosen = [r for r in revisions if r["metadata"]["name"] == revision]
        if revision is None or not chosen:
            raise BackendError(
                f"{what} has no ControllerRevision {revision or '(none)'} to return to; roll it "
                f"back by hand (kubectl rollout undo {workload.key}/{name})"
            )
        return chosen[0]["data"] | {"metadata": {"resourceVersion": version}}, STRATEGIC

    def progress(self, target: KubernetesTarget, ref: Ref) -> Progress:
        if ref["op"] == "run":
            return self._job_progress(ref)
        workload = WORKLOADS[ref["workload"]]
        found = self._read(workload, ref["namespace"], ref["name"])
        what = f"{workload.key} {ref['name']}"
        current = _named_image(found, ref["container"])
        if current != ref["image"]:
            return Progress(
                "failed",
                f"{what} runs {current}, not {ref['image']}: it was changed outside this "
                "deployment",
            )
        unchanged = ref["op"] == "deploy" and not ref["updated"]
        if unchanged and not _rolls_out_by_itself(found):  # OnDelete: no status to go by
            return Progress("succeeded", f"{what} already runs {current}")
        # unchanged, its status still says whether that image runs healthy: an earlier rollout
        # of it may have failed and been left, or still be under way
        state, message = ROLLOUT_STATUS[workload.key](found)
        if state == "succeeded":
            return Progress(state, f"{what} already runs {current}" if unchanged else message)
        pods = self._pods(found)
        if workload.key == "statefulset" and state == "running" and not unchanged:
            self._unblock(found, ref, pods)
        # why the pods of the image do not run: waiting reasons and exit codes
        problems = _problems(p for p in pods if _named_image(p, ref["container"]) == ref["image"])
        return Progress(state, f"{message}; {problems}" if problems else message)

    def _pods(self, owner: dict[str, Any]) -> list[dict[str, Any]]:
        """The workload's pods, but those being deleted."""
        listed = self._call(
            self.client.core.list_namespaced_pod,
            owner["metadata"]["namespace"],
            label_selector=_selector(owner["spec"]["selector"]),
        )
        return [p for p in listed.get("items") or () if not p["metadata"].get("deletionTimestamp")]

    # -- job runs --------------------------------------------------------------------------------

    def run_job(
        self,
        target: KubernetesTarget,
        *,
        env: dict[str, str],
        image_tag: str | None,
        deployment_id: str,
    ) -> Ref:
        namespace = self._namespace(target)
        self._review(target, "cronjob", namespace)  # before the Job exists, as for an app
        cronjob = self._cronjob(target, namespace)
        name = job_name(cronjob["metadata"]["name"], deployment_id)
        job_template = cronjob["spec"]["jobTemplate"]
        template = job_template["spec"]["template"]
        container = _container(target, template, f"cronjob {cronjob['metadata']['name']}")
        container["env"] = _merge_env(container.get("env") or [], env)
        if image_tag is not None:
            repository = target.options.image or repository_of(container["image"])
            container["image"] = f"{repository}:{image_tag}"
        meta = job_template.get("metadata") or {}
        ttl = job_template["spec"].get("ttlSecondsAfterFinished")
        job = {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": {
                "name": name,
                "namespace": namespace,
                "labels": meta.get("labels") or {},
                "annotations": {INSTANTIATE: "manual"}
                | (meta.get("annotations") or {})
                | {ANNOTATION_DEPLOYMENT: deployment_id},
                # owned, so that it goes with the CronJob, but not controlled: the CronJob
                # controller deletes the finished Jobs it controls beyond its history limits,
                # and would delete a run before its outcome is read
                "ownerReferences": [
                    {
                        "apiVersion": "batch/v1",
                        "kind": "CronJob",
                        "name": cronjob["metadata"]["name"],
                        "uid": cronjob["metadata"]["uid"],
                        "controller": False,
                    }
                ],
            },
            # deleted by the TTL controller instead, a while after it ends
            "spec": job_template["spec"]
            | {"ttlSecondsAfterFinished": max(ttl if ttl is not None else RUN_TTL, RUN_TTL_MIN)},
        }
        ref = {"op": "run", "namespace": namespace, "job": name, "container": container["name"]}
        ref |= {"deployment": deployment_id}
        try:
            created = self._call(self.client.batch.create_namespaced_job, namespace, job)
        except ApiError as exc:
            if exc.reason != "AlreadyExists":
                raise
            # a repeated call for this deployment: its Job is there, never a second one
            created = self._call(self.client.batch.read_namespaced_job, name, namespace)
            mine = (created["metadata"].get("annotations") or {}).get(ANNOTATION_DEPLOYMENT)
            if mine != deployment_id:
                raise BackendError(
                    f"job {name} in namespace {namespace} exists, but was not created for "
                    f"deployment {deployment_id}; delete it, or deploy again"
                ) from None
        run = _container(target, created["spec"]["template"], f"job {name}")
        return ref | {"image": run["image"]}

    def _job_progress(self, ref: Ref) -> Progress:
        """Done when the Job's Complete or Failed condition is True, as the controller says."""
        try:
            job = self._call(self.client.batch.read_namespaced_job, ref["job"], ref["namespace"])
        except ApiError as exc:
            if exc.status != 404:
                raise
            raise BackendError(
                f"job {ref['job']} in namespace {ref['namespace']} is gone before its outcome "
                "was read: deleted by hand or with its CronJob, or its ttlSecondsAfterFinished "
                "passed while shiphook was stopped"
            ) from None
        status = job.get("status") or {}
        for condition in status.get("conditions") or ():
            if condition.get("status") != "True":
                continue
            why = f"{condition.get('reason') or condition['type']}"
            if condition.get("message"):
                why += f": {condition['message']}"
            if condition["type"] == "Complete":
                return Progress("succeeded", f"job {ref['job']} completed ({why})")
            if condition["type"] == "Failed":
                problems = self._job_problems(job)
                message = f"job {ref['job']} failed: {why}"
                return Progress("failed", f"{message}; {problems}" if problems else message)
        counts = ", ".join(f"{status.get(k) or 0} {k}" for k in ("active", "succeeded", "failed"))
        message = f"job {ref['job']}: {counts}"
        # why an active pod does not run: an image that cannot be pulled never ends the Job,
        # so rollout_timeout does, and its message says why
        active = status.get("active") or 0
        problems = self._job_problems(job) if status.get("ready", 0) < active else ""
        return Progress("running", f"{message}; {problems}" if problems else message)

    def _job_problems(self, job: dict[str, Any]) -> str:
        listed = self._call(
            self.client.core.list_namespaced_pod,
            job["metadata"]["namespace"],
            label_selector=_selector(job["spec"]["selector"]),
        )
        return _problems(listed.get("items") or ())


# -- what `kubectl rollout status` decides, per workload ----------------------------------------


def _deployment_status(d: dict[str, Any]) -> tuple[str, str]:
    name, spec, status = d["metadata"]["name"], d["spec"], d.get("status") or {}
    if spec.get("paused"):
        # kubectl rollout status would wait here until its own timeout; the controller makes no
        # new ReplicaSet for a paused Deployment, so nothing would come of waiting
        return "failed", _paused(name)
    if d["metadata"].get("generation", 0) > status.get("observedGeneration", 0):
        return "running", "waiting for the deployment spec update to be observed"
    patched = _patched_at(d)
    for condition in status.get("conditions") or ():
        if (
            condition["type"] == "Progressing"
            and condition.get("reason") == "ProgressDeadlineExceeded"
            # the controller keeps a deadline exceeded before shiphook's last patch (a failed
            # rollout it rolls back, say) until the new template makes progress: not this one's
            and not (patched and condition.get("lastUpdateTime", "") <= patched)
        ):
            why = f"deployment {name} exceeded its progress deadline"
            message = condition.get("message")
            return "failed", f"{why}: {message}" if message else why
    replicas = spec.get("replicas", 1)
    updated = status.get("updatedReplicas", 0)
    available = status.get("availableReplicas", 0)
    waiting = f"waiting for deployment {name} rollout to finish: "
    if updated < replicas:
        return "running", f"{waiting}{updated} out of {replicas} new replicas have been updated"
    if status.get("replicas", 0) > updated:
        old = status.get("replicas", 0) - updated
        return "running", f"{waiting}{old} old replicas are pending termination"
    if available < updated:
        return "running", f"{waiting}{available} of {updated} updated replicas are available"
    return "succeeded", f"deployment {name} successfully rolled out"


def _statefulset_status(s: dict[str, Any]) -> tuple[str, str]:
    name, spec, status = s["metadata"]["name"], s["spec"], s.get("status") or {}
    strategy = spec.get("updateStrategy") or {}
    if strategy.get("type", "RollingUpdate") != "RollingUpdate":
        return "failed", f"statefulset {name} updates {strategy['type']}: no rollout to follow"
    observed = status.get("observedGeneration", 0)
    if observed == 0 or s["metadata"].get("generation", 0) > observed:
        return "running", "waiting for the statefulset spec update to be observed"
    replicas, ready = spec.get("replicas", 1), status.get("readyReplicas", 0)
    if ready < replicas:
        return "running", f"waiting for {replicas - ready} pods of statefulset {name} to be ready"
    updated = status.get("updatedReplicas", 0)
    partition = (strategy.get("rollingUpdate") or {}).get("partition")
    if partition:
        if updated < replicas - partition:
            return "running", (
                f"waiting for the partitioned rollout of statefulset {name} to finish: "
                f"{updated} out of {replicas - partition} new pods have been updated"
            )
        return "succeeded", f"partitioned rollout complete: {updated} new pods have been updated"
    if status.get("updateRevision") != status.get("currentRevision"):
        return "running", (
            f"waiting for the rolling update of statefulset {name} to complete: {updated} pods "
            f"at revision {status.get('updateRevision')}"
        )
    return "succeeded", (
        f"statefulset {name} rolling update complete: {status.get('currentReplicas', 0)} pods at "
        f"revision {status.get('currentRevision')}"
    )


def _daemonset_status(d: dict[str, Any]) -> tuple[str, str]:
    name, spec, status = d["metadata"]["name"], d["spec"], d.get("status") or {}
    strategy = spec.get("updateStrategy") or {}
    if strategy.get("type", "RollingUpdate") != "RollingUpdate":
        return "failed", f"daemonset {name} updates {strategy['type']}: no rollout to follow"
    if d["metadata"].get("generation", 0) > status.get("observedGeneration", 0):
        return "running", "waiting for the daemonset spec update to be observed"
    desired = status.get("desiredNumberScheduled", 0)
    updated = status.get("updatedNumberScheduled", 0)
    available = status.get("numberAvailable", 0)
    waiting = f"waiting for daemonset {name} rollout to finish: "
    if updated < desired:
        return "running", f"{waiting}{updated} out of {desired} new pods have been updated"
    if available < desired:
        return "running", f"{waiting}{available} of {desired} updated pods are available"
    return "succeeded", f"daemonset {name} successfully rolled out"


def _rolls_out_by_itself(workload: dict[str, Any]) -> bool:
    """Whether the controller rolls a new template out (a Deployment, or a StatefulSet or
    DaemonSet updating RollingUpdate), so that the workload's status follows it."""
    strategy = workload["spec"].get("updateStrategy") or {}
    return strategy.get("type", "RollingUpdate") == "RollingUpdate"


ROLLOUT_STATUS: dict[str, Callable[[dict[str, Any]], tuple[str, str]]] = {
    "deployment": _deployment_status,
    "statefulset": _statefulset_status,
    "daemonset": _daemonset_status,
}


# -- helpers -------------------------------------------------------------------------------------


def _paused(name: str) -> str:
    return (
        f"deployment {name} is paused: its controller rolls out no change until it is resumed "
        f"(kubectl rollout resume deployment/{name})"
    )


def _patched_at(found: dict[str, Any]) -> str | None:
    """When shiphook last changed the object, in the API server's time (RFC 3339, seconds)."""
    times = [
        entry["time"]
        for entry in found["metadata"].get("managedFields") or ()
        if entry.get("manager") == FIELD_MANAGER and not entry.get("subresource")
        and entry.get("time")
    ]  # fmt: skip
    return max(times, default=None)


def job_name(cronjob: str, deployment_id: str) -> str:
    """The Job a run creates: the CronJob's name and a digest of the deployment id, so that a
    repeated run finds it; 63 characters at most (the job-name label's limit)."""
    digest = hashlib.sha256(deployment_id.encode()).hexdigest()[:10]
    return f"{cronjob[:52].rstrip('-.')}-{digest}"


def _template_digest(workload: dict[str, Any]) -> str:
    """The pod template as the API server keeps it (defaults and admission applied), hashed: a
    rollback finds out whether anything but shiphook changed it since the deploy."""
    template = json.dumps(workload["spec"]["template"], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(template.encode()).hexdigest()


def _container(target: KubernetesTarget, template: dict[str, Any], what: str) -> dict[str, Any]:
    """The pod template's container the target names, or its only one."""
    containers = template["spec"]["containers"]
    names = ", ".join(c["name"] for c in containers)
    wanted = target.options.container
    if wanted is None:
        if len(containers) == 1:
            return containers[0]
        raise BackendError(
            f'{what} has {len(containers)} containers ({names}): set container = "<name>" on '
            f"target {target.name} to say which one shiphook changes"
        )
    for container in containers:
        if container["name"] == wanted:
            return container
    raise BackendError(f"{what} has no container {wanted!r} (its containers: {names})")


def _named_image(found: dict[str, Any], container: str) -> str | None:
    """The image of the named container of a workload (its template) or of a pod."""
    spec = found["spec"]["template"]["spec"] if "template" in found["spec"] else found["spec"]
    return next((c["image"] for c in spec["containers"] if c["name"] == container), None)


def _ready(pod: dict[str, Any]) -> bool:
    conditions = (pod.get("status") or {}).get("conditions") or ()
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


def _problems(pods: Any) -> str:
    """`pod NAME: container C ImagePullBackOff (...)` for the first few pods that have one."""
    found = []
    for pod in pods:
        status = pod.get("status") or {}
        said = []
        for c in [
            *(status.get("initContainerStatuses") or ()),
            *(status.get("containerStatuses") or ()),
        ]:
            state, last = c.get("state") or {}, (c.get("lastState") or {}).get("terminated")
            waiting, ended = state.get("waiting"), state.get("terminated")
            if waiting and waiting.get("reason") not in (
                None,
                "ContainerCreating",
                "PodInitializing",
            ):
                text = f"container {c['name']} {waiting['reason']}"
                if waiting.get("message"):
                    text += f" ({waiting['message']})"
                if last and last.get("exitCode"):
                    text += f", last exit code {last['exitCode']}"
                said.append(text)
            elif ended and ended.get("exitCode"):
                said.append(
                    f"container {c['name']} {ended.get('reason') or 'terminated'} with exit code "
                    f"{ended['exitCode']}"
                )
        if said:
            found.append(f"pod {pod['metadata']['name']}: {', '.join(said)}")
    return "; ".join(found[:PODS_NAMED])


def _selector(selector: dict[str, Any]) -> str:
    """A LabelSelector as the `labelSelector` query parameter writes it."""
    parts = [f"{k}={v}" for k, v in (selector.get("matchLabels") or {}).items()]
    for e in selector.get("matchExpressions") or ():
        values = ",".join(e.get("values") or ())
        parts.append(
            {
                "In": f"{e['key']} in ({values})",
                "NotIn": f"{e['key']} notin ({values})",
                "Exists": e["key"],
                "DoesNotExist": f"!{e['key']}",
            }[e["operator"]]
        )
    return ",".join(parts)


def _merge_env(base: list[dict[str, Any]], overrides: dict[str, str]) -> list[dict[str, Any]]:
    """The container's env, with `overrides` replacing same-named entries in place (a value
    replaces a valueFrom) and new names appended."""
    left = dict(overrides)
    merged = []
    for entry in base:
        name = entry["name"]
        merged.append({"name": name, "value": left.pop(name)} if name in left else entry)
    merged.extend({"name": name, "value": value} for name, value in left.items())
    return merged


def _may_not(missing: list[str], namespace: str, needed_by: str | None = None) -> str:
    text = f"the credentials may not {', '.join(missing)} in namespace {namespace}"
    if needed_by:
        text += f", which {needed_by} needs"
    return f"{text} ({ROLE})"


@contextmanager
def _not_found_in(namespace: str) -> Iterator[None]:
    """A 404 of a read names the namespace it looked in (the API server's message does not)."""
    try:
        yield
    except ApiError as exc:
        if exc.status != 404:
            raise
        raise ApiError(
            f"{exc.message} in namespace {namespace}", status=404, reason=exc.reason,
            transient=False,
        ) from None  # fmt: skip


def _status_of(exc: ApiException) -> tuple[str, str]:
    """The metav1.Status message and reason of an error answer; for an answer that is no Status
    (the API server's in-flight limit answers 429 in plain text), the status line and the first
    line of the text."""
    try:
        status = json.loads(exc.body or "")
    except ValueError:
        status = None
    if isinstance(status, dict) and status.get("message"):
        return str(status["message"]), str(status.get("reason") or "")
    message = f"{exc.status} {exc.reason}"
    lines = exc.body.strip().splitlines() if isinstance(exc.body, str) else []
    if lines:
        message += f": {lines[0][:200]}"
    return message, str(exc.reason or "")


def _retry_after(exc: ApiException) -> float | None:
    """The seconds an answer's `Retry-After` asks for: the API server sends whole seconds (its
    in-flight limit 1, a Status with `details.retryAfterSeconds` those)."""
    value = (exc.headers or {}).get("Retry-After", "").strip()
    return float(value) if value.isdigit() else None


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip() or None
    except OSError:
        return None
