"""The test control plane (tests/k8s) is real and fit for the Kubernetes backend.

Kubernetes' own controllers compute rollout status exactly as `kubectl rollout status` reads it;
kwok plays the kubelet and turns an image tag into a failure (`:broken`, `:crashloop`, a Job's
`:fail`); RBAC is enforced for ServiceAccount tokens. Skipped without the built binaries
(tests/k8s/build.sh), failing instead when SHIPHOOK_REQUIRE_KUBERNETES=1 (as in CI).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass

import kubernetes.client as k8s
import pytest
from kubernetes.client.exceptions import ApiException
from shiphook.testing import eventually

APP = "shiphook-test/app"  # never pulled: kwok plays the kubelet


@dataclass
class Kube:
    namespace: str
    apps: k8s.AppsV1Api
    batch: k8s.BatchV1Api
    core: k8s.CoreV1Api
    rbac: k8s.RbacAuthorizationV1Api


@pytest.fixture
def kube(kube_cluster) -> Iterator[Kube]:
    """A fresh namespace on the session's cluster, with admin clients; deleted afterwards."""
    namespace = kube_cluster.new_namespace()
    with kube_cluster.client() as api:
        yield Kube(
            namespace,
            k8s.AppsV1Api(api),
            k8s.BatchV1Api(api),
            k8s.CoreV1Api(api),
            k8s.RbacAuthorizationV1Api(api),
        )
        k8s.CoreV1Api(api).delete_namespace(namespace)


def template(name: str, image: str, **spec) -> dict:
    return {
        "metadata": {"labels": {"app": name}},
        "spec": {"containers": [{"name": "app", "image": image}], **spec},
    }


def workload(name: str, image: str, **spec) -> dict:
    return {
        "metadata": {"name": name},
        "spec": {
            "selector": {"matchLabels": {"app": name}},
            "template": template(name, image),
            **spec,
        },
    }


def set_image(image: str, **spec) -> dict:
    """What `kubectl set image` sends: a strategic-merge patch of one container's image."""
    return {
        "spec": {"template": {"spec": {"containers": [{"name": "app", "image": image}]}}, **spec}
    }


def pods(kube: Kube, name: str) -> list[k8s.V1Pod]:
    listed = kube.core.list_namespaced_pod(kube.namespace, label_selector=f"app={name}").items
    return [pod for pod in listed if pod.metadata.deletion_timestamp is None]


def images(kube: Kube, name: str) -> set[str]:
    return {pod.spec.containers[0].image for pod in pods(kube, name)}


def deployment_done(kube: Kube, name: str) -> bool:
    """`kubectl rollout status deployment/NAME` succeeded."""
    d = kube.apps.read_namespaced_deployment_status(name, kube.namespace)
    s = d.status
    return (
        (s.observed_generation or 0) >= d.metadata.generation
        and s.updated_replicas == d.spec.replicas
        and s.replicas == s.updated_replicas
        and s.available_replicas == s.updated_replicas
    )


def test_a_deployment_rolls_to_a_new_tag_and_its_replicaset_pods_run_it(kube):
    kube.apps.create_namespaced_deployment(kube.namespace, workload("web", f"{APP}:v1", replicas=2))
    eventually(lambda: deployment_done(kube, "web"), what="the first rollout")

    kube.apps.patch_namespaced_deployment("web", kube.namespace, set_image(f"{APP}:v2"))
    eventually(lambda: deployment_done(kube, "web"), what="the rollout to v2")

    status = kube.apps.read_namespaced_deployment_status("web", kube.namespace).status
    assert (status.updated_replicas, status.ready_replicas, status.available_replicas) == (2, 2, 2)
    [current] = [
        rs for rs in kube.apps.list_namespaced_replica_set(kube.namespace).items if rs.spec.replicas
    ]
    assert current.spec.template.spec.containers[0].image == f"{APP}:v2"
    eventually(lambda: images(kube, "web") == {f"{APP}:v2"}, what="only v2 pods")
    running = pods(kube, "web")
    assert len(running) == 2
    for pod in running:
        assert pod.metadata.owner_references[0].name == current.metadata.name
        assert pod.status.phase == "Running"
        assert pod.status.container_statuses[0].ready


@pytest.mark.parametrize(
    "tag, reason", [("broken", "ImagePullBackOff"), ("crashloop", "CrashLoopBackOff")]
)
def test_a_deployment_rolled_to_a_failing_tag_exceeds_its_progress_deadline(kube, tag, reason):
    kube.apps.create_namespaced_deployment(kube.namespace, workload("web", f"{APP}:v1", replicas=1))
    eventually(lambda: deployment_done(kube, "web"), what="the first rollout")

    patch = set_image(f"{APP}:{tag}", progressDeadlineSeconds=3)
    kube.apps.patch_namespaced_deployment("web", kube.namespace, patch)

    def progressing() -> k8s.V1DeploymentCondition | None:
        status = kube.apps.read_namespaced_deployment_status("web", kube.namespace).status
        [condition] = [c for c in status.conditions if c.type == "Progressing"]
        return condition if condition.status == "False" else None

    condition = eventually(progressing, what="Progressing=False")
    assert condition.reason == "ProgressDeadlineExceeded"
    assert "has timed out progressing" in condition.message
    assert not deployment_done(kube, "web")
    [failing] = [p for p in pods(kube, "web") if p.spec.containers[0].image == f"{APP}:{tag}"]
    container = failing.status.container_statuses[0]
    assert not container.ready
    assert container.state.waiting.reason == reason
    if tag == "crashloop":
        assert failing.status.phase == "Running"
        assert container.last_state.terminated.exit_code == 1
    else:
        assert failing.status.phase == "Pending"
    # the old pod keeps serving: maxUnavailable rounds down to 0
    assert f"{APP}:v1" in images(kube, "web")


def statefulset_done(kube: Kube, name: str) -> bool:
    s = kube.apps.read_namespaced_stateful_set_status(name, kube.namespace)
    st = s.status
    return (
        (st.observed_generation or 0) >= s.metadata.generation
        and st.ready_replicas == s.spec.replicas
        and st.update_revision == st.current_revision
    )


def daemonset_done(kube: Kube, name: str) -> bool:
    d = kube.apps.read_namespaced_daemon_set_status(name, kube.namespace)
    st = d.status
    return (
        (st.observed_generation or 0) >= d.metadata.generation
        and st.desired_number_scheduled > 0
        and st.updated_number_scheduled == st.desired_number_scheduled
        and st.number_available == st.desired_number_scheduled
    )


def test_a_statefulset_rolls_to_a_new_revision(kube):
    apps, ns = kube.apps, kube.namespace
    apps.create_namespaced_stateful_set(
        ns, workload("db", f"{APP}:v1", replicas=2, serviceName="db")
    )
    eventually(lambda: statefulset_done(kube, "db"), what="the first rollout")
    first = apps.read_namespaced_stateful_set_status("db", ns).status.current_revision

    apps.patch_namespaced_stateful_set("db", ns, set_image(f"{APP}:v2"))
    eventually(
        lambda: (
            statefulset_done(kube, "db")
            and apps.read_namespaced_stateful_set_status("db", ns).status.current_revision != first
        ),
        what="the rollout to v2",
    )
    eventually(lambda: images(kube, "db") == {f"{APP}:v2"}, what="only v2 pods")
    assert sorted(p.metadata.name for p in pods(kube, "db")) == ["db-0", "db-1"]


def test_a_daemonset_rolls_to_a_new_revision(kube):
    apps, ns = kube.apps, kube.namespace
    apps.create_namespaced_daemon_set(ns, workload("agent", f"{APP}:v1"))
    eventually(lambda: daemonset_done(kube, "agent"), what="the first rollout")

    apps.patch_namespaced_daemon_set("agent", ns, set_image(f"{APP}:v2"))
    eventually(lambda: daemonset_done(kube, "agent"), what="the rollout to v2")
    eventually(lambda: images(kube, "agent") == {f"{APP}:v2"}, what="only v2 pods")
    revisions = kube.apps.list_namespaced_controller_revision(ns).items
    assert sorted(r.revision for r in revisions) == [1, 2]


@pytest.mark.parametrize(
    "tag, condition, phase, exit_code",
    [("ok", "Complete", "Succeeded", 0), ("fail", "Failed", "Failed", 1)],
)
def test_a_job_completes_or_fails_by_its_image_tag(kube, tag, condition, phase, exit_code):
    job = {
        "metadata": {"name": "migrate"},
        "spec": {
            "backoffLimit": 0,
            "template": template("migrate", f"{APP}:{tag}", restartPolicy="Never"),
        },
    }
    kube.batch.create_namespaced_job(kube.namespace, job)

    def finished() -> list[k8s.V1JobCondition]:
        status = kube.batch.read_namespaced_job_status("migrate", kube.namespace).status
        return [
            c
            for c in status.conditions or []
            if c.type in ("Complete", "Failed") and c.status == "True"
        ]

    [final] = eventually(finished, what=f"the Job's {condition} condition")
    assert final.type == condition
    if tag == "fail":
        assert final.reason == "BackoffLimitExceeded"
    [pod] = kube.core.list_namespaced_pod(
        kube.namespace, label_selector="batch.kubernetes.io/job-name=migrate"
    ).items
    assert pod.status.phase == phase
    assert pod.status.container_statuses[0].state.terminated.exit_code == exit_code


def test_a_serviceaccount_without_patch_on_deployments_is_forbidden_to_patch(kube, kube_cluster):
    ns = kube.namespace
    kube.apps.create_namespaced_deployment(ns, workload("web", f"{APP}:v1", replicas=1))
    kube.core.create_namespaced_service_account(ns, {"metadata": {"name": "deployer"}})
    rule = {"apiGroups": ["apps"], "resources": ["deployments"], "verbs": ["get", "list", "watch"]}
    kube.rbac.create_namespaced_role(ns, {"metadata": {"name": "deployer"}, "rules": [rule]})
    kube.rbac.create_namespaced_role_binding(
        ns,
        {
            "metadata": {"name": "deployer"},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "Role",
                "name": "deployer",
            },
            "subjects": [{"kind": "ServiceAccount", "name": "deployer", "namespace": ns}],
        },
    )
    token = kube_cluster.token_for(ns, "deployer")

    with kube_cluster.client(token) as api:
        as_deployer = k8s.AppsV1Api(api)
        assert as_deployer.read_namespaced_deployment("web", ns).metadata.name == "web"
        with pytest.raises(ApiException) as forbidden:
            as_deployer.patch_namespaced_deployment("web", ns, set_image(f"{APP}:v2"))
        assert forbidden.value.status == 403
        assert json.loads(forbidden.value.body)["message"] == (
            f'deployments.apps "web" is forbidden: User "system:serviceaccount:{ns}:deployer" '
            f'cannot patch resource "deployments" in API group "apps" in the namespace "{ns}"'
        )

        # the same token may patch once the Role grants it: the 403 was about that verb alone
        rule["verbs"].append("patch")
        kube.rbac.patch_namespaced_role("deployer", ns, {"rules": [rule]})

        def patched() -> bool:
            try:
                as_deployer.patch_namespaced_deployment("web", ns, set_image(f"{APP}:v2"))
            except ApiException as exc:
                if exc.status != 403:
                    raise
                return False
            return True

        eventually(patched, what="the patch once allowed")
    assert (
        kube.apps.read_namespaced_deployment("web", ns).spec.template.spec.containers[0].image
        == f"{APP}:v2"
    )
