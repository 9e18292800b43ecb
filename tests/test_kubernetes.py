"""The Kubernetes backend (plugins/shiphook_kubernetes) through the real shiphook deployer, the real
client and a real control plane (tests/k8s: Kubernetes' own controllers, kwok as the kubelet).

Every test works in a fresh namespace; a failure is declared by the image tag deployed (`:broken`
ImagePullBackOff, `:crashloop` CrashLoopBackOff, a Job pod's `:fail` exit code 1: tests/k8s/
stages.yaml). What a test says about Kubernetes it reads from the API server: templates,
ReplicaSets, ControllerRevisions, pods, Jobs.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import signal
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kubernetes.client as k8s
import pytest
import yaml
from conftest import ADMIN_TOKEN, ROOT, Harness, run_cli, write_config
from http_proxy import Cut
from k8s.api_proxy import TOO_MANY_REQUESTS, ApiServerProxy, Step, status
from shiphook.instance import open_instance
from shiphook.testing import eventually
from shiphook_kubernetes.backend import (
    ANNOTATION_DEPLOYMENT,
    INSTANTIATE,
    NEEDED,
    RUN_TTL,
    RUN_TTL_MIN,
    TARGET_NEEDS,
    WORKLOADS,
    ApiError,
    job_name,
)
from test_durability import all_deployments
from test_k8s_cluster import images, template, workload

APP = "shiphook-test/app"  # never pulled: kwok plays the kubelet
WAIT = "90"


def readme_role() -> list[dict]:
    """The rules of the Role in README.md's Kubernetes section, as a user would apply them."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("### The Role shiphook needs") :]
    start = section.index("```yaml\n") + len("```yaml\n")
    block = section[start : section.index("\n```", start)]
    [role] = [d for d in yaml.safe_load_all(block) if d["kind"] == "Role"]
    return role["rules"]


README_RULES = readme_role()


@dataclass
class Kube:
    cluster: Any  # tests/k8s/cluster.py's ControlPlane
    namespace: str
    apps: k8s.AppsV1Api
    batch: k8s.BatchV1Api
    core: k8s.CoreV1Api
    rbac: k8s.RbacAuthorizationV1Api

    def deployment(self, name: str = "web", *, containers: list[dict] | None = None, **spec):
        body = workload(name, f"{APP}:v1", **{"replicas": 2, **spec})
        if containers:
            body["spec"]["template"]["spec"]["containers"] = containers
        self.apps.create_namespaced_deployment(self.namespace, body)
        eventually(lambda: self.rolled_out("deployment", name), f"deployment {name}")
        return name

    def statefulset(self, name: str = "db", **spec) -> str:
        body = workload(name, f"{APP}:v1", **{"replicas": 2, "serviceName": name, **spec})
        self.apps.create_namespaced_stateful_set(self.namespace, body)
        eventually(lambda: self.rolled_out("statefulset", name), f"statefulset {name}")
        return name

    def daemonset(self, name: str = "agent") -> str:
        self.apps.create_namespaced_daemon_set(self.namespace, workload(name, f"{APP}:v1"))
        eventually(lambda: self.rolled_out("daemonset", name), f"daemonset {name}")
        return name

    def cronjob(
        self,
        name: str = "migrate",
        image: str = f"{APP}:ok",
        *,
        suspended_jobs: bool = False,
        **spec: Any,
    ) -> str:
        """A CronJob that never fires on its own, with `spec` added to its spec; with
        `suspended_jobs` its Jobs start suspended (no pod until the test resumes them)."""
        job_template = template(name, image, restartPolicy="Never")
        job_template["spec"]["containers"][0]["env"] = [
            {"name": "GREETING", "value": "hello"},
            {"name": "MODE", "value": "full"},
        ]
        body = {
            "metadata": {"name": name},
            "spec": {
                "schedule": "0 0 1 1 *",
                "suspend": True,  # runs only when shiphook starts one
                "jobTemplate": {
                    "metadata": {"labels": {"team": "db"}, "annotations": {"owner": "db-team"}},
                    "spec": {
                        "backoffLimit": 0,
                        "suspend": suspended_jobs,
                        "template": job_template,
                    },
                },
            }
            | spec,
        }
        self.batch.create_namespaced_cron_job(self.namespace, body)
        return name

    def read(self, kind: str, name: str) -> dict:
        method = getattr(self.apps, f"read_namespaced_{kind.replace('set', '_set')}")
        return json.loads(method(name, self.namespace, _preload_content=False).data)

    def images(self, kind: str, name: str) -> dict[str, str]:
        """Container name -> image of the workload's pod template."""
        containers = self.read(kind, name)["spec"]["template"]["spec"]["containers"]
        return {c["name"]: c["image"] for c in containers}

    def rolled_out(self, kind: str, name: str) -> bool:
        """`kubectl rollout status` says done (the backend's own reading of it)."""
        from shiphook_kubernetes.backend import ROLLOUT_STATUS

        return ROLLOUT_STATUS[kind](self.read(kind, name))[0] == "succeeded"

    def pod_images(self, name: str) -> list[str]:
        """The image of the first container of each pod of `name` that runs and is ready."""
        pods = self.core.list_namespaced_pod(self.namespace, label_selector=f"app={name}").items
        return sorted(
            p.spec.containers[0].image
            for p in pods
            if p.metadata.deletion_timestamp is None
            and p.status.phase == "Running"
            and all(c.ready for c in p.status.container_statuses or [])
        )

    def jobs(self) -> list[k8s.V1Job]:
        return self.batch.list_namespaced_job(self.namespace).items

    def service_account(self, name: str, rules: list[dict]) -> str:
        """A ServiceAccount bound to a Role of exactly `rules`; a kubeconfig with its token."""
        ns = self.namespace
        self.core.create_namespaced_service_account(ns, {"metadata": {"name": name}})
        self.rbac.create_namespaced_role(ns, {"metadata": {"name": name}, "rules": rules})
        self.rbac.create_namespaced_role_binding(
            ns,
            {
                "metadata": {"name": name},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
                "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": ns}],
            },
        )
        return name


@contextlib.contextmanager
def new_kube(cluster: Any, prefix: str) -> Iterator[Kube]:
    """A `Kube` on a fresh namespace of `cluster`, deleted afterwards."""
    namespace = cluster.new_namespace(prefix)
    with cluster.client() as api:
        yield Kube(
            cluster,
            namespace,
            k8s.AppsV1Api(api),
            k8s.BatchV1Api(api),
            k8s.CoreV1Api(api),
            k8s.RbacAuthorizationV1Api(api),
        )
        k8s.CoreV1Api(api).delete_namespace(namespace)


@pytest.fixture
def kube(kube_cluster) -> Iterator[Kube]:
    with new_kube(kube_cluster, "shiphook") as kube:
        yield kube


def kube_config(
    tmp_path: Path,
    kube: Kube,
    *targets: str,
    kubeconfig: Path | None = None,
    extra: str = "",
    namespace: str | None = None,
) -> Path:
    """A config whose backend `k8s` reaches the test cluster (as admin unless `kubeconfig`), its
    default namespace the test's unless `namespace`."""
    text = f"""
[server]
database_url = "sqlite:///{tmp_path}/shiphook.db"
{extra}
[backends.k8s]
plugin = "kubernetes"
kubeconfig = "{kubeconfig or kube.cluster.kubeconfig}"
namespace = "{namespace or kube.namespace}"
timeout = 10
poll_interval = 0.2
"""
    return write_config(tmp_path, text + "".join(targets))


def target(name: str, kind: str, **keys: Any) -> str:
    keys = {"rollout_timeout": 90, "retry_budget": 10, **keys}
    lines = [f"[targets.{name}]", f'kind = "{kind}"', 'backend = "k8s"']
    lines += [f"{key} = {json.dumps(value)}" for key, value in keys.items()]
    return "\n" + "\n".join(lines) + "\n"


def as_service_account(kube: Kube, tmp_path: Path, name: str, rules: list | None = None) -> Path:
    """A kubeconfig of the ServiceAccount `name`; with `rules`, one made bound to a Role of
    those rules first."""
    if rules is not None:
        kube.service_account(name, rules)
    token = kube.cluster.token_for(kube.namespace, name)
    return kube.cluster.write_kubeconfig(tmp_path / f"{name}.kubeconfig", token, kube.namespace)


def wait_post(harness: Harness, token: str, body: object) -> Any:
    return harness.post_hook(token, body, params={"wait": WAIT})


def run_body(**env: str) -> dict:
    return {"instanceEnvironmentVariables": [{"name": k, "value": v} for k, v in env.items()]}


# -- Deployments --------------------------------------------------------------------------------


def test_a_deployment_rolls_to_a_new_tag_and_the_same_tag_again_patches_nothing(
    kube, harness_factory, tmp_path
):
    kube.deployment("web")
    harness = harness_factory(kube_config(tmp_path, kube, target("web", "app", deployment="web")))
    token = harness.new_hook("web")
    result = wait_post(harness, token, {"imageTag": "v2"})
    assert result.status_code == 201, result.text
    deployment = result.json["deployment"]
    assert deployment["status"] == "succeeded"
    assert deployment["message"] == "deployment web successfully rolled out"  # kubectl's words
    assert deployment["backendRef"]["image"] == f"{APP}:v2"
    # answered once the new ReplicaSet's pods run it
    assert kube.pod_images("web") == [f"{APP}:v2"] * 2
    sets = kube.apps.list_namespaced_replica_set(kube.namespace).items
    [current] = [s for s in sets if s.spec.replicas]
    assert current.spec.template.spec.containers[0].image == f"{APP}:v2"
    found = kube.read("deployment", "web")
    assert found["metadata"]["annotations"][ANNOTATION_DEPLOYMENT] == deployment["id"]
    generation = found["metadata"]["generation"]

    again = wait_post(harness, token, {"imageTag": "v2"})
    assert again.status_code == 201, again.text
    assert again.json["deployment"]["message"] == f"deployment web already runs {APP}:v2"
    assert any("no rollout" in e["message"] for e in again.json["deployment"]["history"])
    assert kube.read("deployment", "web")["metadata"]["generation"] == generation  # no patch


@pytest.mark.parametrize(
    "tag, reason",
    [
        ("broken", f'ImagePullBackOff (Back-off pulling image "{APP}:broken")'),
        ("crashloop", "CrashLoopBackOff (back-off 40s restarting failed container=app pod=web-"),
    ],
)
def test_a_failing_tag_is_rolled_back_to_the_previous_replicasets_template(
    kube, harness_factory, tmp_path, tag, reason
):
    kube.deployment("web", progressDeadlineSeconds=3)
    before = kube.read("deployment", "web")["spec"]["template"]
    harness = harness_factory(kube_config(tmp_path, kube, target("web", "app", deployment="web")))
    result = wait_post(harness, harness.new_hook("web"), {"imageTag": tag})
    assert result.status_code == 502, result.text
    deployment = result.json["deployment"]
    assert deployment["status"] == "rolled_back"
    message = deployment["message"]
    # the controller's own words, then why the new pods do not run
    assert message.startswith('deployment web exceeded its progress deadline: ReplicaSet "web-'), (
        message
    )
    assert '" has timed out progressing.; pod web-' in message
    assert f"container app {reason}" in message
    if tag == "crashloop":
        assert "last exit code 1" in message
    assert message.endswith("; rolled back (deployment web successfully rolled out)")
    # the template is the previous ReplicaSet's again, and its pods run
    assert kube.read("deployment", "web")["spec"]["template"] == before
    assert kube.images("deployment", "web") == {"app": f"{APP}:v1"}
    eventually(lambda: kube.pod_images("web") == [f"{APP}:v1"] * 2, "v1 pods only")


def test_a_failing_tag_with_on_failure_leave_fails_and_stays(kube, harness_factory, tmp_path):
    kube.deployment("web", progressDeadlineSeconds=3)
    config = kube_config(tmp_path, kube, target("web", "app", deployment="web", on_failure="leave"))
    harness = harness_factory(config)
    result = wait_post(harness, harness.new_hook("web"), {"imageTag": "broken"})
    assert result.status_code == 502, result.text
    deployment = result.json["deployment"]
    assert deployment["status"] == "failed"
    assert "exceeded its progress deadline" in deployment["message"]
    assert "ImagePullBackOff" in deployment["message"]
    assert deployment["message"].endswith("; left as it is (on_failure = leave)")
    assert kube.images("deployment", "web") == {"app": f"{APP}:broken"}
    assert f"{APP}:v1" in kube.pod_images("web")  # the old pods keep serving


def test_a_progress_deadline_exceeded_before_the_patch_is_not_the_new_rollouts(
    kube, harness_factory, tmp_path
):
    """The controller keeps ProgressDeadlineExceeded on a Deployment until a new template makes
    progress, so right after a patch it still reports the old rollout's: a deploy after a
    failure left as it is, and a rollback, wait for the new template's own outcome."""
    kube.deployment("web", replicas=1, progressDeadlineSeconds=3)
    config = kube_config(
        tmp_path,
        kube,
        target("left", "app", deployment="web", on_failure="leave"),
        target("undone", "app", deployment="web"),
    )
    harness = harness_factory(config)
    left = wait_post(harness, harness.new_hook("left"), {"imageTag": "broken"})
    assert left.json["deployment"]["status"] == "failed", left.text
    condition = kube.read("deployment", "web")["status"]["conditions"]
    assert any(c.get("reason") == "ProgressDeadlineExceeded" for c in condition), condition

    undone = harness.new_hook("undone")
    fixed = wait_post(harness, undone, {"imageTag": "v2"})
    assert fixed.json["deployment"]["status"] == "succeeded", fixed.text
    assert kube.pod_images("web") == [f"{APP}:v2"]
    for _ in range(2):  # its rollback starts from the deadline this failure left
        again = wait_post(harness, undone, {"imageTag": "crashloop"})
        assert again.json["deployment"]["status"] == "rolled_back", again.text
        assert again.json["deployment"]["message"].endswith(
            "; rolled back (deployment web successfully rolled out)"
        )
        assert kube.images("deployment", "web") == {"app": f"{APP}:v2"}


def test_only_the_named_container_of_a_multi_container_pod_changes(kube, harness_factory, tmp_path):
    containers = [
        {"name": "app", "image": f"{APP}:v1"},
        {"name": "proxy", "image": "shiphook-test/proxy:1.0"},
    ]
    kube.deployment("web", containers=containers)
    config = kube_config(
        tmp_path,
        kube,
        target("web", "app", deployment="web", container="app"),
        target("unnamed", "app", deployment="web"),
    )
    harness = harness_factory(config)
    result = wait_post(harness, harness.new_hook("web"), {"imageTag": "v2"})
    assert result.status_code == 201, result.text
    assert kube.images("deployment", "web") == {
        "app": f"{APP}:v2",
        "proxy": "shiphook-test/proxy:1.0",
    }
    unnamed = wait_post(harness, harness.new_hook("unnamed"), {"imageTag": "v3"})
    assert unnamed.status_code == 502, unnamed.text
    assert unnamed.json["deployment"]["message"] == (
        'deployment web has 2 containers (app, proxy): set container = "<name>" on target '
        "unnamed to say which one shiphook changes"
    )
    assert kube.images("deployment", "web")["app"] == f"{APP}:v2"


def test_a_concurrent_edit_answered_409_is_read_again_and_retried(kube, harness_factory, tmp_path):
    kube.deployment("web")
    harness = harness_factory(kube_config(tmp_path, kube, target("web", "app", deployment="web")))
    backend = harness.instance.backends["k8s"]
    real = backend._patch
    answers: list[str] = []

    def patch(*args: Any, **kwargs: Any) -> Any:
        if not answers:  # someone else edits the Deployment between shiphook's read and patch
            edit = {"metadata": {"annotations": {"team": "web"}}}
            kube.apps.patch_namespaced_deployment("web", kube.namespace, edit)
        try:
            result = real(*args, **kwargs)
        except ApiError as exc:
            answers.append(f"{exc.status} {exc.message}")
            raise
        answers.append("200")
        return result

    backend._patch = patch
    result = wait_post(harness, harness.new_hook("web"), {"imageTag": "v2"})
    assert result.status_code == 201, result.text
    assert answers[0].startswith(
        '409 Operation cannot be fulfilled on deployments.apps "web": the object has been '
        "modified; please apply your changes to the latest version and try again"
    ), answers
    # read again and patched again; a status write of the controller in between is a 409 too
    assert answers[-1] == "200", answers
    assert all(a.startswith("409 ") for a in answers[:-1]), answers
    found = kube.read("deployment", "web")
    assert found["metadata"]["annotations"]["team"] == "web"  # the other edit stays
    assert kube.images("deployment", "web") == {"app": f"{APP}:v2"}


def test_a_deploy_repeated_after_a_crash_follows_the_first_rollout(kube, harness_factory, tmp_path):
    """The deployer thread dies right after the patch, before it stored the reference; the deployer
    calls deploy again for the same deployment, which finds its own rollout by the annotation
    (no second patch) and rolls it back to what ran before the first call."""
    kube.deployment("web", progressDeadlineSeconds=3)
    config = kube_config(
        tmp_path,
        kube,
        target("web", "app", deployment="web"),
        extra="[deployer]\nlease_seconds = 2\nscan_interval = 0.2\n",
    )
    harness = harness_factory(config)
    backend = harness.instance.backends["k8s"]
    real, real_patch = backend.deploy, backend._patch
    calls: list[str] = []
    patches: list[dict] = []

    class Crash(BaseException):
        """The deployer's process dies here (what no `except Exception` catches)."""

    def crashing(*args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs["deployment_id"])
        ref = real(*args, **kwargs)
        if len(calls) == 1:
            raise Crash
        return ref

    def patch(*args: Any, **kwargs: Any) -> Any:
        patches.append(args[3])
        return real_patch(*args, **kwargs)

    backend.deploy, backend._patch = crashing, patch
    deployment_id = harness.deploy(harness.new_hook("web"), {"imageTag": "broken"})
    deployment = harness.wait_for(deployment_id, timeout=90)
    assert calls == [deployment_id, deployment_id]
    assert deployment["status"] == "rolled_back", deployment
    assert "ImagePullBackOff" in deployment["message"]
    assert deployment["backendRef"]["previous_image"] == f"{APP}:v1"
    # one patch of the image, one rollback (a JSON patch of the template): none repeated
    assert [type(p).__name__ for p in patches] == ["dict", "list"], patches
    assert kube.images("deployment", "web") == {"app": f"{APP}:v1"}


PAUSED = (
    "deployment web is paused: its controller rolls out no change until it is resumed "
    "(kubectl rollout resume deployment/web)"
)


def test_a_deploy_to_a_paused_deployment_fails_at_once_and_changes_nothing(
    kube, harness_factory, tmp_path
):
    """The controller makes no rollout of a paused Deployment (kubectl rollout status would wait
    for one until its timeout): nothing is patched, and the deploy says to resume it."""
    kube.deployment("web")
    kube.apps.patch_namespaced_deployment("web", kube.namespace, {"spec": {"paused": True}})
    generation = kube.read("deployment", "web")["metadata"]["generation"]
    web = target("web", "app", deployment="web", rollout_timeout=20)
    harness = harness_factory(kube_config(tmp_path, kube, web))
    result = wait_post(harness, harness.new_hook("web"), {"imageTag": "v2"})
    assert result.status_code == 502, result.text
    deployment = result.json["deployment"]
    assert deployment["status"] == "failed"
    assert deployment["message"] == (
        f"{PAUSED}; shiphook changed nothing: resume it and deploy again"
    )
    found = kube.read("deployment", "web")
    assert found["metadata"]["generation"] == generation
    assert kube.images("deployment", "web") == {"app": f"{APP}:v1"}


@pytest.mark.parametrize("kind", ["statefulset", "daemonset"])
def test_a_new_tag_for_a_workload_updating_on_delete_fails_at_once_and_changes_nothing(
    kube, harness_factory, tmp_path, kind
):
    """Its pods would take the new template only when deleted: no rollout to follow, so
    nothing is patched (before, it was patched, then "rolled back")."""
    spec = {"updateStrategy": {"type": "OnDelete"}}
    body = workload(
        kind, f"{APP}:v1", **spec | ({"serviceName": kind} if kind == "statefulset" else {})
    )
    getattr(kube.apps, f"create_namespaced_{kind.replace('set', '_set')}")(kube.namespace, body)
    eventually(lambda: images(kube, kind) == {f"{APP}:v1"}, f"{kind}'s pods")
    generation = kube.read(kind, kind)["metadata"]["generation"]
    harness = harness_factory(kube_config(tmp_path, kube, target("t", "app", **{kind: kind})))
    token = harness.new_hook("t")
    result = wait_post(harness, token, {"imageTag": "v2"})
    assert result.status_code == 502, result.text
    assert result.json["deployment"]["message"] == (
        f"{kind} {kind} updates OnDelete: its pods take a new template only when they are "
        "deleted, so there would be no rollout to follow; shiphook changed nothing: set "
        "updateStrategy RollingUpdate, or update it by hand"
    )
    assert kube.read(kind, kind)["metadata"]["generation"] == generation
    assert kube.images(kind, kind) == {"app": f"{APP}:v1"}
    # the tag it runs: nothing to roll out, it succeeds at once
    assert wait_post(harness, token, {"imageTag": "v1"}).status_code == 201


def test_check_says_what_makes_every_deploy_of_a_new_tag_fail(kube, tmp_path):
    kube.deployment("paused")
    kube.apps.patch_namespaced_deployment("paused", kube.namespace, {"spec": {"paused": True}})
    ondelete = {"replicas": 2, "serviceName": "db", "updateStrategy": {"type": "OnDelete"}}
    kube.apps.create_namespaced_stateful_set(
        kube.namespace, workload("db", f"{APP}:v1", **ondelete)
    )
    config = kube_config(
        tmp_path,
        kube,
        target("paused", "app", deployment="paused"),
        target("db", "app", statefulset="db"),
    )
    lines = run_cli("check", config=config, env=serve_env()).stdout.splitlines()
    where = f"in namespace {kube.namespace}, 2 replicas"
    assert (
        f"target paused (app): found, running {APP}:v1 (deployment paused {where}; paused: a "
        "new tag fails at once until `kubectl rollout resume`)"
    ) in lines
    assert (
        f"target db (app): found, running {APP}:v1 (statefulset db {where}; updates OnDelete: "
        "a new tag fails at once, as there is no rollout)"
    ) in lines


def test_a_deployment_paused_during_its_rollout_fails_and_is_not_rolled_back(
    kube, harness_factory, tmp_path
):
    """Paused mid-rollout, the rollout fails at once; the rollback is refused as `kubectl
    rollout undo` refuses it (k8s.io/kubectl/pkg/polymorphichelpers/rollback.go)."""
    kube.deployment("web")  # the default progress deadline: 600 s, no end of its own
    web = target("web", "app", deployment="web", rollout_timeout=60)
    harness = harness_factory(kube_config(tmp_path, kube, web))
    deployment_id = harness.deploy(harness.new_hook("web"), {"imageTag": "broken"})
    eventually(
        lambda: "ImagePullBackOff" in harness.instance.deployments.get(deployment_id).message,
        "the rollout's failing pod",
    )
    kube.apps.patch_namespaced_deployment("web", kube.namespace, {"spec": {"paused": True}})
    deployment = harness.wait_for(deployment_id, timeout=90)
    assert deployment["status"] == "failed", deployment
    message = deployment["message"]
    assert message.startswith(f"{PAUSED}; pod web-"), message  # and why its pods do not run:
    assert f'ImagePullBackOff (Back-off pulling image "{APP}:broken")' in message
    assert message.endswith(
        "; not rolled back: you cannot rollback a paused deployment; resume it first with "
        "'kubectl rollout resume' and try again"
    )
    assert kube.images("deployment", "web") == {"app": f"{APP}:broken"}


@pytest.mark.parametrize("kind", ["deployment", "statefulset"])
def test_a_pod_template_edited_by_hand_during_the_rollout_is_not_rolled_back(
    kube, harness_factory, tmp_path, kind
):
    """An env set by hand mid-rollout (`kubectl set env`) is kept: a rollback would undo it."""
    getattr(kube, kind)("web")
    web = target("web", "app", **{kind: "web"}, rollout_timeout=20)
    harness = harness_factory(kube_config(tmp_path, kube, web))
    deployment_id = harness.deploy(harness.new_hook("web"), {"imageTag": "broken"})
    eventually(
        lambda: "ImagePullBackOff" in harness.instance.deployments.get(deployment_id).message,
        "the rollout's failing pod",
    )
    hotfix = {"containers": [{"name": "app", "env": [{"name": "HOTFIX", "value": "1"}]}]}
    patch = getattr(kube.apps, f"patch_namespaced_{kind.replace('set', '_set')}")
    patch("web", kube.namespace, {"spec": {"template": {"spec": hotfix}}})
    deployment = harness.wait_for(deployment_id, timeout=90)
    assert deployment["status"] == "failed", deployment
    assert deployment["message"].endswith(
        f"; not rolled back: {kind} web's pod template changed since this deployment set "
        f"{APP}:broken (kubectl edit, set env, rollout restart): something else changed it, so "
        "shiphook does not roll it back, which would undo that change too; look at it and "
        "deploy again"
    ), deployment["message"]
    [container] = kube.read(kind, "web")["spec"]["template"]["spec"]["containers"]
    assert (container["image"], container["env"]) == (
        f"{APP}:broken",
        [{"name": "HOTFIX", "value": "1"}],
    )


def test_a_rollback_brings_back_the_replicasets_annotations_as_kubectl_rollout_undo_does(
    kube, harness_factory, tmp_path
):
    """`kubectl rollout undo` sets the Deployment's annotations to the ReplicaSet's it returns
    to, but for those the Deployment keeps (its revision, kubectl apply's last configuration);
    so `kubectl rollout history` shows the change-cause of what runs again."""
    kube.deployment("web", progressDeadlineSeconds=3)
    applied = json.dumps({"kind": "Deployment", "metadata": {"name": "web"}})  # kubectl apply's
    last_applied = {"kubectl.kubernetes.io/last-applied-configuration": applied}
    annotate = kube.apps.patch_namespaced_deployment
    annotate("web", kube.namespace, {"metadata": {"annotations": last_applied}})
    # the rollback, not how the rollout fails, is under test: shiphook's own rollout_timeout
    # ends it should a busy controller-manager be late with the progress deadline
    web = target("web", "app", deployment="web", rollout_timeout=20)
    harness = harness_factory(kube_config(tmp_path, kube, web))
    token = harness.new_hook("web")
    first = wait_post(harness, token, {"imageTag": "v2"}).json["deployment"]
    assert first["status"] == "succeeded", first

    def current_set() -> dict:
        [current] = [s for s in kube.apps.list_namespaced_replica_set(kube.namespace).items
                     if s.spec.template.spec.containers[0].image == f"{APP}:v2"]  # fmt: skip
        return current.metadata.annotations

    cause = {"kubernetes.io/change-cause": "v2 for the spring release"}
    annotate("web", kube.namespace, {"metadata": {"annotations": cause}})
    eventually(lambda: current_set().get("kubernetes.io/change-cause"), "the set's cause")
    v2_set = current_set()

    broken_id = harness.deploy(token, {"imageTag": "broken"})
    eventually(
        lambda: kube.images("deployment", "web") == {"app": f"{APP}:broken"},
        "kube.images('deployment', 'web') == {'app': f'{APP}:broken'}",
    )
    cause = {"kubernetes.io/change-cause": "the broken one"}
    annotate("web", kube.namespace, {"metadata": {"annotations": cause}})
    broken = harness.wait_for(broken_id, timeout=120)
    assert broken["status"] == "rolled_back", broken

    annotations = kube.read("deployment", "web")["metadata"]["annotations"]
    # the v2 ReplicaSet's: its change-cause and shiphook's record of the deploy that made it
    assert annotations["kubernetes.io/change-cause"] == "v2 for the spring release"
    assert annotations[ANNOTATION_DEPLOYMENT] == first["id"]
    assert annotations["shiphook.io/previous-image"] == f"{APP}:v1"
    # the Deployment's own, kept
    assert annotations["kubectl.kubernetes.io/last-applied-configuration"] == applied
    assert "deployment.kubernetes.io/desired-replicas" in v2_set
    assert "deployment.kubernetes.io/desired-replicas" not in annotations
    revision = int(v2_set["deployment.kubernetes.io/revision"])
    eventually(
        lambda: (
            kube.read("deployment", "web")["metadata"]["annotations"][
                "deployment.kubernetes.io/revision"
            ]
            == str(revision + 2)
        ),
        "the revision after the rollback",
    )


def test_in_cluster_the_pods_serviceaccount_and_namespace_are_used(
    kube, harness_factory, tmp_path, monkeypatch
):
    """What Kubernetes mounts in a pod, and the variables it sets, in files of the test's."""
    import kubernetes.config.incluster_config as incluster
    import shiphook_kubernetes.backend

    kube.deployment("web")
    kube.service_account("shiphook", README_RULES)
    mounted = tmp_path / "serviceaccount"
    mounted.mkdir()
    (mounted / "token").write_text(kube.cluster.token_for(kube.namespace, "shiphook"))
    (mounted / "ca.crt").write_text(kube.cluster.ca.read_text())
    (mounted / "namespace").write_text(kube.namespace)
    monkeypatch.setattr(incluster, "SERVICE_TOKEN_FILENAME", str(mounted / "token"))
    monkeypatch.setattr(incluster, "SERVICE_CERT_FILENAME", str(mounted / "ca.crt"))
    monkeypatch.setattr(shiphook_kubernetes.backend, "IN_CLUSTER_NAMESPACE", mounted / "namespace")
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "127.0.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", str(kube.cluster.api_port))
    config = write_config(
        tmp_path,
        f"""
        [server]
        database_url = "sqlite:///{tmp_path}/shiphook.db"

        [backends.k8s]
        plugin = "kubernetes"
        in_cluster = true
        poll_interval = 0.2

        [targets.web]
        kind = "app"
        backend = "k8s"
        deployment = "web"
        """,
    )
    harness = harness_factory(config)
    backend = harness.instance.backends["k8s"]
    assert backend.check().endswith(
        f": the credentials are accepted; targets default to namespace {kube.namespace}"
    )
    result = wait_post(harness, harness.new_hook("web"), {"imageTag": "v2"})
    assert result.status_code == 201, result.text
    assert kube.images("deployment", "web") == {"app": f"{APP}:v2"}


# -- StatefulSets and DaemonSets ------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["statefulset", "daemonset"])
def test_a_statefulset_or_daemonset_rolls_out_and_a_failing_tag_is_rolled_back(
    kube, harness_factory, tmp_path, kind, caplog
):
    caplog.set_level(logging.INFO, logger="shiphook.kubernetes")
    name = kube.statefulset() if kind == "statefulset" else kube.daemonset()
    pods = 2 if kind == "statefulset" else 1
    config = kube_config(
        tmp_path,
        kube,
        target("app", "app", **{kind: name}),
        # no progress deadline on these: shiphook's rollout_timeout ends a rollout that hangs
        target("hangs", "app", **{kind: name}, rollout_timeout=8),
    )
    harness = harness_factory(config)
    result = wait_post(harness, harness.new_hook("app"), {"imageTag": "v2"})
    assert result.status_code == 201, result.text
    message = result.json["deployment"]["message"]
    if kind == "statefulset":
        assert message.startswith(f"statefulset {name} rolling update complete: 2 pods at revision")
    else:
        assert message == f"daemonset {name} successfully rolled out"
    eventually(lambda: kube.pod_images(name) == [f"{APP}:v2"] * pods, "v2 pods")
    revisions = kube.apps.list_namespaced_controller_revision(kube.namespace).items
    assert sorted(r.revision for r in revisions) == [1, 2]
    before = kube.read(kind, name)["spec"]["template"]

    failed = wait_post(harness, harness.new_hook("hangs"), {"imageTag": "broken"})
    assert failed.status_code == 502, failed.text
    deployment = failed.json["deployment"]
    assert deployment["status"] == "rolled_back", deployment["message"]
    assert deployment["message"].startswith("did not finish within 8s (last state: waiting for")
    assert f'ImagePullBackOff (Back-off pulling image "{APP}:broken")' in deployment["message"]
    if kind == "statefulset":  # its pod stuck on the broken template, deleted by the rollback
        deleted = f"deployment {deployment['id']}: statefulset {name}: deleted pod {name}-"
        assert deleted in caplog.text
    # the ControllerRevision of v2 patched back
    assert kube.read(kind, name)["spec"]["template"] == before
    eventually(lambda: kube.pod_images(name) == [f"{APP}:v2"] * pods, "v2 pods again")


def test_a_statefulset_left_failing_rolls_forward_to_a_good_tag(kube, harness_factory, tmp_path):
    """Its pods stuck on the failed template hold any new rollout (the StatefulSet's "forced
    rollback"): a deploy over the failure left in place deletes them once it has patched."""
    name = kube.statefulset()
    left = target("db", "app", statefulset=name, rollout_timeout=8, on_failure="leave")
    harness = harness_factory(kube_config(tmp_path, kube, left))
    token = harness.new_hook("db")
    failed = wait_post(harness, token, {"imageTag": "broken"})
    assert failed.status_code == 502, failed.text
    assert failed.json["deployment"]["message"].endswith("; left as it is (on_failure = leave)")
    assert f"{APP}:broken" in images(kube, name)
    fixed = wait_post(harness, token, {"imageTag": "v3"})
    assert fixed.status_code == 201, fixed.text
    eventually(lambda: kube.pod_images(name) == [f"{APP}:v3"] * 2, "v3 pods")
    # and back to the failure left in place, then on demand to what ran before it
    assert wait_post(harness, token, {"imageTag": "broken"}).status_code == 502
    back = harness.client.simulate_post(
        f"/api/v1/deployments/{failed.json['deployment']['id']}/rollback",
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
    )
    assert back.status_code == 201, back.text
    ended = harness.wait_for(back.json["deployment"]["id"], timeout=90)
    assert ended["status"] == "succeeded", ended
    eventually(lambda: kube.pod_images(name) == [f"{APP}:v1"] * 2, "v1 pods")


def test_a_partitioned_statefulset_rollout_ends_when_the_pods_above_the_partition_run_it(
    kube, harness_factory, tmp_path
):
    strategy = {"type": "RollingUpdate", "rollingUpdate": {"partition": 1}}
    name = kube.statefulset("db", replicas=3, updateStrategy=strategy)
    harness = harness_factory(kube_config(tmp_path, kube, target("db", "app", statefulset=name)))
    result = wait_post(harness, harness.new_hook("db"), {"imageTag": "v2"})
    assert result.status_code == 201, result.text
    assert result.json["deployment"]["message"] == (
        "partitioned rollout complete: 2 new pods have been updated"
    )
    pods = kube.core.list_namespaced_pod(kube.namespace, label_selector="app=db").items
    images = {p.metadata.name: p.spec.containers[0].image for p in pods}
    assert images == {"db-0": f"{APP}:v1", "db-1": f"{APP}:v2", "db-2": f"{APP}:v2"}


# -- Jobs from CronJobs ---------------------------------------------------------------------------


def test_a_run_creates_a_job_from_the_cronjob_with_its_overrides(kube, harness_factory, tmp_path):
    cronjob = kube.cronjob()
    config = kube_config(
        tmp_path, kube, target("migrate", "job", cronjob=cronjob, max_concurrent_runs=2)
    )
    harness = harness_factory(config)
    token = harness.new_hook("migrate")
    result = wait_post(harness, token, run_body(MODE="dry-run", TARGET="v42"))
    assert result.status_code == 201, result.text
    run = result.json["deployment"]
    assert run["status"] == "succeeded", run
    name = job_name(cronjob, run["id"])
    assert run["message"].startswith(f"job {name} completed (")
    [job] = kube.jobs()
    # as `kubectl create job --from=cronjob/migrate` makes it
    assert job.metadata.name == name
    assert job.metadata.annotations[INSTANTIATE] == "manual"
    assert job.metadata.annotations["owner"] == "db-team"
    assert job.metadata.annotations[ANNOTATION_DEPLOYMENT] == run["id"]
    assert job.metadata.labels["team"] == "db"
    [owner] = job.metadata.owner_references
    cron = kube.batch.read_namespaced_cron_job(cronjob, kube.namespace)
    # owned, deleted with it, but not controlled: the CronJob controller prunes what it controls
    assert (owner.kind, owner.name, owner.uid, owner.controller) == (
        "CronJob",
        cronjob,
        cron.metadata.uid,
        False,
    )
    assert job.spec.ttl_seconds_after_finished == RUN_TTL
    env = {e.name: e.value for e in job.spec.template.spec.containers[0].env}
    assert env == {"GREETING": "hello", "MODE": "dry-run", "TARGET": "v42"}
    assert any(c.type == "Complete" and c.status == "True" for c in job.status.conditions)
    # the overrides were this run's only: the CronJob's own template is untouched
    own = cron.spec.job_template.spec.template.spec.containers[0]
    assert {e.name: e.value for e in own.env} == {"GREETING": "hello", "MODE": "full"}

    # two at once, each its own Job; an image tag for one run only
    ids = [harness.deploy(token, {"imageTag": "ok2"}), harness.deploy(token, run_body(MODE="x"))]
    ended = [harness.wait_for(i, timeout=90) for i in ids]
    assert [d["status"] for d in ended] == ["succeeded", "succeeded"], ended
    images = {j.metadata.name: j.spec.template.spec.containers[0].image for j in kube.jobs()}
    assert images[job_name(cronjob, ids[0])] == f"{APP}:ok2"
    assert images[job_name(cronjob, ids[1])] == f"{APP}:ok"
    assert len(images) == 3


def test_runs_are_read_to_their_end_whatever_the_cronjobs_history_limits(
    kube, harness_factory, tmp_path
):
    """The CronJob controller deletes the finished Jobs it controls beyond its history limits:
    a run it controlled would be gone before its outcome was read ("not found")."""
    cronjob = kube.cronjob(successfulJobsHistoryLimit=0, failedJobsHistoryLimit=0)
    config = kube_config(
        tmp_path, kube, target("migrate", "job", cronjob=cronjob, max_concurrent_runs=3)
    )
    harness = harness_factory(config)
    token = harness.new_hook("migrate")
    ids = [harness.deploy(token, run_body(MODE=str(n))) for n in range(2)]
    ids.append(harness.deploy(token, run_body(EXIT="5")))
    ended = [harness.wait_for(i, timeout=90) for i in ids]
    assert [d["status"] for d in ended] == ["succeeded", "succeeded", "failed"], ended
    assert ended[2]["message"].endswith(": container app Error with exit code 5"), ended[2]
    kept = {j.metadata.name: j.spec.ttl_seconds_after_finished for j in kube.jobs()}
    assert kept == {job_name(cronjob, i): RUN_TTL for i in ids}


def test_a_run_whose_job_is_deleted_fails_saying_it_is_gone(kube, harness_factory, tmp_path):
    cronjob = kube.cronjob(suspended_jobs=True)  # it runs until the test deletes it
    harness = harness_factory(
        kube_config(tmp_path, kube, target("migrate", "job", cronjob=cronjob))
    )
    deployment_id = harness.deploy(harness.new_hook("migrate"), run_body())
    name = job_name(cronjob, deployment_id)
    harness.wait_started(deployment_id, timeout=60)  # its Job is made
    kube.batch.delete_namespaced_job(name, kube.namespace, propagation_policy="Background")
    run = harness.wait_for(deployment_id, timeout=90)
    assert run["status"] == "failed", run
    assert run["message"] == (
        f"job {name} in namespace {kube.namespace} is gone before its outcome was read: deleted "
        "by hand or with its CronJob, or its ttlSecondsAfterFinished passed while shiphook was "
        "stopped"
    )


def test_a_runs_job_is_kept_an_hour_at_least_whatever_its_template_says(
    kube, harness_factory, tmp_path
):
    """A jobTemplate's ttlSecondsAfterFinished of 0 would delete a run before its outcome was
    read; a longer one is kept."""
    cronjob = kube.cronjob()
    harness = harness_factory(
        kube_config(tmp_path, kube, target("migrate", "job", cronjob=cronjob))
    )
    token = harness.new_hook("migrate")
    kept = {}
    for ttl in (0, 7 * 24 * 3600):
        patch = {"spec": {"jobTemplate": {"spec": {"ttlSecondsAfterFinished": ttl}}}}
        kube.batch.patch_namespaced_cron_job(cronjob, kube.namespace, patch)
        run = wait_post(harness, token, run_body()).json["deployment"]
        assert run["status"] == "succeeded", run
        job = kube.batch.read_namespaced_job(job_name(cronjob, run["id"]), kube.namespace)
        kept[ttl] = job.spec.ttl_seconds_after_finished
    assert kept == {0: RUN_TTL_MIN, 7 * 24 * 3600: 7 * 24 * 3600}


def test_a_run_whose_image_cannot_be_pulled_says_so_when_its_time_is_up(
    kube, harness_factory, tmp_path
):
    """ImagePullBackOff never fails a Job: rollout_timeout ends the wait, naming the reason."""
    cronjob = kube.cronjob()
    job = target("migrate", "job", cronjob=cronjob, rollout_timeout=8)
    harness = harness_factory(kube_config(tmp_path, kube, job))
    run = wait_post(harness, harness.new_hook("migrate"), {**run_body(), "imageTag": "broken"})
    run = run.json["deployment"]
    assert run["status"] == "failed", run
    name = job_name(cronjob, run["id"])
    assert run["message"].startswith(
        f"did not finish within 8s (last state: job {name}: 1 active, 0 succeeded, 0 failed; "
        f"pod {name}-"
    ), run["message"]
    assert (
        f': container app ImagePullBackOff (Back-off pulling image "{APP}:broken"))'
        in (run["message"])
    )


def test_a_failing_run_fails_with_the_reason_and_the_exit_code(kube, harness_factory, tmp_path):
    cronjob = kube.cronjob()
    harness = harness_factory(
        kube_config(tmp_path, kube, target("migrate", "job", cronjob=cronjob))
    )
    result = wait_post(harness, harness.new_hook("migrate"), {"imageTag": "fail"})
    assert result.status_code == 502, result.text
    run = result.json["deployment"]
    assert run["status"] == "failed"
    name = job_name(cronjob, run["id"])
    assert run["message"].startswith(
        f"job {name} failed: BackoffLimitExceeded: Job has reached the specified backoff limit; "
        f"pod {name}-"
    ), run["message"]
    assert run["message"].endswith(": container app Error with exit code 1")


def test_a_run_whose_overrides_make_it_exit_3_fails_with_exit_code_3(
    kube, harness_factory, tmp_path
):
    cronjob = kube.cronjob()
    harness = harness_factory(
        kube_config(tmp_path, kube, target("migrate", "job", cronjob=cronjob))
    )
    result = wait_post(harness, harness.new_hook("migrate"), run_body(EXIT="3"))
    assert result.status_code == 502, result.text
    assert result.json["deployment"]["message"].endswith(": container app Error with exit code 3")


def test_a_run_repeated_after_a_crash_finds_its_job(kube, harness_factory, tmp_path):
    """The deployer thread dies after the Job was created, before it stored the reference; when
    the lease has expired the deployer calls run_job again for the same deployment: 409
    AlreadyExists, and the Job is read instead of made twice."""
    cronjob = kube.cronjob()
    config = kube_config(
        tmp_path,
        kube,
        target("migrate", "job", cronjob=cronjob),
        extra="[deployer]\nlease_seconds = 2\nscan_interval = 0.2\n",
    )
    harness = harness_factory(config)
    backend = harness.instance.backends["k8s"]
    real = backend.run_job
    calls: list[str] = []

    class Crash(BaseException):
        """The deployer's process dies here (what no `except Exception` catches)."""

    def crashing(*args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs["deployment_id"])
        ref = real(*args, **kwargs)
        if len(calls) == 1:
            raise Crash
        return ref

    backend.run_job = crashing  # the deployer looks the method up on every call
    deployment_id = harness.deploy(harness.new_hook("migrate"), run_body(MODE="once"))
    run = harness.wait_for(deployment_id, timeout=90)
    assert run["status"] == "succeeded", run
    assert calls == [deployment_id, deployment_id]
    [job] = kube.jobs()
    assert job.metadata.name == job_name(cronjob, deployment_id)
    assert run["backendRef"]["job"] == job.metadata.name
    env = {e.name: e.value for e in job.spec.template.spec.containers[0].env}
    assert env["MODE"] == "once"


def test_a_run_resumed_after_kill_9_of_shiphook_serve_has_exactly_one_job(kube, serve, tmp_path):
    # the run's Job starts suspended: it is surely running when the server is killed
    cronjob = kube.cronjob(suspended_jobs=True)
    config = kube_config(
        tmp_path,
        kube,
        target("migrate", "job", cronjob=cronjob),
        extra="[deployer]\nlease_seconds = 2\nscan_interval = 0.2\n",
    )
    server = serve(config, env=serve_env(), name="first")
    token = create_hook_cli(config, "migrate")
    status, _, answer = server.request(
        "POST", "/api/v1/dh", json.dumps(run_body(MODE="once")).encode(),
        {"X-Deploy-Hook-Token": token},
    )  # fmt: skip
    assert status == 201, answer
    deployment_id = json.loads(answer)["deployment"]["id"]
    name = job_name(cronjob, deployment_id)
    eventually(kube.jobs, "the Job")
    server.stop(signal.SIGKILL)  # the server and its deployer process, at once

    instance = open_instance(config, plugin_modules=[])
    try:
        assert instance.deployments.get(deployment_id).status == "in_progress"
    finally:
        instance.close()
    restarted = serve(config, env=serve_env(), name="second")
    kube.batch.patch_namespaced_job(name, kube.namespace, {"spec": {"suspend": False}})

    def ended() -> dict | None:
        [run] = [d for d in all_deployments(restarted) if d["id"] == deployment_id]
        return run if run["status"] not in ("queued", "in_progress") else None

    run = eventually(ended, "the resumed run to end")
    assert run["status"] == "succeeded", run
    assert run["message"].startswith(f"job {name} completed (")
    [job] = kube.jobs()
    assert job.metadata.name == name
    assert {e.name: e.value for e in job.spec.template.spec.containers[0].env}["MODE"] == "once"


def test_api_errors_are_the_apis_own_message_and_permanent_or_transient_by_status(
    kube, harness_factory, tmp_path
):
    """404 and 422 from the API server fail at once with its Status.message; 401 too; a 409
    is transient (the deployer retries it)."""
    kube.deployment("web")
    config = kube_config(
        tmp_path,
        kube,
        target("web", "app", deployment="web"),
        target("gone", "app", deployment="gone", retry_budget=3600),
    )
    harness = harness_factory(config)
    gone = harness.wait_for(harness.deploy(harness.new_hook("gone"), {"imageTag": "v2"}), 30)
    assert (gone["status"], gone["message"]) == (
        "failed",
        f'deployments.apps "gone" not found in namespace {kube.namespace}',
    )

    backend = harness.instance.backends["k8s"]
    workload = WORKLOADS["deployment"]
    with pytest.raises(ApiError) as invalid:
        backend._patch(workload, kube.namespace, "web", {"spec": {"replicas": -1}})
    assert (invalid.value.status, invalid.value.transient) == (422, False)
    assert invalid.value.message == (
        'Deployment.apps "web" is invalid: spec.replicas: Invalid value: -1: must be greater '
        "than or equal to 0"
    )
    stale = {"metadata": {"resourceVersion": "1", "annotations": {"a": "b"}}}
    with pytest.raises(ApiError) as conflict:
        backend._patch(workload, kube.namespace, "web", stale)
    assert (conflict.value.status, conflict.value.transient) == (409, True)
    assert conflict.value.message.startswith(
        'Operation cannot be fulfilled on deployments.apps "web": the object has been modified'
    )

    stranger = kube.cluster.write_kubeconfig(tmp_path / "stranger", "not-a-token", kube.namespace)
    checked = run_cli(
        "check", config=kube_config(tmp_path, kube, kubeconfig=stranger), env=serve_env(),
        check=False,
    )  # fmt: skip
    assert (
        f"backend k8s (kubernetes): NOT USABLE: Unauthorized: the API server of {stranger} does "
        "not accept the credentials"
    ) in checked.stdout, checked.stdout  # reached: it refused


@pytest.fixture
def api_proxy(kube_cluster) -> Iterator[ApiServerProxy]:
    proxy = ApiServerProxy(kube_cluster)
    yield proxy
    proxy.close()


def retries(deployment: dict) -> list[str]:
    """The retries the deployment's history records, without their random delays."""
    return [
        re.sub(r"^retry (\d+) in [\d.]+ s: ", r"\1: ", event["message"])
        for event in deployment["history"]
        if event["message"].startswith("retry ")
    ]


def test_429_5xx_and_lost_connections_are_retried_and_the_rollout_succeeds(
    kube, api_proxy, harness_factory, tmp_path
):
    """The API server, through a proxy, answers the deploy's patch 429 (its in-flight limit),
    then takes the patch and loses the answer with the connection; then answers the rollout's
    reads 429, 503 and 500 with its own Status, and drops one."""
    kube.deployment("web")
    path = f"/apis/apps/v1/namespaces/{kube.namespace}/deployments/web"
    kubeconfig = api_proxy.kubeconfig(tmp_path / "proxied.kubeconfig", kube.namespace)
    web = target("web", "app", deployment="web", retry_budget=120)
    harness = harness_factory(kube_config(tmp_path, kube, web, kubeconfig=kubeconfig))
    api_proxy.script(
        Step("PATCH", path, TOO_MANY_REQUESTS),
        Step("PATCH", path, Cut.AFTER),
        Step("GET", path, None),  # the deploy again: it finds the rollout its patch started
        # the watch cache's answer while it initializes (k8s.io/apiserver storage/cacher)
        Step("GET", path, status(429, "TooManyRequests", "storage is (re)initializing",
                                 {"retryAfterSeconds": 1}, retry_after=1)),
        # a graceful stop of the API server (k8s.io/apiserver server/filters/waitgroup.go)
        Step("GET", path, status(503, "ServiceUnavailable", "apiserver is shutting down",
                                 retry_after=1)),
        # an error of etcd the API server passes on (responsewriters.ErrorToAPIStatus)
        Step("GET", path, status(500, "", "etcdserver: request timed out")),
        Step("GET", path, Cut.BEFORE),
    )  # fmt: skip
    result = wait_post(harness, harness.new_hook("web"), {"imageTag": "v2"})
    assert result.status_code == 201, result.text
    deployment = result.json["deployment"]
    assert deployment["message"] == "deployment web successfully rolled out"
    assert api_proxy.steps_left == []
    lost = (
        f"cannot reach the API server of {kubeconfig}: "
        "Remote end closed connection without response"
    )
    assert retries(deployment) == [
        "1: 429 Too Many Requests: Too many requests, please try again later.",
        f"2: {lost}",
        "1: storage is (re)initializing",
        "2: apiserver is shutting down",
        "3: etcdserver: request timed out",
        f"4: {lost}",
    ]
    # one patch reached the API server, and the deploy repeated after its lost answer followed
    # that rollout instead of taking the image it found for one already there
    assert api_proxy.met("PATCH", path) == ["429", "cut after"]
    found = kube.read("deployment", "web")
    assert found["metadata"]["generation"] == 2
    assert found["metadata"]["annotations"][ANNOTATION_DEPLOYMENT] == deployment["id"]
    assert deployment["backendRef"]["updated"] is True
    assert kube.pod_images("web") == [f"{APP}:v2"] * 2


def test_a_retry_waits_as_long_as_retry_after_asks_or_gives_up_past_the_budget(
    kube, api_proxy, harness_factory, tmp_path
):
    """The API server's `Retry-After` (2 s, where the backoff's first delay is at most 0.5 s)
    sets the retry's delay; one longer than the target's retry budget (10 s) fails at once."""
    kube.deployment("web")
    kube.deployment("api")
    web, api = (
        f"/apis/apps/v1/namespaces/{kube.namespace}/deployments/{n}" for n in ("web", "api")
    )
    kubeconfig = api_proxy.kubeconfig(tmp_path / "proxied.kubeconfig", kube.namespace)
    targets = target("web", "app", deployment="web"), target("api", "app", deployment="api")
    harness = harness_factory(kube_config(tmp_path, kube, *targets, kubeconfig=kubeconfig))
    initializing = "storage is (re)initializing"
    api_proxy.script(
        Step("PATCH", web, status(429, "TooManyRequests", initializing, retry_after=2)),
        Step("PATCH", api, status(429, "TooManyRequests", initializing, retry_after=60)),
    )
    waited = wait_post(harness, harness.new_hook("web"), {"imageTag": "v2"}).json["deployment"]
    assert waited["status"] == "succeeded", waited
    assert [e["message"] for e in waited["history"] if e["message"].startswith("retry ")] == [
        f"retry 1 in 2 s: {initializing}"
    ]
    refused = wait_post(harness, harness.new_hook("api"), {"imageTag": "v2"}).json["deployment"]
    assert refused["status"] == "failed", refused
    assert refused["message"] == f"gave up after 1 attempt and 0.0s of backoff: {initializing}"
    assert kube.pod_images("api") == [f"{APP}:v1"] * 2


@pytest.mark.parametrize(
    "code, reason, message",
    [
        (401, "Unauthorized", "Unauthorized"),
        (403, "Forbidden", 'deployments.apps "web" is forbidden: User "admin" cannot patch '
                           'resource "deployments" in API group "apps" in the namespace "{ns}"'),
        (404, "NotFound", 'deployments.apps "web" not found'),
        (422, "Invalid", 'Deployment.apps "web" is invalid: spec.template.spec.containers[0].'
                         "image: Required value"),
    ],
)  # fmt: skip
def test_401_403_404_and_422_fail_at_once_with_the_apis_message(
    kube, api_proxy, harness_factory, tmp_path, code, reason, message
):
    kube.deployment("web")
    path = f"/apis/apps/v1/namespaces/{kube.namespace}/deployments/web"
    kubeconfig = api_proxy.kubeconfig(tmp_path / "proxied.kubeconfig", kube.namespace)
    # with a long budget, an answer taken for transient would be retried, and the retry pass
    web = target("web", "app", deployment="web", retry_budget=600)
    harness = harness_factory(kube_config(tmp_path, kube, web, kubeconfig=kubeconfig))
    message = message.format(ns=kube.namespace)
    api_proxy.script(Step("PATCH", path, status(code, reason, message)))
    deployment = harness.wait_for(harness.deploy(harness.new_hook("web"), {"imageTag": "v2"}), 60)
    assert deployment["status"] == "failed", deployment
    if code == 401:
        message += f": the API server of {kubeconfig} does not accept the credentials"
    assert deployment["message"] == message
    assert retries(deployment) == []
    assert api_proxy.met("PATCH", path) == [str(code)]
    assert kube.images("deployment", "web") == {"app": f"{APP}:v1"}


# -- RBAC ---------------------------------------------------------------------------------------


def test_a_serviceaccount_bound_to_the_readmes_role_deploys_rolls_back_and_runs(
    kube, harness_factory, tmp_path
):
    kube.deployment("web", progressDeadlineSeconds=3)
    kube.statefulset("db")
    kube.daemonset("agent")
    cronjob = kube.cronjob()
    kubeconfig = as_service_account(kube, tmp_path, "shiphook", README_RULES)
    config = kube_config(
        tmp_path,
        kube,
        target("web", "app", deployment="web"),
        target("db", "app", statefulset="db", rollout_timeout=8),
        target("agent", "app", daemonset="agent", rollout_timeout=8),
        target("migrate", "job", cronjob=cronjob),
        kubeconfig=kubeconfig,
    )
    checked = run_cli("check", config=config, env=serve_env())
    assert "backend k8s (kubernetes): Kubernetes v1.36.3 at https://127.0.0.1:" in checked.stdout
    assert f"targets default to namespace {kube.namespace}" in checked.stdout

    harness = harness_factory(config)
    web = harness.new_hook("web")
    assert wait_post(harness, web, {"imageTag": "v2"}).json["deployment"]["status"] == "succeeded"
    broken = wait_post(harness, web, {"imageTag": "broken"}).json["deployment"]
    assert broken["status"] == "rolled_back", broken
    assert kube.images("deployment", "web") == {"app": f"{APP}:v2"}
    db = harness.new_hook("db")
    assert wait_post(harness, db, {"imageTag": "v2"}).json["deployment"]["status"] == "succeeded"
    broken = wait_post(harness, db, {"imageTag": "broken"}).json["deployment"]
    assert broken["status"] == "rolled_back", broken
    agent = harness.new_hook("agent")
    assert wait_post(harness, agent, {"imageTag": "v2"}).json["deployment"]["status"] == "succeeded"
    broken = wait_post(harness, agent, {"imageTag": "broken"}).json["deployment"]
    assert broken["status"] == "rolled_back", broken
    run = wait_post(harness, harness.new_hook("migrate"), run_body(MODE="x")).json["deployment"]
    assert run["status"] == "succeeded", run


def test_a_role_narrowed_to_the_targets_workloads_by_name_is_enough(
    kube, harness_factory, tmp_path
):
    """`resourceNames` on the get and patch of the workloads: the reviews name the target's
    workload, so the least a Role may grant is its own workloads, not the namespace's."""
    kube.deployment("web")
    kube.deployment("other")
    cronjob = kube.cronjob()
    rules = [dict(rule) for rule in README_RULES]
    for rule in rules:
        if "deployments" in rule["resources"]:
            rule["resources"] = ["deployments"]
            rule["resourceNames"] = ["web"]
        if "cronjobs" in rule["resources"]:
            rule["resources"] = ["cronjobs"]
            rule["resourceNames"] = [cronjob]
    kubeconfig = as_service_account(kube, tmp_path, "narrow", rules)
    config = kube_config(
        tmp_path,
        kube,
        target("web", "app", deployment="web"),
        target("other", "app", deployment="other"),
        target("migrate", "job", cronjob=cronjob),
        kubeconfig=kubeconfig,
    )
    checked = run_cli("check", config=config, env=serve_env(), check=False)
    lines = checked.stdout.splitlines()
    assert any(line.startswith("target web (app): found, running ") for line in lines), lines
    assert any(line.startswith("target migrate (job): found, running ") for line in lines), lines
    assert any(
        line.startswith("target other (app): NOT USABLE: the credentials may not get deployments")
        for line in lines
    ), lines
    harness = harness_factory(config)
    result = wait_post(harness, harness.new_hook("web"), {"imageTag": "v2"})
    assert result.json["deployment"]["status"] == "succeeded", result.text
    run = wait_post(harness, harness.new_hook("migrate"), run_body(MODE="x")).json["deployment"]
    assert run["status"] == "succeeded", run


def test_a_role_without_patch_or_create_fails_at_once_and_check_names_what_is_missing(
    kube, harness_factory, tmp_path
):
    """A rollout or a job run is preceded by the review of what its target needs, so nothing is
    changed or created."""
    kube.deployment("web")
    cronjob = kube.cronjob()
    rules = [dict(rule) for rule in README_RULES]
    for rule in rules:
        if "deployments" in rule["resources"] or "jobs" in rule["resources"]:
            rule["verbs"] = ["get"]  # no patch of the workloads, no create of Jobs
    kubeconfig = as_service_account(kube, tmp_path, "reader", rules)
    config = kube_config(
        tmp_path,
        kube,
        target("web", "app", deployment="web"),
        target("migrate", "job", cronjob=cronjob),
        kubeconfig=kubeconfig,
    )
    checked = run_cli("check", config=config, env=serve_env(), check=False)
    assert checked.returncode == 1
    role = "(README.md, Kubernetes: the Role shiphook needs)"
    assert checked.stdout.splitlines()[3:] == [
        f"target web (app): NOT USABLE: the credentials may not patch deployments.apps in "
        f"namespace {kube.namespace}, which target web needs {role}",
        f"target migrate (job): NOT USABLE: the credentials may not create jobs.batch in "
        f"namespace {kube.namespace}, which target migrate needs {role}",
    ], checked.stdout

    harness = harness_factory(config)
    result = wait_post(harness, harness.new_hook("web"), {"imageTag": "v2"})
    assert result.status_code == 502, result.text
    deployment = result.json["deployment"]
    assert deployment["status"] == "failed"
    assert deployment["message"] == (
        f"the credentials may not patch deployments.apps in namespace {kube.namespace}, which "
        "target web needs (README.md, Kubernetes: the Role shiphook needs)"
    )
    assert kube.images("deployment", "web") == {"app": f"{APP}:v1"}

    run = wait_post(harness, harness.new_hook("migrate"), run_body(MODE="x")).json["deployment"]
    assert run["status"] == "failed"
    assert run["message"] == (
        f"the credentials may not create jobs.batch in namespace {kube.namespace}, which target "
        f"migrate needs {role}"
    )
    assert kube.jobs() == []


def test_the_readmes_role_in_the_targets_namespace_alone_passes_check_and_deploys(
    kube, harness_factory, tmp_path
):
    """The backend's own namespace (here `default`, where the ServiceAccount may do nothing) is
    not reviewed: only each target's is."""
    kube.deployment("web")
    kube.service_account("shiphook", README_RULES)
    config = kube_config(
        tmp_path,
        kube,
        target("web", "app", deployment="web", namespace=kube.namespace),
        kubeconfig=as_service_account(kube, tmp_path, "shiphook"),
        namespace="default",
    )
    checked = run_cli("check", config=config, env=serve_env(), check=False)
    assert checked.returncode == 0, checked.stdout
    assert "the credentials are accepted; targets default to namespace default" in checked.stdout
    assert f"target web (app): found, running {APP}:v1" in checked.stdout
    harness = harness_factory(config)
    result = wait_post(harness, harness.new_hook("web"), {"imageTag": "v2"})
    assert result.json["deployment"]["status"] == "succeeded", result.text


def check_with_kubeconfig(tmp_path: Path, text: str) -> tuple[Path, Any]:
    """`shiphook check` of a target on a kubeconfig holding `text`, which fails (exit 1)."""
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(text)
    config = write_config(
        tmp_path,
        f'[backends.k8s]\nplugin = "kubernetes"\nkubeconfig = "{kubeconfig}"\n'
        '[targets.web]\nkind = "app"\nbackend = "k8s"\ndeployment = "web"\n',
    )
    checked = run_cli("check", config=config, env=serve_env(), check=False)
    assert checked.returncode == 1, checked.stdout + checked.stderr
    return kubeconfig, checked


@pytest.mark.parametrize(
    "text, cause",
    [("not: [yaml", "ParserError: while parsing a flow sequence"), ("- a\n- b\n", "TypeError")],
)
def test_a_kubeconfig_that_is_not_one_is_named_in_one_line(tmp_path, text, cause):
    kubeconfig, checked = check_with_kubeconfig(tmp_path, text)
    line = checked.stdout.splitlines()[2]
    assert line.startswith(
        f"backend k8s (kubernetes): NOT USABLE: {kubeconfig}: not a kubeconfig ({cause}"
    ), checked.stdout
    assert line.endswith("expected the YAML that `kubectl config view --raw` prints")
    assert "Traceback" not in checked.stdout + checked.stderr


def test_check_reviews_each_targets_own_namespace_and_names_what_is_missing_there(
    kube, harness_factory, tmp_path
):
    """The README's Role is bound in the backend's namespace only. In a second one the
    ServiceAccount may get and patch Deployments and list pods, but not list ReplicaSets, which
    a rollback needs; in a third it may do nothing."""
    kube.deployment("web")
    kube.service_account("shiphook", README_RULES)
    patcher = [
        {"apiGroups": ["apps"], "resources": ["deployments"], "verbs": ["get", "patch"]},
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]},
    ]
    second, third = kube.cluster.new_namespace("second"), kube.cluster.new_namespace("third")
    try:
        for namespace in (second, third):
            body = workload("web", f"{APP}:v1", replicas=1)
            kube.apps.create_namespaced_deployment(namespace, body)
        kube.rbac.create_namespaced_role(second, {"metadata": {"name": "p"}, "rules": patcher})
        kube.rbac.create_namespaced_role_binding(
            second,
            {
                "metadata": {"name": "p"},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "p"},
                "subjects": [
                    {"kind": "ServiceAccount", "name": "shiphook", "namespace": kube.namespace}
                ],
            },
        )
        config = kube_config(
            tmp_path,
            kube,
            target("web", "app", deployment="web"),
            target("second", "app", deployment="web", namespace=second),
            target("leave", "app", deployment="web", namespace=second, on_failure="leave"),
            target("third", "app", deployment="web", namespace=third),
            kubeconfig=as_service_account(kube, tmp_path, "shiphook"),
        )
        checked = run_cli("check", config=config, env=serve_env(), check=False)
        assert checked.returncode == 1
        role = "(README.md, Kubernetes: the Role shiphook needs)"
        lines = checked.stdout.splitlines()
        assert lines[3:] == [
            f"target web (app): found, running {APP}:v1 "
            f"(deployment web in namespace {kube.namespace}, 2 replicas)",
            f"target second (app): NOT USABLE: the credentials may not list replicasets.apps in "
            f"namespace {second}, which target second needs {role}",
            f"target leave (app): found, running {APP}:v1 "  # it will not roll back
            f"(deployment web in namespace {second}, 1 replica)",
            f"target third (app): NOT USABLE: the credentials may not get deployments.apps, "
            f"patch deployments.apps, list pods, list replicasets.apps in namespace {third}, "
            f"which target third needs {role}",
        ], checked.stdout
        assert lines[2].endswith(f"targets default to namespace {kube.namespace}")

        # a rollout that could not be rolled back is not started; one that need not be, is
        harness = harness_factory(config)
        failed = wait_post(harness, harness.new_hook("second"), {"imageTag": "v2"})
        assert failed.json["deployment"]["message"] == (
            f"the credentials may not list replicasets.apps in namespace {second}, which target "
            f"second needs {role}"
        )
        left = wait_post(harness, harness.new_hook("leave"), {"imageTag": "v2"})
        assert left.json["deployment"]["status"] == "succeeded", left.text
    finally:
        for namespace in (second, third):
            kube.core.delete_namespace(namespace)


# -- end to end ---------------------------------------------------------------------------------


def serve_env() -> dict[str, str]:
    """The environment of a `shiphook` subprocess: no ambient KUBECONFIG to fall back on."""
    import os

    env = dict(os.environ)
    env["KUBECONFIG"] = "/nonexistent/kubeconfig"  # must never be read
    for proxy in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY"):
        env[proxy] = "http://127.0.0.1:9"  # nor these: nothing listens there
    env.pop("NO_PROXY", None)
    env.pop("no_proxy", None)
    env["SHIPHOOK_ADMIN_TOKEN"] = ADMIN_TOKEN
    return env


def create_hook_cli(config: Path, target_name: str) -> str:
    created = run_cli("hooks", "create", target_name, "--name", "ci", "--json", config=config,
                      env=serve_env())  # fmt: skip
    return json.loads(created.stdout)["token"]


def test_serve_hooks_create_and_curl_wait(kube, serve, tmp_path):
    kube.deployment("web", progressDeadlineSeconds=3)
    config = kube_config(tmp_path, kube, target("web", "app", deployment="web"))
    server = serve(config, env=serve_env())
    token = create_hook_cli(config, "web")

    def curl(tag: str) -> tuple[int, dict]:
        done = subprocess.run(
            ["curl", "-sS", "-o", "-", "-w", "\n%{http_code}", "-X", "POST",
             f"{server.url}/api/v1/dh?wait={WAIT}", "-H", f"X-Deploy-Hook-Token: {token}",
             "--data", json.dumps({"imageTag": tag})],
            capture_output=True, text=True, timeout=120, check=True,
        )  # fmt: skip
        body, _, code = done.stdout.rpartition("\n")
        return int(code), json.loads(body)

    status, answer = curl("v2")
    assert status == 201, answer
    assert answer["deployment"]["status"] == "succeeded"
    assert kube.images("deployment", "web") == {"app": f"{APP}:v2"}
    assert kube.pod_images("web") == [f"{APP}:v2"] * 2

    status, answer = curl("broken")
    assert status == 502, answer
    assert answer["deployment"]["status"] == "rolled_back"
    assert "ProgressDeadlineExceeded" not in answer["description"]  # the controller's message:
    assert "has timed out progressing" in answer["description"]
    assert f'ImagePullBackOff (Back-off pulling image "{APP}:broken")' in answer["description"]
    assert kube.images("deployment", "web") == {"app": f"{APP}:v2"}


def test_the_instance_opens_without_reaching_the_cluster(tmp_path):
    """shiphook starts, and takes hooks, while the API server is down: nothing is contacted
    before there is work."""
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "c", "cluster": {"server": "https://127.0.0.1:9"}}],
                "users": [{"name": "u", "user": {"token": "t"}}],
                "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
                "current-context": "x",
            }
        )
    )
    config = write_config(
        tmp_path,
        f"""
        [server]
        database_url = "sqlite:///{tmp_path}/shiphook.db"

        [backends.k8s]
        plugin = "kubernetes"
        kubeconfig = "{kubeconfig}"
        timeout = 2

        [targets.web]
        kind = "app"
        backend = "k8s"
        deployment = "web"
        """,
    )
    instance = open_instance(config, plugin_modules=[])
    try:
        assert instance.backends["k8s"]._client is None
    finally:
        instance.close()
    checked = run_cli("check", config=config, env=serve_env(), check=False)
    assert checked.returncode == 1
    assert "backend k8s (kubernetes): UNREACHABLE: cannot reach the API server of" in (
        checked.stdout
    )
    assert "Traceback" not in checked.stderr


def test_the_context_named_is_used_with_its_namespace(kube, tmp_path):
    """`context` picks one of the kubeconfig's contexts (not its current-context), and that
    context's namespace is the default of targets that name none."""
    kube.deployment("web")
    kubeconfig = kube.cluster.write_kubeconfig(tmp_path / "kubeconfig", kube.cluster.admin_token)
    data = json.loads(kubeconfig.read_text())
    data["clusters"].append({"name": "gone", "cluster": {"server": "https://127.0.0.1:9"}})
    data["contexts"] = [
        {"name": "elsewhere", "context": {"cluster": "gone", "user": "user"}},
        {
            "name": "test",
            "context": {"cluster": "test", "user": "user", "namespace": kube.namespace},
        },
    ]
    data["current-context"] = "elsewhere"
    kubeconfig.write_text(json.dumps(data))
    config = write_config(
        tmp_path,
        f"""
        [server]
        database_url = "sqlite:///{tmp_path}/shiphook.db"

        [backends.k8s]
        plugin = "kubernetes"
        kubeconfig = "{kubeconfig}"
        context = "test"

        [targets.web]
        kind = "app"
        backend = "k8s"
        deployment = "web"
        """,
    )
    checked = run_cli("check", config=config, env=serve_env())
    assert f"targets default to namespace {kube.namespace}" in checked.stdout
    assert f"target web (app): found, running {APP}:v1" in checked.stdout


def test_a_kubeconfig_rewritten_while_shiphook_runs_is_read_again(kube, harness_factory, tmp_path):
    """A token rotated in the file is used from the next call on, without a restart; so is a
    wrong one written over a good one."""
    kube.deployment("web")
    kubeconfig = kube.cluster.write_kubeconfig(tmp_path / "rotated.kubeconfig", "expired")
    web = target("web", "app", deployment="web", retry_budget=60)
    harness = harness_factory(kube_config(tmp_path, kube, web, kubeconfig=kubeconfig))
    hook = harness.new_hook("web")
    refused = wait_post(harness, hook, {"imageTag": "v2"}).json["deployment"]
    assert refused["status"] == "failed", refused
    assert refused["message"] == (
        f"Unauthorized: the API server of {kubeconfig} does not accept the credentials"
    )
    kube.cluster.write_kubeconfig(kubeconfig, kube.cluster.admin_token)
    result = wait_post(harness, hook, {"imageTag": "v2"})
    assert result.status_code == 201, result.text
    assert kube.images("deployment", "web") == {"app": f"{APP}:v2"}
    kube.cluster.write_kubeconfig(kubeconfig, "revoked")
    refused = wait_post(harness, hook, {"imageTag": "v3"}).json["deployment"]
    assert refused["status"] == "failed", refused
    assert kube.images("deployment", "web") == {"app": f"{APP}:v2"}
    # caught half-written, it is retried, not taken for a file that is no kubeconfig
    kubeconfig.write_text("")
    deployment_id = harness.deploy(hook, {"imageTag": "v3"})
    eventually(
        lambda: "retry 1 in" in harness.instance.deployments.get(deployment_id).message,
        "a retry",
    )
    kube.cluster.write_kubeconfig(kubeconfig, kube.cluster.admin_token)
    assert harness.wait_for(deployment_id, timeout=90)["status"] == "succeeded"


def test_an_api_server_whose_certificate_is_not_trusted_fails_at_once_in_one_line(
    kube, harness_factory, tmp_path
):
    """No retry makes a certificate trusted: the deployment fails without retries."""
    kube.deployment("web")
    config = yaml.safe_load(Path(kube.cluster.kubeconfig).read_text())
    for cluster in config["clusters"]:
        cluster["cluster"].pop("certificate-authority-data", None)
        cluster["cluster"].pop("certificate-authority", None)
    untrusting = tmp_path / "untrusting.kubeconfig"
    untrusting.write_text(yaml.safe_dump(config))
    web = target("web", "app", deployment="web", retry_budget=600)
    harness = harness_factory(kube_config(tmp_path, kube, web, kubeconfig=untrusting))
    deployment = harness.wait_for(harness.deploy(harness.new_hook("web"), {"imageTag": "v2"}), 60)
    assert deployment["status"] == "failed", deployment
    assert deployment["message"].startswith(f"cannot reach the API server of {untrusting}: ")
    assert "CERTIFICATE_VERIFY_FAILED" in deployment["message"]
    assert "\n" not in deployment["message"]
    assert retries(deployment) == []


def test_an_api_server_that_never_answers_is_given_up_after_the_timeout(tmp_path):
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        port = silent.getsockname()[1]
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(
            json.dumps(
                {
                    "clusters": [{"name": "c", "cluster": {"server": f"https://127.0.0.1:{port}"}}],
                    "users": [{"name": "u", "user": {"token": "t"}}],
                    "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
                    "current-context": "x",
                }
            )
        )
        config = write_config(
            tmp_path,
            f"""
            [server]
            database_url = "sqlite:///{tmp_path}/shiphook.db"

            [backends.k8s]
            plugin = "kubernetes"
            kubeconfig = "{kubeconfig}"
            timeout = 1
            """,
        )
        checked = run_cli("check", config=config, env=serve_env(), check=False)
    assert checked.returncode == 1
    assert (
        f"backend k8s (kubernetes): UNREACHABLE: cannot reach the API server of {kubeconfig}: "
        "no answer within 1 s\n"
    ) in checked.stdout, checked.stdout


@pytest.mark.parametrize(
    "keys, error",
    [
        ("", 'set either kubeconfig = "/path/to/kubeconfig" (and optionally context) or '
             "in_cluster = true; the KUBECONFIG variable is not read"),
        ('in_cluster = true\ncontext = "x"', "context applies to a kubeconfig only"),
        ('kubeconfig = "/nonexistent/kubeconfig"', "backends.k8s.kubeconfig: "),
        ('in_cluster = "yes"', "backends.k8s.in_cluster: Input should be a valid boolean"),
    ],
)  # fmt: skip
def test_the_backend_is_told_how_to_reach_the_cluster_by_the_file_alone(tmp_path, keys, error):
    config = write_config(
        tmp_path,
        f'[backends.k8s]\nplugin = "kubernetes"\n{keys}\n',
    )
    checked = run_cli("check", config=config, env=serve_env(), check=False)
    assert checked.returncode != 0
    assert error in checked.stderr, checked.stderr
    assert "Traceback" not in checked.stderr


@pytest.mark.parametrize(
    "keys, error",
    [
        ('deployment = "web"\ncronjob = "x"', "set exactly one of deployment, statefulset, "
         "daemonset (an app target) or cronjob (a job target); got deployment, cronjob"),
        ('container = "app"', "got none"),
        ('deployment = "web"\nimage = "repo:1.0"', "expected a repository without tag or digest"),
        ('deployment = "web"\nnamespace = "Not_Valid"', "targets.web.namespace: expected a "
         "namespace's name: 1 to 63 lowercase letters, digits and '-'"),
    ],
)  # fmt: skip
def test_a_target_names_exactly_one_workload(tmp_path, keys, error):
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text("{}")
    config = write_config(
        tmp_path,
        f'[backends.k8s]\nplugin = "kubernetes"\nkubeconfig = "{kubeconfig}"\n'
        f'[targets.web]\nkind = "app"\nbackend = "k8s"\n{keys}\n',
    )
    checked = run_cli("check", config=config, env=serve_env(), check=False)
    assert checked.returncode != 0
    assert error in checked.stderr, checked.stderr


def test_the_readmes_role_grants_exactly_what_check_asks_for():
    granted = {
        (verb, group, resource)
        for rule in README_RULES
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }
    assert granted == set(NEEDED)
    # and a target's review asks for nothing else
    assert {need for lists in TARGET_NEEDS.values() for n in lists for need in n} == set(NEEDED)


def test_the_example_config_loads(tmp_path, monkeypatch):
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text("{}")
    text = (ROOT / "configs" / "examples" / "kubernetes.toml").read_text()
    assert 'kubeconfig = "/etc/shiphook/kubeconfig"' in text
    config = write_config(tmp_path, text.replace("/etc/shiphook/kubeconfig", str(kubeconfig)))
    monkeypatch.chdir(tmp_path)
    instance = open_instance(config, plugin_modules=[])
    try:
        assert instance.config.backends["k8s"].plugin == "kubernetes"
        assert {t.kind for t in instance.config.targets.values()} == {"app", "job"}
        assert instance.config.targets["migrate"].max_concurrent_runs == 2
    finally:
        instance.close()


def test_a_kubeconfig_key_that_is_not_base64_is_named_in_one_line(tmp_path):
    kubeconfig, checked = check_with_kubeconfig(
        tmp_path,
        "apiVersion: v1\ncurrent-context: x\n"
        "clusters: [{name: c, cluster: {server: 'https://127.0.0.1:1'}}]\n"
        "contexts: [{name: x, context: {cluster: c, user: u}}]\n"
        "users: [{name: u, user: {client-certificate-data: abc, client-key-data: abc}}]\n",
    )
    assert (
        f"backend k8s (kubernetes): NOT USABLE: {kubeconfig}: a certificate or key (*-data) of "
        "the context is not base64 (Incorrect padding); expected the YAML that"
    ) in checked.stdout, checked.stdout
