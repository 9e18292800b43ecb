"""Durability under real processes: SIGKILL mid-flight, bursts, hundreds of waiting CI jobs,
and several replicas sharing one PostgreSQL database."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.parse
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path

import pytest
import scripted_backend
from conftest import (
    ADMIN_TOKEN,
    SHIPHOOK,
    Server,
    free_port,
    plugin_env,
    replaced_by,
    run_cli,
    write_config,
)
from shiphook import tokens
from shiphook.db import connect_on_loop, create_db_engine, upgrade
from shiphook.deployer.process import RESTART_DELAY
from shiphook.errors import DatabaseUnavailable
from shiphook.fastpath import checkpoint
from shiphook.models import Deployment, DeploymentCreate, Status, utcnow
from shiphook.storage import Storage, _in_progress_on, _next_queued, _supersede
from shiphook.testing import eventually
from shiphook.tokens import TOKEN_HEADER
from test_http_limits import connect, read_answer, unread_requests
from uuid_utils import uuid7

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
    lease_seconds: float = 2,
    server: str = "",
) -> Path:
    """`apps` app targets and `jobs` job targets on one scripted backend sharing `tmp_path`;
    `server` holds more `[server]` lines."""
    text = f"""
        [server]
        database_url = "{database_url or f"sqlite:///{tmp_path}/shiphook.db"}"
        {server}
        [deployer]
        lease_seconds = {lease_seconds}
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


def post_hook(
    server: Server, token: str, body: dict, query: str = "", headers: dict | None = None
) -> tuple[int, dict]:
    status, _, raw = server.request(
        "POST",
        f"/api/v1/dh{query}",
        json.dumps(body).encode(),
        {"X-Deploy-Hook-Token": token, **(headers or {})},
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
    eventually(lambda: len(state.calls()) >= 10, "ten backend calls", timeout=30)
    server.stop(signal.SIGKILL)  # mid-flight

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


def wait_deploy_called(tmp_path: Path) -> None:
    eventually(lambda: backend_state(tmp_path).calls("deploy"), "the rollout's start", timeout=10)


def test_superseded_waiting_ci_jobs_are_answered_while_the_running_rollout_goes_on(tmp_path, serve):
    config = fleet_config(tmp_path, apps=1, jobs=0, timeout=300)
    server = serve(config)
    token = create_hook(server, "app0")
    status, body = post_hook(server, token, {"imageTag": "hang-0"})  # holds app0 for 300 s
    assert status == 201
    running = body["deployment"]["id"]
    wait_deploy_called(tmp_path)

    pool = ThreadPoolExecutor(12)
    burst = [
        pool.submit(post_hook, server, token, {"imageTag": f"1.{n}"}, "?wait=25") for n in range(12)
    ]
    answered, pending = [], set(burst)
    while len(pending) > 1:  # every waiter but one is answered, the rollout still going on
        done, pending = wait(pending, timeout=60, return_when=FIRST_COMPLETED)
        assert done, f"{len(pending)} waiting CI jobs were not answered"
        answered += [future.result() for future in done]
    shown = {d["id"]: d for d in all_deployments(server)}
    access = "shiphook.access: POST /api/v1/dh 409 deployment"
    eventually(lambda: server.log().count(access) >= 11, "an access line per answer", timeout=10)
    log = server.log()
    server.stop(signal.SIGKILL)  # ends the last one's wait
    pool.shutdown()

    assert shown[running]["status"] == "in_progress"
    newest = max(shown)
    assert shown[newest]["status"] == "queued"
    assert [status for status, _ in answered] == [409] * 11
    for _, body in answered:
        deployment = body["deployment"]
        assert deployment["status"] == "superseded"
        successor = shown[deployment["supersededBy"]]
        assert successor["id"] > deployment["id"]
        assert body["description"] == (
            f"deployment {deployment['id']} was superseded by deployment {successor['id']} "
            f"(tag {successor['imageTag']})"
        )
        assert replaced_by(shown, deployment["id"]) == newest
    assert log.count(access) == 11
    assert token not in log


def test_a_restarted_server_resumes_a_killed_ones_rollout_at_once(tmp_path, serve):
    # a lease outlives the test: the dead deployer's rollout is taken over because it is gone
    config = fleet_config(tmp_path, apps=1, jobs=0, rollout_seconds=1.5, lease_seconds=300)
    server = serve(config, name="first")
    status, body = post_hook(server, create_hook(server, "app0"), {"imageTag": "1.0"})
    assert status == 201
    deployment_id = body["deployment"]["id"]
    eventually(lambda: all_deployments(server)[0]["backendRef"], "the rollout's start", timeout=10)
    server.stop(signal.SIGKILL)

    restarted = serve(config, name="second")
    (deployment,) = wait_all_terminal(restarted, 1, timeout=60)
    assert deployment["status"] == "succeeded", deployment
    assert len(backend_state(tmp_path).calls("deploy")) == 1
    assert f"resuming deployment {deployment_id} of target app0 after a restart" in (
        restarted.log()
    )


def test_hundreds_of_waiting_ci_jobs_do_not_hold_up_new_hook_requests(tmp_path, serve):
    config = fleet_config(tmp_path, apps=2, jobs=0, timeout=5)
    server = serve(config)
    waiting_token, other_token = create_hook(server, "app0"), create_hook(server, "app1")
    hanging = ({"imageTag": "hang-0"}, "", {"Idempotency-Key": "hang"})
    status, _ = post_hook(server, waiting_token, *hanging)  # holds app0 for 5 s
    assert status == 201
    wait_deploy_called(tmp_path)  # the hanging rollout has started

    body = json.dumps(hanging[0]).encode()
    retry = (  # the same request again, waiting for the hanging deployment
        f"POST /api/v1/dh?wait=20 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        f"X-Deploy-Hook-Token: {waiting_token}\r\nIdempotency-Key: hang\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    waiting_ci_jobs = [connect(server) for _ in range(200)]
    for sock in waiting_ci_jobs:
        sock.sendall(retry)
    eventually(lambda: not unread_requests(server, waiting_ci_jobs), "the waiting jobs' reading")

    def answer(sock: socket.socket) -> tuple[int, float]:
        with sock:
            status, _, _ = read_answer(sock)
        return status, time.monotonic()

    with ThreadPoolExecutor(200) as waiters_pool:
        waiting = [waiters_pool.submit(answer, sock) for sock in waiting_ci_jobs]
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
    assert [status for status, _ in outcomes] == [502] * 200  # rolled back at its timeout
    assert min(at for _, at in outcomes) > fresh_done


# -- stopping ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("workers", "to_group"),
    [(1, False), (1, True), (2, True)],
    ids=["sigterm-to-serve", "sigterm-to-the-group", "sigterm-to-the-group-2-workers"],
)
def test_a_stopped_server_answers_its_waiting_callers_at_once_and_loses_nothing(
    tmp_path, serve, workers, to_group
):
    config = fleet_config(
        tmp_path,
        apps=4,
        jobs=0,
        rollout_seconds=10,
        timeout=120,
        server=f"max_wait = 900\nworkers = {workers}\nshutdown_timeout = 10",
    )
    server = serve(config, name="first")
    tokens = [create_hook(server, f"app{i}") for i in range(4)]
    state = backend_state(tmp_path)

    def waiting_ci_job(token: str) -> tuple[int, dict, dict]:
        status, headers, raw = server.request(
            "POST", "/api/v1/dh?wait=900", b'{"imageTag": "2.0"}', {"X-Deploy-Hook-Token": token}
        )
        return status, {k.lower(): v for k, v in headers.items()}, json.loads(raw)

    body = b'{"imageTag": "2.0"}'
    slow = connect(server)  # a ?wait request still sending its body when the stop begins
    slow.sendall(
        b"POST /api/v1/dh?wait=900 HTTP/1.1\r\nHost: x\r\nX-Deploy-Hook-Token: %s\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (tokens[3].encode(), len(body), body[:5])
    )
    partial = connect(server)  # and a request whose head has begun
    partial.sendall(b"GET /healthz HTTP/1.1\r\nHost:")
    with ThreadPoolExecutor(3) as pool:
        waiting = [pool.submit(waiting_ci_job, token) for token in tokens[:3]]
        # every rollout under way, every caller waiting
        eventually(lambda: len(state.calls("deploy")) >= 3, "three rollouts", timeout=30)
        if to_group:  # as systemd does: serve, its HTTP worker(s) and its deployer process
            os.killpg(server.process.pid, signal.SIGTERM)
        else:
            server.process.send_signal(signal.SIGTERM)
        answers = [w.result() for w in waiting]
        # the stop waits for the slow request: longer than the deployer's supervisor takes to
        # restart a deployer that went away
        time.sleep(2 * RESTART_DELAY)
        slow.sendall(body[5:])
        status, headers, raw = read_answer(slow)
        answers.append((status, headers, json.loads(raw)))
    assert server.process.wait(30) == 0  # far from max_wait, and before the rollouts end

    for status, headers, answer in answers:
        deployment = answer["deployment"]
        assert status == 504, answer
        # the rollouts go on: their callers did not wait for them
        assert deployment["status"] == "in_progress" or deployment["target"] == "app3"
        assert "the server is shutting down; it goes on" in answer["description"]
        assert headers["location"] == f"/api/v1/deployments/{deployment['id']}"
    status, _, raw = read_answer(partial)
    assert status == 503 and "shutting down" in json.loads(raw)["description"]
    log = server.log()
    assert " ERROR " not in log and "starting a new" not in log, log

    restarted = serve(config, name="second")
    deployments = wait_all_terminal(restarted, 4)
    assert {d["id"] for d in deployments} == {a["deployment"]["id"] for *_, a in answers}
    assert [d["status"] for d in deployments] == ["succeeded"] * 4
    deploys = Counter(call["deployment"] for call in state.calls("deploy"))
    assert sorted(deploys.values()) == [1] * 4  # each resumed, none deployed twice


@pytest.mark.parametrize(
    ("workers", "to_group"),
    [(1, False), (2, False), (2, True)],
    ids=["kill-hup", "kill-hup-2-workers", "terminal-closed-2-workers"],
)
def test_sighup_stops_the_server_in_order_as_sigterm_does(tmp_path, serve, workers, to_group):
    """Not at once (Python's default), nor by restarting the HTTP workers (uvicorn's)."""
    config = fleet_config(
        tmp_path, apps=1, jobs=0, rollout_seconds=10, timeout=120, server=f"workers = {workers}"
    )
    server = serve(config)
    token = create_hook(server, "app0")
    state = backend_state(tmp_path)
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(
            server.request,
            "POST",
            "/api/v1/dh?wait=900",
            b'{"imageTag": "2.0"}',
            {"X-Deploy-Hook-Token": token},
        )
        eventually(lambda: state.calls("deploy"), "the rollout under way", timeout=30)
        (os.killpg if to_group else os.kill)(server.process.pid, signal.SIGHUP)
        status, _, raw = waiting.result()
    assert status == 504, raw
    assert "the server is shutting down; it goes on" in json.loads(raw)["description"]
    assert server.process.wait(30) == 0
    log = server.log()
    assert "shiphook stopped" in log and " ERROR " not in log, log


def test_a_log_pipe_whose_reader_is_gone_costs_its_lines_not_the_server(tmp_path):
    """serve's stderr a pipe whose reader stopped (a `| logger` killed): the server goes on
    answering, without spinning on the failed writes, and stops on SIGTERM."""
    port, config = free_port(), fleet_config(tmp_path, apps=1, jobs=0)
    process = subprocess.Popen(
        [SHIPHOOK, "--config", str(config), "serve", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=plugin_env(),
        start_new_session=True,
    )
    server = Server(process, f"http://127.0.0.1:{port}", tmp_path / "unused.log")
    try:
        eventually(lambda: answers(server), "serve answering")
        process.stdout.close()
        for _ in range(3):  # each an access line, an error's among them
            status, _, _ = server.request("POST", "/api/v1/dh", b"{}", {TOKEN_HEADER: "x"})
            assert status == 404
        before = cpu_seconds(process.pid)
        time.sleep(2)
        assert cpu_seconds(process.pid) - before < 1, "the server spins"
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
    finally:
        server.stop(signal.SIGKILL)


def test_hook_requests_are_accepted_again_once_the_database_file_is_writable_again(tmp_path, serve):
    """A write-ahead log made immutable (`chattr +i`, a file system gone read-only) at the
    server's first hook request: 503 while it lasts, 201 once it is writable again."""
    config = fleet_config(tmp_path, apps=1, jobs=0)
    created = run_cli("hooks", "create", "app0", "--name", "ci", "--json", config=config)
    token = json.loads(created.stdout)["token"]
    server = serve(config)
    wal = tmp_path / "shiphook.db-wal"
    if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(wal)]).returncode:
        pytest.skip("chattr +i needs e2fsprogs, root and a file system that has it")
    try:
        assert post_hook(server, token, {"imageTag": "2.0"})[0] == 503
    finally:
        subprocess.run(["chattr", "-i", str(wal)], check=True)
    eventually(lambda: post_hook(server, token, {"imageTag": "2.1"})[0] == 201, "a 201 again")
    assert "database reachable again" in server.log()


def replace_or_remove(database: Path, how: str) -> None:
    if how == "removed":
        database.unlink()
    else:  # a copy put in its place (a backup restored under the running server)
        copy = database.with_name("copy.db")
        shutil.copy(database, copy)
        os.replace(copy, database)


@pytest.mark.parametrize("how", ["removed", "replaced"])
def test_a_database_file_removed_or_replaced_under_shiphook_takes_no_201_and_starts_nothing(
    harness_factory, how
):
    """Every connection open goes on writing to the old file, which no later start reads: a
    201 for what it commits would be a deployment lost, and the deployer would start
    deployments from it."""
    harness = harness_factory(start=False)
    token = harness.new_hook("web")
    assert harness.post_hook(token, {"imageTag": "1.0"}).status_code == 201
    replace_or_remove(Path(harness.instance.storage.engine.url.database), how)
    refused = harness.post_hook(token, {"imageTag": "1.1"})
    assert refused.status_code == 503, refused.text
    assert refused.json["cause"] == "DatabaseFileGone"
    harness.deployer.start()
    time.sleep(1)  # several scans
    assert backend_state(harness.instance.config.path.parent).calls() == []


@pytest.mark.parametrize("how", ["removed", "replaced"])
@pytest.mark.parametrize("after", ["start", "a deployment"])
def test_serve_stops_when_its_database_file_is_removed_or_replaced(tmp_path, serve, how, after):
    """Right after the start, the deployer process has not connected yet: it must take the
    file serve migrated for the database, not whatever it finds at the path."""
    config = fleet_config(tmp_path, apps=1, jobs=0)
    server = serve(config)
    if after == "a deployment":
        token = create_hook(server, "app0")
        deployed = post_hook(server, token, {"imageTag": "1.0"})[1]["deployment"]["id"]
        eventually(lambda: deployment_status(server, deployed) == "succeeded", "a deployment")
    replace_or_remove(tmp_path / "shiphook.db", how)
    assert server.process.wait(30) == 2
    said = server.log().splitlines()[-1]
    assert said == (
        f"shiphook: the database file {tmp_path / 'shiphook.db'} was removed or replaced while "
        "shiphook ran: stopped, so that nothing more is written where no later start reads it "
        "(stop shiphook before you move, remove or restore the file)"
    )
    assert "Traceback" not in server.log()
    if how == "removed":
        assert not (tmp_path / "shiphook.db").exists()  # no empty database in its place


def answers(server: Server) -> bool:
    try:
        return server.request("GET", "/healthz")[0] == 200
    except OSError:
        return False


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_a_waiting_ci_job_that_went_away_holds_up_neither_the_server_nor_its_stop(tmp_path, serve):
    """A `?wait` caller whose connection closed (a CI job cancelled, curl -m) is waited for no
    longer: the stop does not wait its shutdown_timeout for it and logs no error."""
    config = fleet_config(
        tmp_path, apps=1, jobs=0, rollout_seconds=60, server="shutdown_timeout = 10"
    )
    server = serve(config)
    token = create_hook(server, "app0")
    state = backend_state(tmp_path)
    body = b'{"imageTag": "2.0"}'
    gone = connect(server)
    gone.sendall(
        b"POST /api/v1/dh?wait=900 HTTP/1.1\r\nHost: x\r\nX-Deploy-Hook-Token: %s\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (token.encode(), len(body), body)
    )
    eventually(lambda: state.calls("deploy"), "the rollout under way", timeout=30)
    gone.close()
    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(30) == 0
    log = server.log()
    assert " ERROR " not in log and "Traceback" not in log, log


def test_a_stop_does_not_wait_for_a_backend_call_that_hangs_and_the_next_start_resumes(
    tmp_path, serve
):
    config = fleet_config(
        tmp_path, apps=1, jobs=0, server="database_timeout = 1\nshutdown_timeout = 2"
    )
    config.write_text(config.read_text().replace("polls = 5", "polls = 5\nstall_seconds = 8"))
    server = serve(config, name="first")
    token = create_hook(server, "app0")
    status, body = post_hook(server, token, {"imageTag": "stall-1"})
    assert status == 201
    eventually(
        lambda: deployment_status(server, body["deployment"]["id"]) == "in_progress",
        "the rollout's start",
        timeout=30,
    )
    server.process.send_signal(signal.SIGTERM)  # while deploy hangs, for 8 s
    assert server.process.wait(30) == 0
    assert backend_state(tmp_path).calls("deploy") == []  # it had not returned
    assert " ERROR " not in server.log() and " WARNING " not in server.log(), server.log()
    left = f"deployment {body['deployment']['id']} of app0: left in progress by the stop; it "
    assert left + "resumes at the next start" in server.log()

    restarted = serve(config, name="second")
    [deployment] = wait_all_terminal(restarted, 1)
    assert deployment["status"] == "succeeded", deployment


def deployment_status(server: Server, deployment_id: str) -> str:
    status, _, raw = server.request("GET", f"/api/v1/deployments/{deployment_id}", headers=ADMIN)
    assert status == 200, raw
    return json.loads(raw)["deployment"]["status"]


def deployer_process(server: Server) -> int | None:
    """The pid of the deployer process of a `shiphook serve` with one HTTP worker, if it has one."""
    children: list[str] = []
    for thread in Path(f"/proc/{server.process.pid}/task").iterdir():  # each lists its own
        with contextlib.suppress(FileNotFoundError):  # gone since
            children += (thread / "children").read_text().split()
    for child in children:
        with contextlib.suppress(FileNotFoundError):
            if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes():
                return int(child)
    return None


def test_the_deployer_ignores_sigterm_and_a_dead_deployer_is_replaced(tmp_path, serve):
    server = serve(fleet_config(tmp_path, apps=1, jobs=0))
    token = create_hook(server, "app0")
    deployer = deployer_process(server)
    assert deployer is not None
    os.kill(deployer, signal.SIGTERM)  # serve stops it, when serve stops
    assert post_hook(server, token, {"imageTag": "1.0"}, "?wait=30")[0] == 201
    assert deployer_process(server) == deployer

    os.kill(deployer, signal.SIGKILL)
    eventually(
        lambda: deployer_process(server) not in (deployer, None), "a new deployer", timeout=30
    )
    assert post_hook(server, token, {"imageTag": "2.0"}, "?wait=30")[0] == 201
    assert "deployer process exited with status -9; starting a new one" in server.log()

    # a stop after a restart stops both (the killed deployer had been waiting to be stopped)
    replacement = deployer_process(server)
    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(30) == 0
    assert "shiphook stopped" in server.log()
    eventually(lambda: not Path(f"/proc/{replacement}").exists(), "the deployer gone")


def alive(pid: int) -> bool:
    """Whether the process runs (a zombie, ended but not yet reaped, does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("workers", [1, 2])
def test_the_processes_of_a_serve_that_was_killed_stop(tmp_path, serve, workers):
    """Its deployer, and its HTTP workers when there are several: none takes hooks that no
    deployer runs, nor holds the port a new serve needs."""
    server = serve(fleet_config(tmp_path, apps=1, jobs=0, server=f"workers = {workers}"))
    children = Path(f"/proc/{server.process.pid}/task/{server.process.pid}/children")
    eventually(lambda: len(children.read_text().split()) > workers, "serve's processes")
    spawned = [
        int(pid)
        for pid in children.read_text().split()
        if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()
    ]
    assert len(spawned) == workers + (workers > 1), spawned  # the deployer, and the workers
    os.kill(server.process.pid, signal.SIGKILL)  # serve alone, not its process group
    server.process.wait()
    for pid in spawned:
        eventually(lambda pid=pid: not alive(pid), f"process {pid} gone", timeout=30)


def test_http_workers_slow_to_start_on_a_busy_machine_are_not_killed(tmp_path, serve):
    """uvicorn kills a worker that does not answer its supervisor's health check in time, and
    starts another, which meets the same: a machine slow enough (a start taking 7 s here, as
    under a load of 6 on 2 cores) would never get its workers serving."""
    slow = tmp_path / "slow"
    slow.mkdir()
    (slow / "sitecustomize.py").write_text(  # sys.argv is not set yet when this runs
        "import time\nif b'spawn_main' in open('/proc/self/cmdline', 'rb').read(): time.sleep(7)\n"
    )
    env = plugin_env()
    env["PYTHONPATH"] = os.pathsep.join([str(slow), env["PYTHONPATH"]])
    server = serve(fleet_config(tmp_path, apps=1, jobs=0, server="workers = 2"), env=env)
    token = create_hook(server, "app0")
    assert post_hook(server, token, {"imageTag": "1.0"})[0] == 201
    assert "died" not in server.log(), server.log()


def test_what_a_plugin_starts_can_be_stopped_with_sigterm(tmp_path, serve):
    """The deployer process keeps SIGTERM and SIGINT from stopping it (serve stops it when
    done) with handlers, not by ignoring them: an ignored signal stays ignored in every
    process a plugin starts (kubectl, a helper daemon), which SIGTERM then cannot stop."""
    server = serve(fleet_config(tmp_path, apps=1, jobs=0))
    eventually(lambda: "backend ready" in server.log(), "the deployer process started")
    status = Path(f"/proc/{deployer_process(server)}/status").read_text()
    masks = dict(line.split(":\t") for line in status.splitlines() if line.startswith("Sig"))
    for signum in (signal.SIGTERM, signal.SIGINT):
        bit = 1 << (signum - 1)
        assert not int(masks["SigIgn"], 16) & bit, (signum.name, masks)
        assert int(masks["SigCgt"], 16) & bit, (signum.name, masks)


# a plugin module that notes, in each process that loads it, whether the admin token is there
ENVIRONMENT_SPY = """
import os
from pathlib import Path

from scripted_backend import ScriptedBackend
from shiphook import hookimpl


class SpyBackend(ScriptedBackend):
    name = "environment-spy"


@hookimpl
def register_backends(register):
    seen = "admin token" if os.environ.get("SHIPHOOK_ADMIN_TOKEN") else "no admin token"
    Path(os.environ["SPY_DIRECTORY"], str(os.getpid())).write_text(seen)
    register(SpyBackend)
"""


@pytest.mark.parametrize("workers", [1, 2])
def test_the_admin_token_reaches_no_plugin_in_any_process_of_serve(tmp_path, serve, workers):
    """`serve` keeps the token's SHA-256 in its place: the HTTP workers still check it."""
    (tmp_path / "environment_spy.py").write_text(ENVIRONMENT_SPY)
    spied = tmp_path / "spied"
    spied.mkdir()
    env = plugin_env(SPY_DIRECTORY=str(spied))
    env["PYTHONPATH"] += os.pathsep + str(tmp_path)
    env["SHIPHOOK_PLUGINS"] += ",environment_spy"
    config = fleet_config(tmp_path, apps=1, jobs=0, server=f"workers = {workers}")
    server = serve(config, env=env)
    # serve, its deployer process, and each HTTP worker of several
    eventually(lambda: len(list(spied.iterdir())) == 2 + (workers > 1) * workers, "all loaded")
    assert {path.read_text() for path in spied.iterdir()} == {"no admin token"}
    for _ in range(4):  # whichever worker answers
        assert server.request("GET", "/api/v1/targets", headers=ADMIN)[0] == 200
        assert (
            server.request("GET", "/api/v1/targets", headers={"Authorization": "Bearer x"})[0]
            == 401
        )


def test_the_admin_api_opens_with_the_token_s_digest_alone(tmp_path, serve):
    """`SHIPHOOK_ADMIN_TOKEN_SHA256` instead of the token: the server never holds the token."""
    env = plugin_env(SHIPHOOK_ADMIN_TOKEN_SHA256=tokens.digest(ADMIN_TOKEN))
    del env["SHIPHOOK_ADMIN_TOKEN"]
    server = serve(fleet_config(tmp_path, apps=1, jobs=0), env=env)
    assert "admin API on" in server.log()
    assert server.request("GET", "/api/v1/targets", headers=ADMIN)[0] == 200
    wrong = {"Authorization": f"Bearer {tokens.digest(ADMIN_TOKEN)}"}  # the digest is no token
    assert server.request("GET", "/api/v1/targets", headers=wrong)[0] == 401


# -- several replicas on PostgreSQL ------------------------------------------------------------


# a replica's start-up up to its migration, which waits for a line on stdin to begin
MIGRATING_REPLICA = """
import sys
from shiphook.db import create_db_engine, upgrade
engine = create_db_engine(sys.argv[1])
engine.connect().close()
print("ready", flush=True)
sys.stdin.readline()
upgrade(engine)
"""


@pytest.mark.parametrize("attempt", range(3))
def test_replicas_starting_together_on_a_new_database_all_migrate_it(
    tmp_path, postgres_url, attempt
):
    replicas = [
        subprocess.Popen(
            [sys.executable, "-c", MIGRATING_REPLICA, postgres_url],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    for replica in replicas:
        assert replica.stdout.readline() == "ready\n", replica.communicate()[1]
    for replica in replicas:  # both start migrating at once
        replica.stdin.write("go\n")
        replica.stdin.flush()
    for replica in replicas:
        _, stderr = replica.communicate(timeout=60)
        assert replica.returncode == 0, stderr
    config = fleet_config(tmp_path, apps=1, jobs=0, database_url=postgres_url)
    assert "the latest" in run_cli("check", config=config).stdout


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
    eventually(  # else one does it all
        lambda: all("scripted backend ready" in s.log() for s in (first, second)),
        "both deployers' start",
        timeout=30,
    )

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
    eventually(
        lambda: {c["server"] for c in state.calls()} == servers, "both replicas' work", timeout=30
    )
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


def test_replicas_superseding_one_target_at_once_do_not_deadlock(postgres_url):
    """Two replicas' deployers supersede and start one app target's deployments while hook
    requests keep arriving: each takes the rows the other has not locked, rather than wait
    for them in another order (PostgreSQL aborted one of the two, "deadlock detected", about
    once a second)."""
    engines = [create_db_engine(postgres_url) for _ in range(3)]
    upgrade(engines[0])
    replicas, accepting = [Storage(e) for e in engines[:2]], Storage(engines[2])
    failures: Counter[str] = Counter()
    started: list[str] = []
    until = time.monotonic() + 4

    def accept() -> None:
        while time.monotonic() < until:
            for _ in range(50):
                accepting.add_deployment(
                    new=DeploymentCreate(
                        id=str(uuid7()),
                        target="web",
                        kind="app",
                        created_at=utcnow(),
                        image_tag="1.0",
                    )
                )

    def work(storage: Storage, slot: int, starts: bool) -> None:
        while time.monotonic() < until:
            try:
                if not starts:
                    storage.supersede_queued(target="web", now=utcnow())
                    continue
                chosen, _, _ = storage.next_deployment(
                    target="web", slot=slot, kind="app", now=utcnow()
                )
                if chosen is not None:
                    started.append(chosen.id)
                    storage.update_deployment(
                        deployment_id=chosen.id, now=utcnow(), status=Status.succeeded
                    )
            except Exception as exc:
                failures[type(getattr(exc, "orig", exc)).__name__] += 1

    try:
        threads = [threading.Thread(target=accept)] + [
            threading.Thread(target=work, args=(replica, slot, starts))
            for slot, replica in enumerate(replicas)
            for starts in (True, False)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not failures, failures
        assert started
    finally:
        for storage in (*replicas, accepting):
            storage.close()
        for engine in engines:
            engine.dispose()


def test_a_deployment_a_failed_superseder_had_locked_is_still_superseded(postgres_url):
    """A replica that locked older queued deployments to supersede them, then failed before
    its commit (a lost connection, a kill), must not leave them queued behind a newer one that
    another replica started meanwhile: they would be rolled out after it, a downgrade."""
    engine = create_db_engine(postgres_url)
    upgrade(engine)
    storage = Storage(engine)
    try:
        a, b, c = [
            DeploymentCreate(
                id=str(uuid7()), target="web", kind="app", created_at=utcnow(), image_tag=tag
            )
            for tag in ("1.0", "1.1", "1.2")
        ]
        for new in (a, b, c):
            storage.add_deployment(new=new)
        failing = engine.connect()
        failing.begin()
        newest_then = Deployment(id=b.id, target="web", kind="app", image_tag="1.1")
        assert list(
            failing.execute(_supersede(newest_then, utcnow(), engine.dialect)).scalars()
        ) == [a.id]
        with ThreadPoolExecutor(1) as pool:
            started = pool.submit(
                storage.next_deployment, target="web", slot=0, kind="app", now=utcnow()
            )
            time.sleep(0.5)  # the other replica supersedes and starts c meanwhile
            failing.rollback()  # the superseder fails: a is queued again
            failing.close()
            chosen, superseded, _ = started.result(timeout=10)
        assert chosen is not None and chosen.id == c.id
        assert set(superseded) == {a.id, b.id}
        statuses = storage.statuses(deployment_ids=[a.id, b.id, c.id])
        assert statuses == {a.id: "superseded", b.id: "superseded", c.id: "in_progress"}
    finally:
        storage.close()
        engine.dispose()


@pytest.mark.parametrize("query", ["in progress", "next app", "next job", "supersede"])
def test_the_deployers_queries_read_the_queue_not_the_history(database_url, query):
    """The deployer's queries find a target's queue through the status index, in order,
    however many finished deployments the table holds: SQLite walked the primary key from the
    oldest deployment on, to supersede or to start the next one, and PostgreSQL planned the
    supersede's `id IN (subquery)`, once autovacuum had analyzed the table, as a hash join over
    all of it (bench/README.md, sixteenth session)."""
    engine = create_db_engine(database_url)
    upgrade(engine)
    now = utcnow()
    try:
        with engine.begin() as connection:
            connection.execute(
                Deployment.__table__.insert(),
                [
                    {
                        "id": f"{n:08d}",
                        "target": "web",
                        "kind": "app",
                        "created_at": now,
                        "status": "superseded" if n < 20_000 else "queued",
                        "message": "",
                    }
                    for n in range(20_300)  # the finished ones older, as ids are by time
                ],
            )
            if engine.dialect.name == "postgresql":  # as autovacuum does; shiphook never
                connection.exec_driver_sql("ANALYZE deployment")  # analyzes SQLite
        newest = Deployment(id="00020299", target="web", kind="app", image_tag="1.0")
        statement = {
            "in progress": _in_progress_on("web", 0, "app"),
            "next app": _next_queued("web", "app"),
            "next job": _next_queued("web", "job"),
            "supersede": _supersede(newest, now, engine.dialect),
        }[query].compile(dialect=engine.dialect)
        explain = "EXPLAIN " if engine.dialect.name == "postgresql" else "EXPLAIN QUERY PLAN "
        params = statement.params
        if statement.positional:
            params = tuple(params[name] for name in statement.positiontup)
        with engine.connect() as connection:
            rows = connection.exec_driver_sql(explain + statement.string, params)
            plan = "\n".join(str(row[-1]) for row in rows)
        # the queue through the status index (PostgreSQL may sort the queue's rows); a
        # supersede's rows then each by its primary key: nothing reads the whole table
        assert "ix_deployment_status_target_id" in plan, plan
        if engine.dialect.name == "postgresql":
            assert not re.search(r"Seq Scan|Hash", plan), plan
            if query == "supersede":
                assert "Index Cond: ((id)::text = ANY" in plan, plan
        else:
            assert not re.search(r"^(SCAN|USE TEMP B-TREE)", plan, re.MULTILINE), plan
    finally:
        engine.dispose()


def test_a_transaction_aborted_for_a_conflict_is_not_the_database_unreachable(postgres_url):
    """A deadlock or a serialization failure is worth trying again; it is not logged as the
    database being unreachable, as a refused connection or a statement timeout is."""
    import psycopg
    from sqlalchemy.exc import OperationalError

    storage = Storage(create_db_engine(postgres_url))
    try:

        def wrapped(cause: Exception) -> OperationalError:
            return OperationalError("UPDATE deployment ...", {}, cause)

        assert not storage.unavailable(wrapped(psycopg.errors.DeadlockDetected("deadlock")))
        assert not storage.unavailable(wrapped(psycopg.errors.SerializationFailure("x")))
        assert storage.unavailable(wrapped(psycopg.errors.QueryCanceled("statement timeout")))
        assert storage.unavailable(wrapped(psycopg.OperationalError("connection refused")))

        def deadlocked() -> None:
            raise wrapped(psycopg.errors.DeadlockDetected("deadlock detected"))

        # an API call gets a 503 to try again, and the database is not taken for unreachable
        with pytest.raises(DatabaseUnavailable, match="DeadlockDetected"):
            asyncio.run(storage.call(deadlocked))
        assert storage.reachability.reachable
    finally:
        storage.close()


@pytest.mark.parametrize("deferred", [True, False])
def test_an_http_worker_can_leave_checkpoints_to_the_deployer(harness_factory, deferred):
    """`serve`'s workers never stall on a checkpoint's disk syncs; its deployer does them."""
    quiet = harness_factory(start=False)
    storage = quiet.instance.storage
    if deferred:
        storage.accept_path.defer_checkpoints()
    token = quiet.new_hook("web")
    for n in range(500):  # a commit each, writing three pages or more to the log
        assert quiet.post_hook(token, {"imageTag": f"{n}.0"}).status_code == 201
    frames, copied = checkpoint(storage.engine)
    if deferred:  # past SQLite's automatic checkpoint at 1 000 pages: none ran
        assert frames > 1000
        assert copied == frames
    else:
        assert frames < 1000


# -- the database failing ----------------------------------------------------------------------


def test_a_hook_request_waits_for_an_sqlite_write_lock_held_outside_shiphook(tmp_path, serve):
    """Another connection to the SQLite file (an operator's sqlite3 shell, a backup tool) holds
    its write lock: the accept path's commit waits for it (SQLite's busy handler tries again)
    rather than failing at once; past database_timeout the caller gets the README's 503, and the
    commit goes through once the lock is free."""
    server = serve(fleet_config(tmp_path, apps=1, jobs=0, server="database_timeout = 1"))
    token = create_hook(server, "app0")
    retry = {"Idempotency-Key": "build-1"}
    holder = sqlite3.connect(tmp_path / "shiphook.db", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # SQLite's write lock, until the COMMIT below
    try:
        status, body = post_hook(server, token, {"imageTag": "1.0"}, headers=retry)
        assert server.request("GET", "/healthz")[0] == 200
    finally:
        holder.execute("COMMIT")
        holder.close()
    # it waited for the lock: failing at once would be "database is locked", an OperationalError
    assert (status, body["cause"]) == (503, "TimeoutError"), body

    [deployment] = eventually(lambda: all_deployments(server), "the waiting commit", timeout=30)
    assert deployment["imageTag"] == "1.0"
    status, body = post_hook(server, token, {"imageTag": "1.0"}, headers=retry)
    assert status == 201 and body["deployment"]["id"] == deployment["id"], body


def test_every_postgresql_connection_has_connect_statement_and_keepalive_timeouts(postgres_url):
    engine = create_db_engine(postgres_url, timeout=3)
    try:
        with engine.connect() as connection:
            assert connection.exec_driver_sql("SHOW statement_timeout").scalar_one() == "3s"
            schema = connection.exec_driver_sql("SHOW search_path").scalar_one()
            assert schema.startswith("shiphook_")  # the URL's own options are kept
            given = connection.connection.dbapi_connection.info.get_parameters()
    finally:
        engine.dispose()
    assert given["connect_timeout"] == "3"
    assert (given["keepalives"], given["keepalives_idle"]) == ("1", "3")
    assert given["tcp_user_timeout"] == "3000"

    async def on_loop() -> tuple[str, str, dict[str, str]]:  # the accept path's, on PostgreSQL
        connect = connect_on_loop(engine, 3)
        assert connect is not None
        async with await connect() as connection:
            timeout = await (await connection.execute("SHOW statement_timeout")).fetchone()
            schema = await (await connection.execute("SHOW search_path")).fetchone()
            return timeout[0], schema[0], connection.info.get_parameters()

    timeout, schema, given_on_loop = asyncio.run(on_loop())
    assert timeout == "3s" and schema.startswith("shiphook_")
    assert {k: given_on_loop.get(k) for k in given} == given

    engine = create_db_engine(f"{postgres_url}&connect_timeout=10", timeout=3)  # the URL's wins
    try:
        with engine.connect() as connection:
            given = connection.connection.dbapi_connection.info.get_parameters()
    finally:
        engine.dispose()
    assert given["connect_timeout"] == "10"


class PostgresProxy:
    """A TCP proxy on loopback between shiphook and PostgreSQL that can go silent (stop
    forwarding bytes, connections left open, as a partition does) or refuse connections."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.port = 0
        self._flowing = threading.Event()
        self._flowing.set()
        self._sockets: list[socket.socket] = []
        self._listener: socket.socket | None = None
        self.open()

    def url(self, database_url: str) -> str:
        """`database_url` through this proxy."""
        parts = urllib.parse.urlsplit(database_url)
        netloc = f"{parts.username}@127.0.0.1:{self.port}"
        return urllib.parse.urlunsplit(parts._replace(netloc=netloc))

    def open(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self.port = listener.getsockname()[1]
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def pause(self) -> None:
        self._flowing.clear()

    def resume(self) -> None:
        self._flowing.set()

    def close(self) -> None:
        """Refuse new connections and reset the open ones, as a stopped PostgreSQL does."""
        assert self._listener is not None
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes its accept()
        self._listener.close()
        for sock in self._sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        self._sockets.clear()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:  # closed
                return
            server = socket.create_connection(self.upstream)
            self._sockets += [client, server]
            for source, sink in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                self._flowing.wait()
                sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)


@pytest.fixture
def postgres_proxy(postgres_url) -> Iterator[tuple[PostgresProxy, str]]:
    """A proxy to the test PostgreSQL, and the URL of the test's schema through it."""
    parts = urllib.parse.urlsplit(postgres_url)
    proxy = PostgresProxy((parts.hostname, parts.port or 5432))
    try:
        yield proxy, proxy.url(postgres_url)
    finally:
        proxy.resume()
        proxy.close()


def outage_config(tmp_path: Path, database_url: str) -> Path:
    config = fleet_config(tmp_path, apps=1, jobs=0, database_url=database_url)
    text = config.read_text().replace("[server]\n", "[server]\ndatabase_timeout = 2\n", 1)
    config.write_text(text)
    return config


def test_a_silent_database_gets_hooks_a_503_and_healthz_still_answers(
    tmp_path, postgres_proxy, serve
):
    proxy, database_url = postgres_proxy
    server = serve(outage_config(tmp_path, database_url))
    token = create_hook(server, "app0")
    assert post_hook(server, token, {"imageTag": "1.0"})[0] == 201

    proxy.pause()  # every byte to and from PostgreSQL held, no connection closed
    with ThreadPoolExecutor(4) as pool:
        silent = list(
            pool.map(lambda n: post_hook(server, token, {"imageTag": f"2.{n}"}), range(4))
        )
        assert server.request("GET", "/healthz")[0] == 200
    assert [status for status, _ in silent] == [503] * 4, silent
    assert all(body["cause"] == "TimeoutError" for _, body in silent), silent
    assert server.request("GET", "/healthz")[0] == 200

    proxy.resume()
    status, body = post_hook(server, token, {"imageTag": "3.0"})
    assert status == 201, body
    tags = {d["imageTag"] for d in all_deployments(server)}
    assert {"1.0", "3.0"} <= tags


def test_a_stop_does_not_wait_for_a_call_the_silent_database_never_answers(
    tmp_path, postgres_proxy, serve
):
    """Something between still acknowledges every packet but forwards none: no TCP timeout
    fires and the server's `statement_timeout` never arrives, yet SIGTERM stops `serve`
    without waiting for the database to come back (the calls left waiting in database
    threads end at their deadline)."""
    proxy, database_url = postgres_proxy
    server = serve(outage_config(tmp_path, database_url))
    token = create_hook(server, "app0")
    assert post_hook(server, token, {"imageTag": "1.0"})[0] == 201
    eventually(lambda: "rolling out" in server.log(), "the deployer at work", timeout=30)

    proxy.pause()
    assert post_hook(server, token, {"imageTag": "2.0"})[0] == 503
    # a call in a database thread: the caller has its 503, the thread waits on
    assert server.request("GET", "/api/v1/deployments", headers=ADMIN)[0] == 503
    # the HTTP worker logs it once; the deployer once or more (its scan, a stopped slot)
    both = "both processes met the silence"
    eventually(lambda: server.log().count("database unreachable") >= 2, both, timeout=30)
    server.process.send_signal(signal.SIGTERM)
    server.process.wait(30)  # raises TimeoutExpired while a call waits for the database
    assert server.process.returncode == 0, server.log()


@pytest.mark.parametrize("on_loop", [False, True], ids=["thread", "event loop"])
def test_a_call_the_silent_database_never_answers_ends_at_its_deadline(postgres_proxy, on_loop):
    """The same silence, one call: it fails a second past the server's statement_timeout
    (`database_timeout` in whole seconds), saying so, and the connection is given up (the
    pool, or the accept path, opens a new one)."""
    proxy, database_url = postgres_proxy
    engine = create_db_engine(database_url, timeout=1.5)
    try:
        if on_loop:

            async def call() -> None:
                connection = await connect_on_loop(engine, 1.5)()
                await connection.execute("SELECT 1")
                proxy.pause()
                try:
                    await connection.execute("SELECT 1")
                finally:
                    assert connection.closed
                    await connection.close()

            ended = ThreadPoolExecutor(1).submit(asyncio.run, call())
        else:
            connection = engine.connect()
            connection.exec_driver_sql("SELECT 1")
            proxy.pause()
            ended = ThreadPoolExecutor(1).submit(connection.exec_driver_sql, "SELECT 1")
        with pytest.raises(Exception, match=r"no answer from the database within 3 s"):
            ended.result(timeout=30)  # TimeoutError here: the call still waits
    finally:
        proxy.resume()
        engine.dispose()


def test_a_refusing_database_gets_hooks_a_503_and_logs_each_change_once(
    tmp_path, postgres_proxy, serve
):
    proxy, database_url = postgres_proxy
    server = serve(outage_config(tmp_path, database_url))
    token = create_hook(server, "app0")
    assert post_hook(server, token, {"imageTag": "1.0"})[0] == 201

    proxy.close()
    for n in range(5):
        status, headers, raw = server.request(
            "POST",
            "/api/v1/dh",
            json.dumps({"imageTag": f"2.{n}"}).encode(),
            {"X-Deploy-Hook-Token": token},
        )
        assert status == 503, raw
        assert int({k.lower(): v for k, v in headers.items()}["retry-after"]) > 0
        body = json.loads(raw)
        assert body["cause"] == "OperationalError"
        assert "postgres" not in body["description"] and "127.0.0.1" not in body["description"]
    assert server.request("GET", "/api/v1/deployments", headers=ADMIN)[0] == 503

    proxy.open()  # PostgreSQL is back, at the same address

    def accepted() -> bool:
        status = post_hook(server, token, {"imageTag": "3.0"})[0]
        assert status in (201, 503), status
        return status == 201

    eventually(accepted, "a hook request accepted again", timeout=30)
    log = [line for line in server.log().splitlines() if "shiphook.storage" in line]
    assert [line.split("shiphook.storage: ")[1].split(":")[0] for line in log] == [
        "database unreachable",
        "database reachable again",
    ], log
    assert "shiphook.http" not in server.log()  # no request failed unexpectedly


def test_while_the_database_refuses_connections_the_deployer_backs_off_and_logs_once(
    tmp_path, postgres_proxy, harness_factory, monkeypatch, caplog
):
    proxy, database_url = postgres_proxy
    monkeypatch.setenv("SHIPHOOK_DATABASE_URL", database_url)
    harness = harness_factory(start=False, server="\n[deployer]\nscan_interval = 0.2\n")
    deployment_id = harness.deploy(harness.new_hook("web"), {"imageTag": "1.0"})
    proxy.close()
    caplog.set_level(logging.INFO, logger="shiphook")
    harness.deployer.start()
    time.sleep(2)  # ten scan intervals: a busy loop would log hundreds of lines by now
    down = [r for r in caplog.records if r.name.startswith("shiphook")]
    assert [r.getMessage().split(":")[0] for r in down] == ["database unreachable"], down[:5]
    assert "Connection refused" in down[0].getMessage()
    assert down[0].exc_info is None

    proxy.open()
    assert harness.wait_for(deployment_id, timeout=30)["status"] == "succeeded"
    assert "database reachable again" in caplog.messages
