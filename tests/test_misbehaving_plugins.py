"""A backend that raises or does not return fails its deployment, never the deployer (issue 13)."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta

import pytest
from conftest import write_config
from scripted_backend import GARBAGE
from shiphook.config import DeployerSettings
from shiphook.deployer.deployer import Deployer

WORK = {  # a deployment that makes the deployer call each method
    "describe": ("web", {"imageTag": "1.0"}),
    "deploy": ("web", {"imageTag": "1.0"}),
    "progress": ("web", {"imageTag": "1.0"}),
    "rollback": ("web", {"imageTag": "bad-1.0"}),
    "run_job": ("migrate", {}),
}


@pytest.mark.parametrize("method", sorted(WORK))
def test_a_plugin_raising_in_any_method_fails_that_deployment_with_the_errors_text(
    harness_factory, method
):
    harness = harness_factory(backend_extra=f'fail_in = "{method}"')
    target, body = WORK[method]
    token = harness.new_hook(target)
    deployment = harness.wait_for(harness.deploy(token, body))
    assert deployment["status"] == "failed", deployment
    assert deployment["message"].endswith(
        f"the scripted backend failed unexpectedly: RuntimeError: a bug in the plugin's {method}"
    ), deployment
    # the deployer goes on: the next deployment is taken to its end too
    again = {"imageTag": f"{body['imageTag']}-again"} if body else {}
    assert harness.wait_for(harness.deploy(token, again))["status"] == "failed"
    assert harness.deployer._dispatcher.is_alive()


def stalling_config(tmp_path, *, call_timeout: float, lease_seconds: float = 30, **backend):
    extra = "".join(f"{key} = {value}\n" for key, value in backend.items())
    return write_config(
        tmp_path,
        f"""
        [server]
        database_url = "sqlite:///{tmp_path}/shiphook.db"
        [deployer]
        lease_seconds = {lease_seconds}
        scan_interval = 0.1
        [backends.fake]
        plugin = "scripted"
        {extra}
        [targets.web]
        kind = "app"
        backend = "fake"
        name = "web"
        retry_budget = 0
        call_timeout = {call_timeout}
        """,
    )


def test_a_call_past_call_timeout_is_given_up_as_transient_and_frees_its_slot(
    harness_factory, tmp_path
):
    harness = harness_factory(stalling_config(tmp_path, call_timeout=0.5, stall_seconds=600))
    token = harness.new_hook("web")
    deployment = harness.wait_for(harness.deploy(token, {"imageTag": "stall-1"}))
    assert deployment["status"] == "failed", deployment
    assert deployment["message"] == (
        "gave up after 1 attempt and 0.0s of backoff: the scripted backend's deploy did not "
        "return within 0.5s (the target's call_timeout); that call still runs and may yet "
        "change the workload (logged if it ends)"
    )
    # the slot is free again while the stalled call still runs
    assert harness.wait_for(harness.deploy(token, {"imageTag": "2.0"}))["status"] == "succeeded"
    stopping = threading.Thread(target=harness.deployer.stop)
    stopping.start()
    stopping.join(30)
    assert not stopping.is_alive(), "the deployer waited for the stalled call"


def test_a_call_given_up_that_ends_later_is_logged_as_it_may_have_changed_the_workload(
    harness_factory, tmp_path, caplog
):
    harness = harness_factory(stalling_config(tmp_path, call_timeout=0.5, stall_seconds=2))
    deployment = harness.wait_for(harness.deploy(harness.new_hook("web"), {"imageTag": "stall-1"}))
    assert deployment["status"] == "failed", deployment
    assert deployment["message"].endswith(
        "; that call still runs and may yet change the workload (logged if it ends)"
    )
    ended = f"deployment {deployment['id']} of web: the scripted backend's deploy ended "
    deadline = time.monotonic() + 30
    while not any(r.getMessage().startswith(ended) for r in caplog.records):
        assert time.monotonic() < deadline, "the stalled call's end was not logged"
        time.sleep(0.1)
    (line,) = [r for r in caplog.records if r.getMessage().startswith(ended)]
    assert line.levelname == "WARNING"
    assert line.getMessage().endswith(
        "s after it was made, after the deployment had been given up: it may have changed the "
        "workload"
    )


def test_a_call_past_call_timeout_is_waited_for_by_its_retry_not_made_twice(
    harness_factory, tmp_path
):
    """A plugin never has two calls of one deployment at once: the retry of a call that did
    not return in time waits for that call (and takes its answer) rather than call again."""
    config = stalling_config(tmp_path, call_timeout=0.5, stall_seconds=2)
    config.write_text(config.read_text().replace("retry_budget = 0", "retry_budget = 60"))
    harness = harness_factory(config)
    deployment = harness.wait_for(harness.deploy(harness.new_hook("web"), {"imageTag": "stall-1"}))
    assert deployment["status"] == "succeeded", deployment
    assert len(harness.backend.calls("deploy")) == 1
    timed_out = [e for e in deployment["history"] if "did not return within 0.5s" in e["message"]]
    assert timed_out, deployment["history"]


def test_the_slots_lease_stays_renewed_while_a_long_call_runs(harness_factory, tmp_path):
    config = stalling_config(tmp_path, call_timeout=60, lease_seconds=1, stall_seconds=2.5)
    harness = harness_factory(config)
    instance = harness.instance
    replica = Deployer(  # another process on the same database, waiting for a lease to expire
        instance.storage,
        instance.config.targets,
        instance.backends,
        settings=DeployerSettings(lease_seconds=1, scan_interval=0.1),
        owner="replica",
    )
    replica.start()
    try:
        deployment_id = harness.deploy(harness.new_hook("web"), {"imageTag": "stall-1"})
        assert harness.wait_for(deployment_id)["status"] == "succeeded"
    finally:
        replica.stop()
    assert [c["deployment"] for c in harness.backend.calls("deploy")] == [deployment_id]


@pytest.mark.parametrize("garbage", sorted(GARBAGE))
def test_a_plugin_returning_what_the_contract_does_not_allow_fails_that_deployment(
    harness_factory, garbage
):
    harness = harness_factory(backend_extra=f'garbage_from = "{garbage}"')
    method = garbage.partition("-")[0]
    target, body = WORK[method]
    token = harness.new_hook(target)
    deployment = harness.wait_for(harness.deploy(token, body))
    assert deployment["status"] == "failed", deployment
    assert f"the scripted backend's {method} returned " in deployment["message"], deployment
    assert deployment["message"].endswith(": a bug in the plugin"), deployment
    again = {"imageTag": f"{body['imageTag']}-again"} if body else {}
    assert harness.wait_for(harness.deploy(token, again))["status"] == "failed"


def test_a_slot_claimed_after_the_database_stalled_is_left_to_its_lease(
    harness_factory, monkeypatch, caplog
):
    """A claim whose answer came after half the lease (a silent database) may see its lease
    expire before the first renewal, and another process take the slot meanwhile: two would
    work on one target. The claimant leaves it."""
    harness = harness_factory(start=False)
    instance = harness.instance
    now = [datetime(2026, 12, 1, tzinfo=UTC)]
    deployer = Deployer(
        instance.storage,
        instance.config.targets,
        instance.backends,
        settings=DeployerSettings(lease_seconds=10),
        clock=lambda: now[0],
        owner="stalled",
    )
    claim = instance.storage.claim_lease

    def answered_late(**kwargs):
        now[0] += timedelta(seconds=20)
        return claim(**kwargs)

    monkeypatch.setattr(instance.storage, "claim_lease", answered_late)
    deployer._claim(instance.config.targets["web"], 0, now[0])  # not started: no worker pool
    assert deployer._running == set()
    assert "deployer: slot web/0 claimed 0:00:20 late, the database slow to answer" in caplog.text
