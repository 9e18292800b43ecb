"""The deployment lifecycle: ?wait, Idempotency-Key, coalescing, job queues, resume, rollback
on demand, history. In process, through falcon.testing and the scripted backend."""

from __future__ import annotations

import asyncio
import logging
import subprocess
from datetime import timedelta

import pytest
from conftest import ADMIN_TOKEN, replaced_by, run_cli, scripted_config
from shiphook.deployer.deployer import ROLLOUT_LEFT, RUN_LEFT, lease_owner, owner_is_gone
from shiphook.errors import DatabaseUnavailable
from shiphook.services import Deployments

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def wait_post(harness, token, body, seconds, **kwargs):
    return harness.post_hook(token, body, params={"wait": str(seconds)}, **kwargs)


# -- ?wait ------------------------------------------------------------------------------------


def test_wait_answers_201_when_the_rollout_succeeds(harness):
    result = wait_post(harness, harness.new_hook("web"), {"imageTag": "1.0"}, 10)
    assert result.status_code == 201
    assert result.json["deployment"]["status"] == "succeeded"
    assert result.json["deployment"]["history"][-1]["status"] == "succeeded"


def test_wait_answers_502_with_the_reason_when_the_rollout_is_rolled_back(harness):
    result = wait_post(harness, harness.new_hook("web"), {"imageTag": "bad-1"}, 10)
    assert result.status_code == 502
    assert result.json["deployment"]["status"] == "rolled_back"
    assert "rolled back" in result.json["description"]
    assert "task exited with code 1" in result.json["description"]


def test_wait_answers_502_when_the_rollout_failed(harness):
    result = wait_post(harness, harness.new_hook("api"), {"imageTag": "bad-1"}, 10)
    assert result.status_code == 502
    assert result.json["deployment"]["status"] == "failed"
    assert "failed: update paused: task exited with code 1" in result.json["description"]


def test_wait_answers_504_at_the_deadline_and_the_deployment_goes_on(harness):
    result = wait_post(harness, harness.new_hook("web"), {"imageTag": "hang-1"}, 0.3)
    assert result.status_code == 504
    assert "still in_progress after 0.3s" in result.json["description"]
    deployment_id = result.json["deployment"]["id"]
    assert result.headers["location"] == f"/api/v1/deployments/{deployment_id}"
    assert harness.wait_for(deployment_id)["status"] == "rolled_back"  # after its 5 s timeout


def test_wait_answers_504_with_the_deployment_when_its_state_cannot_be_read(harness, monkeypatch):
    """Committed, then the database went silent: the caller learns it was accepted (a retry
    without an Idempotency-Key would deploy twice), not a bare 503."""

    def silent(*args, **kwargs):
        raise DatabaseUnavailable("TimeoutError")

    monkeypatch.setattr(Deployments, "get", silent)
    result = wait_post(harness, harness.new_hook("web"), {"imageTag": "hang-1"}, 0.3)
    assert result.status_code == 504, result.text
    deployment_id = result.json["deployment"]["id"]
    assert result.headers["location"] == f"/api/v1/deployments/{deployment_id}"
    assert result.json["description"] == (
        f"deployment {deployment_id} was accepted, but its state cannot be read now (the "
        "database is unavailable (TimeoutError); try again later): "
        f"GET /api/v1/deployments/{deployment_id}"
    )


def test_wait_answers_409_naming_the_deployment_that_superseded_it(harness):
    token = harness.new_hook("web")
    harness.wait_started(harness.deploy(token, {"imageTag": "hang-1"}))  # holds the target
    hook = {"X-Deploy-Hook-Token": token}

    async def waiting_ci_job(conductor):
        return await conductor.simulate_post(
            "/api/v1/dh", json={"imageTag": "1.0"}, headers=hook, params={"wait": "20"}
        )

    def waiting_job_stored() -> bool:
        return any(d.image_tag == "1.0" for d in harness.instance.deployments.list())

    async def newer_push(conductor):
        while not waiting_job_stored():  # the newer push comes after it
            await asyncio.sleep(0.01)
        return await conductor.simulate_post("/api/v1/dh", json={"imageTag": "2.0"}, headers=hook)

    result, pushed = harness.gather(waiting_ci_job, newer_push)
    newer = pushed.json["deployment"]["id"]
    assert result.status_code == 409
    assert result.json["deployment"]["status"] == "superseded"
    assert result.json["deployment"]["supersededBy"] == newer
    assert f"superseded by deployment {newer}" in result.json["description"]
    assert harness.wait_for(newer)["status"] == "succeeded"
    assert harness.backend.image("web") == "registry.test/app:2.0"


def test_wait_is_capped_by_max_wait(harness_factory):
    harness = harness_factory(server="max_wait = 0.2")
    result = wait_post(harness, harness.new_hook("web"), {"imageTag": "hang-1"}, 600)
    assert result.status_code == 504
    assert "after 0.2s" in result.json["description"]


@pytest.mark.parametrize("value", ["soon", "-1", "nan", "inf"])
def test_a_bad_wait_value_is_400_and_stores_nothing(harness, value):
    result = wait_post(harness, harness.new_hook("web"), {"imageTag": "1.0"}, value)
    assert result.status_code == 400
    assert "wait:" in result.json["description"]
    assert harness.instance.deployments.list() == []


def test_many_waiting_ci_jobs_are_each_answered_when_their_run_ends(harness):
    hook = {"X-Deploy-Hook-Token": harness.new_hook("report")}

    async def ci_job(conductor):
        return await conductor.simulate_post("/api/v1/dh", headers=hook, params={"wait": "20"})

    results = harness.gather(*[ci_job] * 50)
    assert [r.status_code for r in results] == [201] * 50


def test_a_waiting_ci_job_is_answered_when_a_deployer_elsewhere_records_the_end(harness_factory):
    """As under `shiphook serve`, where the deployer is another process (or another replica):
    the waiters read outcomes from the database, whoever records them."""
    accepting = harness_factory(start=False)  # no deployer of its own
    token = accepting.new_hook("web")
    deploying = harness_factory()  # the same database
    hook = {"X-Deploy-Hook-Token": token}

    async def ci_job(conductor):  # answered long before its deadline: released by the end
        answer = conductor.simulate_post(
            "/api/v1/dh", json={"imageTag": "1.0"}, headers=hook, params={"wait": "600"}
        )
        return await asyncio.wait_for(answer, timeout=60)

    [result] = accepting.gather(ci_job)
    assert result.status_code == 201, result.text
    assert result.json["deployment"]["status"] == "succeeded"
    assert deploying.backend.calls("deploy")


# -- Idempotency-Key ----------------------------------------------------------------------------


def test_a_retry_with_the_same_key_returns_the_original_deployment(harness):
    token = harness.new_hook("web")
    headers = {"Idempotency-Key": "build-77"}
    first = harness.post_hook(token, {"imageTag": "1.0"}, headers=headers)
    second = harness.post_hook(token, {"imageTag": "1.0"}, headers=headers)
    assert first.status_code == second.status_code == 201
    assert first.json["deployment"]["id"] == second.json["deployment"]["id"]
    assert second.headers["idempotent-replayed"] == "true"
    harness.wait_for(first.json["deployment"]["id"])
    assert len(harness.instance.deployments.list()) == 1
    assert len(harness.backend.calls("deploy")) == 1


def test_the_same_key_with_a_different_body_is_422(harness):
    token = harness.new_hook("web")
    headers = {"Idempotency-Key": "build-77"}
    first = harness.post_hook(token, {"imageTag": "1.0"}, headers=headers)
    second = harness.post_hook(token, {"imageTag": "1.1"}, headers=headers)
    assert second.status_code == 422
    assert "Idempotency-Key 'build-77'" in second.json["description"]
    assert first.json["deployment"]["id"] in second.json["description"]
    assert len(harness.instance.deployments.list()) == 1


def test_keys_belong_to_one_hook(harness):
    headers = {"Idempotency-Key": "same"}
    a = harness.post_hook(harness.new_hook("web"), {"imageTag": "1.0"}, headers=headers)
    b = harness.post_hook(harness.new_hook("web"), {"imageTag": "1.0"}, headers=headers)
    assert a.json["deployment"]["id"] != b.json["deployment"]["id"]


def test_a_key_is_forgotten_after_24_hours(harness):
    token = harness.new_hook("web")
    headers = {"Idempotency-Key": "k"}
    first = harness.post_hook(token, {"imageTag": "1.0"}, headers=headers).json["deployment"]
    storage = harness.instance.storage
    old = storage.get_deployment(deployment_id=first["id"]).created_at - timedelta(hours=25)
    storage.update_deployment(deployment_id=first["id"], now=old, created_at=old)
    second = harness.post_hook(token, {"imageTag": "1.1"}, headers=headers)
    assert second.status_code == 201
    assert second.json["deployment"]["id"] != first["id"]


def test_concurrent_retries_with_one_key_create_one_deployment(harness_factory):
    harness = harness_factory(start=False)
    headers = {"X-Deploy-Hook-Token": harness.new_hook("web"), "Idempotency-Key": "r"}

    async def retry(conductor):
        return await conductor.simulate_post("/api/v1/dh", json={"imageTag": "1"}, headers=headers)

    results = harness.gather(*[retry] * 10)
    assert {r.status_code for r in results} == {201}
    assert len({r.json["deployment"]["id"] for r in results}) == 1
    assert len(harness.instance.deployments.list()) == 1


def test_a_malformed_key_is_400(harness):
    result = harness.post_hook(
        harness.new_hook("web"), {"imageTag": "1.0"}, headers={"Idempotency-Key": "x" * 300}
    )
    assert result.status_code == 400
    assert "Idempotency-Key" in result.json["description"]


# -- one rollout per target; job queues ----------------------------------------------------------


def test_queued_app_deployments_coalesce_to_the_newest(harness):
    token = harness.new_hook("web")
    first = harness.deploy(token, {"imageTag": "hang-0"})
    harness.wait_started(first)
    queued = [harness.deploy(token, {"imageTag": f"1.{i}"}) for i in range(5)]
    ended = {d: harness.wait_for(d, timeout=15) for d in queued}
    assert [ended[d]["status"] for d in queued] == ["superseded"] * 4 + ["succeeded"]
    assert all(replaced_by(ended, d) == queued[-1] for d in queued[:-1])
    assert harness.wait_for(first)["status"] == "rolled_back"
    assert harness.backend.image("web") == "registry.test/app:1.4"
    assert [c["tag"] for c in harness.backend.calls("deploy")] == ["hang-0", "1.4"]
    assert harness.backend.max_in_flight("web") == 1


def test_job_runs_queue_per_target_up_to_max_concurrent_runs(harness_factory):
    harness = harness_factory(backend_extra="polls = 15")
    report, migrate = harness.new_hook("report"), harness.new_hook("migrate")
    runs = [harness.deploy(report, {}) for _ in range(5)]
    runs += [harness.deploy(migrate, {}) for _ in range(3)]
    assert all(harness.wait_for(r)["status"] == "succeeded" for r in runs)
    assert len(harness.backend.calls("run")) == 8  # job runs are never coalesced
    assert harness.backend.max_in_flight("report") == 2
    assert harness.backend.max_in_flight("migrate") == 1


def test_a_run_past_rollout_timeout_fails_saying_it_goes_on_beside_the_next(
    harness_factory, tmp_path
):
    """No backend call stops a run: the one past its deadline is left to the orchestrator and
    no longer counted, so the next starts beside it; the message must not hide that."""
    config = scripted_config(tmp_path, backend_extra="polls = 1000000")
    config.write_text(
        config.read_text().replace('name = "migrate"\n', 'name = "migrate"\nrollout_timeout = 1\n')
    )
    harness = harness_factory(config)
    token = harness.new_hook("migrate")
    runs = [harness.wait_for(harness.deploy(token, {}), timeout=30) for _ in range(2)]
    for run in runs:
        assert run["status"] == "failed", run
        assert run["message"].startswith("did not finish within 1s (last state: job running)")
        # the scripted backend: concurrent runs
        assert run["message"].endswith(RUN_LEFT[True].format(it="it"))
    assert harness.backend.max_in_flight("migrate") == 2


def test_a_rollout_whose_progress_cannot_be_read_fails_saying_it_may_yet_complete(harness):
    deployment = harness.wait_for(
        harness.deploy(harness.new_hook("web"), {"imageTag": "unreadable"}), timeout=30
    )
    assert deployment["status"] == "failed", deployment
    assert deployment["message"].startswith("gave up after "), deployment
    assert deployment["message"].endswith(ROLLOUT_LEFT), deployment
    assert harness.backend.calls("rollback") == []  # its state unknown: not rolled back


def test_a_run_whose_progress_cannot_be_read_fails_saying_it_is_not_stopped(
    harness_factory, tmp_path
):
    config = scripted_config(tmp_path)
    config.write_text(
        config.read_text().replace('name = "report"\n', 'name = "report"\nretry_budget = 1\n')
    )
    harness = harness_factory(config)
    run = harness.wait_for(harness.deploy(harness.new_hook("report"), {"imageTag": "unreadable"}))
    assert run["status"] == "failed", run
    assert run["message"].startswith("gave up after "), run
    assert run["message"].endswith(RUN_LEFT[True].format(it="if it still runs, it")), run


# -- resume ----------------------------------------------------------------------------------


def test_a_restarted_deployer_resumes_an_in_progress_rollout_without_deploying_again(
    harness_factory, tmp_path
):
    state = f'state_dir = "{tmp_path}"\nrollout_seconds = 0.5'
    first = harness_factory(backend_extra=state, server="")
    deployment_id = first.deploy(first.new_hook("web"), {"imageTag": "1.0"})
    first.wait_started(deployment_id)
    first.deployer.stop()  # leaves it in progress, as a crash would

    assert first.instance.deployments.get(deployment_id).to_json()["status"] == "in_progress"
    second = harness_factory(backend_extra=state)
    assert second.wait_for(deployment_id)["status"] == "succeeded"
    assert len(second.backend.calls("deploy")) == 1


# -- rollback on demand ---------------------------------------------------------------------------


def test_rollback_deploys_the_previous_successful_image_as_a_new_deployment(harness, caplog):
    caplog.set_level(logging.INFO, logger="shiphook.deployer")
    token = harness.new_hook("web")
    harness.wait_for(harness.deploy(token, {"imageTag": "1.0"}))
    current = harness.deploy(token, {"imageTag": "2.0"})
    harness.wait_for(current)
    result = harness.client.simulate_post(f"/api/v1/deployments/{current}/rollback", headers=ADMIN)
    assert result.status_code == 201
    rollback = result.json["deployment"]
    assert rollback["rollbackOf"] == current and rollback["imageTag"] == "1.0"
    assert harness.wait_for(rollback["id"])["status"] == "succeeded"
    assert harness.backend.image("web") == "registry.test/app:1.0"
    started = f"deployment {rollback['id']} of web: in progress (1.0, the rollback of {current})"
    assert started in caplog.messages


def test_rollback_skips_successes_of_the_tag_it_undoes(harness):
    """A CI job retried deploys the same tag twice: undoing the second goes back to the tag
    before both, not to the first (which would change nothing)."""
    token = harness.new_hook("web")
    for tag in ("1.0", "2.0"):
        harness.wait_for(harness.deploy(token, {"imageTag": tag}))
    again = harness.deploy(token, {"imageTag": "2.0"})
    assert "already runs" in harness.wait_for(again)["message"]
    assert harness.instance.deployments.rollback(again).image_tag == "1.0"


def test_rollback_of_a_superseded_deployment_or_to_the_same_tag_is_refused(harness_factory):
    harness = harness_factory(backend_extra="rollout_seconds = 3")
    token = harness.new_hook("web")
    running = harness.deploy(token, {"imageTag": "1.0"})
    harness.wait_started(running)
    skipped, newest = (harness.deploy(token, {"imageTag": tag}) for tag in ("1.1", "1.2"))
    assert harness.wait_for(skipped)["status"] == "superseded"
    refused = harness.client.simulate_post(f"/api/v1/deployments/{skipped}/rollback", headers=ADMIN)
    assert refused.status_code == 409
    assert refused.json["description"] == (
        f"deployment {skipped} was superseded: it never ran, so there is nothing to roll back; "
        f"roll back the one that ran instead ({newest} or its successor)"
    )
    # the image a first deployment replaced, when it is of the tag deployed: no way back
    first = harness.deploy(harness.new_hook("api"), {"imageTag": "initial"})
    harness.wait_for(first)
    same = harness.client.simulate_post(f"/api/v1/deployments/{first}/rollback", headers=ADMIN)
    assert same.status_code == 409
    assert same.json["description"].startswith("nothing to roll back to: ")


def test_rollback_of_a_first_deployment_returns_to_the_image_it_replaced(harness):
    first = harness.deploy(harness.new_hook("web"), {"imageTag": "1.0"})
    harness.wait_for(first)
    rollback = harness.instance.deployments.rollback(first)
    assert rollback.image_tag == "initial"


def test_rollback_refuses_what_it_cannot_do(harness_factory):
    harness = harness_factory(start=False)
    job = harness.deploy(harness.new_hook("migrate"), {})
    queued = harness.deploy(harness.new_hook("web"), {"imageTag": "1.0"})
    post = harness.client.simulate_post
    assert post(f"/api/v1/deployments/{job}/rollback", headers=ADMIN).status_code == 400
    nothing = post(f"/api/v1/deployments/{queued}/rollback", headers=ADMIN)
    assert nothing.status_code == 409
    assert "nothing to roll back to" in nothing.json["description"]
    assert post("/api/v1/deployments/nope/rollback", headers=ADMIN).status_code == 404
    assert post(f"/api/v1/deployments/{queued}/rollback").status_code == 401


def test_rollback_refuses_a_tag_the_target_does_not_allow_or_one_of_another_repository(harness):
    """The image a first deployment replaced may be anything: a tag outside allowed_tags, or
    one of another repository (a target with an `image` override), whose tag the target's
    repository may not even have."""
    first = harness.deploy(harness.new_hook("strict"), {"imageTag": "v1.0.0"})
    harness.wait_for(first)
    refused = harness.client.simulate_post(f"/api/v1/deployments/{first}/rollback", headers=ADMIN)
    assert refused.status_code == 409
    assert refused.json["description"] == (
        "the tag to roll back to, 'initial', is not allowed for target 'strict' (allowed_tags "
        "v\\d+\\.\\d+\\.\\d+): deploy an allowed tag instead"
    )
    web = harness.deploy(harness.new_hook("web"), {"imageTag": "1.0"})
    harness.wait_for(web)
    storage = harness.instance.storage
    storage.update_deployment(
        deployment_id=web,
        now=harness.instance.deployments.clock(),
        previous_image="other.test/x:v14",
    )
    refused = harness.client.simulate_post(f"/api/v1/deployments/{web}/rollback", headers=ADMIN)
    assert refused.status_code == 409
    assert refused.json["description"] == (
        f"deployment {web} replaced other.test/x:v14, from another repository than it deployed "
        "(registry.test/app), and a rollback deploys a tag from the target's repository: roll "
        "back by hand"
    )
    assert len(harness.instance.deployments.list()) == 2


def test_cli_rollback_queues_the_previous_image(harness, tmp_path):
    token = harness.new_hook("web")
    harness.wait_for(harness.deploy(token, {"imageTag": "1.0"}))
    current = harness.deploy(token, {"imageTag": "2.0"})
    harness.wait_for(current)
    out = run_cli("deployments", "rollback", current, config=scripted_config(tmp_path)).stdout
    assert "back to 1.0" in out
    newest = harness.instance.deployments.list(limit=1)[0].to_json()
    assert newest["rollbackOf"] == current
    assert harness.wait_for(newest["id"], timeout=15)["status"] == "succeeded"
    shown = run_cli("deployments", "show", newest["id"], config=scripted_config(tmp_path)).stdout
    assert f"rollbackOf:     {current}\n" in shown


# -- history ------------------------------------------------------------------------------


def test_every_transition_is_in_the_history_of_show_and_the_admin_list(harness):
    deployment_id = harness.deploy(harness.new_hook("web"), {"imageTag": "bad-1"})
    harness.wait_for(deployment_id)
    shown = harness.client.simulate_get(f"/api/v1/deployments/{deployment_id}", headers=ADMIN)
    history = shown.json["deployment"]["history"]
    assert [e["status"] for e in history][:2] == ["queued", "in_progress"]
    assert history[-1]["status"] == "rolled_back"
    assert any(e["message"].startswith("rolling back: ") for e in history)
    assert all(e["at"].endswith("Z") for e in history)
    listed = harness.client.simulate_get("/api/v1/deployments", headers=ADMIN)
    assert listed.json["deployments"][0]["history"] == history


def test_only_a_lease_holder_that_provably_stopped_is_taken_over_at_once():
    machine, pid, start, _ = lease_owner().split(":")
    ended = subprocess.Popen(["true"])
    ended.wait()  # its pid names no process now
    assert not owner_is_gone(lease_owner())  # this process
    assert not owner_is_gone(f"{machine}:{pid}:{start}:0other00")  # another deployer of it
    assert owner_is_gone(f"{machine}:{pid}:{int(start) - 1}:00000000")  # an earlier one, same pid
    assert owner_is_gone(f"{machine}:{ended.pid}:{start}:00000000")
    assert not owner_is_gone(f"0123456789ab:{ended.pid}:{start}:00000000")  # another machine
    assert not owner_is_gone("3f2a9c1e0b7d")  # a name of another form
