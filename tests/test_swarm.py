"""The Swarm backend against a real Docker Engine, driven through the real shiphook worker.

The engine and the test services come from tests/swarm_support.py: a private dockerd started once
for the session, or the swarm manager SHIPHOOK_TEST_DOCKER_HOST names (then the tests that stop
the engine are skipped). Without dockerd this file is skipped, or fails when
SHIPHOOK_REQUIRE_DOCKER=1 (as in CI). Services are created without asking a registry, and every
target sets `resolve_image = false`: no registry is reachable here.
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
import subprocess
from typing import Any

import pytest
from conftest import ROOT, run_cli, write_config
from docker import APIClient
from docker.errors import APIError
from dockerd import APP, JOB, PrivateDockerd, free_port, make_tls_files
from shiphook import BackendError, Target
from shiphook.deployer.deployer import ROLLOUT_LEFT
from shiphook.errors import ConfigError
from shiphook.instance import open_instance
from shiphook.services import parse_hook_body
from shiphook.testing import eventually
from shiphook_swarm import SwarmBackend, SwarmOptions, SwarmTargetOptions
from shiphook_swarm.backend import same_image
from swarm_support import (
    NotAManagerProxy,
    job_body,
    skip_or_fail,
    swarm_config,
    target,
)

# the `engine` and `services` fixtures; a plugin, so that one engine serves every module
pytest_plugins = ["swarm_support"]


def stored(harness: Any, deployment_id: str) -> dict:
    return harness.instance.deployments.get(deployment_id).to_json()


def statuses(deployment: dict) -> list[str]:
    return [event["status"] for event in deployment["history"]]


def backend_on(host: str) -> SwarmBackend:
    return SwarmBackend(SwarmOptions(host=host, timeout=10, poll_interval=0.2))


def target_of(kind: str, service: str, **options: Any) -> Target:
    return Target(
        name="t",
        kind=kind,
        backend="swarm",
        options=SwarmTargetOptions(service=service, resolve_image=False, **options),
    )


def docker(engine: Any, *args: str) -> None:
    """The docker CLI against the test engine, as an operator uses it."""
    subprocess.run(
        ["docker", "-H", engine.host, *args], check=True, capture_output=True, timeout=30
    )


def progress_until_done(backend: SwarmBackend, t: Target, ref: dict) -> Any:
    return eventually(
        lambda: (p := backend.progress(t, ref)).state != "running" and p, what="progress"
    )


# -- app rollouts ----------------------------------------------------------------------------


def test_a_new_tag_rolls_out_and_the_running_tasks_use_it(
    engine, services, harness_factory, tmp_path
):
    service = services.app(replicas=2)
    harness = harness_factory(swarm_config(tmp_path, engine, target("web", "app", service)))
    deployment = harness.wait_for(
        harness.deploy(harness.new_hook("web"), {"imageTag": "v2"}), timeout=90
    )
    assert deployment["status"] == "succeeded", deployment
    assert deployment["message"] == "update completed"
    assert deployment["previousImage"] == f"{APP}:v1"
    assert services.image(service) == f"{APP}:v2"
    assert services.running_images(service) == [f"{APP}:v2", f"{APP}:v2"]


def test_deploying_the_image_already_running_succeeds_at_once(
    engine, services, harness_factory, tmp_path
):
    service = services.app()
    version = services.inspect(service)["Version"]["Index"]
    harness = harness_factory(swarm_config(tmp_path, engine, target("web", "app", service)))
    deployment = harness.wait_for(harness.deploy(harness.new_hook("web"), {"imageTag": "v1"}))
    assert deployment["status"] == "succeeded", deployment
    assert deployment["message"] == f"service {service} already runs {APP}:v1"
    assert deployment["backendRef"]["updated"] is False
    assert services.inspect(service)["Version"]["Index"] == version  # not updated at all
    # the history says so too, rather than "rolling out v1 (was ...:v1)"
    steps = [event["message"] for event in deployment["history"]]
    assert f"already runs {APP}:v1: no rollout" in steps
    assert not any(step.startswith("rolling out") for step in steps), steps


DIGEST = "sha256:" + "0" * 64


@pytest.mark.parametrize(
    ("current", "wanted", "same"),
    [
        ("app:v1", "app:v1", True),
        (f"app:v1@{DIGEST}", "app:v1", True),  # the registry could not be asked
        ("app:v1", f"app:v1@{DIGEST}", False),  # pinned now: the tag may have been pushed again
        (f"app:v1@{DIGEST}", f"app:v1@{DIGEST}", True),
        (f"app:v1@{DIGEST}", f"app:v1@sha256:{'1' * 64}", False),  # the tag was pushed again
        ("app:v1", "app:v2", False),
        (f"app@{DIGEST}", f"app:v1@{DIGEST}", False),
        ("app:v1", "other/app:v1", False),
    ],
)
def test_a_service_runs_the_wanted_image_when_tag_and_any_known_digests_match(
    current, wanted, same
):
    assert same_image(current, wanted) is same


def test_the_tag_a_pinned_service_runs_starts_no_rollout_when_the_registry_cannot_be_asked(
    engine, services, monkeypatch
):
    """With `resolve_image` on (the default) and no registry to ask, the tag is deployed as it
    is; a service pinned to a digest of that tag already runs it."""

    def no_registry(self: APIClient, image: str) -> None:
        raise APIError(f"Get https://registry.test/v2/{image}: no such host")

    monkeypatch.setattr(APIClient, "inspect_distribution", no_registry)
    service = services.app()
    pinned = f"{APP}:v1@{DIGEST}"
    docker(
        engine, "service", "update", "--detach", "--no-resolve-image", "--image", pinned, service
    )
    version = services.inspect(service)["Version"]["Index"]
    t = Target(name="t", kind="app", backend="swarm", options=SwarmTargetOptions(service=service))
    ref = backend_on(engine.host).deploy(t, image_tag="v1", deployment_id="d1")
    assert (ref["image"], ref["updated"]) == (pinned, False), ref
    assert services.inspect(service)["Version"]["Index"] == version  # not updated at all


def test_a_broken_tag_is_rolled_back_to_the_old_image_with_swarms_message(
    engine, services, harness_factory, tmp_path
):
    service = services.app()
    harness = harness_factory(swarm_config(tmp_path, engine, target("web", "app", service)))
    deployment = harness.wait_for(
        harness.deploy(harness.new_hook("web"), {"imageTag": "broken"}), timeout=90
    )
    assert deployment["status"] == "rolled_back", deployment
    message = deployment["message"]
    assert message.startswith("update paused due to failure or early termination of task ")
    assert "(task: non-zero exit (1))" in message
    assert message.endswith("; rolled back (rollback completed)")
    assert services.image(service) == f"{APP}:v1"
    eventually(lambda: services.running_images(service) == [f"{APP}:v1"], "v1 running")


def test_with_on_failure_leave_a_broken_tag_is_left_as_swarm_left_it(
    engine, services, harness_factory, tmp_path
):
    service = services.app()
    config = swarm_config(tmp_path, engine, target("web", "app", service, on_failure="leave"))
    harness = harness_factory(config)
    deployment = harness.wait_for(
        harness.deploy(harness.new_hook("web"), {"imageTag": "broken"}), timeout=90
    )
    assert deployment["status"] == "failed", deployment
    message = deployment["message"]
    assert message.startswith("update paused due to failure or early termination")
    assert "rolled back" not in message
    # where it was left: paused, and how many of its replicas still run
    assert f"service {service} is paused with 0 of 1 replicas running" in message
    assert message.endswith("left as it is (on_failure = leave)")
    inspected = services.inspect(service)
    assert inspected["Spec"]["TaskTemplate"]["ContainerSpec"]["Image"] == f"{APP}:broken"
    assert inspected["UpdateStatus"]["State"] == "paused"


def test_a_broken_tag_fails_also_when_the_services_update_failure_action_is_continue(
    engine, services, harness_factory, tmp_path
):
    """Swarm completes such an update whatever its tasks do; shiphook, as `docker service
    update` does, calls it done only once every task has run for the update's Monitor, so a
    crash-looping image never is (it could pass for healthy while its task happened to run),
    and rollout_timeout ends it with the task's error."""
    service = services.app(failure_action="continue")
    config = swarm_config(
        tmp_path,
        engine,
        target("web", "app", service, on_failure="leave", rollout_timeout=15),
    )
    harness = harness_factory(config)
    deployment = harness.wait_for(
        harness.deploy(harness.new_hook("web"), {"imageTag": "broken"}), timeout=90
    )
    assert deployment["status"] == "failed", deployment
    assert deployment["message"].startswith("did not finish within 15s"), deployment
    assert f"of {APP}:broken failed: task: non-zero exit (1)" in deployment["message"]
    healthy = harness.wait_for(
        harness.deploy(harness.new_hook("web"), {"imageTag": "v2"}), timeout=90
    )
    assert healthy["status"] == "succeeded", healthy
    assert "stay running" in " ".join(e["message"] for e in healthy["history"]), healthy


def test_a_service_that_rolls_itself_back_is_not_swapped_a_second_time(
    engine, services, harness_factory, tmp_path
):
    service = services.app(failure_action="rollback")
    harness = harness_factory(swarm_config(tmp_path, engine, target("web", "app", service)))
    deployment = harness.wait_for(
        harness.deploy(harness.new_hook("web"), {"imageTag": "broken"}), timeout=90
    )
    assert deployment["status"] == "rolled_back", deployment
    message = deployment["message"]
    # what failed, why, and what Swarm went back to: once, not as a rollback to the broken image
    assert message.startswith(f"the update to {APP}:broken failed (task ")
    assert "failed: task: non-zero exit (1))" in message
    assert message.endswith(f"Swarm rolled service {service} back to {APP}:v1 on its own")
    assert message.count("back") == 1, message
    # shiphook took no rollback step of its own
    steps = [(event["status"], event["message"]) for event in deployment["history"]]
    assert not any("rolling back" in step for _, step in steps), steps
    assert [status for status, _ in steps][-1] == "rolled_back"
    assert deployment["backendRef"]["image"] == f"{APP}:broken"
    inspected = services.inspect(service)
    assert inspected["Spec"]["TaskTemplate"]["ContainerSpec"]["Image"] == f"{APP}:v1"
    assert inspected["UpdateStatus"]["State"] == "rollback_completed"
    # Swarm's own rollback drops PreviousSpec: a rollback=previous from shiphook would have
    # been refused ("does not have a previous spec") and the deployment would say so
    assert "PreviousSpec" not in inspected

    # a deploy repeated for this deployment (a crash before its ref was stored) finds the
    # rollout Swarm undid, through the tasks it created, and does not start it again
    backend, t = backend_on(engine.host), target_of("app", service)
    ref = backend.deploy(t, image_tag="broken", deployment_id=deployment["id"])
    assert ref["updated"] and ref["image"] == f"{APP}:broken"
    assert services.image(service) == f"{APP}:v1"
    assert backend.progress(t, ref).state == "rolled_back"


def test_a_rollback_by_hand_during_a_rollout_is_not_reported_as_the_tag_failing(
    engine, services, harness_factory, tmp_path
):
    service = services.app(monitor=30)  # the update stays under way long enough
    harness = harness_factory(swarm_config(tmp_path, engine, target("web", "app", service)))
    deployment_id = harness.deploy(harness.new_hook("web"), {"imageTag": "v2"})
    harness.wait_started(deployment_id, timeout=30)
    eventually(lambda: stored(harness, deployment_id)["backendRef"], what="the rollout's start")
    docker(engine, "service", "rollback", "-d", service)
    deployment = harness.wait_for(deployment_id, timeout=90)
    assert deployment["status"] == "rolled_back", deployment
    assert deployment["message"] == (
        f"service {service} was rolled back to {APP}:v1 while {APP}:v2 rolled out, with no failed "
        "task of it listed: most likely by hand (docker service rollback)"
    )


def test_a_missing_service_fails_at_once_with_the_engines_message(
    engine, harness_factory, tmp_path
):
    # with a long retry budget, an error taken for transient would keep it running for minutes
    config = swarm_config(
        tmp_path, engine, target("gone", "app", "no-such-service", retry_budget=600)
    )
    harness = harness_factory(config)
    deployment = harness.wait_for(harness.deploy(harness.new_hook("gone"), {"imageTag": "v2"}))
    assert deployment["status"] == "failed"
    assert deployment["message"] == "service no-such-service not found"
    assert deployment["backendRef"] is None


def test_a_service_removed_mid_rollout_fails_the_deployment_naming_the_service(
    engine, services, harness_factory, tmp_path
):
    service = services.app(monitor=30)  # Swarm watches the new task for 30 s: time to remove it
    config = swarm_config(tmp_path, engine, target("web", "app", service, retry_budget=600))
    harness = harness_factory(config)
    deployment_id = harness.deploy(harness.new_hook("web"), {"imageTag": "v2"})
    harness.wait_started(deployment_id, timeout=30)
    service_id = services.inspect(service)["ID"]
    services.client.remove_service(service)
    deployment = harness.wait_for(deployment_id, timeout=30)
    assert deployment["status"] == "failed", deployment
    assert deployment["message"] == f"service {service} was removed"
    assert service_id[:12] not in deployment["message"]


# -- job runs ----------------------------------------------------------------------------------


def test_a_job_run_gets_its_overrides_and_its_task_log_shows_them(
    engine, services, harness_factory, tmp_path
):
    service = services.job(env=["GREETING=hello from the service", "NAME=service"])
    harness = harness_factory(swarm_config(tmp_path, engine, target("migrate", "job", service)))
    body = job_body(GREETING="hi from ci")
    deployment = harness.wait_for(harness.deploy(harness.new_hook("migrate"), body), timeout=60)
    assert deployment["status"] == "succeeded", deployment
    assert deployment["message"] == "job completed: 1 of 1 tasks complete"
    iteration = deployment["backendRef"]["iteration"]
    assert services.job_output(service, iteration) == "GREETING=hi from ci NAME=service\n"


def test_an_env_edited_by_hand_after_a_run_keeps_the_edit_and_drops_the_runs_override(
    engine, services, harness_factory, tmp_path
):
    service = services.job(env=["GREETING=hello", "NAME=service"])
    harness = harness_factory(swarm_config(tmp_path, engine, target("migrate", "job", service)))
    token = harness.new_hook("migrate")
    first = harness.wait_for(harness.deploy(token, job_body(NAME="ci")), timeout=60)
    assert first["status"] == "succeeded", first
    docker(engine, "service", "update", "-d", "--env-add", "GREETING=edited", service)
    second = harness.wait_for(harness.deploy(token, {}), timeout=60)
    assert second["status"] == "succeeded", second
    output = services.job_output(service, second["backendRef"]["iteration"])
    assert output == "GREETING=edited NAME=service\n"


def test_a_failing_job_run_fails_with_the_tasks_error(engine, services, harness_factory, tmp_path):
    service = services.job(env=[])
    harness = harness_factory(swarm_config(tmp_path, engine, target("migrate", "job", service)))
    deployment = harness.wait_for(
        harness.deploy(harness.new_hook("migrate"), {"imageTag": "fail"}), timeout=60
    )
    assert deployment["status"] == "failed", deployment
    assert deployment["message"].endswith(" failed: task: non-zero exit (1)")
    assert services.image(service) == f"{JOB}:fail"


def test_two_job_runs_are_two_iterations_each_tracked_with_its_own_env(
    engine, services, harness_factory, tmp_path
):
    service = services.job(env=["GREETING=hello", "NAME=service"])
    harness = harness_factory(swarm_config(tmp_path, engine, target("migrate", "job", service)))
    token = harness.new_hook("migrate")
    first = harness.deploy(token, job_body(NAME="a"))
    second = harness.deploy(token, job_body(GREETING="bye"))
    first, second = harness.wait_for(first, timeout=60), harness.wait_for(second, timeout=60)
    assert first["status"] == second["status"] == "succeeded", (first, second)
    one, two = first["backendRef"]["iteration"], second["backendRef"]["iteration"]
    assert two == one + 1
    assert services.job_output(service, one) == "GREETING=hello NAME=a\n"
    # the first run's override does not leak into the second: it merges over the service's env
    assert services.job_output(service, two) == "GREETING=bye NAME=service\n"


def test_a_job_runs_image_tag_applies_to_that_run_only_and_each_run_records_its_image(
    engine, services, harness_factory, tmp_path
):
    services.client.tag(f"{JOB}:ok", JOB, "other")  # another image the job can run
    service = services.job(env=["NAME=service"])
    config = swarm_config(tmp_path, engine, target("migrate", "job", service))
    harness = harness_factory(config)
    token = harness.new_hook("migrate")
    tagged_id = harness.deploy(token, {"imageTag": "other"})
    plain_id = harness.deploy(token, job_body(NAME="plain"))  # queued behind it
    tagged = harness.wait_for(tagged_id, timeout=60)
    plain = harness.wait_for(plain_id, timeout=60)
    assert tagged["status"] == plain["status"] == "succeeded", (tagged, plain)
    # the plain run ran the service's own image, not the previous run's tag
    assert tagged["backendRef"]["image"] == f"{JOB}:other"
    assert plain["backendRef"]["image"] == f"{JOB}:ok"
    ran = {
        (task.get("JobIteration") or {}).get("Index"): task["Spec"]["ContainerSpec"]["Image"]
        for task in services.client.tasks(filters={"service": service})
    }
    assert ran[tagged["backendRef"]["iteration"]] == f"{JOB}:other"
    assert ran[plain["backendRef"]["iteration"]] == f"{JOB}:ok"
    assert services.image(service) == f"{JOB}:ok"

    # the CLI shows the image each run ran
    listed = run_cli("deployments", "list", config=config).stdout.splitlines()
    assert listed[0].split()[:4] == ["ID", "TARGET", "REQUESTED", "IMAGE"]
    rows = {line.split()[0]: line for line in listed[1:]}
    assert f" {JOB}:other " in rows[tagged_id] and f" {JOB}:ok " in rows[plain_id]
    shown = run_cli("deployments", "show", tagged_id, config=config).stdout
    assert re.search(rf"^image: +{re.escape(JOB)}:other$", shown, re.MULTILINE), shown


def test_a_run_after_a_tagged_run_restores_the_services_image_also_when_repeated(engine, services):
    services.client.tag(f"{JOB}:ok", JOB, "other")
    service = services.job(env=[])
    backend, t = backend_on(engine.host), target_of("job", service)
    tagged = backend.run_job(t, env={}, image_tag="other", deployment_id="i-1")
    assert tagged["image"] == f"{JOB}:other" and services.image(service) == f"{JOB}:other"
    plain = backend.run_job(t, env={}, image_tag=None, deployment_id="i-2")
    assert plain["image"] == f"{JOB}:ok" and services.image(service) == f"{JOB}:ok"
    # repeated after a crash: the same run, found through the labels, not a third iteration
    assert backend.run_job(t, env={}, image_tag=None, deployment_id="i-2") == plain
    assert services.inspect(service)["JobStatus"]["JobIteration"]["Index"] == plain["iteration"]


# -- the engine going away -------------------------------------------------------------------


def test_a_rollout_goes_on_when_the_engine_is_killed_and_started_again(
    engine, services, harness_factory, tmp_path, caplog
):
    daemon = engine.private()
    service = services.app(replicas=2, monitor=2)
    config = swarm_config(tmp_path, engine, target("web", "app", service, retry_budget=120))
    harness = harness_factory(config)
    deployment_id = harness.deploy(harness.new_hook("web"), {"imageTag": "v2"})
    eventually(lambda: stored(harness, deployment_id)["backendRef"], what="the rollout's start")
    caplog.set_level(logging.WARNING, logger="shiphook.deployer")
    daemon.kill()
    eventually(lambda: "cannot reach the Docker engine" in caplog.text, what="a failed poll")
    daemon.start()
    daemon.wait_for_swarm()

    deployment = harness.wait_for(deployment_id, timeout=120)
    assert deployment["status"] == "succeeded", deployment
    assert services.image(service) == f"{APP}:v2"
    eventually(lambda: services.running_images(service) == [f"{APP}:v2"] * 2, "v2 running")


def test_an_engine_down_past_the_retry_budget_fails_clearly_and_loses_nothing(
    engine, services, harness_factory, tmp_path
):
    daemon = engine.private()
    service = services.app(replicas=2, monitor=2)
    config = swarm_config(tmp_path, engine, target("web", "app", service, retry_budget=2))
    harness = harness_factory(config)
    deployment_id = harness.deploy(harness.new_hook("web"), {"imageTag": "v2"})
    eventually(lambda: stored(harness, deployment_id)["backendRef"], what="the rollout's start")
    daemon.kill()
    try:
        deployment = harness.wait_for(deployment_id, timeout=60)
    finally:
        daemon.start()
        daemon.wait_for_swarm()
    assert deployment["status"] == "failed", deployment
    assert deployment["message"].startswith("gave up after ")
    assert f"cannot reach the Docker engine at {engine.host}" in deployment["message"]
    assert deployment["message"].endswith(ROLLOUT_LEFT)  # Swarm may well complete it
    # the record keeps the whole story, and Swarm kept the update it had been given
    assert statuses(deployment)[0] == "queued" and statuses(deployment)[-1] == "failed"
    assert "rolling out v2 (was shiphook-test/app:v1)" in [
        event["message"] for event in deployment["history"]
    ]
    assert deployment["backendRef"]["image"] == f"{APP}:v2"
    assert services.image(service) == f"{APP}:v2"


def test_a_graceful_engine_restart_mid_rollout_ends_succeeded(
    engine, services, harness_factory, tmp_path, caplog
):
    daemon = engine.private()
    # tasks slow to stop: the engine's graceful stop then takes seconds, some of them answering
    # "This node is not a swarm manager" on the connections it still serves
    service = services.app(replicas=3, monitor=2, stop_signal=None)
    config = swarm_config(tmp_path, engine, target("web", "app", service, retry_budget=120))
    harness = harness_factory(config)
    deployment_id = harness.deploy(harness.new_hook("web"), {"imageTag": "v2"})
    eventually(lambda: stored(harness, deployment_id)["backendRef"], what="the rollout's start")
    caplog.set_level(logging.WARNING, logger="shiphook.deployer")
    daemon.stop()  # SIGTERM, as systemctl restart docker sends
    daemon.start()
    daemon.wait_for_swarm()

    deployment = harness.wait_for(deployment_id, timeout=120)
    assert deployment["status"] == "succeeded", deployment
    assert deployment["message"] == "update completed"
    # the engine did say it, and shiphook retried it rather than failing the deployment
    assert "This node is not a swarm manager" in caplog.text
    assert services.image(service) == f"{APP}:v2"
    eventually(lambda: services.running_images(service) == [f"{APP}:v2"] * 3, "v2 running")


def test_not_a_swarm_manager_mid_rollout_is_retried_and_the_rollout_succeeds(
    engine, services, harness_factory, tmp_path, not_a_manager_proxy, caplog
):
    proxy: NotAManagerProxy = not_a_manager_proxy
    service = services.app(monitor=2)
    web = target("web", "app", service, retry_budget=120)
    harness = harness_factory(swarm_config(tmp_path, engine, web, host=proxy.host))
    deployment_id = harness.deploy(harness.new_hook("web"), {"imageTag": "v2"})
    harness.wait_started(deployment_id, timeout=30)
    caplog.set_level(logging.WARNING, logger="shiphook.deployer")
    proxy.answer_not_a_manager(3)  # what a manager's engine says for a moment as it stops
    deployment = harness.wait_for(deployment_id, timeout=90)
    assert deployment["status"] == "succeeded", deployment
    assert proxy.answered == 3
    assert caplog.text.count("This node is not a swarm manager") == 3
    assert services.running_images(service) == [f"{APP}:v2"]


def test_not_a_swarm_manager_from_a_node_never_seen_as_one_fails_at_once(
    engine, harness_factory, services, tmp_path, not_a_manager_proxy
):
    proxy: NotAManagerProxy = not_a_manager_proxy
    proxy.answer_not_a_manager(math.inf)
    service = services.app()
    # with a long retry budget, an error taken for transient would keep it running for minutes
    web = target("web", "app", service, retry_budget=600)
    harness = harness_factory(swarm_config(tmp_path, engine, web, host=proxy.host))
    deployment = harness.wait_for(harness.deploy(harness.new_hook("web"), {"imageTag": "v2"}))
    assert deployment["status"] == "failed", deployment
    assert deployment["message"].startswith("This node is not a swarm manager.")
    assert "docker swarm init" in deployment["message"]
    assert proxy.answered == 1  # not retried

    # the backend's own rule: permanent until the engine has answered it as a manager
    backend = backend_on(proxy.host)
    with pytest.raises(BackendError) as never:
        backend.check()
    proxy.answer_not_a_manager(0)
    backend.check()
    proxy.answer_not_a_manager(1)
    with pytest.raises(BackendError) as since:
        backend.check()
    assert not never.value.transient and since.value.transient
    assert never.value.message == since.value.message


# -- end to end ------------------------------------------------------------------------------


def test_serve_then_hooks_create_then_curl_runs_the_new_tag_on_the_service(
    engine, services, serve, tmp_path
):
    service = services.app()
    config = swarm_config(tmp_path, engine, target("web", "app", service))
    server = serve(config)
    created = run_cli("hooks", "create", "web", "--name", "github-actions", "--json", config=config)
    token = json.loads(created.stdout)["token"]
    result = subprocess.run(
        [
            *("curl", "--fail-with-body", "-sS", "-X", "POST", f"{server.url}/api/v1/dh"),
            *("-H", f"X-Deploy-Hook-Token: {token}", "--data", '{"imageTag":"v2"}'),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr + result.stdout
    deployment_id = json.loads(result.stdout)["deployment"]["id"]

    def finished() -> dict | None:
        status, _, body = server.request(
            "GET", f"/api/v1/deployments/{deployment_id}", headers={"X-Deploy-Hook-Token": token}
        )
        assert status == 200, body
        shown = json.loads(body)["deployment"]
        return None if shown["status"] in ("queued", "in_progress") else shown

    deployment = eventually(finished, timeout=90, what="the deployment's end")
    assert deployment["status"] == "succeeded", deployment
    assert services.image(service) == f"{APP}:v2"
    assert services.running_images(service) == [f"{APP}:v2"]
    assert "(config " in server.log() and ", 1 target, 1 HTTP worker, admin API on)" in server.log()


def test_rollback_returns_to_the_tag_shiphook_last_deployed_not_to_one_set_by_hand(
    engine, services, harness_factory, tmp_path
):
    services.client.tag(f"{APP}:v1", APP, "by-hand")
    service = services.app()
    harness = harness_factory(swarm_config(tmp_path, engine, target("web", "app", service)))
    token = harness.new_hook("web")
    first = harness.wait_for(harness.deploy(token, {"imageTag": "v2"}), timeout=90)
    assert first["status"] == "succeeded", first
    inspected = services.inspect(service)
    spec = inspected["Spec"]
    spec["TaskTemplate"]["ContainerSpec"]["Image"] = f"{APP}:by-hand"  # outside shiphook
    services.client._result(
        services.client._post_json(
            services.client._url("/services/{0}/update", inspected["ID"]),
            data=spec,
            params={"version": inspected["Version"]["Index"]},
        )
    )
    second = harness.wait_for(harness.deploy(token, {"imageTag": "v1"}), timeout=90)
    assert second["status"] == "succeeded", second
    assert second["previousImage"] == f"{APP}:by-hand"

    # as README.md says: the last tag shiphook deployed successfully before it, not the
    # previousImage; with no such deployment, the tag of the previousImage
    assert harness.instance.deployments.rollback(second["id"]).image_tag == "v2"
    assert harness.instance.deployments.rollback(first["id"]).image_tag == "v1"


# -- the backend on its own ----------------------------------------------------------------------


def test_check_describes_the_swarm_manager_it_reached(engine):
    line = backend_on(engine.host).check()
    assert line.startswith("Docker Engine ") and "swarm manager" in line


def test_an_engine_that_is_no_swarm_manager_answers_check_with_swarms_message(engine, tmp_path):
    engine.private()  # starts a second private engine: only where the first one is ours
    if shutil.which("openssl") is None:
        skip_or_fail("openssl is needed to make TLS certificates")
    tls = make_tls_files(tmp_path)
    address = f"127.0.0.1:{free_port()}"
    loner = PrivateDockerd.create(extra_args=tls.dockerd_args(address))  # and its unix socket
    over_tls = SwarmOptions(
        host=f"tcp://{address}",
        tls_ca_cert=tls.ca,
        tls_client_cert=tls.client_cert,
        tls_client_key=tls.client_key,
        timeout=10,
    )
    answers = []
    try:
        loner.start()
        for backend in (
            backend_on(loner.host),
            SwarmBackend(over_tls),
            SwarmBackend(SwarmOptions(host=f"tcp://{address}", tls_ca_cert=tls.ca, timeout=10)),
        ):
            with pytest.raises(BackendError) as caught:
                backend.check()
            answers.append(caught.value)
    finally:
        loner.remove()
    over_socket, with_certificate, without_certificate = answers
    for answer in (over_socket, with_certificate):
        assert answer.message.startswith("This node is not a swarm manager.")
        assert "docker swarm init" in answer.message
        assert not answer.transient
    # an engine started with --tlsverify refuses a client without a certificate
    assert without_certificate.message.startswith(
        f"cannot reach the Docker engine at tcp://{address}"
    )
    assert without_certificate.transient


def test_the_backend_starts_without_an_engine_and_reports_it_unreachable(tmp_path):
    backend = backend_on(f"unix://{tmp_path}/no-docker.sock")  # must not contact anything
    with pytest.raises(BackendError) as caught:
        backend.check()
    assert caught.value.transient
    assert caught.value.message.startswith(f"cannot reach the Docker engine at unix://{tmp_path}")


def test_a_service_of_the_wrong_mode_for_the_target_kind_is_refused(engine, services):
    app, job = services.app(), services.job(env=[])
    backend = backend_on(engine.host)
    assert backend.describe(target_of("app", app)).detail == f"replicated service {app}, 1 replica"
    with pytest.raises(BackendError) as as_app:
        backend.describe(target_of("app", job))
    assert as_app.value.message == (
        f"service {job} is a replicated-job service, but target t is of kind 'app', which needs "
        "a replicated or global service: point the target at such a service or change its kind"
    )
    with pytest.raises(BackendError) as as_job:
        backend.run_job(target_of("job", app), env={}, image_tag=None, deployment_id="d")
    assert "is a replicated service, but target t is of kind 'job'" in as_job.value.message
    assert not as_app.value.transient and not as_job.value.transient


def test_deploy_and_rollback_are_idempotent_for_a_deployment(engine, services):
    service = services.app()
    backend, t = backend_on(engine.host), target_of("app", service)

    ref = backend.deploy(t, image_tag="v2", deployment_id="d-1")
    assert backend.deploy(t, image_tag="v2", deployment_id="d-1") == ref  # a retry after a crash
    assert ref["updated"] and ref["image"] == f"{APP}:v2" and ref["previous_image"] == f"{APP}:v1"
    # updated once: a second update would have made v2 the previous spec
    assert services.inspect(service)["PreviousSpec"]["TaskTemplate"]["ContainerSpec"]["Image"] == (
        f"{APP}:v1"
    )
    assert progress_until_done(backend, t, ref).state == "succeeded"

    first = backend.rollback(t, ref)
    again = backend.rollback(t, ref)
    assert first["requested"] and not again["requested"]  # swapped back once, not twice
    assert services.image(service) == f"{APP}:v1"
    assert progress_until_done(backend, t, first).state == "succeeded"
    # the deployment's update is now the previous spec: a late retry still does not redo it
    assert backend.deploy(t, image_tag="v2", deployment_id="d-1")["image"] == f"{APP}:v2"
    assert services.image(service) == f"{APP}:v1"


def test_run_job_is_idempotent_for_a_deployment(engine, services):
    service = services.job(env=["NAME=service"])
    backend, t = backend_on(engine.host), target_of("job", service)
    ref = backend.run_job(t, env={"NAME": "once"}, image_tag=None, deployment_id="r-1")
    assert backend.run_job(t, env={"NAME": "once"}, image_tag=None, deployment_id="r-1") == ref
    job_status = services.inspect(service)["JobStatus"]
    assert job_status["JobIteration"]["Index"] == ref["iteration"]  # one new iteration only
    assert progress_until_done(backend, t, ref).state == "succeeded"
    assert services.job_output(service, ref["iteration"]) == "GREETING= NAME=once\n"


def test_a_job_update_refused_by_the_engine_fails_permanently_with_its_message(engine, services):
    service = services.job(env=[])
    backend = backend_on(engine.host)
    t = target_of("job", service, image="Not/A-Valid/Repository")
    with pytest.raises(BackendError) as caught:
        backend.run_job(t, env={}, image_tag="ok", deployment_id="r-2")
    assert not caught.value.transient
    assert '"Not/A-Valid/Repository:ok" is not a valid repository/tag' in caught.value.message


# -- configuration ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("backend_keys", "target_keys", "expected"),
    [
        ('hots = "unix:///x.sock"', "", "backends.swarm.hots: unknown key"),
        ('host = "http://x"', "", "backends.swarm.host: expected unix:///path/to/docker.sock"),
        ('host = "tcp://s3cret@d:2376"', "", "backends.swarm.host: a host holds no credentials"),
        ("tls = true", "", "backends.swarm: TLS options apply to tcp:// hosts only"),
        ('host = "tcp://d:2376"\ntls_client_cert = "{cert}"', "", "set both or neither"),
        ('host = "tcp://d:2376"\ntls_ca_cert = "/nope.pem"', "", "backends.swarm.tls_ca_cert"),
        ('api_version = "latest"', "", 'backends.swarm.api_version: expected "auto"'),
        ("timeout = 0", "", "backends.swarm.timeout: Input should be greater than 0"),
        # a switch is TOML's true or false: "no" (a string) or 0 is refused, not read as false
        ('host = "tcp://d:2376"\ntls_verify = "no"', "", "backends.swarm.tls_verify: Input should"),
        ("tls = 0", "", "backends.swarm.tls: Input should be a valid boolean"),
        ("", 'resolve_image = "false"', "targets.web.resolve_image: Input should be a valid"),
        ("poll_interval = 0.001", "", "backends.swarm.poll_interval: Input should be greater"),
        ("", 'image = "web:1.0"', "targets.web.image: expected a repository without tag"),
        ("", 'servise = "web"', "targets.web.servise: unknown key"),
    ],
)
def test_swarm_options_are_validated_when_the_config_loads(
    tmp_path, backend_keys, target_keys, expected
):
    cert = tmp_path / "cert.pem"
    cert.write_text("not checked here")
    text = (
        f'[server]\ndatabase_url = "sqlite:///{tmp_path}/s.db"\n'
        f'[backends.swarm]\nplugin = "swarm"\n{backend_keys.format(cert=cert)}\n'
        f'[targets.web]\nkind = "app"\nbackend = "swarm"\nservice = "web"\n{target_keys}\n'
    )
    with pytest.raises(ConfigError) as caught:
        open_instance(write_config(tmp_path, text), plugin_modules=[])
    assert expected in caught.value.message
    assert "s3cret" not in caught.value.message


def test_a_swarm_job_target_cannot_ask_for_concurrent_runs(tmp_path):
    text = (
        f'[server]\ndatabase_url = "sqlite:///{tmp_path}/s.db"\n'
        '[backends.swarm]\nplugin = "swarm"\n'
        '[targets.nightly]\nkind = "job"\nbackend = "swarm"\nservice = "n"\n'
        "max_concurrent_runs = 2\n"
    )
    expected = r"targets\.nightly\.max_concurrent_runs: the swarm backend"
    with pytest.raises(ConfigError, match=expected):
        open_instance(write_config(tmp_path, text), plugin_modules=[])


def test_targets_shows_for_each_kind_only_what_applies(tmp_path):
    config = write_config(
        tmp_path,
        f'[server]\ndatabase_url = "sqlite:///{tmp_path}/s.db"\n'
        '[backends.swarm]\nplugin = "swarm"\n'
        '[targets.web]\nkind = "app"\nbackend = "swarm"\nservice = "web"\n'
        '[targets.migrate]\nkind = "job"\nbackend = "swarm"\nservice = "migrate"\n',
    )
    out = run_cli("targets", config=config).stdout
    assert "None" not in out  # no image=None for a target without an image key
    header, *lines = out.splitlines()
    assert header.split()[:4] == ["NAME", "KIND", "BACKEND", "ON"]
    rows = {line.split()[0]: line.split() for line in lines}
    assert rows["web"][3] == "rollback"
    assert rows["migrate"][3] == "-"  # a job run is never rolled back
    assert rows["migrate"][-2:] == ["service=migrate", "resolve_image=True"]


def test_the_example_configs_tag_policy_takes_the_tag_the_readme_workflow_deploys(
    tmp_path, monkeypatch
):
    readme = (ROOT / "README.md").read_text()
    assert """--data '{"imageTag":"${{ github.sha }}"}'""" in readme
    monkeypatch.chdir(tmp_path)
    instance = open_instance(ROOT / "configs" / "examples" / "swarm.toml", plugin_modules=[])
    try:
        web = instance.config.targets["web"]
        for tag in ("3f786850e387550fdab836ed7e6dc881de23001b", "v1.2.3", "1.2.3"):
            assert parse_hook_body(web, json.dumps({"imageTag": tag}).encode()).imageTag == tag
    finally:
        instance.close()


def test_help_and_readme_name_kubernetes_swarm_and_nomad(tmp_path):
    help_text = " ".join(run_cli("--help", config=tmp_path / "unread.toml").stdout.split())
    intro = " ".join((ROOT / "README.md").read_text().split("\n\n")[1].split())
    for text in (help_text, intro):
        assert "Kubernetes" in text and "Docker Swarm" in text and "Nomad" in text
        assert "planned" not in text, text


def test_the_example_config_loads(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    instance = open_instance(ROOT / "configs" / "examples" / "swarm.toml", plugin_modules=[])
    try:
        assert instance.config.backends["swarm"].plugin == "swarm"
        assert {t.kind for t in instance.config.targets.values()} == {"app", "job"}
    finally:
        instance.close()
