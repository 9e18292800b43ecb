"""The Nomad backend (issue 15) through python-nomad and the real shiphook deployer.

Nomad is the fake of tests/nomad_fake, or a real agent when NOMAD_ADDR is given (see
tests/nomad_support.py: the tests that need the fake's controls skip then). What a test says about
Nomad it reads from Nomad: the job, its versions and deployments, the dispatched children, and the
requests the fake saw.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
from typing import Any

import pytest
from conftest import ROOT, Harness, run_cli, write_config
from nomad_support import (
    AGENT_TAGS,
    IMAGE,
    Cluster,
    batch_job,
    nomad_config,
    service_job,
    target,
    unique,
)
from shiphook import BackendError
from shiphook.instance import open_instance
from shiphook.testing import eventually
from shiphook_nomad import NomadBackend, NomadOptions
from test_durability import all_deployments, create_hook, post_hook, wait_all_terminal

pytest_plugins = ["nomad_support"]

WAIT = "60"  # ?wait seconds: far above any rollout here


def deploy(harness: Harness, target_name: str, body: dict) -> Any:
    token = harness.new_hook(target_name)
    return harness.post_hook(token, body, params={"wait": WAIT})


def app_harness(harness_factory, tmp_path, cluster: Cluster, job: dict, **keys: Any) -> Harness:
    cluster.register(job)
    cluster.settled(job["ID"], 0)
    config = nomad_config(tmp_path, cluster, target("web", "app", job["ID"], **keys))
    return harness_factory(config)


def registers(fake: Any, job_id: str) -> list[Any]:
    """The registers of the job that shiphook sent (the tests' own send no EnforceIndex)."""
    return [r for r in fake.calls("POST", f"/v1/job/{job_id}") if r.body.get("EnforceIndex")]


def progress_messages(harness: Harness) -> list[str]:
    """Every message the backend's progress gives the deployer, in order."""
    backend = harness.instance.backends["nomad"]
    said: list[str] = []
    real = backend.progress

    def progress(target: Any, ref: Any) -> Any:
        answer = real(target, ref)
        said.append(answer.message)
        return answer

    backend.progress = progress  # the deployer looks the method up on every call
    return said


# -- app deploys --------------------------------------------------------------------------


def test_a_deploy_registers_the_new_tag_and_follows_the_deployment_of_that_version(
    nomad_cluster, harness_factory, tmp_path
):
    job_id = unique("web")
    harness = app_harness(harness_factory, tmp_path, nomad_cluster, service_job(job_id, count=2))
    said = progress_messages(harness)
    result = deploy(harness, "web", {"imageTag": "v2"})
    assert result.status_code == 201, result.text
    deployment = result.json["deployment"]
    assert deployment["status"] == "succeeded"
    assert deployment["message"].startswith("Deployment completed successfully (job ")
    assert deployment["previousImage"] == f"{IMAGE}:v1"
    assert deployment["backendRef"]["image"] == f"{IMAGE}:v2"
    assert deployment["backendRef"]["version"] == 1
    job = nomad_cluster.job(job_id)
    assert (job["Version"], job["Stable"]) == (1, True)
    assert nomad_cluster.image(job_id) == f"{IMAGE}:v2"
    assert job["Meta"]["shiphook_deployment"] == deployment["id"]
    if nomad_cluster.fake is not None:
        # registered once, with EnforceIndex and the JobModifyIndex it read
        (register,) = registers(nomad_cluster.fake, job_id)
        assert register.body["EnforceIndex"] is True
        assert register.body["JobModifyIndex"] == register.body["Job"]["JobModifyIndex"]
        # the deployment of version 1 comes after the register: until then the latest was 0's
        assert any(
            m.startswith(
                "waiting for Nomad to create the deployment of version 1 (latest: version 0)"
            )
            for m in said
        ), said


def test_a_register_refused_for_a_moved_job_modify_index_is_read_again_and_retried(
    nomad_cluster, harness_factory, tmp_path
):
    fake = nomad_cluster.needs_fake()
    job_id = unique("web")
    harness = app_harness(harness_factory, tmp_path, nomad_cluster, service_job(job_id))
    backend: NomadBackend = harness.instance.backends["nomad"]
    real_get = backend.api.job.get_job
    reads = []

    def get_job(job_id_: str, *args: Any, **kwargs: Any) -> dict:
        job = real_get(job_id_, *args, **kwargs)
        reads.append(job["JobModifyIndex"])
        if len(reads) == 2:  # (1: describe) someone else registers between read and register
            fake.put_job(service_job(job_id, meta={"owner": "someone else"}))
        return job

    backend.api.job.get_job = get_job
    result = deploy(harness, "web", {"imageTag": "v2"})
    assert result.status_code == 201, result.text
    sent = registers(fake, job_id)
    assert len(sent) == 2
    assert sent[0].body["JobModifyIndex"] == reads[1]
    assert sent[1].body["JobModifyIndex"] == reads[2] != reads[1]
    job = nomad_cluster.job(job_id)
    assert job["Meta"]["owner"] == "someone else"  # the other change is kept
    assert nomad_cluster.image(job_id) == f"{IMAGE}:v2"
    assert job["Version"] == 2


def test_an_rpc_prefixed_index_conflict_and_no_cluster_leader_are_retried(
    nomad_cluster, harness_factory, tmp_path
):
    fake = nomad_cluster.needs_fake()
    job_id = unique("web")
    harness = app_harness(harness_factory, tmp_path, nomad_cluster, service_job(job_id))
    conflict = "rpc error: Enforcing job modify index 9: job exists with conflicting job modify "
    fake.fail("POST", f"/v1/job/{job_id}", 500, conflict + "index: 11")
    fake.fail("GET", f"/v1/job/{job_id}/deployments", 500, "No cluster leader", times=2)
    result = deploy(harness, "web", {"imageTag": "v2"})
    assert result.status_code == 201, result.text
    assert len(registers(fake, job_id)) == 2
    assert nomad_cluster.job(job_id)["Version"] == 1


def test_a_version_replaced_before_nomad_deploys_it_fails_naming_the_newer_one(
    nomad_cluster, harness_factory, tmp_path
):
    fake = nomad_cluster.needs_fake()
    job_id = unique("web")
    harness = app_harness(
        harness_factory, tmp_path, nomad_cluster, service_job(job_id), on_failure="leave"
    )
    backend = harness.instance.backends["nomad"]
    real = backend.deploy

    def deploy_then_someone_else(target: Any, **kwargs: Any) -> Any:
        ref = real(target, **kwargs)
        fake.put_job(service_job(job_id, "v3"))  # before the scheduler has seen version 1
        return ref

    backend.deploy = deploy_then_someone_else
    result = deploy(harness, "web", {"imageTag": "v2"})
    deployment = result.json["deployment"]
    assert deployment["status"] == "failed", result.text
    assert deployment["message"] == (
        f"job {job_id} version 1 was replaced by version 2 before Nomad deployed it: it was "
        "changed outside this deployment; left as it is (on_failure = leave)"
    )
    assert [d["JobVersion"] for d in nomad_cluster.deployments(job_id)] == [0, 2]


def test_deploying_the_running_tag_registers_an_unchanged_spec_and_succeeds_at_once(
    nomad_cluster, harness_factory, tmp_path
):
    job_id = unique("web")
    harness = app_harness(harness_factory, tmp_path, nomad_cluster, service_job(job_id))
    before = nomad_cluster.job(job_id)
    result = deploy(harness, "web", {"imageTag": "v1"})
    assert result.status_code == 201, result.text
    deployment = result.json["deployment"]
    assert deployment["status"] == "succeeded"
    assert deployment["message"] == f"job {job_id} already runs {IMAGE}:v1"
    assert deployment["backendRef"]["updated"] is False
    after = nomad_cluster.job(job_id)
    assert (after["Version"], after["JobModifyIndex"]) == (
        before["Version"],
        before["JobModifyIndex"],
    )
    assert len(nomad_cluster.deployments(job_id)) == 1
    if nomad_cluster.fake is not None:
        (register,) = registers(nomad_cluster.fake, job_id)
        assert register.body["JobModifyIndex"] == before["JobModifyIndex"]


def test_nomads_auto_revert_is_reported_as_rolled_back_with_the_failing_tasks_exit_code(
    nomad_cluster, harness_factory, tmp_path
):
    fake = nomad_cluster.needs_fake()
    job_id = unique("web")
    job = service_job(job_id, auto_revert=True, progress_deadline=1)
    harness = app_harness(harness_factory, tmp_path, nomad_cluster, job)
    result = deploy(harness, "web", {"imageTag": "exit-1"})
    assert result.status_code == 502, result.text
    deployment = result.json["deployment"]
    assert deployment["status"] == "rolled_back"
    message = deployment["message"]
    assert message.startswith("Failed due to progress deadline - rolling back to job version 0; ")
    assert ": task app: Exit Code: 1; " in message
    assert message.endswith(
        f"Nomad rolled job {job_id} back to version 0 ({IMAGE}:v1) as version 2"
    )
    assert fake.calls("POST", f"/v1/job/{job_id}/revert") == []  # no second rollback
    job = nomad_cluster.job(job_id)
    assert (job["Version"], nomad_cluster.image(job_id)) == (2, f"{IMAGE}:v1")


def test_a_progress_deadline_failure_is_rolled_back_to_the_previous_stable_version(
    nomad_cluster, harness_factory, tmp_path
):
    fake = nomad_cluster.needs_fake()
    job_id = unique("web")
    job = service_job(job_id, progress_deadline=0.5)
    harness = app_harness(harness_factory, tmp_path, nomad_cluster, job)
    first = deploy(harness, "web", {"imageTag": "v2"})
    assert first.json["deployment"]["status"] == "succeeded", first.text
    result = deploy(harness, "web", {"imageTag": "stall"})
    assert result.status_code == 502, result.text
    deployment = result.json["deployment"]
    assert deployment["status"] == "rolled_back"
    assert deployment["message"].startswith("Failed due to progress deadline; rolled back (")
    (revert,) = fake.calls("POST", f"/v1/job/{job_id}/revert")
    # back to version 1 (v2, stable), checked against the version this deployment registered
    assert revert.body == {"JobID": job_id, "JobVersion": 1, "EnforcePriorVersion": 2}
    job = nomad_cluster.job(job_id)
    assert (job["Version"], nomad_cluster.image(job_id)) == (3, f"{IMAGE}:v2")
    assert nomad_cluster.settled(job_id, 3)["Status"] == "successful"


def test_unhealthy_allocations_fail_the_deployment_and_on_failure_leave_keeps_it(
    nomad_cluster, harness_factory, tmp_path
):
    nomad_cluster.needs_fake()
    job_id = unique("web")
    job = service_job(job_id, progress_deadline=0)
    harness = app_harness(harness_factory, tmp_path, nomad_cluster, job, on_failure="leave")
    result = deploy(harness, "web", {"imageTag": "unhealthy"})
    assert result.status_code == 502, result.text
    deployment = result.json["deployment"]
    assert deployment["status"] == "failed"
    assert deployment["message"].startswith("Failed due to unhealthy allocations; allocation ")
    assert deployment["message"].endswith(" unhealthy; left as it is (on_failure = leave)")
    assert nomad_cluster.image(job_id) == f"{IMAGE}:unhealthy"


def test_a_driver_error_fails_the_deployment_with_dockers_pull_error(
    nomad_cluster, harness_factory, tmp_path
):
    nomad_cluster.needs_fake()
    job_id = unique("web")
    job = service_job(job_id, progress_deadline=0)
    harness = app_harness(harness_factory, tmp_path, nomad_cluster, job, on_failure="leave")
    result = deploy(harness, "web", {"imageTag": "driver-error"})
    deployment = result.json["deployment"]
    assert deployment["status"] == "failed", result.text
    assert (
        f"task app: Failed to pull `{IMAGE}:driver-error`: Error response from daemon"
        in (deployment["message"])
    )
    assert "; Error was unrecoverable" in deployment["message"]


def test_a_job_without_an_update_block_is_tracked_through_its_allocations(
    nomad_cluster, harness_factory, tmp_path
):
    nomad_cluster.needs_fake()
    job_id = unique("web")
    job = service_job(job_id, max_parallel=0, count=2)
    nomad_cluster.register(job)
    config = nomad_config(tmp_path, nomad_cluster, target("web", "app", job_id))
    harness = harness_factory(config)
    result = deploy(harness, "web", {"imageTag": "v2"})
    assert result.status_code == 201, result.text
    deployment = result.json["deployment"]
    assert deployment["backendRef"]["watch"] == "allocations"
    assert deployment["message"] == f"2 of 2 allocations of version 1 healthy ({IMAGE}:v2)"
    assert nomad_cluster.deployments(job_id) == []  # Nomad made none

    failed = deploy(harness, "web", {"imageTag": "exit-2"})
    deployment = failed.json["deployment"]
    assert deployment["status"] == "rolled_back", failed.text
    assert f"job {job_id} version 2; allocation " in deployment["message"]
    assert "failed: task app: Exit Code: 2" in deployment["message"]
    # no version is stable without a deployment: back to the version it replaced
    assert nomad_cluster.image(job_id) == f"{IMAGE}:v2"


def test_a_system_job_is_followed_through_its_allocations_running_the_new_version(
    nomad_cluster, harness_factory, tmp_path
):
    """Nomad's system scheduler (before 1.11) makes no deployment, update block or not, and its
    allocations get no health: they are followed until every one runs the new version."""
    nomad_cluster.needs_fake()
    job_id = unique("agent")
    nomad_cluster.register(service_job(job_id, job_type="system"))
    eventually(lambda: nomad_cluster.api().get_allocations(job_id), "the first allocation")
    harness = harness_factory(nomad_config(tmp_path, nomad_cluster, target("web", "app", job_id)))
    result = deploy(harness, "web", {"imageTag": "v2"})
    assert result.status_code == 201, result.text
    deployment = result.json["deployment"]
    assert deployment["backendRef"]["watch"] == "allocations"
    assert deployment["message"] == f"1 of 1 allocations running version 1 ({IMAGE}:v2)"
    assert nomad_cluster.deployments(job_id) == []


def test_a_group_whose_canaries_wait_for_a_manual_promotion_is_refused_up_front(
    nomad_cluster, harness_factory, tmp_path
):
    job_id = unique("web")
    harness = app_harness(
        harness_factory, tmp_path, nomad_cluster, service_job(job_id, canary=1, count=2)
    )
    before = nomad_cluster.job(job_id)["Version"]
    refused = (
        f"group web of job {job_id} has canary = 1 without auto_promote: each of its "
        "deployments waits for a person to promote it (nomad deployment promote), which "
        "shiphook does not do; set auto_promote = true in its update block, or canary = 0"
    )
    result = deploy(harness, "web", {"imageTag": "v2"})
    assert result.status_code == 502, result.text
    assert result.json["deployment"]["message"] == refused
    assert nomad_cluster.job(job_id)["Version"] == before  # nothing registered
    backend: NomadBackend = harness.instance.backends["nomad"]
    with pytest.raises(BackendError) as said:  # what `shiphook check` shows
        backend.describe(harness.instance.config.targets["web"])
    assert said.value.message == refused
    nomad_cluster.register(service_job(job_id, canary=1, count=2, auto_promote=True))
    nomad_cluster.settled(job_id, before + 1)
    assert deploy(harness, "web", {"imageTag": "v2"}).status_code == 201


def test_a_stopped_job_is_neither_deployed_nor_run(nomad_cluster, harness_factory, tmp_path):
    web, migrate = unique("web"), unique("migrate")
    nomad_cluster.register(service_job(web))
    nomad_cluster.register(batch_job(migrate))
    nomad_cluster.settled(web, 0)
    config = nomad_config(
        tmp_path,
        nomad_cluster,
        target("web", "app", web),
        target("migrate", "job", migrate, parameters=["GREETING"]),
    )
    harness = harness_factory(config)
    for job_id in (web, migrate):
        nomad_cluster.api().deregister_job(job_id)  # nomad job stop
    versions = {job_id: nomad_cluster.job(job_id)["Version"] for job_id in (web, migrate)}
    deployed = deploy(harness, "web", {"imageTag": "v2"}).json["deployment"]
    assert (deployed["status"], deployed["message"]) == (
        "failed",
        f"job {web} is stopped: shiphook does not start a stopped job; start it (nomad job "
        f"start {web}, or nomad job run) and deploy again",
    )
    ran = run(harness, {"GREETING": "hi"}, "v2").json["deployment"]
    assert ran["status"] == "failed", ran
    assert ran["message"].startswith(f"job {migrate} is stopped: "), ran
    assert ran["message"].endswith(" and run again"), ran
    # nothing registered: neither the new image nor a run's window
    assert {job_id: nomad_cluster.job(job_id)["Version"] for job_id in versions} == versions
    backend: NomadBackend = harness.instance.backends["nomad"]
    with pytest.raises(BackendError, match=f"^job {web} is stopped: "):
        backend.describe(harness.instance.config.targets["web"])


def test_a_job_purged_during_a_rollout_ends_it_and_one_registered_anew_is_not_followed(
    nomad_cluster, harness_factory, tmp_path
):
    nomad_cluster.needs_fake()  # a rollout that stays under way: the fake's stall tag
    job_id = unique("web")
    harness = app_harness(harness_factory, tmp_path, nomad_cluster, service_job(job_id))
    backend = harness.instance.backends["nomad"]
    real = backend.deploy
    again: list[dict] = []

    def deploy_then_purge(target: Any, **kwargs: Any) -> Any:
        ref = real(target, **kwargs)
        nomad_cluster.settled(job_id, 0)  # (the first version's, already)
        eventually(lambda: nomad_cluster.deployments(job_id)[-1]["JobVersion"] == 1, "v1's")
        nomad_cluster.api().deregister_job(job_id, purge=True)
        for job in again:
            nomad_cluster.register(job)
        return ref

    backend.deploy = deploy_then_purge
    gone = deploy(harness, "web", {"imageTag": "stall-1"}).json["deployment"]
    assert gone["status"] == "failed", gone
    assert gone["message"] == (
        f"Cancelled because job is stopped; not rolled back: read job {job_id}: job not found"
    )

    nomad_cluster.register(service_job(job_id))
    nomad_cluster.settled(job_id, 0)
    again.append(service_job(job_id, "v3"))  # a new job of the same ID, at version 0
    anew = deploy(harness, "web", {"imageTag": "stall-2"}).json["deployment"]
    assert anew["status"] == "failed", anew
    assert anew["message"] == (
        f"job {job_id} was purged and registered again during this deployment: shiphook "
        "neither follows nor rolls back the new job; look at it and deploy again"
    )
    assert nomad_cluster.image(job_id) == f"{IMAGE}:v3"


def job_under_acls(nomad_cluster) -> tuple[Any, str]:
    """The fake with ACLs on, and a service job registered there with a management token."""
    fake = nomad_cluster.needs_fake()
    fake.acl = True
    job_id = unique("web")
    nomad_cluster.token = fake.management
    nomad_cluster.register(service_job(job_id))
    nomad_cluster.settled(job_id, 0)
    return fake, job_id


def test_a_token_lacking_submit_job_fails_the_deploy_at_once_with_permission_denied(
    nomad_cluster, harness_factory, tmp_path
):
    fake, job_id = job_under_acls(nomad_cluster)
    reader = fake.token("read-job")
    config = nomad_config(
        tmp_path, nomad_cluster, target("web", "app", job_id, retry_budget=60), token=reader
    )
    harness = harness_factory(config)
    result = deploy(harness, "web", {"imageTag": "v2"})
    deployment = result.json["deployment"]
    assert deployment["status"] == "failed", result.text
    assert deployment["message"] == (
        f"register job {job_id}: Permission denied "
        "(check the ACL token's capabilities in namespace default)"
    )
    assert len(registers(fake, job_id)) == 1  # not retried
    assert reader not in json.dumps(result.json)


def test_a_token_file_rewritten_while_shiphook_runs_is_read_again(
    nomad_cluster, harness_factory, tmp_path
):
    """A token rotated in `token_file` is sent from the next call on, without a restart."""
    fake, job_id = job_under_acls(nomad_cluster)
    token_file = tmp_path / "nomad-token"
    token_file.write_text(fake.token("read-job") + "\n")
    web = target("web", "app", job_id, retry_budget=60)
    harness = harness_factory(nomad_config(tmp_path, nomad_cluster, web, token_file=token_file))
    refused = deploy(harness, "web", {"imageTag": "v2"}).json["deployment"]
    assert refused["status"] == "failed", refused
    assert "Permission denied" in refused["message"]
    token_file.write_text(fake.token("read-job", "submit-job") + "\n")
    result = deploy(harness, "web", {"imageTag": "v2"})
    assert result.status_code == 201, result.text
    assert nomad_cluster.image(job_id) == f"{IMAGE}:v2"


def readme_capabilities() -> list[str]:
    """The capabilities of the ACL policy in README.md's Nomad section, as a user applies it."""
    readme = (ROOT / "README.md").read_text()
    policy = readme[readme.index("The ACL policy the token needs") :]
    block = policy[policy.index("```hcl") : policy.index("```", policy.index("```hcl") + 3)]
    return json.loads(re.search(r"capabilities = (\[.*?\])", block).group(1))


def test_the_readmes_acl_policy_is_enough_for_everything_shiphook_does(
    nomad_cluster, harness_factory, tmp_path
):
    """A deploy, a failed one rolled back, a run, and a run with its own imageTag, with a token
    of exactly the README's capabilities (the other tests use a management token)."""
    fake = nomad_cluster.needs_fake()
    fake.acl = True
    nomad_cluster.token = fake.management
    web, migrate = unique("web"), unique("migrate")
    nomad_cluster.register(service_job(web, progress_deadline=1))  # a failure fails at once
    nomad_cluster.settled(web, 0)
    nomad_cluster.register(batch_job(migrate))
    token = fake.token(*readme_capabilities())
    config = nomad_config(
        tmp_path,
        nomad_cluster,
        target("web", "app", web),
        target("migrate", "job", migrate, parameters=["EXIT", "GREETING"]),
        token=token,
    )
    harness = harness_factory(config)
    assert deploy(harness, "web", {"imageTag": "v2"}).json["deployment"]["status"] == "succeeded"
    failed = deploy(harness, "web", {"imageTag": "exit-1"}).json["deployment"]
    assert failed["status"] == "rolled_back", failed
    assert nomad_cluster.image(web) == f"{IMAGE}:v2"
    for tag in (None, "v2"):  # a run with a tag of its own registers the job first
        ran = run(harness, {"GREETING": "hi"}, tag).json["deployment"]
        assert ran["status"] == "succeeded", ran


# -- job runs -------------------------------------------------------------------------------


def job_harness(harness_factory, tmp_path, cluster: Cluster, job: dict, **keys: Any) -> Harness:
    cluster.register(job)
    keys.setdefault("parameters", ["EXIT", "GREETING"])
    config = nomad_config(tmp_path, cluster, target("migrate", "job", job["ID"], **keys))
    return harness_factory(config)


def run(harness: Harness, env: dict[str, str], tag: str | None = None) -> Any:
    body: dict[str, Any] = {
        "instanceEnvironmentVariables": [{"name": k, "value": v} for k, v in env.items()]
    }
    if tag is not None:
        body["imageTag"] = tag
    return deploy(harness, "migrate", body)


def test_a_run_dispatches_with_meta_and_the_token_in_the_query_and_follows_the_child(
    nomad_cluster, harness_factory, tmp_path
):
    job_id = unique("migrate")
    harness = job_harness(harness_factory, tmp_path, nomad_cluster, batch_job(job_id))
    result = run(harness, {"GREETING": "hello"})
    assert result.status_code == 201, result.text
    deployment = result.json["deployment"]
    child = deployment["backendRef"]["child"]
    assert child.startswith(f"{job_id}/dispatch-")
    assert deployment["message"] == f"job {child} completed: 1 allocation(s) complete"
    assert nomad_cluster.job(child)["Meta"] == {"GREETING": "hello"}
    if nomad_cluster.fake is not None:
        (dispatch,) = nomad_cluster.fake.calls("POST", f"/v1/job/{job_id}/dispatch")
        assert dispatch.query["idempotency_token"] == f"shiphook-{deployment['id']}"
        assert dispatch.body == {"Meta": {"GREETING": "hello"}}
        # no register: the job already runs the run's image
        assert registers(nomad_cluster.fake, job_id) == []


def test_a_failing_run_ends_after_nomads_reschedule_with_the_tasks_exit_code(
    nomad_cluster, harness_factory, tmp_path
):
    # the reschedule is written a while after the failure: the run is not over meanwhile
    nomad_cluster.needs_fake().reschedule_delay = 1.0
    job_id = unique("migrate")
    harness = job_harness(harness_factory, tmp_path, nomad_cluster, batch_job(job_id))
    result = run(harness, {"EXIT": "3"})
    assert result.status_code == 502, result.text
    deployment = result.json["deployment"]
    child = deployment["backendRef"]["child"]
    message = deployment["message"]
    assert message.startswith(f"job {child}: allocation ")
    assert message.endswith(
        " failed (attempt 2): task run: Exit Code: 3; Exceeded allowed attempts 3 in interval "
        '24h0m0s and mode is "fail"'
    )
    allocs = nomad_cluster.api().get_allocations(child)
    assert len(allocs) == 2  # the one reschedule of a failed batch allocation
    assert sorted(bool(a["NextAllocation"]) for a in allocs) == [False, True]


def test_a_run_with_an_undeclared_meta_key_fails_with_nomads_message(
    nomad_cluster, harness_factory, tmp_path
):
    job_id = unique("migrate")
    job = batch_job(job_id, meta_optional=("GREETING",))
    harness = job_harness(harness_factory, tmp_path, nomad_cluster, job)
    result = run(harness, {"EXIT": "0"})
    deployment = result.json["deployment"]
    assert deployment["status"] == "failed", result.text
    assert deployment["message"] == (
        f"dispatch job {job_id}: Dispatch request included unpermitted metadata keys: [EXIT]"
    )
    # and `shiphook check` said so up front
    backend = harness.instance.backends["nomad"]
    with pytest.raises(BackendError, match=r"parameters \['EXIT'\] are not declared in job"):
        backend.describe(harness.instance.config.targets["migrate"])


def test_an_image_tag_applies_to_its_run_only(nomad_cluster, harness_factory, tmp_path):
    job_id = unique("migrate")
    harness = job_harness(harness_factory, tmp_path, nomad_cluster, batch_job(job_id))
    tagged = run(harness, {"GREETING": "one"}, tag="v2")
    assert tagged.status_code == 201, tagged.text
    child = tagged.json["deployment"]["backendRef"]["child"]
    assert nomad_cluster.image(child) == f"{IMAGE}:v2"
    assert tagged.json["deployment"]["backendRef"]["image"] == f"{IMAGE}:v2"
    parent = nomad_cluster.job(job_id)
    assert nomad_cluster.image(job_id) == f"{IMAGE}:v1"  # registered back
    assert not (parent["Meta"] or {})
    plain = run(harness, {"GREETING": "two"})
    assert plain.status_code == 201, plain.text
    assert nomad_cluster.image(plain.json["deployment"]["backendRef"]["child"]) == f"{IMAGE}:v1"


def test_a_tagged_run_that_nomad_refuses_puts_the_jobs_own_image_back(
    nomad_cluster, harness_factory, tmp_path
):
    job_id = unique("migrate")
    job = batch_job(job_id, meta_optional=("GREETING",))
    harness = job_harness(harness_factory, tmp_path, nomad_cluster, job)
    refused = run(harness, {"EXIT": "0"}, tag="v2")
    assert refused.json["deployment"]["status"] == "failed", refused.text
    assert "unpermitted metadata keys: [EXIT]" in refused.json["deployment"]["message"]
    parent = nomad_cluster.job(job_id)
    assert nomad_cluster.image(job_id) == f"{IMAGE}:v1"
    assert not (parent["Meta"] or {})  # no run holds the job: the next one goes at once
    after = run(harness, {"GREETING": "hi"}, tag="v3")
    assert after.status_code == 201, after.text


def test_concurrent_tagged_runs_of_one_job_each_run_their_own_image(
    nomad_cluster, harness_factory, tmp_path
):
    job_id = unique("migrate")
    harness = job_harness(
        harness_factory, tmp_path, nomad_cluster, batch_job(job_id), max_concurrent_runs=4
    )
    token = harness.new_hook("migrate")
    headers = {"X-Deploy-Hook-Token": token}

    def call(tag: str):
        async def go(conductor: Any) -> Any:
            body = {"imageTag": tag, "instanceEnvironmentVariables": []}
            return await conductor.simulate_post(
                "/api/v1/dh", json=body, headers=headers, params={"wait": WAIT}
            )

        return go

    answers = harness.gather(*(call(f"r{n}") for n in range(4)))
    for answer in answers:
        assert answer.status_code == 201, answer.text
        ref = answer.json["deployment"]["backendRef"]
        assert (
            nomad_cluster.image(ref["child"]) == f"{IMAGE}:{answer.json['deployment']['imageTag']}"
        )
    assert nomad_cluster.image(job_id) == f"{IMAGE}:v1"


# -- the server ---------------------------------------------------------------------------


def nomad_env() -> dict[str, str]:
    from conftest import plugin_env

    env = plugin_env()
    # the backend reads none of these: the config file alone says where Nomad is
    env.update(NOMAD_ADDR="http://127.0.0.1:9", NOMAD_TOKEN="not-this-one", NOMAD_REGION="nowhere")
    return env


def test_a_run_resumed_after_kill_9_of_serve_does_not_dispatch_twice(
    nomad_cluster, serve, tmp_path
):
    fake = nomad_cluster.needs_fake()
    job_id = unique("migrate")
    nomad_cluster.register(batch_job(job_id))
    config = nomad_config(
        tmp_path,
        nomad_cluster,
        target("migrate", "job", job_id, parameters=["GREETING"]),
        extra="[deployer]\nlease_seconds = 2\nscan_interval = 0.2\n",
    )
    server = serve(config, env=nomad_env(), name="first")
    token = create_hook(server, "migrate")
    # Nomad dispatches, and its answer is held until the server is gone
    fake.hold("POST", f"/v1/job/{job_id}/dispatch", 30)
    status, answer = post_hook(
        server, token, {"instanceEnvironmentVariables": [{"name": "GREETING", "value": "hi"}]}
    )
    assert status == 201, answer
    eventually(lambda: fake.calls("POST", f"/v1/job/{job_id}/dispatch"), "the dispatch")
    server.stop(signal.SIGKILL)
    assert len(fake.children(job_id)) == 1

    restarted = serve(config, env=nomad_env(), name="second")
    (deployment,) = wait_all_terminal(restarted, 1, timeout=60)
    assert deployment["status"] == "succeeded", deployment
    dispatches = fake.calls("POST", f"/v1/job/{job_id}/dispatch")
    assert len(dispatches) == 2
    assert {d.query["idempotency_token"] for d in dispatches} == {f"shiphook-{deployment['id']}"}
    (child,) = fake.children(job_id)  # the same child both times
    assert deployment["backendRef"]["child"] == child["ID"]


def test_serve_and_curl_with_wait_fail_the_ci_step_when_the_rollout_fails(
    nomad_cluster, serve, tmp_path
):
    nomad_cluster.needs_fake()
    job_id = unique("web")
    nomad_cluster.register(service_job(job_id, progress_deadline=0))
    nomad_cluster.settled(job_id, 0)
    config = nomad_config(tmp_path, nomad_cluster, target("web", "app", job_id))
    server = serve(config, env=nomad_env())
    token = create_hook(server, "web")

    def curl(tag: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [
                "curl",
                "--fail-with-body",
                "-sS",
                "-X",
                "POST",
                f"{server.url}/api/v1/dh?wait=60",
                "-H",
                f"X-Deploy-Hook-Token: {token}",
                "--data",
                json.dumps({"imageTag": tag}),
            ],
            capture_output=True,
            text=True,
            timeout=90,
        )

    ok = curl("v2")
    assert ok.returncode == 0, ok.stderr + ok.stdout
    assert json.loads(ok.stdout)["deployment"]["status"] == "succeeded"
    broken = curl("exit-1")
    assert broken.returncode == 22, broken.stdout  # curl's --fail-with-body on a 4xx/5xx
    answer = json.loads(broken.stdout)
    assert answer["deployment"]["status"] == "rolled_back"
    assert "Failed due to unhealthy allocations" in answer["description"]
    assert "Exit Code: 1" in answer["description"]
    assert nomad_cluster.image(job_id) == f"{IMAGE}:v2"
    assert [d["status"] for d in all_deployments(server)] == ["rolled_back", "succeeded"]


# -- options --------------------------------------------------------------------------------


def test_options_verify_tls_by_default_and_never_read_nomad_variables(monkeypatch, tmp_path):
    monkeypatch.setenv("NOMAD_TOKEN", "from-the-environment")
    monkeypatch.setenv("NOMAD_ADDR", "http://127.0.0.1:9")
    token_file = tmp_path / "token"
    token_file.write_text("from-the-file\n")
    options = NomadOptions(address="https://nomad.example.com:4646", token_file=token_file)
    api = NomadBackend(options).api
    for part in (api.job, api.deployment, api.leader):
        assert (part.address, part.token, part.verify) == (
            "https://nomad.example.com:4646",
            "from-the-file",
            True,
        )
        assert part.session.trust_env is False
    assert NomadBackend(NomadOptions()).api.job.token is None
    with pytest.raises(ValueError, match="token and token_file are alternatives"):
        NomadOptions(token="a", token_file=token_file)
    with pytest.raises(ValueError, match="expected http://host:port or https://host:port"):
        NomadOptions(address="nomad:4646")
    for address in ("https://s3cret@nomad:4646", "https://u:s3cret@nomad:4646"):
        with pytest.raises(ValueError, match="holds no credentials"):
            NomadOptions(address=address)
    with pytest.raises(ValueError, match="tls_verify\n  Input should be a valid boolean"):
        NomadOptions(tls_verify="false")  # a string, not TOML's false: refused, not read as false


def test_the_example_config_loads(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    instance = open_instance(ROOT / "configs" / "examples" / "nomad.toml", plugin_modules=[])
    try:
        assert instance.config.backends["nomad"].plugin == "nomad"
        assert {t.kind for t in instance.config.targets.values()} == {"app", "job"}
        assert instance.config.targets["migrate"].parameters == ("MIGRATION", "DRY_RUN")
    finally:
        instance.close()


def test_the_readme_says_how_to_run_against_a_real_agent_and_that_it_never_was():
    readme = (ROOT / "README.md").read_text()
    start = readme.index("`tests/test_nomad.py` can also run against a real Nomad agent.")
    end = readme.find("\n#", start)  # the next heading, if any
    section = readme[start : end if end != -1 else None]
    assert "That mode is unverified" in section and "it has never been run" in section
    support = (ROOT / "tests" / "nomad_support.py").read_text()
    read = set(re.findall(r'os\.environ\.get\("([A-Z_]+)"', support))
    assert read == {"NOMAD_ADDR", "NOMAD_TOKEN", "SHIPHOOK_TEST_NOMAD_IMAGE"}
    for name in read:  # every variable the tests read, given as the command gives it
        assert f"{name}=" in section, name
    for tag in AGENT_TAGS:
        assert f"`{tag}`" in section, tag
    assert "python -m pytest tests/test_nomad.py" in section


def test_a_config_error_about_the_token_never_shows_it(tmp_path):
    (tmp_path / "t").write_text("from-the-file\n")
    # short values: a short enough input would be quoted in the error
    config = write_config(
        tmp_path,
        """
        [backends.nomad]
        plugin = "nomad"
        token = "s3cr3t"
        token_file = "t"
        """,
    )
    result = run_cli("check", config=config, check=False)
    assert result.returncode == 2
    assert "backends.nomad: token and token_file are alternatives: set one" in result.stderr
    assert "s3cr3t" not in result.stderr + result.stdout


@pytest.mark.parametrize(
    "keys, error",
    [
        ('token = "s3cr3t\\nsecond"', "token: expected an ACL token, one line of printable ASCII"),
        ('token = "s3cr3t€"', "token: expected an ACL token, one line of printable ASCII"),
        ('token_file = "two-lines"', "two-lines: expected an ACL token, one line"),
        ('token_file = "empty"', "empty is empty"),
        ('address = "http://admin:s3cr3t@nomad:4646"', "address: an address holds no credentials"),
        ('address = "http://s3cr3t@nomad:4646"', "address: an address holds no credentials"),
    ],
)
def test_a_token_that_cannot_be_sent_is_a_config_error_that_never_shows_it(tmp_path, keys, error):
    """Sent anyway, a token with a line break was quoted back by the HTTP client, in the log,
    the deployment's message and the caller's answer."""
    (tmp_path / "two-lines").write_text("s3cr3t\nsecond\n")
    (tmp_path / "empty").write_text("\n")
    config = write_config(tmp_path, f'[backends.nomad]\nplugin = "nomad"\n{keys}\n')
    result = run_cli("check", config=config, check=False)
    assert result.returncode == 2, result.stdout
    assert error in result.stderr
    assert "s3cr3t" not in result.stderr + result.stdout
