"""The Nomad fake against the behaviour document (docs/nomad-api-behaviour.md):
codes, texts, shapes and index rules, through python-nomad where the backend uses it.

Section numbers in the test names' comments are the document's.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import nomad.api
import nomad.api.exceptions
import pytest
import requests
from nomad_fake import JOB_KEYS, NomadFake
from nomad_support import IMAGE, batch_job, service_job
from shiphook.testing import eventually

Fault = nomad.api.exceptions.BaseNomadException


@pytest.fixture
def fake() -> Iterator[NomadFake]:
    fake = NomadFake(delay=0.1).start()
    yield fake
    fake.stop()


def api(fake: NomadFake, token: str | None = None) -> nomad.api.Job:
    return nomad.api.Job(address=fake.address, namespace="default", token=token)


def refused(call: Any, *args: Any, **kwargs: Any) -> requests.Response:
    with pytest.raises(Fault) as caught:
        call(*args, **kwargs)
    return caught.value.nomad_resp


def settled(fake: NomadFake, job_id: str, version: int) -> dict[str, Any]:
    def ended() -> dict[str, Any] | None:
        for d in api(fake).get_deployments(job_id):
            if d["JobVersion"] == version and d["Status"] != "running":
                return d
        return None

    return eventually(ended, "the allocation to end", timeout=10)


def test_errors_are_plain_text_with_nomads_codes_and_texts(fake):  # 1.1, 1.4, 2.1
    jobs = api(fake)
    answer = refused(jobs.get_job, "nope")
    assert (answer.status_code, answer.text) == (404, "job not found")
    assert answer.headers["Content-Type"] == "text/plain; charset=utf-8"
    assert answer.headers["X-Nomad-Index"] == "0"  # set before the not-found check
    with pytest.raises(nomad.api.exceptions.URLNotFoundNomadException):
        jobs.get_job("nope")
    answer = refused(jobs.get_versions, "nope")
    assert (answer.status_code, answer.text) == (404, "job versions not found")
    assert jobs.get_deployment("nope") is None  # 200 null
    assert jobs.get_deployments("nope") == []
    assert jobs.get_allocations("nope") == []
    raw = requests.delete(f"{fake.address}/v1/job/web/summary")
    assert (raw.status_code, raw.text) == (405, "Invalid method")


def test_bad_query_parameters_and_methods_get_nomads_answers(fake):
    url = f"{fake.address}/v1/job/web"
    for query, text in [("index=abc", "Invalid index"), ("index=1&wait=xyz", "Invalid wait time")]:
        answer = requests.get(f"{url}?{query}")
        assert (answer.status_code, answer.text) == (400, text)
    assert requests.get(f"{url}?index=1&wait=1m30s").status_code == 404  # no such job yet
    answer = requests.patch(url)
    assert (answer.status_code, answer.text) == (405, "Invalid method")


def test_a_job_in_a_namespace_that_does_not_exist_is_refused(fake):
    answer = requests.post(
        f"{fake.address}/v1/jobs?namespace=foo", json={"Job": service_job("web")}
    )
    assert (answer.status_code, answer.text) == (
        500,
        '1 error occurred:\n\t* job "web" is in nonexistent namespace "foo"\n\n',
    )
    fake.namespaces.add("foo")
    assert requests.post(
        f"{fake.address}/v1/jobs?namespace=foo", json={"Job": service_job("web")}
    ).ok


def test_register_checks_in_nomads_order_with_its_texts(fake):  # 2.2
    jobs = api(fake)
    url = f"{fake.address}/v1/job/web"
    empty = requests.post(url, data=b"")
    assert (empty.status_code, empty.text) == (400, "Request body is empty")
    assert refused(jobs.register_job, "web", service_job("web")).text == "Job must be specified"
    answer = refused(jobs.register_job, "web", {"Job": service_job("other")})
    assert (answer.status_code, answer.text) == (400, "Job ID does not match name")
    batch = batch_job("web")
    jobs.register_job("web", {"Job": service_job("web")})
    answer = refused(jobs.register_job, "web", {"Job": batch})
    assert (answer.status_code, answer.text) == (
        500,
        'cannot update job from type "service" to "batch"',
    )


def test_enforce_index_texts_and_json_keys_matched_case_insensitively(fake):  # 2.2
    jobs = api(fake)
    job = service_job("web")
    missing = refused(
        jobs.register_job, "web", {"Job": job, "EnforceIndex": True, "JobModifyIndex": 41}
    )
    assert (missing.status_code, missing.text) == (
        500,
        "Enforcing job modify index 41: job does not exist",
    )
    created = jobs.register_job("web", {"Job": job, "enforceindex": True, "jobmodifyindex": 0})
    index = created["JobModifyIndex"]
    exists = refused(jobs.register_job, "web", {"Job": job, "EnforceIndex": True})
    assert exists.text == "Enforcing job modify index 0: job already exists"
    stale = refused(
        jobs.register_job, "web", {"Job": job, "EnforceIndex": True, "JobModifyIndex": index - 1}
    )
    assert stale.text == (
        f"Enforcing job modify index {index - 1}: job exists with conflicting job modify "
        f"index: {index}"
    )


def test_one_index_versions_and_modify_index_only_on_spec_changes(fake):  # 1.2, 3.1, 3.2
    jobs = api(fake)
    first = jobs.register_job("web", {"Job": service_job("web")})
    assert first["EvalCreateIndex"] == first["JobModifyIndex"] == first["Index"]
    assert first["EvalID"]
    settled(fake, "web", 0)
    read = jobs.get_job("web")
    assert set(JOB_KEYS) <= set(read)
    assert (read["Version"], read["Stable"], read["Status"]) == (0, True, "running")
    # the read job posted back: no change, no version, yet a new evaluation
    same = jobs.register_job("web", {"Job": read})
    assert same["JobModifyIndex"] == read["JobModifyIndex"]
    assert same["EvalID"] and same["EvalID"] != first["EvalID"]
    assert same["EvalCreateIndex"] == same["Index"] > same["JobModifyIndex"]
    again = jobs.get_job("web")
    assert (again["Version"], again["JobModifyIndex"]) == (0, read["JobModifyIndex"])
    # a changed spec: the next version, indexes from the same counter
    read["TaskGroups"][0]["Tasks"][0]["Config"]["image"] = "registry.example.com/team/web:v2"
    changed = jobs.register_job("web", {"Job": read})
    assert changed["JobModifyIndex"] == changed["EvalCreateIndex"] == changed["Index"]
    assert changed["Index"] > same["Index"]
    assert jobs.get_job("web")["Version"] == 1
    versions = jobs.get_versions("web")["Versions"]
    assert [v["Version"] for v in versions] == [1, 0]  # newest first
    headers = jobs.request("web", method="get").headers
    assert int(headers["X-Nomad-Index"]) == jobs.get_job("web")["ModifyIndex"]


def test_the_deployment_of_a_new_version_comes_after_the_register(fake):  # 3.4
    jobs = api(fake)
    jobs.register_job("web", {"Job": service_job("web", count=2)})
    done = settled(fake, "web", 0)
    assert (done["Status"], done["StatusDescription"]) == (
        "successful",
        "Deployment completed successfully",
    )
    job = jobs.get_job("web")
    job["TaskGroups"][0]["Tasks"][0]["Config"]["image"] = "registry.example.com/team/web:v2"
    jobs.register_job("web", {"Job": job})
    assert jobs.get_deployment("web")["JobVersion"] == 0  # still the old one
    settled(fake, "web", 1)
    latest = jobs.get_deployment("web")
    assert (latest["JobVersion"], latest["TaskGroups"]["web"]["HealthyAllocs"]) == (1, 2)
    assert latest["JobSpecModifyIndex"] == jobs.get_job("web")["JobModifyIndex"]


def test_auto_revert_re_registers_the_latest_stable_version_as_a_new_one(fake):  # 3.4
    jobs = api(fake)
    jobs.register_job("web", {"Job": service_job("web", auto_revert=True, progress_deadline=0)})
    settled(fake, "web", 0)
    job = jobs.get_job("web")
    job["TaskGroups"][0]["Tasks"][0]["Config"]["image"] = "registry.example.com/team/web:exit-1"
    jobs.register_job("web", {"Job": job})
    failed = settled(fake, "web", 1)
    assert failed["Status"] == "failed"
    assert failed["StatusDescription"] == (
        "Failed due to unhealthy allocations - rolling back to job version 0"
    )
    assert settled(fake, "web", 2)["Status"] == "successful"
    reverted = jobs.get_job("web")
    assert reverted["Version"] == 2
    assert reverted["TaskGroups"][0]["Tasks"][0]["Config"]["image"].endswith(":v1")
    allocs = [a for a in jobs.get_allocations("web") if a["JobVersion"] == 1]
    events = allocs[0]["TaskStates"]["app"]["Events"]
    assert [e["DisplayMessage"] for e in events if e["Type"] == "Terminated"] == ["Exit Code: 1"]


def test_progress_deadline_and_no_stable_version_descriptions(fake):  # 3.4
    jobs = api(fake)
    job = service_job("web", tag="stall", auto_revert=True, progress_deadline=0.3)
    jobs.register_job("web", {"Job": job})
    failed = settled(fake, "web", 0)
    assert failed["StatusDescription"] == (
        "Failed due to progress deadline - no stable job version to auto revert to"
    )


def test_a_stop_is_a_new_version_and_a_purge_leaves_every_incarnations_records(fake):
    jobs = api(fake)  # 1.1 (DELETE), 2.4, 2.6, 3.4 (cancelled because stopped)
    jobs.register_job("web", {"Job": service_job("web", tag="stall")})
    eventually(lambda: jobs.get_deployment("web"), "the deployment")
    jobs.deregister_job("web")
    stopped = jobs.get_job("web")
    assert (stopped["Stop"], stopped["Version"]) == (True, 1)
    eventually(lambda: jobs.get_job("web")["Status"] == "dead", "a dead job")
    (cancelled,) = jobs.get_deployments("web")
    assert (cancelled["Status"], cancelled["StatusDescription"]) == (
        "cancelled",
        "Cancelled because job is stopped",
    )
    assert [a["DesiredStatus"] for a in jobs.get_allocations("web")] == ["stop"]
    jobs.deregister_job("web", purge=True)
    assert refused(jobs.get_job, "web").status_code == 404
    jobs.register_job("web", {"Job": service_job("web")})
    settled(fake, "web", 0)
    # the new job's own, unless it is gone too or ?all is asked for
    assert [d["Status"] for d in jobs.get_deployments("web")] == ["successful"]
    assert len(jobs.get_allocations("web")) == 1
    assert len(jobs.request("web", "deployments", method="get", params={"all": "true"}).json()) == 2
    jobs.deregister_job("web", purge=True)
    assert len(jobs.get_deployments("web")) == 2
    assert len(jobs.get_allocations("web")) == 2


def test_a_job_registered_again_at_once_after_a_purge_is_placed_anew(fake):  # 2.6, 3.1
    jobs = api(fake)
    jobs.register_job("web", {"Job": service_job("web", tag="stall")})
    eventually(lambda: jobs.get_allocations("web"), "the first allocation")
    jobs.deregister_job("web", purge=True)
    jobs.register_job("web", {"Job": service_job("web", tag="v3")})  # version 0 again
    assert settled(fake, "web", 0)["Status"] == "successful"
    (running,) = jobs.get_allocations("web")
    assert running["ClientStatus"] == "running" and running["JobVersion"] == 0
    assert jobs.get_job("web")["Status"] == "running"


def test_the_newest_stable_version_is_kept_among_the_six(fake):  # 2.3
    jobs = api(fake)
    jobs.register_job("web", {"Job": service_job("web")})
    settled(fake, "web", 0)  # stable
    for n in range(1, 8):  # never stable: stalled
        fake.put_job(service_job("web", tag=f"stall-{n}"))
    versions = [v["Version"] for v in jobs.get_versions("web")["Versions"]]
    assert versions == [7, 6, 5, 4, 3, 0]


def test_a_system_job_keeps_its_update_block_but_gets_no_deployment_nor_health(fake):  # 3.5
    jobs = api(fake)
    jobs.register_job("agent", {"Job": service_job("agent", job_type="system")})
    assert jobs.get_job("agent")["TaskGroups"][0]["Update"]["MaxParallel"] == 1
    eventually(
        lambda: [a["ClientStatus"] for a in jobs.get_allocations("agent")] == ["running"],
        "a running allocation",
    )
    fake.wait_idle()
    assert jobs.get_deployments("agent") == []
    assert jobs.get_allocations("agent")[0]["DeploymentStatus"] is None


def test_revert_errors_and_enforce_prior_version(fake):  # 2.7
    jobs = api(fake)
    jobs.register_job("web", {"Job": service_job("web")})
    assert refused(jobs.revert_job, "web", 0).text == "can't revert to current version"
    job = jobs.get_job("web")
    job["TaskGroups"][0]["Tasks"][0]["Config"]["image"] = "registry.example.com/team/web:v2"
    jobs.register_job("web", {"Job": job})
    wrong = refused(jobs.revert_job, "web", 0, enforce_prior_version=0)
    assert (wrong.status_code, wrong.text) == (
        500,
        "Current job has version 1; enforcing version 0",
    )
    gone = refused(jobs.revert_job, "web", 7)
    assert gone.text == 'job "web" in namespace "default" at version 7 not found'
    answer = jobs.revert_job("web", 0, enforce_prior_version=1)
    assert answer["JobModifyIndex"] == answer["Index"]
    reverted = jobs.get_job("web")
    assert (reverted["Version"], reverted["Stable"]) == (2, False)


def test_dispatch_idempotency_is_by_the_query_string_only(fake):  # 2.8, 4.4
    jobs = api(fake)
    jobs.register_job("migrate", {"Job": batch_job("migrate")})
    # python-nomad's own idempotency_token goes in the body, where Nomad never looks
    one = jobs.dispatch_job("migrate", meta={"GREETING": "hi"}, idempotency_token="tok")
    two = jobs.dispatch_job("migrate", meta={"GREETING": "hi"}, idempotency_token="tok")
    assert one["DispatchedJobID"] != two["DispatchedJobID"]
    params = {"idempotency_token": "run-1"}
    first = jobs.request("migrate", "dispatch", method="post", json={"Meta": {}}, params=params)
    again = jobs.request(
        "migrate", "dispatch", method="post", json={"Meta": {"EXIT": "1"}}, params=dict(params)
    )
    first, again = first.json(), again.json()
    assert first["DispatchedJobID"].startswith("migrate/dispatch-")
    assert again["DispatchedJobID"] == first["DispatchedJobID"]
    assert (again["EvalID"], again["EvalCreateIndex"]) == ("", 0)
    assert first["JobCreateIndex"] < first["EvalCreateIndex"] == first["Index"]
    child = jobs.get_job(first["DispatchedJobID"])  # a job id with `/`, unescaped
    assert (child["ParentID"], child["Dispatched"]) == ("migrate", True)
    escaped = requests.get(f"{fake.address}/v1/job/{first['DispatchedJobID'].replace('/', '%2F')}")
    assert escaped.json()["ID"] == first["DispatchedJobID"]
    assert len(fake.children("migrate")) == 3


def test_dispatch_checks_with_nomads_texts(fake):  # 2.8
    jobs = api(fake)
    assert refused(jobs.dispatch_job, "missing").text == "parameterized job not found"
    jobs.register_job("web", {"Job": service_job("web")})
    assert (
        refused(jobs.dispatch_job, "web").text == 'Specified job "web" is not a parameterized job'
    )
    jobs.register_job("migrate", {"Job": batch_job("migrate", meta_required=("DEPLOY_ID",))})
    answer = refused(jobs.dispatch_job, "migrate", meta={"DEPLOY_ID": "1", "NOPE": "x"})
    assert (answer.status_code, answer.text) == (
        500,
        "Dispatch request included unpermitted metadata keys: [NOPE]",
    )
    answer = refused(jobs.dispatch_job, "migrate", meta={"EXIT": "1"})
    assert answer.text == "Dispatch did not provide required meta keys: [DEPLOY_ID]"
    answer = refused(jobs.dispatch_job, "migrate", meta={"DEPLOY_ID": 1})
    assert (answer.status_code, answer.text) == (
        400,
        "json: cannot unmarshal number into Go struct field JobDispatchRequest.Meta of type string",
    )


def test_a_dispatch_is_checked_against_the_job_it_copies_before_its_token(fake):  # 2.8
    """Job.Dispatch reads the job once: it checks the meta against it, then looks for the
    token's child, then copies it (nomad/job_endpoint.go at v1.9.7, Dispatch)."""
    jobs = api(fake)
    jobs.register_job("migrate", {"Job": batch_job("migrate")})

    def dispatch(token: str, meta: dict[str, str]) -> requests.Response:
        params = {"idempotency_token": token}
        return jobs.request(
            "migrate", "dispatch", method="post", json={"Meta": meta}, params=params
        )

    first = dispatch("run-1", {}).json()["DispatchedJobID"]
    job = jobs.get_job("migrate")
    job["ParameterizedJob"]["MetaRequired"] = ["WINDOW"]
    job["TaskGroups"][0]["Tasks"][0]["Config"]["image"] = f"{IMAGE}:v2"
    jobs.register_job("migrate", {"Job": job})
    # the meta is checked first: a missing required key is refused even for a known token
    answer = refused(dispatch, "run-1", {})
    assert (answer.status_code, answer.text) == (
        500,
        "Dispatch did not provide required meta keys: [WINDOW]",
    )
    assert dispatch("run-1", {"WINDOW": "1"}).json()["DispatchedJobID"] == first
    second = dispatch("run-2", {"WINDOW": "1"}).json()["DispatchedJobID"]
    images = {
        c["ID"]: c["TaskGroups"][0]["Tasks"][0]["Config"]["image"] for c in fake.children("migrate")
    }
    assert images == {
        first: f"{IMAGE}:v1",
        second: f"{IMAGE}:v2",
    }
    assert jobs.get_job(second)["Meta"] == {"WINDOW": "1"}


def test_a_failed_batch_allocation_is_rescheduled_once(fake):  # 3.3, 3.5, 3.6
    jobs = api(fake)
    jobs.register_job("migrate", {"Job": batch_job("migrate")})
    fake.reschedule_delay = 5.0
    child = jobs.dispatch_job("migrate", meta={"EXIT": "2"})["DispatchedJobID"]
    # failed, and not yet rescheduled: the evaluation its failure queued keeps the job pending
    (first,) = eventually(
        lambda: [a for a in jobs.get_allocations(child) if a["ClientStatus"] == "failed"],
        "the first failure",
    )
    assert (first["NextAllocation"], first["FollowupEvalID"]) == ("", "")
    assert jobs.get_job(child)["Status"] == "pending"

    def both_failed() -> list[dict[str, Any]] | None:
        allocs = jobs.get_allocations(child)
        return (
            allocs
            if len(allocs) == 2 and all(a["ClientStatus"] == "failed" for a in allocs)
            else None
        )

    allocs = sorted(
        eventually(both_failed, "both failed", timeout=10), key=lambda a: a["CreateIndex"]
    )
    assert allocs[0]["NextAllocation"] == allocs[1]["ID"]
    assert allocs[1]["NextAllocation"] == ""
    assert allocs[1]["ClientDescription"] == "Failed tasks"
    assert allocs[1]["DeploymentStatus"] is None
    eventually(
        lambda: jobs.get_job(child)["Status"] == "dead",
        "jobs.get_job(child)['Status'] == 'dead'",
        timeout=10,
    )
    words = jobs.dispatch_job("migrate", meta={"EXIT": "abc"})["DispatchedJobID"]
    eventually(  # not a number: the fake's task exits 1
        lambda: [a["ClientStatus"] for a in jobs.get_allocations(words)] == ["failed"] * 2,
        "both attempts failed",
        timeout=10,
    )
    fine = jobs.dispatch_job("migrate", meta={"EXIT": "0"})["DispatchedJobID"]
    eventually(
        lambda: [a["ClientStatus"] for a in jobs.get_allocations(fine)] == ["complete"],
        "[a['ClientStatus'] for a in jobs.get_allocations(fine)] == ['complete']",
        timeout=10,
    )


def test_acl_tokens_need_their_capability(fake):  # 1.4
    fake.acl = True
    anonymous, reader = api(fake), api(fake, fake.token("read-job"))
    submitter = api(fake, fake.token("read-job", "submit-job"))
    dispatcher = api(fake, fake.token("dispatch-job"))
    answer = refused(anonymous.get_job, "web")
    assert (answer.status_code, answer.text) == (403, "Permission denied")
    with pytest.raises(nomad.api.exceptions.URLNotAuthorizedNomadException):
        reader.register_job("web", {"Job": service_job("web")})
    assert refused(api(fake, "not-a-token").get_job, "web").text == "Permission denied"
    # register: an unknown token is refused before the job is validated, anonymous after it
    invalid = {"Job": {"ID": "bad", "TaskGroups": []}}
    assert refused(api(fake, "not-a-token").register_job, "bad", invalid).status_code == 403
    answer = refused(anonymous.register_job, "bad", invalid)
    assert (answer.status_code, answer.text) == (
        500,
        "1 error occurred:\n\t* Missing job task groups\n\n",
    )
    submitter.register_job("migrate", {"Job": batch_job("migrate")})
    assert reader.get_job("migrate")["ID"] == "migrate"
    assert refused(submitter.dispatch_job, "migrate").status_code == 403
    assert dispatcher.dispatch_job("migrate")["DispatchedJobID"]
    fake.acl = False
    assert anonymous.get_job("migrate")["ID"] == "migrate"


def test_injected_faults_and_held_answers(fake):  # 1.4 (forwarded errors), 7
    jobs = api(fake)
    fake.fail("GET", "/v1/job/web", 500, "No cluster leader")
    assert refused(jobs.get_job, "web").text == "No cluster leader"
    assert refused(jobs.get_job, "web").text == "job not found"
    # a held answer: the register is done while its client still waits for the answer
    fake.hold("POST", "/v1/job/web", 30)

    def register() -> None:
        with contextlib.suppress(Fault):  # python-nomad gives up after its 5 s timeout
            jobs.register_job("web", {"Job": service_job("web")})

    sender = threading.Thread(target=register, daemon=True)
    sender.start()
    assert eventually(
        lambda: api(fake).get_job("web") if "web" in api(fake) else None,
        "api(fake).get_job('web') if 'web' in api(fake) else None",
        timeout=10,
    )
    assert sender.is_alive()
