"""The conformance suite (shiphook.testing) against the swarm backend on the tests' dockerd.

The `engine` and `services` fixtures come from tests/swarm_support.py: skipped without dockerd,
failing when SHIPHOOK_REQUIRE_DOCKER=1.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from typing import Any

import pytest
from dockerd import JOB
from shiphook.testing import BackendConformance, JobRun
from swarm_support import Engine, Services
from test_swarm import docker

pytest_plugins = ["shiphook.testing", "swarm_support"]


class TestSwarmConformance(BackendConformance):
    plugin = "swarm"
    rollout_timeout = 90
    initial_tag = "v1"
    healthy_tag = "v2"
    failing_tag = "broken"
    failing_reason = "task: non-zero exit (1)"
    other_failing_tag = "also-broken"
    stalling_tag = "stalled"  # its health stays "starting"
    job_tag = "env"
    other_job_tag = "env2"
    job_variable = ("GREETING", "hello")
    failing_run_reason = "task: non-zero exit (3)"
    stalling_job_tag = "stalled"

    @pytest.fixture(autouse=True)
    def _swarm(self, engine: Engine, services: Services) -> None:
        self.engine = engine
        self.services = services

    def backend_options(self) -> dict[str, Any]:
        return {"host": self.engine.host, "timeout": 10, "poll_interval": 0.2}

    def unreachable_options(self) -> dict[str, Any]:
        return {"host": f"unix://{self.tmp_path}/no-docker.sock", "timeout": 5}

    def silent_options(self, address: str) -> dict[str, Any]:
        return {"host": f"tcp://{address}", "timeout": 2}

    def make_app(self) -> dict[str, Any]:
        return {"service": self.services.app(), "resolve_image": False}

    def make_reverting_app(self) -> dict[str, Any]:
        return {"service": self.services.app(failure_action="rollback"), "resolve_image": False}

    def make_job(self) -> dict[str, Any]:
        service = self.services.job(env=["GREETING=hello"], image=f"{JOB}:{self.job_tag}")
        return {"service": service, "resolve_image": False}

    def missing_workload(self, kind: str) -> dict[str, Any]:
        return {"service": f"shiphook-test-missing-{uuid.uuid4().hex[:8]}", "resolve_image": False}

    def workload_image(self, options: dict[str, Any]) -> str:
        return self.services.image(options["service"])

    def running_images(self, options: dict[str, Any]) -> list[str]:
        return self.services.running_images(options["service"])

    def workload_version(self, options: dict[str, Any]) -> str:
        spec = self.services.inspect(options["service"])["Spec"]
        return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()

    def job_run(self, options: dict[str, Any], deployment: dict[str, Any]) -> JobRun:
        iteration = deployment["backendRef"]["iteration"]
        tasks = self.services.client.tasks(filters={"service": options["service"]})
        (task,) = [t for t in tasks if (t.get("JobIteration") or {}).get("Index") == iteration]
        output = self.services.job_output(options["service"], iteration)
        env = dict(line.split("=", 1) for line in output.splitlines() if "=" in line)
        return JobRun(image=task["Spec"]["ContainerSpec"]["Image"], env=env)

    def job_runs(self, options: dict[str, Any]) -> int:
        job_status = self.services.inspect(options["service"]).get("JobStatus") or {}
        return int((job_status.get("JobIteration") or {}).get("Index") or 0)

    def change_by_hand(self, options: dict[str, Any]) -> None:
        docker(
            self.engine,
            "service",
            "update",
            "--detach",
            "--env-add",
            "HOTFIX=1",
            options["service"],
        )

    def changed_by_hand(self, options: dict[str, Any]) -> bool:
        spec = self.services.inspect(options["service"])["Spec"]
        return "HOTFIX=1" in spec["TaskTemplate"]["ContainerSpec"].get("Env", [])
