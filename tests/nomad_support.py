"""Nomad for the tests: the fake of tests/nomad_fake on 127.0.0.1, or a real agent.

Loaded as a pytest plugin (`pytest_plugins = ["nomad_support"]`). With NOMAD_ADDR set (and
NOMAD_TOKEN, a management token, when the agent has ACLs on), the `nomad_cluster` fixture is that
agent: the tests that need the fake's controls (outcomes by image tag, injected errors, ACL tokens
minted on the spot, held answers) skip, the others run against it with the images of
SHIPHOOK_TEST_NOMAD_IMAGE (a repository with the tags of AGENT_TAGS, each with `sh` and a default
command that keeps running). Without NOMAD_ADDR every test runs against the fake. The README says
how to run this mode; it has never been run (no agent could be had where these tests were written).

PYTEST_DONT_REWRITE
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import nomad.api
import pytest
import requests
from nomad_fake import SECOND, NomadFake
from shiphook.testing import eventually

T = TypeVar("T")
REAL_AGENT = os.environ.get("NOMAD_ADDR")
IMAGE = os.environ.get("SHIPHOOK_TEST_NOMAD_IMAGE", "registry.example.com/team/web")
AGENT_TAGS = ("v1", "v2", "v3", "r0", "r1", "r2", "r3")
"""The tags of IMAGE that the tests runnable on a real agent deploy and run."""


@dataclass
class Cluster:
    """The Nomad the tests drive: its address, a management token, and the fake if it is one."""

    address: str
    token: str | None
    fake: NomadFake | None

    def needs_fake(self) -> NomadFake:
        if self.fake is None:
            pytest.skip("needs the Nomad fake's controls; NOMAD_ADDR names a real agent")
        return self.fake

    def api(self, token: str | None = None) -> nomad.api.Job:
        """python-nomad's job API, every setting explicit (no NOMAD_* variables)."""
        session = requests.Session()
        session.trust_env = False
        return nomad.api.Job(
            address=self.address, namespace="default", token=token or self.token, session=session
        )

    def register(self, job: dict[str, Any]) -> dict[str, Any]:
        return self.api().register_job(job["ID"], {"Job": job})

    def job(self, job_id: str) -> dict[str, Any]:
        return self.api().get_job(job_id)

    def image(self, job_id: str) -> str:
        return self.job(job_id)["TaskGroups"][0]["Tasks"][0]["Config"]["image"]

    def deployments(self, job_id: str) -> list[dict[str, Any]]:
        found = self.api().get_deployments(job_id)
        return sorted(found, key=lambda d: d["CreateIndex"])

    def settled(self, job_id: str, version: int, timeout: float = 30) -> dict[str, Any]:
        """Until the deployment of that version has ended."""

        def ended() -> dict[str, Any] | None:
            mine = [d for d in self.deployments(job_id) if d["JobVersion"] == version]
            done = [d for d in mine if d["Status"] in ("successful", "failed", "cancelled")]
            return done[-1] if done else None

        return eventually(ended, f"the end of {job_id}'s deployment of version {version}", timeout)


@pytest.fixture
def nomad_cluster() -> Iterator[Cluster]:
    if REAL_AGENT:
        yield Cluster(REAL_AGENT, os.environ.get("NOMAD_TOKEN"), None)
        return
    fake = NomadFake().start()
    try:
        yield Cluster(fake.address, None, fake)
    finally:
        fake.stop()


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def service_job(
    job_id: str,
    tag: str = "v1",
    *,
    count: int = 1,
    max_parallel: int = 1,
    auto_revert: bool = False,
    progress_deadline: float = 60,
    meta: dict[str, str] | None = None,
    canary: int = 0,
    auto_promote: bool = False,
    job_type: str = "service",
) -> dict[str, Any]:
    """An api.Job of a service (or `job_type`) with one group and one docker task, as `nomad
    job run` sends it (progress_deadline 0: a failed allocation fails the deployment at once)."""
    return {
        "ID": job_id,
        "Type": job_type,
        "Datacenters": ["*"],
        "Meta": meta,
        "TaskGroups": [
            {
                "Name": "web",
                "Count": count,
                "Update": {
                    "MaxParallel": max_parallel,
                    "HealthCheck": "task_states",
                    "MinHealthyTime": 0,
                    # Nomad wants it below a progress deadline that is not 0
                    "HealthyDeadline": int((progress_deadline or 60) * 0.8 * SECOND),
                    "ProgressDeadline": int(progress_deadline * SECOND),
                    "AutoRevert": auto_revert,
                    "Canary": canary,
                    "AutoPromote": auto_promote,
                },
                "Tasks": [
                    {
                        "Name": "app",
                        "Driver": "docker",
                        "Config": {"image": f"{IMAGE}:{tag}"},
                        "Resources": {"CPU": 20, "MemoryMB": 32},
                    }
                ],
            }
        ],
    }


def batch_job(
    job_id: str,
    tag: str = "v1",
    *,
    meta_optional: tuple[str, ...] = ("EXIT", "GREETING"),
    meta_required: tuple[str, ...] = (),
) -> dict[str, Any]:
    """A parameterized batch job whose task reads its meta as ${NOMAD_META_x}."""
    return {
        "ID": job_id,
        "Type": "batch",
        "Datacenters": ["*"],
        "ParameterizedJob": {
            "Payload": "forbidden",
            "MetaRequired": list(meta_required) or None,
            "MetaOptional": list(meta_optional) or None,
        },
        "TaskGroups": [
            {
                "Name": "run",
                "Count": 1,
                "Tasks": [
                    {
                        "Name": "run",
                        "Driver": "docker",
                        "Config": {
                            "image": f"{IMAGE}:{tag}",
                            "command": "sh",
                            "args": ["-c", "echo ${NOMAD_META_GREETING}; exit ${NOMAD_META_EXIT}"],
                        },
                        "Resources": {"CPU": 20, "MemoryMB": 32},
                    }
                ],
            }
        ],
    }


def nomad_config(
    tmp_path: Path,
    cluster: Cluster,
    *targets: str,
    token: str | None = None,
    token_file: Path | None = None,
    extra: str = "",
    database_url: str | None = None,
    timeout: float = 10,
) -> Path:
    """A config with one nomad backend (polling fast) and the given target tables; `extra`
    goes after the [server] table's database_url."""
    secret = token or cluster.token
    path = tmp_path / "shiphook.toml"
    database_url = database_url or f"sqlite:///{tmp_path}/shiphook.db"
    text = f'[server]\ndatabase_url = "{database_url}"\n{extra}\n'
    text += f'[backends.nomad]\nplugin = "nomad"\naddress = "{cluster.address}"\n'
    text += f"poll_interval = 0.05\ntimeout = {timeout}\n"
    if token_file is not None:
        text += f'token_file = "{token_file}"\n'
    elif secret:
        text += f'token = "{secret}"\n'
    path.write_text(text + "".join(targets))
    return path


def target(name: str, kind: str, job: str, **keys: Any) -> str:
    lines = [f"\n[targets.{name}]", f'kind = "{kind}"', 'backend = "nomad"', f'job = "{job}"']
    keys.setdefault("rollout_timeout", 60)
    keys.setdefault("retry_budget", 5)
    for key, value in keys.items():
        if isinstance(value, str):
            lines.append(f'{key} = "{value}"')
        elif isinstance(value, list):
            lines.append(f"{key} = {value!r}".replace("'", '"'))
        else:
            lines.append(f"{key} = {value}")
    return "\n".join(lines) + "\n"
