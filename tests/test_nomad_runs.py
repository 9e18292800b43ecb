"""Runs of one parameterized Nomad job from several shiphooks at once, and runs that end in the
middle of their window (issue 15's open items).

A run with an image tag of its own opens a window on the job: a register putting its image on the
job, its dispatch, a register putting the job's own image back. Nomad arbitrates between
shiphooks: the registers go with EnforceIndex, and an open window makes a meta key of its run's
own required, so Nomad refuses every other dispatch meanwhile. The interleavings are made with the
fake's held answers, so these tests need the fake.
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

from conftest import Harness, run_cli
from nomad_fake import NomadFake
from nomad_support import IMAGE, Cluster, batch_job, nomad_config, target, unique
from shiphook.testing import eventually
from test_durability import create_hook, post_hook, wait_all_terminal
from test_nomad import nomad_env, registers

pytest_plugins = ["nomad_support"]

DEPLOYER = "[deployer]\nlease_seconds = 2\nscan_interval = 0.2\n"
RUNS = 12


def parameterized_job(cluster: Cluster) -> tuple[NomadFake, str]:
    """The fake, with a parameterized job of image tag v1 registered on it."""
    fake = cluster.needs_fake()
    job_id = unique("migrate")
    cluster.register(batch_job(job_id))
    return fake, job_id


def resumed_run(serve, config: Path) -> dict[str, Any]:
    """The one run a restarted serve finds and takes to its end, successfully."""
    restarted = serve(config, env=nomad_env(), name="restarted")
    (run,) = wait_all_terminal(restarted, 1, timeout=60)
    assert run["status"] == "succeeded", run
    return run


def run_body(env: dict[str, str] | None = None, tag: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "instanceEnvironmentVariables": [{"name": k, "value": v} for k, v in (env or {}).items()]
    }
    if tag is not None:
        body["imageTag"] = tag
    return body


def migrate(job_id: str, **keys: Any) -> str:
    keys.setdefault("parameters", ["GREETING"])
    return target("migrate", "job", job_id, **keys)


def replica(harness_factory, tmp_path: Path, cluster: Cluster, name: str, job_id: str) -> Harness:
    """A shiphook of its own (its own database, deployer and backend) running the job."""
    home = tmp_path / name
    home.mkdir()
    return harness_factory(nomad_config(home, cluster, migrate(job_id, retry_budget=30)))


def child_image(cluster: Cluster, deployment: dict[str, Any]) -> str:
    return cluster.image(deployment["backendRef"]["child"])


def window_of(cluster: Cluster, job_id: str) -> str | None:
    """The run whose window is open on the job."""
    return (cluster.job(job_id)["Meta"] or {}).get("shiphook_run")


def assert_as_registered(cluster: Cluster, job_id: str) -> None:
    """The job is back as the test registered it: its own image, no window's meta or key."""
    job = cluster.job(job_id)
    assert cluster.image(job_id) == f"{IMAGE}:v1"
    assert not (job["Meta"] or {}), job["Meta"]
    assert not job["ParameterizedJob"]["MetaRequired"], job["ParameterizedJob"]


# -- shiphooks racing for one job -------------------------------------------------------------


def test_a_run_never_dispatches_into_a_window_another_shiphook_opened_after_its_read(
    nomad_cluster, harness_factory, tmp_path
):
    fake, job_id = parameterized_job(nomad_cluster)
    first = replica(harness_factory, tmp_path, nomad_cluster, "first", job_id)
    second = replica(harness_factory, tmp_path, nomad_cluster, "second", job_id)
    # the first's plain run reads the job while no window is open, and gets the answer late ...
    fake.hold("GET", f"/v1/job/{job_id}", 1.5)
    plain = first.deploy(first.new_hook("migrate"), run_body({"GREETING": "plain"}))
    eventually(lambda: fake.calls("GET", f"/v1/job/{job_id}"), "the plain run's read")
    # ... when the second's tagged run has opened its window (its dispatch's answer is held)
    fake.hold("POST", f"/v1/job/{job_id}/dispatch", 3)
    tagged = second.deploy(second.new_hook("migrate"), run_body(tag="v9"))
    plain_run, tagged_run = first.wait_for(plain, 60), second.wait_for(tagged, 60)
    assert plain_run["status"] == tagged_run["status"] == "succeeded", (plain_run, tagged_run)
    assert child_image(nomad_cluster, tagged_run) == f"{IMAGE}:v9"
    assert child_image(nomad_cluster, plain_run) == f"{IMAGE}:v1"
    # Nomad refused the plain run's dispatch while the window was open; the run waited
    waited = "another run's window opened on the job after this run read it; waiting"
    assert any(waited in e["message"] for e in plain_run["history"]), plain_run["history"]
    assert_as_registered(nomad_cluster, job_id)


def test_two_serve_replicas_on_one_database_give_every_run_its_own_image(
    nomad_cluster, serve, tmp_path, postgres_url
):
    fake, job_id = parameterized_job(nomad_cluster)
    # two runs at a time on each replica (threads = 2), four at once in all
    config = nomad_config(
        tmp_path,
        nomad_cluster,
        migrate(job_id, max_concurrent_runs=4, retry_budget=120, rollout_timeout=120),
        database_url=postgres_url,
        extra=DEPLOYER + "threads = 2\n",
    )
    # every read of the job and every dispatch answer reaches shiphook late: runs act on what
    # others have changed since, and keep their windows open longer
    fake.hold("GET", f"/v1/job/{job_id}", 0.2, times=100_000)
    fake.hold("POST", f"/v1/job/{job_id}/dispatch", 0.2, times=100_000)
    replicas = (serve(config, env=nomad_env(), name="first"), serve(config, env=nomad_env()))
    token = create_hook(replicas[0], "migrate")

    def send(n: int) -> dict[str, Any]:
        tag = f"r{n}" if n // 2 % 2 else None  # tagged and plain runs on each replica
        status, answer = post_hook(replicas[n % 2], token, run_body({"GREETING": f"{n}"}, tag))
        assert status == 201, answer
        return answer["deployment"]

    sent = [send(n) for n in range(RUNS)]  # in this order in the queue: two plain, two tagged, ...
    runs = {d["id"]: d for d in wait_all_terminal(replicas[0], RUNS, timeout=300)}
    for n, accepted in enumerate(sent):
        run = runs[accepted["id"]]
        assert run["status"] == "succeeded", run
        assert child_image(nomad_cluster, run) == f"{IMAGE}:{run['imageTag'] or 'v1'}", run
        assert nomad_cluster.job(run["backendRef"]["child"])["Meta"]["GREETING"] == f"{n}"
    assert len(fake.children(job_id)) == RUNS
    assert_as_registered(nomad_cluster, job_id)
    for server in replicas:  # both replicas ran some
        assert " of migrate: in progress (" in server.log(), server.log()


# -- runs that end in their window --------------------------------------------------------------


def kill_in_window(fake: Any, cluster: Cluster, server: Any, job_id: str, tag: str) -> str:
    """Start a tagged run and kill -9 its serve once the run's window is open, before its
    dispatch; return the run's deployment id."""
    token = create_hook(server, "migrate")
    # the register that opens the window is done, and its answer held until serve is gone
    fake.hold("POST", f"/v1/job/{job_id}", 30)
    status, answer = post_hook(server, token, run_body({"GREETING": "hi"}, tag))
    assert status == 201, answer
    eventually(lambda: window_of(cluster, job_id), "the run's window")
    server.stop(signal.SIGKILL)
    assert fake.children(job_id) == []
    assert cluster.image(job_id) == f"{IMAGE}:{tag}"
    return answer["deployment"]["id"]


def test_a_window_open_when_serve_is_killed_is_closed_by_the_resumed_run(
    nomad_cluster, serve, tmp_path
):
    fake, job_id = parameterized_job(nomad_cluster)
    config = nomad_config(tmp_path, nomad_cluster, migrate(job_id), extra=DEPLOYER)
    run_id = kill_in_window(fake, nomad_cluster, serve(config, env=nomad_env()), job_id, "v5")
    assert window_of(nomad_cluster, job_id) == run_id

    run = resumed_run(serve, config)
    (child,) = fake.children(job_id)
    assert child["ID"] == run["backendRef"]["child"]
    assert child_image(nomad_cluster, run) == f"{IMAGE}:v5"
    # the resumed run knew the window for its own: it dispatched in it and closed it
    assert "took_over_window_of" not in run["backendRef"]
    assert len(registers(fake, job_id)) == 2
    assert_as_registered(nomad_cluster, job_id)


def test_a_window_left_by_a_run_whose_target_was_removed_is_reported_and_taken_over(
    nomad_cluster, serve, tmp_path
):
    fake, job_id = parameterized_job(nomad_cluster)
    config = nomad_config(tmp_path, nomad_cluster, migrate(job_id), extra=DEPLOYER)
    left = kill_in_window(fake, nomad_cluster, serve(config, env=nomad_env()), job_id, "v5")

    # restarted without the target: its run fails without a word to Nomad, the window stays
    nomad_config(tmp_path, nomad_cluster, extra=DEPLOYER)
    without = serve(config, env=nomad_env(), name="without")
    (run,) = wait_all_terminal(without, 1, timeout=60)
    assert run["message"] == "target 'migrate' is no longer in the configuration", run
    without.stop()
    assert window_of(nomad_cluster, job_id) == left

    # with the target back (timeout 1: a window is stale after 3 s), `check` says so ...
    nomad_config(
        tmp_path, nomad_cluster, migrate(job_id, retry_budget=30), extra=DEPLOYER, timeout=1
    )

    def reported() -> str | None:
        result = run_cli("check", config=config, env=nomad_env(), check=False)
        return result.stdout if result.returncode == 1 else None

    said = eventually(reported, "check reporting the stale window", timeout=60)
    assert (
        f"target migrate (job): NOT USABLE: job {job_id} has carried the image of run {left} "
        f"({IMAGE}:v5) since "
    ) in said, said
    assert f"The next run of this target puts {IMAGE}:v1 back" in said, said

    # ... and the next run takes the window over: its own image, then the job's own back
    again = serve(config, env=nomad_env(), name="again")
    status, answer = post_hook(
        again, create_hook(again, "migrate"), run_body(tag="v6"), query="?wait=60"
    )
    assert status == 201, answer
    deployment = answer["deployment"]
    assert deployment["backendRef"]["took_over_window_of"] == left
    assert child_image(nomad_cluster, deployment) == f"{IMAGE}:v6"
    assert_as_registered(nomad_cluster, job_id)
    assert run_cli("check", config=config, env=nomad_env()).returncode == 0


def test_a_stopped_serve_closes_the_window_of_the_run_it_was_starting(
    nomad_cluster, serve, tmp_path
):
    fake, job_id = parameterized_job(nomad_cluster)
    config = nomad_config(tmp_path, nomad_cluster, migrate(job_id), extra=DEPLOYER)
    first = serve(config, env=nomad_env())
    token = create_hook(first, "migrate")
    fake.hold("POST", f"/v1/job/{job_id}/dispatch", 2)  # the run is in its window meanwhile
    status, answer = post_hook(first, token, run_body(tag="v5"))
    assert status == 201, answer
    eventually(lambda: fake.calls("POST", f"/v1/job/{job_id}/dispatch"), "the dispatch")
    first.stop()  # SIGTERM, as an operator stops it
    assert first.process.returncode == 0, first.log()
    # serve exited once the run's dispatch was answered and the job had its own image back
    (child,) = fake.children(job_id)
    assert child["TaskGroups"][0]["Tasks"][0]["Config"]["image"] == f"{IMAGE}:v5"
    assert_as_registered(nomad_cluster, job_id)

    run = resumed_run(serve, config)
    assert run["backendRef"]["child"] == child["ID"]  # the same child, found again
    assert_as_registered(nomad_cluster, job_id)


def test_a_window_the_run_cannot_close_at_once_is_closed_while_the_run_is_followed(
    nomad_cluster, harness_factory, tmp_path
):
    fake, job_id = parameterized_job(nomad_cluster)
    config = nomad_config(tmp_path, nomad_cluster, migrate(job_id, retry_budget=0))
    harness = harness_factory(config)
    fake.hold("POST", f"/v1/job/{job_id}/dispatch", 0.5)
    run_id = harness.deploy(harness.new_hook("migrate"), run_body(tag="v5"))
    eventually(lambda: fake.calls("POST", f"/v1/job/{job_id}/dispatch"), "the dispatch")
    # Nomad loses its leader just then: the register that would close the window fails
    fake.fail("POST", f"/v1/job/{job_id}", 500, "No cluster leader")
    run = harness.wait_for(run_id, 30)
    # the run went on (no retry budget: retrying the run would have failed it) ...
    assert run["status"] == "succeeded", run
    assert run["backendRef"]["window"] == "open"
    assert child_image(nomad_cluster, run) == f"{IMAGE}:v5"
    # ... and following it closed the window
    assert_as_registered(nomad_cluster, job_id)


def test_a_run_that_ends_abnormally_in_its_window_leaves_the_job_as_it_was(
    nomad_cluster, harness_factory, tmp_path
):
    fake, job_id = parameterized_job(nomad_cluster)
    harness = harness_factory(nomad_config(tmp_path, nomad_cluster, migrate(job_id)))
    # an answer to the dispatch that is not Nomad's (from a proxy, say): the backend breaks
    fake.fail("POST", f"/v1/job/{job_id}/dispatch", 200, "{}")
    run = harness.wait_for(harness.deploy(harness.new_hook("migrate"), run_body(tag="v5")), 30)
    assert run["status"] == "failed", run
    assert run["message"] == (
        "the nomad backend failed unexpectedly: KeyError: 'DispatchedJobID'"
    ), run
    assert_as_registered(nomad_cluster, job_id)
