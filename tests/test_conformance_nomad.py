"""The conformance suite (shiphook.testing) against the nomad backend on the Nomad fake.

Each test gets a fake of its own (tests/nomad_fake); image tags choose what its allocations do.
A job run's environment is its dispatched job's meta: the task sees each as NOMAD_META_<name>.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from nomad_fake import NomadFake
from nomad_support import batch_job, service_job
from shiphook.testing import BackendConformance, JobRun, eventually, free_port

pytest_plugins = ["shiphook.testing"]


class TestNomadConformance(BackendConformance):
    plugin = "nomad"
    rollout_timeout = 60
    initial_tag = "v1"
    healthy_tag = "v2"
    failing_tag = "exit-1"
    failing_reason = "Exit Code: 1"
    other_failing_tag = "exit-1-again"
    stalling_tag = "stall"  # pending; make_app's job has no progress deadline
    job_tag = "v1"
    other_job_tag = "v2"
    job_variable = ("GREETING", "hello")  # a meta key with a default in the job's own meta
    failing_run_reason = "Exit Code: 3"
    stalling_job_tag = "stall"  # pending

    @pytest.fixture(autouse=True)
    def _nomad(self) -> Iterator[None]:
        self.fake = NomadFake().start()
        yield
        self.fake.stop()

    def backend_options(self) -> dict[str, Any]:
        return {"address": self.fake.address, "timeout": 10, "poll_interval": 0.05}

    def unreachable_options(self) -> dict[str, Any]:
        return {"address": f"http://127.0.0.1:{free_port()}", "timeout": 5}

    def silent_options(self, address: str) -> dict[str, Any]:
        return {"address": f"http://{address}", "timeout": 2}

    def make_app(self, progress_deadline: float = 0, auto_revert: bool = False) -> dict[str, Any]:
        """progress_deadline 0: a failed allocation fails the deployment at once."""
        job_id = f"web-{uuid.uuid4().hex[:8]}"
        job = service_job(
            job_id,
            self.initial_tag,
            count=2,
            progress_deadline=progress_deadline,
            auto_revert=auto_revert,
        )
        self.fake.put_job(job)
        eventually(lambda: (self.fake.job(job_id) or {}).get("Stable"), "version 0 stable", 30)
        return {"job": job_id}

    def make_reverting_app(self) -> dict[str, Any]:
        # auto_revert needs a progress deadline: a failed allocation fails the deployment at it
        return self.make_app(progress_deadline=1, auto_revert=True)

    def make_job(self) -> dict[str, Any]:
        job_id = f"migrate-{uuid.uuid4().hex[:8]}"
        optional = ("SHIPHOOK_CONFORMANCE", "EXIT", "GREETING")
        job = batch_job(job_id, self.job_tag, meta_optional=optional)
        self.fake.put_job(job | {"Meta": dict([self.job_variable])})
        return {"job": job_id}

    def missing_workload(self, kind: str) -> dict[str, Any]:
        return {"job": f"shiphook-test-missing-{uuid.uuid4().hex[:8]}"}

    def workload_image(self, options: dict[str, Any]) -> str:
        return _image(self.fake.job(options["job"]))

    def _running(self, job_id: str) -> list[dict[str, Any]]:
        with self.fake.lock:
            return [
                dict(a)
                for a in self.fake.allocs.values()
                if a["JobID"] == job_id
                and a["DesiredStatus"] == "run"
                and a["ClientStatus"] == "running"
            ]

    def running_images(self, options: dict[str, Any]) -> list[str]:
        with self.fake.lock:
            versions = {
                v["Version"]: _image(v) for v in self.fake.versions[("default", options["job"])]
            }
        return [versions[a["JobVersion"]] for a in self._running(options["job"])]

    def workload_version(self, options: dict[str, Any]) -> str:
        job = self.fake.job(options["job"])
        allocs = sorted(a["ID"] for a in self._running(options["job"]))
        return f"{job['JobModifyIndex']}:{','.join(allocs)}"

    def job_run(self, options: dict[str, Any], deployment: dict[str, Any]) -> JobRun:
        child = self.fake.job(deployment["backendRef"]["child"])
        return JobRun(image=_image(child), env=dict(child["Meta"] or {}))

    def job_runs(self, options: dict[str, Any]) -> int:
        return len(self.fake.children(options["job"]))

    def change_by_hand(self, options: dict[str, Any]) -> None:  # nomad job run, edited
        job = self.fake.job(options["job"])
        self.fake.put_job(job | {"Meta": (job["Meta"] or {}) | {"HOTFIX": "1"}})

    def changed_by_hand(self, options: dict[str, Any]) -> bool:
        return (self.fake.job(options["job"])["Meta"] or {}).get("HOTFIX") == "1"


def _image(job: dict[str, Any]) -> str:
    return job["TaskGroups"][0]["Tasks"][0]["Config"]["image"]
