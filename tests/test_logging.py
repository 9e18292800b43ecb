"""What the log tells an operator: a line per hook request (never its token), failures as
warnings, and a rollout's progress and retries, which its history keeps too."""

from __future__ import annotations

import logging
import random
import re

import pytest
from shiphook import tokens
from shiphook.errors import one_line


@pytest.fixture
def log_lines(caplog):
    caplog.set_level(logging.INFO)

    def lines(logger: str, level: int = logging.INFO) -> list[str]:
        return [r.getMessage() for r in caplog.records if r.name == logger and r.levelno == level]

    return lines


def test_each_hook_request_is_one_access_log_line_and_never_shows_the_token(
    harness, caplog, log_lines
):
    token, unknown = harness.new_hook("web"), tokens.new_token()
    created = harness.deploy(token, {"imageTag": "1.0"})
    harness.post_hook(token, {"imageTag": "-bad"})
    harness.post_hook(unknown, {"imageTag": "1.0"})
    harness.post_hook(token[:-1], {"imageTag": "1.0"})
    harness.client.simulate_post("/api/v1/dh", json={"imageTag": "1.0"})

    answers = [
        re.fullmatch(r"POST /api/v1/dh (\d{3}) (.+) \(\d+\.\d ms\)", line)
        for line in (log_lines("shiphook.access"))
    ]
    assert all(answers), answers
    assert [(a[1], a[2].split(":")[0]) for a in answers] == [
        ("201", f"deployment {created} queued"),
        ("400", "imageTag"),
        ("404", "no deploy hook matches this token"),
        ("404", "no deploy hook matches this token"),
        ("400", "missing header X-Deploy-Hook-Token"),
    ]
    for secret in (token, unknown, token[:-1], tokens.digest(token), tokens.digest(unknown)):
        assert secret not in caplog.text


def test_a_token_sent_in_the_path_is_masked_in_the_answer_and_the_log(harness, caplog, log_lines):
    token = harness.new_hook("web")
    for path in (
        f"/api/v1/dh/{token}",
        f"/api/v1/deployments/{token[:20]}/rollback",
        f"/api/v1/dh/shk%255F{token[4:]}",  # the prefix's underscore encoded twice
        f"/api/v1/dh/{token[4:]}",  # the body alone
    ):
        answer = harness.client.simulate_get(path)
        assert answer.status_code in (404, 405), answer.text
        assert token[4:12] not in answer.text
    lines = log_lines("shiphook.access")
    assert lines[0].startswith("GET /api/v1/dh/shk_*** 404 no endpoint /api/v1/dh/shk_***: "), lines
    assert token[4:12] not in caplog.text


def test_failed_and_rolled_back_deployments_are_warnings(harness, log_lines):
    rolled_back = harness.deploy(harness.new_hook("web"), {"imageTag": "bad-1"})
    failed = harness.deploy(harness.new_hook("api"), {"imageTag": "bad-2"})
    succeeded = harness.deploy(harness.new_hook("strict"), {"imageTag": "v1.0.0"})
    for deployment_id in (rolled_back, failed, succeeded):
        harness.wait_for(deployment_id)
    warnings = log_lines("shiphook.deployer", logging.WARNING)
    assert any(
        line.startswith(f"deployment {rolled_back} of web: rolled_back: ") for line in warnings
    )
    # the decision comes first: the orchestrator's words for the rollback may sound manual
    assert any(
        line.startswith(f"deployment {rolled_back} of web: rolling back: ") for line in warnings
    )
    assert any(line.startswith(f"deployment {failed} of api: failed: ") for line in warnings)
    assert not any(succeeded in line for line in warnings)
    assert any(
        line.startswith(f"deployment {succeeded} of strict: succeeded")
        for line in log_lines("shiphook.deployer")
    )


def test_retries_and_progress_are_the_deployments_message_history_and_log(
    harness_factory, log_lines
):
    harness = harness_factory(backend_extra="polls = 4")
    deployment = harness.wait_for(
        harness.deploy(harness.new_hook("api"), {"imageTag": "transient2"})
    )
    assert deployment["status"] == "succeeded"
    steps = [e["message"] for e in deployment["history"] if e["status"] == "in_progress"]
    retries = [m for m in steps if m.startswith("retry")]
    assert len(retries) == 2, steps
    for n, retry in enumerate(retries, 1):
        assert re.fullmatch(rf"retry {n} in \d+(\.\d)? s: connection refused", retry), retry
    progress = [m for m in steps if m.startswith("updating")]
    assert progress == ["updating: 0 of 2 tasks", "updating: 1 of 2 tasks"]
    assert steps.index(retries[-1]) < steps.index(progress[0])

    prefix = f"deployment {deployment['id']} of api: "
    assert [prefix + r for r in retries] == [
        line for line in log_lines("shiphook.deployer", logging.WARNING) if line.startswith(prefix)
    ]
    assert all(prefix + p in log_lines("shiphook.deployer") for p in progress)
    # every in-progress message of the history is a line, the first one ("rolling out") too
    started = [m for m in steps if m and not m.startswith("retry")]
    assert started[0].startswith("rolling out transient2 (was ")
    assert all(prefix + m in log_lines("shiphook.deployer") for m in started)


def test_a_job_runs_start_is_a_line(harness, log_lines):
    run = harness.wait_for(harness.deploy(harness.new_hook("migrate"), {}))
    assert f"deployment {run['id']} of migrate: job run started" in log_lines("shiphook.deployer")


def test_what_an_orchestrator_says_is_one_line_that_drives_no_terminal(harness, caplog):
    """A message with a line break could forge a log line, an escape sequence drive the
    operator's terminal (the CLI prints messages too): lines are joined, the rest escaped."""
    forged = "1\n2026-12-01 00:00:00,000 WARNING shiphook.deployer: FORGED\x1b[31m"
    body = {"instanceEnvironmentVariables": [{"name": "EXIT", "value": forged}]}
    run = harness.wait_for(harness.deploy(harness.new_hook("migrate"), body))
    expected = "task exited with code 1; 2026-12-01 00:00:00,000 WARNING shiphook.deployer: "
    assert run["status"] == "failed" and run["message"] == expected + "FORGED\\x1b[31m", run
    lines = [r.getMessage() for r in caplog.records if r.name == "shiphook.deployer"]
    assert any(expected in line for line in lines), lines
    assert not any("\n" in line or "\x1b" in line for line in lines), lines


def test_text_from_elsewhere_is_one_line_without_credentials_or_format_characters():
    said = "cannot reach tcp://s3cret@10.0.0.1:2375\nthen \u202eevil\x1b[2J, é kept"
    assert one_line(said) == (
        "cannot reach tcp://***@10.0.0.1:2375; then \\u202eevil\\x1b[2J, é kept"
    )
    unencoded = "https://ci:pa/ss@word#1@nomad.example:4646/v1/jobs and https://plain/x"
    assert one_line(unencoded) == "https://ci:***@nomad.example:4646/v1/jobs and https://plain/x"
    # each URL of a word on its own: the user info of the second hides nothing of the first
    assert one_line("http://a.b/c,http://u:p@d/e") == "http://a.b/c,http://u:***@d/e"


@pytest.mark.parametrize(
    ("said", "shown"),
    [
        # a proxy or an orchestrator that quotes the request's headers
        (
            "400 Bad Request\r\nX-Nomad-Token: 9f3c2a1e-6b7d-4c1a-8e2f-0a1b2c3d4e5f\r\nHost: n",
            "400 Bad Request; X-Nomad-Token: ***; Host: n",
        ),
        (
            "sent {'Authorization': 'Bearer eyJhbGciOiJSUzI1NiJ9.e30.c2ln', 'Accept': '*/*'}",
            "sent {'Authorization': 'Bearer ***', 'Accept': '*/*'}",
        ),
        ('{"authorization":"Basic Y2k6aHVudGVyMmh1bnRlcjI="}', '{"authorization":"Basic ***"}'),
        # in Go's http.Header as JSON or printed, in bytes, in JSON inside JSON
        ('{"X-Nomad-Token":["9f3c2a1e-6b7d"]}', '{"X-Nomad-Token":["***"]}'),
        (
            'http.Header{"X-Nomad-Token":[]string{"9f3c"}}',
            'http.Header{"X-Nomad-Token":[]string{"***"}}',
        ),
        (
            "map[Authorization:[Bearer eyJhbGciOiJIUzI1NiJ9.e30] Accept:[*/*]]",
            "map[Authorization:[Bearer ***] Accept:[*/*]]",
        ),
        # a tab or a line break between the scheme and the credentials
        ("code Bearer\teyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0", "code Bearer ***"),
        ("Basic\r\nY2k6aHVudGVyMmh1bnRlcjI= sent", "Basic *** sent"),
        ("{b'X-Nomad-Token': b'9f3c2a1e'}", "{b'X-Nomad-Token': b'***'}"),
        (
            '{"body": "{\\"X-Vault-Token\\": \\"hvs.CAES\\"}"}',
            '{"body": "{\\"X-Vault-Token\\": \\"***\\"}"}',
        ),
        ("sent Basic YWRtaW46YWRtaW4= upstream", "sent Basic *** upstream"),
        ("proxy: bearer eyJhbGciOiJSUzI1NiJ9.e30.c2ln rejected", "proxy: bearer *** rejected"),
        # a hook token, wherever it is, and with its underscore percent-encoded
        (
            "invalid value shk_AbCdEfGhIjKlMnOpQrStUvWxYz0123456789AbCdEfGhIjKlM for X",
            "invalid value shk_*** for X",
        ),
        ("POST /api/v1/dh/shk%5FAbCdEfGhIjKl", "POST /api/v1/dh/shk_***"),
        # words that only look like them are kept
        (
            "authorization failed: bearer token required; Basic authentication is off",
            "authorization failed: bearer token required; Basic authentication is off",
        ),
        (
            "deployment authorization: update failed; authorization: denied by policy",
            "deployment authorization: update failed; authorization: denied by policy",
        ),
        (
            "pulling basic docker.io/library/nginx:1.25: bearer docker.io/library/nginx refused",
            "pulling basic docker.io/library/nginx:1.25: bearer docker.io/library/nginx refused",
        ),
    ],
)
def test_text_from_elsewhere_never_shows_a_credential_it_quotes(said, shown):
    assert one_line(said) == shown
    assert one_line(shown) == shown


def test_text_from_elsewhere_shown_again_is_shown_the_same():
    """A stored message is passed through `one_line` again when shown: masking one credential
    must not make another pass mask more (a value's space kept, so no word joins the next)."""
    parts = ["authorization", "x-nomad-token", "Bearer", "basic", "shk_", "AAAAAAAAAAAAAAAA1"]
    parts += ["YWRtaW46YWRtaW4=", "://", "@", ":", "=", " ", "'", '"', ",", ";", "[", "]", "{"]
    parts += ["}", "b'", "\\", "http", "u", "/", "\n", "\t", "[]string{", "%5F", "x"]
    chosen = random.Random(0)
    for _ in range(5000):
        said = "".join(chosen.choice(parts) for _ in range(chosen.randint(1, 14)))
        assert one_line(one_line(said)) == one_line(said), said
