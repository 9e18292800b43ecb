"""Durability under real processes: SIGKILL mid-flight, bursts, hundreds of waiting CI jobs,
and several replicas sharing one PostgreSQL database."""

from __future__ import annotations

import json
import signal
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import scripted_backend
from conftest import ADMIN_TOKEN, Server, write_config

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def fleet_config(
    tmp_path: Path,
    *,
    apps: int,
    jobs: int,
    database_url: str | None = None,
    rollout_seconds: float = 0.2,
    timeout: float = 30,
    threads: int = 16,
) -> Path:
    """`apps` app targets and `jobs` job targets on one scripted backend sharing `tmp_path`."""
    text = f"""
        [server]
        database_url = "{database_url or f"sqlite:///{tmp_path}/shiphook.db"}"
        [engine]
        lease_seconds = 2
        scan_interval = 0.2
        threads = {threads}
        [backends.fake]
        plugin = "scripted"
        state_dir = "{tmp_path}"
        rollout_seconds = {rollout_seconds}
        polls = 5
        """
    for i in range(apps):
        text += f'[targets.app{i}]\nkind = "app"\nbackend = "fake"\nname = "app{i}"\n'
        text += f"rollout_timeout = {timeout}\n"
    for i in range(jobs):
        text += f'[targets.job{i}]\nkind = "job"\nbackend = "fake"\nname = "job{i}"\n'
    return write_config(tmp_path, text)


def backend_state(tmp_path: Path) -> scripted_backend.ScriptedBackend:
    return scripted_backend.ScriptedBackend(
        scripted_backend.ScriptedOptions(state_dir=str(tmp_path))
    )


def create_hook(server: Server, target: str) -> str:
    status, _, body = server.request(
        "POST", f"/api/v1/targets/{target}/hooks", json.dumps({"name": "ci"}).encode(), ADMIN
    )
    assert status == 201, body
    return json.loads(body)["hook"]["token"]


def post_hook(server: Server, token: str, body: dict, query: str = "") -> tuple[int, dict]:
    status, _, raw = server.request(
        "POST", f"/api/v1/dh{query}", json.dumps(body).encode(), {"X-Deploy-Hook-Token": token}
    )
    return status, json.loads(raw)


def all_deployments(server: Server) -> list[dict]:
    status, _, body = server.request("GET", "/api/v1/deployments?limit=1000", headers=ADMIN)
    assert status == 200
    return json.loads(body)["deployments"]


def wait_all_terminal(server: Server, count: int, timeout: float = 90) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        found = all_deployments(server)
        pending = [d for d in found if d["status"] in ("queued", "in_progress")]
        if len(found) >= count and not pending:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(
                f"{len(pending)} of {len(found)} deployments did not end: {pending[:3]}"
            )
        time.sleep(0.2)


def assert_each_app_target_runs_its_newest_tag(deployments: list[dict], tmp_path: Path) -> None:
    state = backend_state(tmp_path)
    apps = {d["target"] for d in deployments if d["kind"] == "app"}
    for target in apps:
        newest = max((d for d in deployments if d["target"] == target), key=lambda d: d["id"])
        assert newest["status"] == "succeeded", newest
        assert state.image(target) == f"registry.test/app:{newest['imageTag']}"
        assert state.max_in_flight(target) == 1


def test_a_killed_server_loses_nothing_and_runs_no_job_twice(tmp_path, serve):
    config = fleet_config(tmp_path, apps=7, jobs=3)
    server = serve(config, name="first")
    tokens = {
        t: create_hook(server, t) for t in [f"app{i}" for i in range(7)] + ["job0", "job1", "job2"]
    }
    requests = [
        (t, {"imageTag": f"{n}.0"} if t.startswith("app") else {})
        for n in range(10)
        for t in tokens
    ]
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda r: post_hook(server, tokens[r[0]], r[1]), requests))
    assert [status for status, _ in answers] == [201] * 100
    accepted = {body["deployment"]["id"] for _, body in answers}

    state = backend_state(tmp_path)
    deadline = time.monotonic() + 30
    while len(state.calls()) < 10:  # kill it mid-flight
        assert time.monotonic() < deadline
        time.sleep(0.05)
    server.stop(signal.SIGKILL)

    restarted = serve(config, name="second")
    deployments = wait_all_terminal(restarted, 100)
    assert {d["id"] for d in deployments} == accepted
    assert all(d["status"] in ("succeeded", "superseded") for d in deployments), Counter(
        d["status"] for d in deployments
    )
    assert_each_app_target_runs_its_newest_tag(deployments, tmp_path)
    jobs = [d["id"] for d in deployments if d["kind"] == "job"]
    runs = Counter(call["deployment"] for call in state.calls("run"))
    assert len(jobs) == 30
    assert all(runs[job] == 1 for job in jobs), runs


def test_a_burst_for_one_target_coalesces_to_one_rollout_at_a_time(tmp_path, serve):
    config = fleet_config(tmp_path, apps=1, jobs=0, rollout_seconds=0.3)
    server = serve(config)
    token = create_hook(server, "app0")
    with ThreadPoolExecutor(64) as pool:
        answers = list(
            pool.map(lambda n: post_hook(server, token, {"imageTag": f"1.{n}"}), range(200))
        )
    assert [status for status, _ in answers] == [201] * 200

    deployments = wait_all_terminal(server, 200)
    by_id = {d["id"]: d for d in deployments}
    assert len(by_id) == 200
    assert_each_app_target_runs_its_newest_tag(deployments, tmp_path)
    statuses = Counter(d["status"] for d in deployments)
    assert set(statuses) == {"succeeded", "superseded"}
    deploys = backend_state(tmp_path).calls("deploy")
    assert statuses["succeeded"] == len(deploys) < 200
    for deployment in deployments:
        if deployment["status"] == "superseded":
            assert deployment["supersededBy"] in by_id
            assert deployment["supersededBy"] > deployment["id"]


def test_hundreds_of_waiting_ci_jobs_do_not_hold_up_new_hook_requests(tmp_path, serve):
    config = fleet_config(tmp_path, apps=2, jobs=0, timeout=3)
    server = serve(config)
    waiting_token, other_token = create_hook(server, "app0"), create_hook(server, "app1")
    status, _ = post_hook(server, waiting_token, {"imageTag": "hang-0"})  # holds app0 for 3 s
    assert status == 201
    state = backend_state(tmp_path)
    deadline = time.monotonic() + 10
    while not state.calls("deploy"):  # the hanging rollout has started
        assert time.monotonic() < deadline
        time.sleep(0.02)

    def waiting_ci_job(n: int) -> tuple[int, float]:
        status, _ = post_hook(server, waiting_token, {"imageTag": f"1.{n}"}, "?wait=10")
        return status, time.monotonic()

    with ThreadPoolExecutor(200) as waiters_pool:
        waiting = [waiters_pool.submit(waiting_ci_job, n) for n in range(200)]
        time.sleep(0.5)  # let the waiters connect and wait
        with ThreadPoolExecutor(8) as pool:
            fresh = list(
                pool.map(
                    lambda n: post_hook(server, other_token, {"imageTag": f"2.{n}"}), range(50)
                )
            )
        fresh_done = time.monotonic()
        assert [status for status, _ in fresh] == [201] * 50
        assert not any(w.done() for w in waiting)  # the fresh requests did not queue behind them
        outcomes = [w.result() for w in waiting]
    codes = Counter(status for status, _ in outcomes)
    assert set(codes) <= {201, 409}, codes  # the newest succeeds; the rest were superseded
    assert codes[201] == 1
    assert min(at for _, at in outcomes) > fresh_done


# -- several replicas on PostgreSQL ------------------------------------------------------------


def test_two_replicas_share_the_work_and_one_takes_over_a_killed_ones(
    tmp_path, postgres_url, serve
):
    config = fleet_config(
        tmp_path, apps=6, jobs=2, database_url=postgres_url, rollout_seconds=0.5, threads=4
    )
    first = serve(config, name="first")
    second = serve(config, name="second")
    targets = [f"app{i}" for i in range(6)] + ["job0", "job1"]
    tokens = {t: create_hook(first, t) for t in targets}
    deadline = time.monotonic() + 30
    while not all("scripted backend ready" in s.log() for s in (first, second)):
        assert time.monotonic() < deadline, "both engines should start"  # else one does it all
        time.sleep(0.05)

    def send(n: int) -> str:
        target = targets[n % len(targets)]
        server = (first, second)[n % 2]
        status, body = post_hook(
            server, tokens[target], {"imageTag": f"{n}.0"} if target.startswith("app") else {}
        )
        assert status == 201, body
        return body["deployment"]["id"]

    with ThreadPoolExecutor(8) as pool:
        accepted = set(pool.map(send, range(48)))

    state = backend_state(tmp_path)
    servers = {first.process.pid, second.process.pid}  # each leads its process group
    deadline = time.monotonic() + 30
    while {c["server"] for c in state.calls()} != servers:  # both are working
        assert time.monotonic() < deadline, "both replicas should take work"
        time.sleep(0.05)
    killed_at = time.time()
    first.stop(signal.SIGKILL)

    deployments = wait_all_terminal(second, 48)
    assert {d["id"] for d in deployments} == accepted
    assert all(d["status"] in ("succeeded", "superseded") for d in deployments)
    assert_each_app_target_runs_its_newest_tag(deployments, tmp_path)

    # no double dispatch: a deployment is started by one process, or resumed after a kill
    starts: dict[str, list[dict]] = {}
    for call in state.calls():
        if call["op"] in ("deploy", "run"):
            starts.setdefault(call["deployment"], []).append(call)
    for calls in starts.values():
        assert len(calls) <= 2, calls
        if len(calls) == 2:
            assert calls[0]["server"] == first.process.pid and calls[0]["at"] < killed_at
            assert calls[1]["server"] == second.process.pid
    runs = Counter(c["deployment"] for c in state.calls("run"))
    assert all(count == 1 for count in runs.values())


@pytest.mark.parametrize("deferred", [True, False])
def test_an_http_worker_can_leave_checkpoints_to_the_engine(harness_factory, deferred):
    """`serve`'s workers never stall on a checkpoint's disk syncs; its engine process does them."""
    quiet = harness_factory(start=False)
    storage = quiet.instance.storage
    if deferred:
        storage.defer_checkpoints()
    token = quiet.new_hook("web")
    for n in range(500):  # a commit each, writing three pages or more to the log
        assert quiet.post_hook(token, {"imageTag": f"{n}.0"}).status_code == 201
    frames, copied = storage.checkpoint()
    if deferred:  # past SQLite's automatic checkpoint at 1 000 pages: none ran
        assert frames > 1000
        assert copied == frames
    else:
        assert frames < 1000
