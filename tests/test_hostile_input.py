"""Input an attacker or a slip of the hand sends: a JSON 4xx naming what is wrong, on SQLite and
on PostgreSQL; never a 500, a traceback in the log, or a secret in a log line."""

from __future__ import annotations

import json
import logging
import socket
import urllib.parse
from collections.abc import Iterator

import pytest
from click.testing import CliRunner
from conftest import ADMIN_TOKEN, Harness, Server, plugin_env, scripted_config
from shiphook import tokens
from shiphook.cli import main
from shiphook.http.app import create_app
from shiphook.http.waiters import Waiters
from shiphook.services import Hooks

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


@pytest.fixture
def on_each_database(request, database_url, monkeypatch) -> Harness:
    """A harness on each database, its deployer not running: what is accepted stays queued."""
    monkeypatch.setenv("SHIPHOOK_DATABASE_URL", database_url)
    return request.getfixturevalue("harness_factory")(start=False)  # closed before the schema


@pytest.fixture
def quiet(on_each_database, caplog) -> Iterator[Harness]:
    """The harness; the test fails if anything was logged as an error (a 500 logs one)."""
    yield on_each_database
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert not errors, caplog.text


def stored(harness: Harness) -> tuple[list, list]:
    return harness.instance.hooks.list(), harness.instance.deployments.list(limit=1000)


def assert_json_error(result, status: int, *names: str) -> None:
    assert result.status_code == status, result.text
    assert result.headers["content-type"].startswith("application/json")
    for name in names:
        assert name in result.json["description"], result.json


# -- 1: tokens that are not ASCII ----------------------------------------------------------


@pytest.mark.parametrize(
    "token",
    ["shk_\xc3\xa9", "\xff", "shk_" + "\xe9" * 49],
    ids=["utf-8-bytes", "latin-1-byte", "token-length"],
)
def test_a_token_that_is_not_ascii_is_404(quiet, token):
    """The header's bytes arrive as Latin-1 text, which has no ASCII digest."""
    quiet.new_hook("web")
    before = stored(quiet)
    assert_json_error(quiet.post_hook(token, {"imageTag": "1.0"}), 404, "no deploy hook")
    read = quiet.client.simulate_get(
        "/api/v1/deployments/x", headers={"X-Deploy-Hook-Token": token}
    )
    assert_json_error(read, 404, "no deploy hook")
    assert stored(quiet) == before


def raw_request(server: Server, request: bytes) -> tuple[int, dict]:
    """Send bytes as they are (no HTTP library would send these); the status and JSON body."""
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as connection:
        connection.sendall(request)
        answer = b""
        while chunk := connection.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def test_raw_non_ascii_token_bytes_get_a_json_404_from_a_real_server(tmp_path, serve):
    server = serve(scripted_config(tmp_path))
    body = b'{"imageTag":"1.0"}'
    for request in (
        b"POST /api/v1/dh HTTP/1.1\r\nHost: shiphook\r\nX-Deploy-Hook-Token: shk_\xc3\xa9\r\n"
        b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body),
        b"GET /api/v1/deployments/x HTTP/1.1\r\nHost: shiphook\r\n"
        b"X-Deploy-Hook-Token: \xff\r\nConnection: close\r\n\r\n",
    ):
        status, answer = raw_request(server, request)
        assert status == 404, answer
        assert answer["description"] == "no deploy hook matches this token"
    assert "Traceback" not in server.log()
    assert " ERROR " not in server.log()


# -- 2: NUL and other control characters ---------------------------------------------------


@pytest.mark.parametrize(
    "deployment_id",
    ["%00", "a%00b", "%01", "%C3%A9", "x" * 300],
    ids=["nul", "inner-nul", "control", "non-ascii", "long"],
)
def test_a_deployment_id_that_is_no_uuid_is_404(quiet, deployment_id):
    token = quiet.new_hook("web")
    quiet.deploy(token, {"imageTag": "1.0"})
    before = stored(quiet)
    path = f"/api/v1/deployments/{deployment_id}"
    for result in (
        quiet.client.simulate_get(path, headers={"X-Deploy-Hook-Token": token}),
        quiet.client.simulate_get(path, headers=ADMIN),
        quiet.client.simulate_post(f"{path}/rollback", headers=ADMIN),
    ):
        assert_json_error(result, 404, "no deployment with id")
    assert stored(quiet) == before


@pytest.mark.parametrize("target", ["%00", "web%00", "web%0A", "%FF"])
def test_a_target_filter_that_is_no_target_name_is_400(quiet, target):
    result = quiet.client.simulate_get(
        "/api/v1/deployments", query_string=f"target={target}", headers=ADMIN
    )
    assert_json_error(result, 400, "target: expected a target's name")


def test_a_well_formed_target_filter_never_configured_nor_recorded_is_404(quiet):
    """A name no deployment was ever recorded under is a typo (a target removed from the config
    keeps its deployments listable by name: test_api)."""
    result = quiet.client.simulate_get("/api/v1/deployments?target=removed", headers=ADMIN)
    assert_json_error(result, 404, "no target named 'removed' (configured: ")


@pytest.mark.parametrize("name", ["a\u0000b", "a\u0007b", "two\nlines", "\u202eevil", "tab\tbed"])
def test_a_hook_name_with_control_characters_is_400_and_stores_nothing(quiet, name):
    result = quiet.client.simulate_post(
        "/api/v1/targets/web/hooks", json={"name": name}, headers=ADMIN
    )
    assert_json_error(result, 400, "name: expected 1 to 100 printable characters")
    assert stored(quiet) == ([], [])


def test_a_hook_name_in_any_script_is_fine(quiet):
    result = quiet.client.simulate_post(
        "/api/v1/targets/web/hooks", json={"name": "déploiement nocturne 夜"}, headers=ADMIN
    )
    assert result.status_code == 201, result.text
    assert quiet.instance.hooks.list()[0].name == "déploiement nocturne 夜"


def test_a_nul_in_a_job_environment_value_is_400_naming_the_field(quiet):
    """A process environment is NUL-terminated strings: such a value could never be set."""
    token = quiet.new_hook("migrate")
    variables = [{"name": "GREETING", "value": "hi"}, {"name": "EXIT", "value": "0\u00001"}]
    result = quiet.post_hook(token, {"instanceEnvironmentVariables": variables})
    assert_json_error(result, 400, "instanceEnvironmentVariables[1].value", "NUL")
    assert stored(quiet)[1] == []
    other_controls = [{"name": "GREETING", "value": "line 1\nline 2\ttab\u0007"}]
    result = quiet.post_hook(token, {"instanceEnvironmentVariables": other_controls})
    assert result.status_code == 201, result.text


def test_a_rejected_job_environment_value_is_not_echoed(quiet, caplog):
    """A job's values may be secrets: the 400 names the field, never shows (or logs) its value."""
    token = quiet.new_hook("migrate")
    variables = [{"name": "GREETING", "value": 31415926535}]
    with caplog.at_level("INFO"):
        result = quiet.post_hook(token, {"instanceEnvironmentVariables": variables})
    assert_json_error(result, 400, "instanceEnvironmentVariables[0].value", "string")
    assert "31415926535" not in result.text
    assert "31415926535" not in caplog.text


# -- 3: hook ids out of the column's range -------------------------------------------------


@pytest.mark.parametrize(
    "hook_id", ["100000000000000000000", "2147483648", "-2147483649", "-1", "0"]
)
def test_an_out_of_range_hook_id_is_404(quiet, hook_id):
    quiet.new_hook("web")
    result = quiet.client.simulate_delete(f"/api/v1/hooks/{hook_id}", headers=ADMIN)
    assert_json_error(result, 404, f"no hook with id {int(hook_id)}")
    assert len(quiet.instance.hooks.list()) == 1


# -- the CLI: the same answers, one line on stderr -------------------------------------------


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["hooks", "create", "web", "--name", "a\u0000b"], "name: expected 1 to 100 printable"),
        (["hooks", "create", "web", "--name", "a\u0001b"], "name: expected 1 to 100 printable"),
        (["hooks", "create", "web", "--name", "\udcff"], "name: expected 1 to 100 printable"),
        (["deployments", "show", "\u0000"], "no deployment with id"),
        (["deployments", "show", "\udcff"], "no deployment with id"),
        (["deployments", "rollback", "a\u0000b"], "no deployment with id"),
        (["deployments", "list", "--target", "\u0000"], "target: expected a target's name"),
        (["hooks", "delete", "100000000000000000000"], "no hook with id 100000000000000000000"),
        (["hooks", "delete", "2147483648"], "no hook with id 2147483648"),
        (
            ["hooks", "delete", "\u0667"],
            "'\u0667' is not a whole number (ASCII digits, 60 at most)",
        ),
        (
            ["deployments", "list", "--limit", "\uff12"],
            "is not a whole number (ASCII digits, 60 at most)",
        ),
        (["hooks", "delete", "abc"], "'abc' is not a whole number (ASCII digits, 60 at most)"),
        (["hooks", "create", "web"], "Missing option '--name'"),
        (["deployments", "list", "--limit", "0"], "0 is not in the range 1<=x<=1000"),
        (["bogus"], "No such command 'bogus' (see '"),
        (["serve", "--host", "[::1]"], "an IPv6 address without brackets"),
        (["serve", "--host", "\udcff"], "expected a host name"),
        (["serve", "--host", "a" * 300], "labels of at most 63 characters"),
        (["deployments", "show", "a" * 5000], "no deployment with id '" + "a" * 60 + "'..."),
        (["hooks", "delete", "9" * 5000], "'" + "9" * 60 + "'... is not a whole number"),
    ],
    ids=[
        "name-nul",
        "name-control",
        "name-not-utf8",
        "show-nul",
        "show-not-utf8",
        "rollback-nul",
        "list-target-nul",
        "delete-huge-id",
        "delete-int32-overflow",
        "delete-other-digits",
        "limit-other-digits",
        "delete-no-number",
        "create-no-name",
        "limit-out-of-range",
        "no-such-command",
        "host-in-brackets",
        "host-not-utf8",
        "host-label-too-long",
        "show-long-id",
        "delete-long-id",
    ],
)
def test_the_cli_answers_hostile_arguments_in_one_line(
    tmp_path, database_url, monkeypatch, args, says
):
    """`\\udcff` is how Python hands over an argument byte that is not UTF-8."""
    for key, value in plugin_env(SHIPHOOK_DATABASE_URL=database_url).items():
        monkeypatch.setenv(key, value)
    result = CliRunner().invoke(main, ["--config", str(scripted_config(tmp_path)), *args])
    assert result.exit_code == 2, (result.output, result.exception)
    assert isinstance(result.exception, SystemExit)
    assert result.stderr.startswith("shiphook: ")
    assert says in result.stderr
    assert result.stderr.count("\n") == 1


# -- 5: repeated JSON keys ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "body", "key"),
    [
        ("web", b'{"imageTag":"first","imageTag":"second"}', "imageTag"),
        ("web", b'{"imageTag":"first","image\\u0054ag":"second"}', "imageTag"),
        ("migrate", b'{"imageTag":"1.0","imageTag":"2.0"}', "imageTag"),
        (
            "migrate",
            b'{"instanceEnvironmentVariables":[{"name":"EXIT","name":"GREETING","value":"0"}]}',
            "name",
        ),
        (
            "migrate",
            b'{"instanceEnvironmentVariables":[],"instanceEnvironmentVariables":'
            b'[{"name":"EXIT","value":"1"}]}',
            "instanceEnvironmentVariables",
        ),
    ],
)
def test_a_repeated_json_key_is_400_naming_it(quiet, target, body, key):
    """A proxy or a reviewer reading the first value would see another request."""
    token = quiet.new_hook(target)
    assert_json_error(quiet.post_hook(token, body), 400, f"key {key} given twice")
    assert stored(quiet)[1] == []


def test_keys_the_caller_sent_are_named_escaped_short_and_few(quiet, caplog):
    """Unknown keys are named in the answer and in the access line, but quoted, escaped and cut
    short, and at most ten of them: a key can neither forge a log line nor fill one."""
    caplog.set_level(logging.INFO, logger="shiphook.access")
    token = quiet.new_hook("web")
    forged = "x\n2026-12-01 00:00:00,000 ERROR shiphook.server: forged"
    result = quiet.post_hook(token, {"imageTag": "1.0", forged: 1, "y" * 60_000: 1})
    shown = repr(forged[:40])
    assert_json_error(result, 400, f"[{shown}...]: unknown key", f"['{'y' * 40}'...]: unknown key")
    many = quiet.post_hook(token, {"imageTag": "1.0"} | {f"k{n}": 1 for n in range(5000)})
    assert_json_error(many, 400, "k9: unknown key (expected one of: imageTag); and 4990 more")
    assert "k10" not in many.json["description"]
    lines = [r.getMessage() for r in caplog.records if r.name == "shiphook.access"]
    assert len(lines) == 2, lines
    assert all("\n" not in line and len(line) < 1000 for line in lines), lines
    assert "x\\n2026" in lines[0]
    assert stored(quiet)[1] == []


def test_a_token_or_idempotency_key_sent_twice_is_400(quiet):
    """Falcon joins a repeated field with commas: two tokens, or two keys, are not one."""
    token = quiet.new_hook("web")
    for headers in (
        [("X-Deploy-Hook-Token", token), ("X-Deploy-Hook-Token", token)],
        [("X-Deploy-Hook-Token", token), ("Idempotency-Key", "a"), ("Idempotency-Key", "b")],
        [("X-Deploy-Hook-Token", token), ("Idempotency-Key", "a,b")],
    ):
        result = quiet.client.simulate_post(
            "/api/v1/dh", body=b'{"imageTag":"1.0"}', headers=headers
        )
        expected = f"{headers[-1][0]}: expected one value, without a comma (sent twice?)"
        assert_json_error(result, 400, expected)
    twice = [("X-Deploy-Hook-Token", token)] * 2
    assert_json_error(quiet.client.simulate_get("/api/v1/deployments/x", headers=twice), 400)
    assert stored(quiet)[1] == []


def test_a_repeated_key_in_the_admin_hook_body_is_400(quiet):
    result = quiet.client.simulate_post(
        "/api/v1/targets/web/hooks", body=b'{"name":"ci","name":"other"}', headers=ADMIN
    )
    assert_json_error(result, 400, "key name given twice")
    assert stored(quiet) == ([], [])


@pytest.mark.parametrize(
    "target, body, shown",
    [
        ("web", b'{"imageTag": null}', "imageTag: Input should be a valid string (got null)"),
        ("web", b"hello", "Invalid JSON: expected value at line 1 column 1: expected"),
        ("migrate", b'{"instanceEnvironmentVariables": {"A": "s3cr3t"}}', "a valid array:"),
        ("migrate", b'{"instanceEnvironmentVariables": [["A", "s3cr3t"]]}', "[0]: Input should"),
        ("migrate", b'{"instanceEnvironmentVariables": ["s3cr3t"]}', "[0]: Input should"),
        ("migrate", b'{"instanceEnvironmentVariables":[{"name":"E","value":"s3cr3t"', "EOF while"),
    ],
)
def test_what_was_sent_is_shown_as_json_and_an_environment_never(quiet, target, body, shown):
    result = quiet.post_hook(quiet.new_hook(target), body)
    assert_json_error(result, 400, shown)
    assert "s3cr3t" not in result.text


def test_a_body_that_begins_with_a_utf8_bom_is_read_as_json(quiet):
    """As RFC 8259 lets a parser do: a file sent with `curl --data @body.json` that a Windows
    editor saved as "UTF-8 with BOM" begins with one."""
    result = quiet.post_hook(quiet.new_hook("web"), b'\xef\xbb\xbf{"imageTag":"1.0"}')
    assert result.status_code == 201, result.text


def test_the_same_key_in_sibling_objects_is_fine(quiet):
    token = quiet.new_hook("migrate")
    variables = [{"name": "EXIT", "value": "0"}, {"name": "GREETING", "value": "hi"}]
    assert quiet.post_hook(token, {"instanceEnvironmentVariables": variables}).status_code == 201


# -- 15: no secret-derived value in a log line ----------------------------------------------


@pytest.mark.parametrize("failure", ["token-drawn-twice", "table-gone"])
def test_a_failed_hook_insert_logs_no_token_digest(on_each_database, caplog, failure):
    """Neither SQLAlchemy's parameters nor PostgreSQL's detail of a unique violation quotes
    the digest, in the 500's log line or in SQLAlchemy's statement log if one turns it on."""
    caplog.set_level(logging.INFO, logger="sqlalchemy.engine")
    instance = on_each_database.instance
    token = tokens.new_token()
    app = create_app(
        hooks=Hooks(instance.storage, instance.config.targets, new_token=lambda: token),
        deployments=instance.deployments,
        targets=instance.config.targets,
        notify=lambda target: None,
        waiters=Waiters(instance.storage),
        admin_digest=tokens.digest(ADMIN_TOKEN),
    )
    client = Harness(instance, on_each_database.deployer, app).client
    if failure == "token-drawn-twice":  # a broken random source: the digest's index refuses it
        created = client.simulate_post(
            "/api/v1/targets/web/hooks", json={"name": "a"}, headers=ADMIN
        )
        assert created.status_code == 201
    else:
        with instance.storage.engine.begin() as connection:
            connection.exec_driver_sql("DROP TABLE hook")
    failed = client.simulate_post("/api/v1/targets/web/hooks", json={"name": "b"}, headers=ADMIN)
    assert failed.status_code == 500
    assert f"request {failed.json['requestId']}" in caplog.text  # the failure is logged ...
    for secret in (token, tokens.digest(token)):  # ... without the secret
        assert secret not in caplog.text
        assert secret not in failed.text


# -- a token where it would be stored or logged in clear ------------------------------------


@pytest.mark.parametrize("shape", ["token", "lookalike"])
def test_a_hook_named_with_a_token_is_400_and_stores_nothing(quiet, shape):
    """A token pasted into the name would be stored, listed and logged in clear."""
    name = tokens.new_token() if shape == "token" else "a" * 32
    result = quiet.client.simulate_post(
        "/api/v1/targets/web/hooks", json={"name": name}, headers=ADMIN
    )
    assert_json_error(result, 400, "name: holds what looks like a token")
    assert name not in result.text
    assert stored(quiet) == ([], [])


def test_a_token_as_idempotency_key_is_400_and_stores_nothing(quiet):
    token = quiet.new_hook("web")
    result = quiet.post_hook(token, {"imageTag": "1.0"}, headers={"Idempotency-Key": token})
    assert_json_error(result, 400, "Idempotency-Key: holds what looks like a hook token")
    assert token not in result.text
    assert stored(quiet)[1] == []
    sha = "0123456789abcdef0123456789abcdef01234567"  # a commit, as CI jobs use for keys
    result = quiet.post_hook(token, {"imageTag": "1.0"}, headers={"Idempotency-Key": sha})
    assert result.status_code == 201, result.text


# -- numbers in other scripts' digits, and what is quoted back -----------------------------


@pytest.mark.parametrize(
    "hook_id", ["\u0661", "\uff11", "9" * 5000], ids=["arabic-indic", "fullwidth", "5000-digits"]
)
def test_a_hook_id_in_other_digits_than_ascii_is_404_and_deletes_nothing(quiet, hook_id):
    quiet.new_hook("web")  # hook 1
    path = f"/api/v1/hooks/{urllib.parse.quote(hook_id)}"
    assert quiet.client.simulate_get(path, headers=ADMIN).status_code == 404
    assert quiet.client.simulate_delete(path, headers=ADMIN).status_code == 404
    assert len(quiet.instance.hooks.list()) == 1


def test_a_limit_in_other_digits_than_ascii_is_400(quiet):
    result = quiet.client.simulate_get(
        "/api/v1/deployments", query_string="limit=%EF%BC%92", headers=ADMIN
    )
    assert_json_error(result, 400, "limit: expected a whole number from 1 to 1000, got '\uff12'")


@pytest.mark.parametrize(
    ("path", "query", "says"),
    [
        ("/api/v1/deployments/" + "a" * 3000, "", "no deployment with id '"),
        ("/api/v1/deployments", "status=" + "s" * 200, "status: '"),
        ("/api/v1/deployments", "target=" + "t" * 200, "got '"),
        ("/api/v1/deployments", "limit=" + "9" * 200, "got '"),
        ("/api/v1/targets/" + "t" * 200 + "/hooks", "", "no target named '"),
    ],
    ids=["deployment-id", "status", "target", "limit", "hooks-of-target"],
)
def test_an_error_quotes_at_most_60_characters_of_what_was_sent(quiet, path, query, says):
    result = quiet.client.simulate_get(path, query_string=query, headers=ADMIN)
    assert 400 <= result.status_code < 500, result.text
    description = result.json["description"]
    assert says in description and "'..." in description, description
    assert len(description) < 250, description
