"""The worker: every outcome of a rollout or job run, driven through the HTTP API and the
scripted test backend."""

from __future__ import annotations

import sys

import pytest
from shiphook import BackendError


def statuses(deployment: dict) -> list[str]:
    return [event["status"] for event in deployment["history"]]


def test_a_new_tag_rolls_out_and_succeeds(harness):
    deployment = harness.wait_for(harness.deploy(harness.new_hook("web"), {"imageTag": "1.2.0"}))
    assert deployment["status"] == "succeeded"
    assert deployment["message"] == "update completed"
    assert deployment["previousImage"] == "registry.test/app:initial"
    assert deployment["startedAt"] and deployment["finishedAt"]
    assert statuses(deployment)[0] == "queued" and statuses(deployment)[-1] == "succeeded"
    assert harness.backend.image("web") == "registry.test/app:1.2.0"


def test_a_failed_rollout_is_rolled_back_with_the_orchestrators_message(harness):
    token = harness.new_hook("web")
    harness.wait_for(harness.deploy(token, {"imageTag": "1.0"}))
    deployment = harness.wait_for(harness.deploy(token, {"imageTag": "bad-1.1"}))
    assert deployment["status"] == "rolled_back"
    assert "task exited with code 1" in deployment["message"]
    assert "rolled back" in deployment["message"]
    assert harness.backend.image("web") == "registry.test/app:1.0"
    assert [c["op"] for c in harness.backend.calls()] == ["deploy", "deploy", "rollback"]


@pytest.mark.parametrize(
    ("raised", "says"),
    [
        (BackendError("service web was changed since"), "not rolled back: service web was "),
        (BackendError("no answer", transient=True), "rollback failed: gave up after "),
        (KeyError("image"), "rollback failed: the scripted backend failed unexpectedly: "),
    ],
    ids=["refused", "unanswered", "a-bug"],
)
def test_a_rollback_refused_is_not_rolled_back_and_one_unanswered_or_buggy_may_be(
    harness, monkeypatch, raised, says
):
    """Refused, the rollback changed nothing; given up on, or ended by a bug in the plugin, it
    may have been made."""

    def rollback(target, ref):
        raise raised

    monkeypatch.setattr(harness.backend, "rollback", rollback)
    deployment = harness.wait_for(harness.deploy(harness.new_hook("web"), {"imageTag": "bad-1"}))
    assert deployment["status"] == "failed", deployment
    assert deployment["message"].startswith(f"update paused: task exited with code 1; {says}"), (
        deployment["message"]
    )


def test_with_on_failure_leave_a_failed_rollout_is_left_as_it_is(harness):
    deployment = harness.wait_for(harness.deploy(harness.new_hook("api"), {"imageTag": "bad-2"}))
    assert deployment["status"] == "failed"
    assert deployment["message"] == (
        "update paused: task exited with code 1; left as it is (on_failure = leave)"
    )
    assert harness.backend.image("api") == "registry.test/app:bad-2"
    assert harness.backend.calls("rollback") == []


def test_a_rollout_past_its_timeout_is_rolled_back(harness_factory):
    harness = harness_factory(timeout=0.3)
    deployment = harness.wait_for(harness.deploy(harness.new_hook("web"), {"imageTag": "hang-1"}))
    assert deployment["status"] == "rolled_back"
    assert "did not finish within 0.3s" in deployment["message"]
    assert harness.backend.image("web") == "registry.test/app:initial"


@pytest.mark.parametrize("state_dir", [False, True], ids=["in-memory", "state-dir"])
def test_transient_errors_are_retried_until_the_call_works(harness_factory, tmp_path, state_dir):
    harness = harness_factory(backend_extra=f'state_dir = "{tmp_path}"' if state_dir else "")
    deployment = harness.wait_for(
        harness.deploy(harness.new_hook("api"), {"imageTag": "transient2"})
    )
    assert deployment["status"] == "succeeded"
    assert len(harness.backend.calls("deploy")) == 3


def test_transient_errors_past_the_retry_budget_fail_with_the_last_message(harness):
    deployment = harness.wait_for(harness.deploy(harness.new_hook("web"), {"imageTag": "down"}))
    assert deployment["status"] == "failed"
    assert deployment["message"].startswith("gave up after")
    assert "connection refused" in deployment["message"]
    assert len(harness.backend.calls("deploy")) >= 2


def test_a_permanent_error_fails_at_once_without_retries(harness):
    deployment = harness.wait_for(harness.deploy(harness.new_hook("web"), {"imageTag": "perm-1"}))
    assert deployment["status"] == "failed"
    assert deployment["message"] == "invalid image reference 'perm-1'"
    assert len(harness.backend.calls("deploy")) == 1


def test_a_backend_bug_fails_the_deployment_instead_of_retrying_it_forever(harness):
    deployment = harness.wait_for(harness.deploy(harness.new_hook("web"), {"imageTag": "crash"}))
    assert deployment["status"] == "failed"
    assert deployment["message"] == (
        "the scripted backend failed unexpectedly: KeyError: 'a bug in the plugin'"
    )
    assert len(harness.backend.calls("deploy")) == 1


def test_a_backend_calling_sys_exit_fails_the_deployment_and_the_deployer_goes_on(
    harness, monkeypatch
):
    monkeypatch.setattr(harness.backend, "deploy", lambda *args, **kwargs: sys.exit(5))
    deployment = harness.wait_for(harness.deploy(harness.new_hook("web"), {"imageTag": "1.0"}))
    assert deployment["status"] == "failed"
    assert (
        deployment["message"] == "the scripted backend failed unexpectedly: it called sys.exit(5)"
    )
    monkeypatch.undo()
    deployment = harness.wait_for(harness.deploy(harness.new_hook("api"), {"imageTag": "1.0"}))
    assert deployment["status"] == "succeeded"


def test_a_target_missing_on_the_orchestrator_fails_with_its_message(harness):
    deployment = harness.wait_for(harness.deploy(harness.new_hook("gone"), {"imageTag": "1.0"}))
    assert deployment["status"] == "failed"
    assert deployment["message"] == "service missing-service not found"
    assert harness.backend.calls("deploy") == []


def test_a_job_run_gets_its_environment_and_succeeds(harness):
    body = {"instanceEnvironmentVariables": [{"name": "GREETING", "value": "hello"}]}
    deployment = harness.wait_for(harness.deploy(harness.new_hook("migrate"), body))
    assert deployment["status"] == "succeeded"
    (run,) = harness.backend.calls("run")
    assert run["env"] == {"GREETING": "hello"}


def test_a_failing_job_run_fails_with_the_task_error(harness):
    body = {"instanceEnvironmentVariables": [{"name": "EXIT", "value": "3"}]}
    deployment = harness.wait_for(harness.deploy(harness.new_hook("migrate"), body))
    assert deployment["status"] == "failed"
    assert deployment["message"] == "task exited with code 3"


def test_an_unreachable_backend_does_not_stop_hooks_being_accepted(harness_factory):
    harness = harness_factory(backend_extra='unreachable = "connection refused"')
    result = harness.post_hook(harness.new_hook("web"), {"imageTag": "1.0"})
    assert result.status_code == 201
    deployment = harness.wait_for(result.json["deployment"]["id"])
    assert deployment["status"] == "failed"
    assert "connection refused" in deployment["message"]


def test_a_deployment_accepted_while_the_deployer_is_down_runs_when_it_starts(harness_factory):
    harness = harness_factory(start=False)
    deployment_id = harness.deploy(harness.new_hook("web"), {"imageTag": "1.0"})
    assert harness.instance.deployments.get(deployment_id).to_json()["status"] == "queued"
    harness.deployer.start()
    assert harness.wait_for(deployment_id)["status"] == "succeeded"
