"""End to end: a real `shiphook serve` on a loopback port, the real CLI, and curl."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
from conftest import plugin_env, run_cli, scripted_config
from shiphook.testing import eventually

pytestmark = pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")


def curl(url: str, *args: str) -> tuple[int, dict]:
    """POST like a CI job does: `curl --data`, no Content-Type of its own."""
    result = subprocess.run(
        ["curl", "-sS", "-o", "-", "-w", "\n%{http_code}", "-X", "POST", url, *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    body, _, code = result.stdout.rpartition("\n")
    return int(code), json.loads(body) if body else {}


def wait_terminal(config, deployment_id: str, timeout: float = 20) -> dict:
    def ended() -> dict | None:
        shown = run_cli("deployments", "show", deployment_id, "--json", config=config).stdout
        deployment = json.loads(shown)
        return deployment if deployment["status"] not in ("queued", "in_progress") else None

    return eventually(ended, f"the end of deployment {deployment_id}", timeout)


def test_hooks_create_then_curl_then_deployments_show_the_outcome(tmp_path, serve):
    config = scripted_config(tmp_path)
    server = serve(config)
    created = json.loads(
        run_cli("hooks", "create", "web", "--name", "ci", "--json", config=config).stdout
    )
    token = created["token"]

    code, body = curl(
        f"{server.url}/api/v1/dh",
        "-H",
        f"X-Deploy-Hook-Token: {token}",
        "--data",
        '{"imageTag":"1.2.0"}',
    )
    assert code == 201, body
    deployment = wait_terminal(config, body["deployment"]["id"])
    assert deployment["status"] == "succeeded"
    assert deployment["message"] == "update completed"
    human = run_cli("deployments", "show", deployment["id"], config=config).stdout
    assert "succeeded" in human and "update completed" in human

    code, body = curl(
        f"{server.url}/api/v1/dh",
        "-H",
        f"X-Deploy-Hook-Token: {token}",
        "--data",
        '{"imageTag":"bad-2"}',
    )
    assert code == 201
    assert wait_terminal(config, body["deployment"]["id"])["status"] == "rolled_back"

    run_cli("hooks", "delete", str(created["id"]), config=config)
    code, body = curl(
        f"{server.url}/api/v1/dh",
        "-H",
        f"X-Deploy-Hook-Token: {token}",
        "--data",
        '{"imageTag":"1.3"}',
    )
    assert code == 404

    server.stop()
    for path in tmp_path.glob("shiphook.db*"):
        assert token.encode() not in path.read_bytes(), f"token found in {path.name}"
    assert token not in server.log()
    listing = run_cli("hooks", "list", "--json", config=config).stdout
    assert token not in listing


def test_every_bad_input_row_holds_against_the_real_server(tmp_path, serve):
    config = scripted_config(tmp_path)
    server = serve(config)
    app_token = json.loads(
        run_cli("hooks", "create", "web", "--name", "ci", "--json", config=config).stdout
    )["token"]
    job_token = json.loads(
        run_cli("hooks", "create", "migrate", "--name", "ci", "--json", config=config).stdout
    )["token"]
    dh = f"{server.url}/api/v1/dh"
    app = ["-H", f"X-Deploy-Hook-Token: {app_token}"]
    job = ["-H", f"X-Deploy-Hook-Token: {job_token}"]

    assert curl(dh, "--data", '{"imageTag":"1"}')[0] == 400
    assert curl(dh, "-H", "X-Deploy-Hook-Token: shk_nope", "--data", '{"imageTag":"1"}')[0] == 404
    assert curl(dh, *app, "--data", "nope")[0] == 400
    assert curl(dh, *app, "--data", "[1]")[0] == 400
    code, body = curl(dh, *app, "--data", '{"imageTag":"a b"}')
    assert code == 400 and "imageTag" in body["description"]
    code, body = curl(dh, *app, "--data", '{"imageTag":"1","x":2}')
    assert code == 400 and "x: unknown key" in body["description"]
    code, body = curl(
        dh, *job, "--data", '{"instanceEnvironmentVariables":[{"name":"NOPE","value":"1"}]}'
    )
    assert code == 400 and "instanceEnvironmentVariables[0].name" in body["description"]
    big = '{"imageTag":"1","p":"' + "x" * 70000 + '"}'
    assert curl(dh, *app, "--data", big)[0] == 413

    listed = json.loads(run_cli("deployments", "list", "--json", config=config).stdout)
    assert listed == []
    assert curl(dh, *app, "--data", '{"imageTag":"1.0"}')[0] == 201
    assert server.process.poll() is None


def test_serve_starts_and_accepts_hooks_while_its_backend_is_unreachable(tmp_path, serve):
    config = scripted_config(tmp_path, backend_extra='unreachable = "connection refused"')
    server = serve(config)
    token = json.loads(
        run_cli("hooks", "create", "web", "--name", "ci", "--json", config=config).stdout
    )["token"]
    code, _ = curl(
        f"{server.url}/api/v1/dh",
        "-H",
        f"X-Deploy-Hook-Token: {token}",
        "--data",
        '{"imageTag":"1"}',
    )
    assert code == 201
    unreachable = "backend fake (scripted) is not reachable: connection refused"
    eventually(lambda: unreachable in server.log(), "the deployer's report of the backend")


def test_the_default_config_serves_healthz_with_no_orchestrator(tmp_path, serve):
    """What `make run` starts: configs/shiphook.toml, SQLite in the working directory."""
    from conftest import ROOT

    config = tmp_path / "shiphook.toml"
    config.write_text((ROOT / "configs" / "shiphook.toml").read_text())
    server = serve(config, env=plugin_env(SHIPHOOK_PLUGINS=""))
    status, _, body = server.request("GET", "/healthz")
    assert status == 200 and json.loads(body) == {"status": "ok"}
    assert (tmp_path / "shiphook.db").exists()
