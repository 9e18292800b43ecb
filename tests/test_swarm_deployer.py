"""The deployer's guarantees (issue 4) through the real Swarm backend.

tests/test_lifecycle.py and tests/test_durability.py pin ?wait, Idempotency-Key, coalescing and
crash safety against the scripted test backend; here the same guarantees run against services on
a real Docker Engine (the `engine` and `services` fixtures of tests/swarm_support.py: skipped
without dockerd, failing when SHIPHOOK_REQUIRE_DOCKER=1). What a test says about Swarm it reads
from Swarm: the service's spec and labels, its tasks, a job's iterations and their output.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from datetime import datetime
from itertools import pairwise
from typing import Any

import pytest
from conftest import Harness, Server, replaced_by
from dockerd import APP
from shiphook.instance import open_instance
from shiphook.models import TERMINAL
from shiphook.testing import eventually
from swarm_support import Engine, Services, job_body, swarm_config, target
from test_durability import all_deployments, create_hook, post_hook, wait_all_terminal

# the `engine` and `services` fixtures; a plugin, so that one engine serves every module
pytest_plugins = ["swarm_support"]

LABEL_DEPLOYMENT = "io.shiphook.deployment"  # what the swarm backend writes on specs and tasks
WAIT = "90"  # ?wait seconds: far above any rollout here; an answer before it is the outcome
BURST = 20

# a leaseholder killed mid-rollout is taken over within about 2 s
QUICK_TAKEOVER = "\n[deployer]\nlease_seconds = 2\nscan_interval = 0.2\n"


@pytest.fixture(scope="module")
def tags(engine: Engine) -> list[str]:
    """Tags b00, b01, ... of the app repository, each a new image reference for Swarm."""
    client = engine.client()
    made = [f"b{n:02d}" for n in range(BURST)]
    for tag in made:
        client.tag(f"{APP}:v1", APP, tag)
    return made


def wait_post(harness: Harness, token: str, body: object, **kwargs: Any) -> Any:
    return harness.post_hook(token, body, params={"wait": WAIT}, **kwargs)


def count_deploys(harness: Harness) -> list[str]:
    """The deployment id of every call the deployer makes to the swarm backend's deploy."""
    backend = harness.instance.backends["swarm"]
    calls: list[str] = []
    real: Callable[..., Any] = backend.deploy

    def deploy(target: Any, *, image_tag: str, deployment_id: str) -> Any:
        calls.append(deployment_id)
        return real(target, image_tag=image_tag, deployment_id=deployment_id)

    backend.deploy = deploy  # the deployer looks the method up on every call
    return calls


def task_labels(services: Services, service: str) -> list[str | None]:
    """The deployment label of each task Swarm still lists for the service (None: unlabelled)."""
    tasks = services.client.tasks(filters={"service": service})
    return [(t["Spec"]["ContainerSpec"].get("Labels") or {}).get(LABEL_DEPLOYMENT) for t in tasks]


def at(timestamp: str) -> datetime:
    """A stored time as the API shows it (ISO 8601, "Z", fraction left out when zero)."""
    return datetime.fromisoformat(timestamp)


def job_iteration(services: Services, service: str) -> int:
    job_status = services.inspect(service).get("JobStatus") or {}
    return int((job_status.get("JobIteration") or {}).get("Index") or 0)


# -- ?wait --------------------------------------------------------------------------------------


def test_wait_answers_201_when_swarm_has_rolled_the_service_to_the_new_tag(
    engine, services, harness_factory, tmp_path
):
    service = services.app()
    harness = harness_factory(swarm_config(tmp_path, engine, target("web", "app", service)))
    result = wait_post(harness, harness.new_hook("web"), {"imageTag": "v2"})
    assert result.status_code == 201, result.text
    deployment = result.json["deployment"]
    assert deployment["status"] == "succeeded"
    assert deployment["message"] == "update completed"  # Swarm's UpdateStatus message
    assert deployment["history"][0]["status"] == "queued"
    assert deployment["history"][-1]["status"] == "succeeded"
    # answered only once the service runs it: no polling needed after a 201
    assert services.image(service) == f"{APP}:v2"
    assert services.running_images(service) == [f"{APP}:v2"]
    assert services.inspect(service)["Spec"]["Labels"][LABEL_DEPLOYMENT] == deployment["id"]


def test_wait_answers_502_with_swarms_reason_when_a_broken_tag_is_rolled_back(
    engine, services, harness_factory, tmp_path
):
    service = services.app()
    harness = harness_factory(swarm_config(tmp_path, engine, target("web", "app", service)))
    result = wait_post(harness, harness.new_hook("web"), {"imageTag": "broken"})
    assert result.status_code == 502, result.text
    deployment = result.json["deployment"]
    assert deployment["status"] == "rolled_back"
    description = result.json["description"]
    assert description.startswith(
        f"deployment {deployment['id']} rolled back: "
        "update paused due to failure or early termination of task "
    )
    assert "(task: non-zero exit (1))" in description  # the failed task's own error
    assert description.endswith("; rolled back (rollback completed)")
    assert services.image(service) == f"{APP}:v1"
    eventually(lambda: services.running_images(service) == [f"{APP}:v1"], "v1 running")


def test_wait_answers_504_at_the_deadline_and_the_swarm_rollout_goes_on(
    engine, services, harness_factory, tmp_path
):
    service = services.app(monitor=2)  # Swarm watches the new task 2 s before it completes
    harness = harness_factory(swarm_config(tmp_path, engine, target("web", "app", service)))
    result = harness.post_hook(harness.new_hook("web"), {"imageTag": "v2"}, params={"wait": "0.5"})
    assert result.status_code == 504, result.text
    deployment_id = result.json["deployment"]["id"]
    assert f"deployment {deployment_id} is still " in result.json["description"]
    assert result.headers["location"] == f"/api/v1/deployments/{deployment_id}"
    assert harness.wait_for(deployment_id, timeout=90)["status"] == "succeeded"
    assert services.running_images(service) == [f"{APP}:v2"]


# -- Idempotency-Key ------------------------------------------------------------------------------


def test_retries_with_one_idempotency_key_roll_the_service_out_once(
    engine, services, harness_factory, tmp_path
):
    service = services.app()
    harness = harness_factory(swarm_config(tmp_path, engine, target("web", "app", service)))
    deploys = count_deploys(harness)
    token = harness.new_hook("web")
    key = {"Idempotency-Key": "pipeline-41-deploy"}
    first = harness.post_hook(token, {"imageTag": "v2"}, headers=key)
    assert first.status_code == 201, first.text
    deployment_id = first.json["deployment"]["id"]
    harness.wait_started(deployment_id, timeout=30)

    # CI retries while Swarm is rolling out (curl --retry after a timeout), some at once
    headers = {"X-Deploy-Hook-Token": token, **key}

    async def retry(conductor: Any) -> Any:
        return await conductor.simulate_post("/api/v1/dh", json={"imageTag": "v2"}, headers=headers)

    retries = harness.gather(*[retry] * 5)
    waited = wait_post(harness, token, {"imageTag": "v2"}, headers=key)
    for answer in [*retries, waited]:
        assert answer.status_code == 201, answer.text
        assert answer.json["deployment"]["id"] == deployment_id
        assert answer.headers["idempotent-replayed"] == "true"
    assert waited.json["deployment"]["status"] == "succeeded"

    assert [d.id for d in harness.instance.deployments.list()] == [deployment_id]
    assert deploys == [deployment_id]
    inspected = services.inspect(service)
    assert inspected["Spec"]["Labels"][LABEL_DEPLOYMENT] == deployment_id
    assert inspected["PreviousSpec"]["TaskTemplate"]["ContainerSpec"]["Image"] == f"{APP}:v1"
    # one task was started for this deployment: one update of a one-replica service
    assert task_labels(services, service).count(deployment_id) == 1
    version = inspected["Version"]["Index"]

    # the same key with another tag starts nothing either
    refused = harness.post_hook(token, {"imageTag": "v1"}, headers=key)
    assert refused.status_code == 422, refused.text
    assert deployment_id in refused.json["description"]
    assert len(harness.instance.deployments.list()) == 1
    assert services.inspect(service)["Version"]["Index"] == version
    assert services.running_images(service) == [f"{APP}:v2"]


# -- one rollout at a time; coalescing -----------------------------------------------------------


def test_a_burst_during_a_swarm_rollout_coalesces_to_the_newest_tag_one_rollout_at_a_time(
    engine, services, tags, harness_factory, tmp_path
):
    service = services.app(monitor=2)
    harness = harness_factory(swarm_config(tmp_path, engine, target("web", "app", service)))
    deploys = count_deploys(harness)
    token = harness.new_hook("web")
    running = harness.deploy(token, {"imageTag": "v2"})
    harness.wait_started(running, timeout=30)  # Swarm is rolling it out from here on

    hook = {"X-Deploy-Hook-Token": token}

    def waiting_ci_job(tag: str) -> Callable[[Any], Any]:
        async def call(conductor: Any) -> Any:
            return await conductor.simulate_post(
                "/api/v1/dh", json={"imageTag": tag}, headers=hook, params={"wait": WAIT}
            )

        return call

    answers = harness.gather(*[waiting_ci_job(tag) for tag in tags])
    burst = {a.json["deployment"]["id"]: a for a in answers}
    assert len(burst) == BURST
    newest = max(burst)  # ids grow in the order deployments are accepted
    newest_tag = burst[newest].json["deployment"]["imageTag"]

    ended = {d: harness.wait_for(d, timeout=90) for d in [running, *burst]}
    ran = sorted((d for d in ended.values() if d["backendRef"]), key=lambda d: d["startedAt"])
    ran_ids = {d["id"] for d in ran}
    # the service ends on the newest accepted tag, and runs nothing else
    assert ended[newest]["status"] == "succeeded", ended[newest]
    assert services.image(service) == f"{APP}:{newest_tag}"
    assert services.running_images(service) == [f"{APP}:{newest_tag}"]
    assert services.inspect(service)["Spec"]["Labels"][LABEL_DEPLOYMENT] == newest

    # each answer is its deployment's outcome: 201 when it ran, 409 naming what replaced it
    for deployment_id, answer in burst.items():
        deployment = ended[deployment_id]
        if deployment["status"] == "superseded":
            assert answer.status_code == 409, answer.text
            successor = ended[deployment["supersededBy"]]
            assert successor["id"] > deployment_id
            assert replaced_by(ended, deployment_id) in ran_ids
            assert (
                f"superseded by deployment {successor['id']} (tag {successor['imageTag']})"
                in answer.json["description"]
            )
        else:
            assert deployment["status"] == "succeeded", deployment
            assert answer.status_code == 201, answer.text
            assert deployment_id in ran_ids

    # one rollout at a time: each ran to Swarm's "update completed" (an update sent over a
    # running one would have failed that one as changed outside it), none overlapping the next
    assert ended[running]["status"] == "succeeded"
    assert all(d["message"] == "update completed" for d in ran), ran
    for before, after in pairwise(ran):
        assert at(before["finishedAt"]) <= at(after["startedAt"]), (before, after)
    # fewer rollouts than requests, each one deploy call; Swarm saw no other
    assert deploys == [d["id"] for d in ran]
    assert len(ran) < 1 + BURST
    assert set(task_labels(services, service)) - {None} <= ran_ids


# -- a killed server -----------------------------------------------------------------------------


def test_a_server_killed_mid_rollout_loses_nothing_and_runs_each_swarm_job_once(
    engine, services, tags, serve, tmp_path
):
    # Swarm holds each update for its 3 s monitor period: the rollouts are surely in progress
    # while the newer tags are accepted and the server is killed
    apps = {"alpha": services.app(monitor=3), "beta": services.app(monitor=3)}
    job = services.job(env=["GREETING=hello", "NAME=service"])
    first_iteration = job_iteration(services, job)
    config = swarm_config(
        tmp_path,
        engine,
        QUICK_TAKEOVER,
        *(target(name, "app", service) for name, service in apps.items()),
        target("migrate", "job", job),
    )
    server = serve(config, name="first")
    tokens = {name: create_hook(server, name) for name in [*apps, "migrate"]}
    accepted: list[str] = []
    runs = 3

    def push(name: str, body: dict) -> str:
        status, answer = post_hook(server, tokens[name], body)
        assert status == 201, answer
        accepted.append(answer["deployment"]["id"])
        return answer["deployment"]["id"]

    first = {name: push(name, {"imageTag": tags[0]}) for name in apps}
    push("migrate", job_body(NAME="run0"))

    def started() -> bool:
        shown = {d["id"]: d for d in all_deployments(server)}
        return all(shown[d]["backendRef"] for d in first.values())

    eventually(started, timeout=60, what="both rollouts' start")
    for n in range(1, 4):  # newer tags queue behind the running rollouts, as do more runs
        for name in apps:
            push(name, {"imageTag": tags[n]})
        if n < runs:
            push("migrate", job_body(NAME=f"run{n}"))
    server.stop(signal.SIGKILL)  # the server and its deployer process, at once

    instance = open_instance(config, plugin_modules=[])
    try:  # what the killed server left
        shown = instance.deployments.list(limit=1000)
    finally:
        instance.close()
    left = [d for d in shown if d.status not in TERMINAL]
    assert {d.id for d in left if d.status == "in_progress"} >= set(first.values()), left
    # the newer tags wait: the newest of each app queued, the older ones queued too or already
    # superseded by it (the deployer supersedes while a rollout runs)
    newer = [d for d in shown if d.kind == "app" and d.id not in first.values()]
    assert len(newer) == 6, newer
    for name in apps:
        mine = sorted((d for d in newer if d.target == name), key=lambda d: d.id)
        assert mine[-1].status == "queued", mine
        assert all(d.status in ("queued", "superseded") for d in mine), mine

    restarted: Server = serve(config, name="second")
    deployments = wait_all_terminal(restarted, len(accepted), timeout=120)
    by_id = {d["id"]: d for d in deployments}
    assert set(by_id) == set(accepted)
    assert all(d["status"] in ("succeeded", "superseded") for d in deployments), [
        (d["id"], d["status"], d["message"]) for d in deployments
    ]

    # each app service ends on its newest accepted tag
    for name, service in apps.items():
        mine = [d for d in deployments if d["target"] == name]
        newest = max(mine, key=lambda d: d["id"])
        assert newest["status"] == "succeeded", newest
        assert services.image(service) == f"{APP}:{newest['imageTag']}"
        assert services.running_images(service) == [f"{APP}:{newest['imageTag']}"]
        # the resumed rollout finished, then the newest queued tag replaced the older ones
        assert by_id[first[name]]["status"] == "succeeded", by_id[first[name]]
        assert by_id[first[name]]["message"] == "update completed"
        queued_behind = sorted(d["id"] for d in mine if d["id"] != first[name])
        assert [by_id[d]["status"] for d in queued_behind] == ["superseded"] * 2 + ["succeeded"]
        assert {replaced_by(by_id, d) for d in queued_behind[:2]} == {newest["id"]}

    # each job run is one iteration of the job service, with one task that ran its overrides
    job_runs = [d for d in deployments if d["kind"] == "job"]
    assert len(job_runs) == runs
    assert all(d["status"] == "succeeded" for d in job_runs), job_runs
    iterations = sorted(d["backendRef"]["iteration"] for d in job_runs)
    assert iterations == list(range(first_iteration + 1, first_iteration + runs + 1))
    assert job_iteration(services, job) == first_iteration + runs  # no run started twice
    for run in job_runs:
        (override,) = run["instanceEnvironmentVariables"]
        output = services.job_output(job, run["backendRef"]["iteration"])
        assert output == f"GREETING=hello NAME={override['value']}\n"
