"""The conformance suite (shiphook.testing) against the kubernetes backend on the tests' control
plane (tests/k8s: the `kube_cluster` fixture, skipped without its binaries, failing when
SHIPHOOK_REQUIRE_KUBERNETES=1), as the admin and as a ServiceAccount bound to exactly README.md's
Role. Each scenario works in a namespace of its own."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import free_port
from shiphook.testing import BackendConformance, JobRun
from test_kubernetes import APP, README_RULES, new_kube

pytest_plugins = ["shiphook.testing"]


class TestKubernetesConformance(BackendConformance):
    plugin = "kubernetes"
    rollout_timeout = 60
    initial_tag = "v1"
    healthy_tag = "v2"
    failing_tag = "broken"  # kwok: ImagePullBackOff; the Deployment's deadline is 3 s
    failing_reason = f'ImagePullBackOff (Back-off pulling image "{APP}:broken")'
    other_failing_tag = "also-broken"
    stalling_tag = "stalled"  # kwok: Running, never ready
    job_tag = "ok"
    other_job_tag = "ok2"
    job_variable = ("GREETING", "hello")  # the CronJob's container defines it
    failing_run_reason = "Error with exit code 3"  # kwok: a Job's pod exits with $EXIT
    stalling_job_tag = "stalled"  # kwok: Running, never ready, never ending

    @pytest.fixture(autouse=True)
    def _kubernetes(self, kube_cluster) -> Iterator[None]:
        with new_kube(kube_cluster, "conformance") as self.kube:
            yield

    def _kubeconfig(self, server: str) -> str:
        """A kubeconfig of a cluster at `server` that is not the test cluster."""
        path = self.tmp_path / f"kubeconfig-{uuid.uuid4().hex[:6]}"
        config = {
            "clusters": [{"name": "c", "cluster": {"server": server}}],
            "users": [{"name": "u", "user": {"token": "t"}}],
            "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
            "current-context": "x",
        }
        Path(path).write_text(json.dumps(config))
        return str(path)

    def backend_options(self) -> dict[str, Any]:
        return {
            "kubeconfig": str(self.kube.cluster.kubeconfig),
            "namespace": self.kube.namespace,
            "timeout": 10,
            "poll_interval": 0.2,
        }

    def unreachable_options(self) -> dict[str, Any]:
        return {"kubeconfig": self._kubeconfig(f"https://127.0.0.1:{free_port()}"), "timeout": 5}

    def silent_options(self, address: str) -> dict[str, Any]:
        return {"kubeconfig": self._kubeconfig(f"https://{address}"), "timeout": 2}

    def make_app(self, progress_deadline: int = 3) -> dict[str, Any]:
        name = f"web-{uuid.uuid4().hex[:6]}"
        self.kube.deployment(name, replicas=1, progressDeadlineSeconds=progress_deadline)
        return {"deployment": name}

    def make_patient_app(self) -> dict[str, Any]:
        return self.make_app(progress_deadline=600)  # Kubernetes' default

    def make_job(self) -> dict[str, Any]:
        return {
            "cronjob": self.kube.cronjob(f"job-{uuid.uuid4().hex[:6]}", f"{APP}:{self.job_tag}")
        }

    def missing_workload(self, kind: str) -> dict[str, Any]:
        name = f"missing-{uuid.uuid4().hex[:8]}"
        return {"deployment": name} if kind == "app" else {"cronjob": name}

    def workload_image(self, options: dict[str, Any]) -> str:
        return self.kube.images("deployment", options["deployment"])["app"]

    def running_images(self, options: dict[str, Any]) -> list[str]:
        return self.kube.pod_images(options["deployment"])

    def workload_version(self, options: dict[str, Any]) -> str:
        return str(self.kube.read("deployment", options["deployment"])["metadata"]["generation"])

    def job_run(self, options: dict[str, Any], deployment: dict[str, Any]) -> JobRun:
        job = self.kube.batch.read_namespaced_job(
            deployment["backendRef"]["job"], self.kube.namespace
        )
        [container] = job.spec.template.spec.containers
        return JobRun(image=container.image, env={e.name: e.value for e in container.env or []})

    def job_runs(self, options: dict[str, Any]) -> int:
        return sum(
            any(
                o.kind == "CronJob" and o.name == options["cronjob"]
                for o in j.metadata.owner_references or []
            )
            for j in self.kube.jobs()
        )

    def change_by_hand(self, options: dict[str, Any]) -> None:  # kubectl set env
        hotfix = {"containers": [{"name": "app", "env": [{"name": "HOTFIX", "value": "1"}]}]}
        patch = {"spec": {"template": {"spec": hotfix}}}
        self.kube.apps.patch_namespaced_deployment(
            options["deployment"], self.kube.namespace, patch
        )

    def changed_by_hand(self, options: dict[str, Any]) -> bool:
        deployment = self.kube.read("deployment", options["deployment"])
        [container] = deployment["spec"]["template"]["spec"]["containers"]
        return {"name": "HOTFIX", "value": "1"} in container.get("env", [])


class TestKubernetesConformanceAsServiceAccount(TestKubernetesConformance):
    """The same scenarios with the token of a ServiceAccount bound to README.md's Role."""

    def backend_options(self) -> dict[str, Any]:
        if not hasattr(self, "_service_account"):
            self.kube.service_account("shiphook", README_RULES)
            token = self.kube.cluster.token_for(self.kube.namespace, "shiphook")
            path = self.tmp_path / "shiphook.kubeconfig"
            self._service_account = self.kube.cluster.write_kubeconfig(path, token)
        return super().backend_options() | {"kubeconfig": str(self._service_account)}
