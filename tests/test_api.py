"""The hook contract through falcon.testing: every answer of the bad-input table, and the rest."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Iterator
from datetime import UTC, datetime

import falcon.inspect
import orjson
import pytest
import scripted_backend
from conftest import ADMIN_TOKEN
from shiphook import tokens
from shiphook.db import create_db_engine, upgrade
from shiphook.errors import DatabaseUnavailable
from shiphook.fastpath import Accepted, GroupCommit
from shiphook.http.app import WAIT_STATUS
from shiphook.instance import open_instance
from shiphook.models import DeploymentCreate, DeploymentPublic, HookPublic, Status
from shiphook.services import new_deployment_json, public_deployment, wait_outcome
from shiphook.storage import Storage
from shiphook.testing import eventually
from sqlalchemy import event
from uuid_utils import uuid7

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def stored_deployments(harness) -> list[dict]:
    return [d.to_json() for d in harness.instance.deployments.list(limit=1000)]


@pytest.fixture
def quiet(harness_factory):
    """A harness whose deployer is not running, so stored deployments stay as accepted."""
    return harness_factory(start=False)


def test_app_hook_accepts_an_image_tag_and_records_a_queued_deployment(quiet):
    token = quiet.new_hook("web")
    result = quiet.post_hook(token, {"imageTag": "1.2.0"})
    assert result.status_code == 201
    deployment = result.json["deployment"]
    assert result.headers["location"] == f"/api/v1/deployments/{deployment['id']}"
    assert deployment["status"] == "queued"
    assert deployment["imageTag"] == "1.2.0"
    assert deployment["target"] == "web"
    assert [d["id"] for d in stored_deployments(quiet)] == [deployment["id"]]


def test_curl_data_without_a_json_content_type_is_accepted(quiet):
    token = quiet.new_hook("web")
    result = quiet.post_hook(
        token,
        b'{"imageTag":"1.2.0"}',
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert result.status_code == 201, result.text


def test_job_hook_accepts_env_overrides_and_an_empty_body(quiet):
    token = quiet.new_hook("migrate")
    body = {"instanceEnvironmentVariables": [{"name": "GREETING", "value": "hi"}]}
    result = quiet.post_hook(token, body)
    assert result.status_code == 201, result.text
    assert result.json["deployment"]["instanceEnvironmentVariables"] == [
        {"name": "GREETING", "value": "hi"}
    ]
    assert quiet.post_hook(token, b"").status_code == 201
    assert quiet.post_hook(token, {"imageTag": "2.0", **body}).status_code == 201
    # what a job's body takes, named after what was wrong with it
    bad = quiet.post_hook(token, {"imageTag": "bad tag"})
    assert bad.status_code == 400
    assert bad.json["description"].endswith(
        'expected a JSON object like {"instanceEnvironmentVariables": [{"name": "X", "value": '
        '"y"}], "imageTag": "1.2.0"} (all keys optional)'
    )


@pytest.mark.parametrize(
    ("target", "body"),
    [
        ("web", {"imageTag": "1.2.0"}),
        ("migrate", {"instanceEnvironmentVariables": [{"name": "GREETING", "value": "hi"}]}),
        ("migrate", {"imageTag": "2.0"}),
    ],
)
def test_the_answer_to_a_hook_is_the_deployment_as_stored(quiet, target, body):
    answer = quiet.post_hook(quiet.new_hook(target), body).json["deployment"]
    stored = quiet.client.simulate_get(f"/api/v1/deployments/{answer['id']}", headers=ADMIN)
    assert answer == {k: v for k, v in stored.json["deployment"].items() if k != "history"}


@pytest.mark.parametrize("microsecond", [0, 120])
def test_a_new_deployments_json_is_its_public_view(microsecond):
    new = DeploymentCreate(
        id=str(uuid7()),
        target="migrate",
        kind="job",
        created_at=datetime(2026, 12, 1, 9, 30, microsecond=microsecond, tzinfo=UTC),
        hook_id=3,
        hook_name="ci",
        image_tag="2.0",
        env=[{"name": "GREETING", "value": "hi"}],
        rollback_of=str(uuid7()),
        idempotency_key="build-7",
        request_digest="d" * 64,
    )
    assert new_deployment_json(new) == public_deployment(new).to_json()
    assert orjson.loads(orjson.dumps(new_deployment_json(new))) == public_deployment(new).to_json()


def test_hook_use_stamps_last_used_at(quiet):
    token = quiet.new_hook("web")
    assert quiet.instance.hooks.list()[0].last_used_at is None
    quiet.post_hook(token, {"imageTag": "1.2.0"})
    assert quiet.instance.hooks.list()[0].last_used_at is not None


def test_missing_token_header_is_400_naming_the_header(quiet):
    result = quiet.client.simulate_post("/api/v1/dh", json={"imageTag": "1.2.0"})
    assert result.status_code == 400
    assert "X-Deploy-Hook-Token" in result.json["description"]
    assert stored_deployments(quiet) == []


@pytest.mark.parametrize(
    "token",
    [
        "nonsense",
        "shk_" + "A" * 49,  # right shape, wrong checksum
        tokens.new_token(),  # well formed, unknown
        tokens.new_token()[:-1],  # truncated
    ],
    ids=["wrong-shape", "bad-checksum", "unknown", "truncated"],
)
def test_bad_tokens_are_404_and_store_nothing(quiet, token):
    quiet.new_hook("web")
    result = quiet.post_hook(token, {"imageTag": "1.2.0"})
    assert result.status_code == 404
    assert stored_deployments(quiet) == []


def test_a_deleted_hook_is_404_at_once(quiet):
    token = quiet.new_hook("web")
    assert quiet.post_hook(token, {"imageTag": "1.0"}).status_code == 201
    hook_id = quiet.instance.hooks.list()[0].id
    quiet.instance.hooks.delete(hook_id)
    assert quiet.post_hook(token, {"imageTag": "1.1"}).status_code == 404
    assert len(stored_deployments(quiet)) == 1


def test_a_hook_deleted_by_another_process_is_404_at_once_despite_the_token_cache(quiet, tmp_path):
    token = quiet.new_hook("web")
    assert quiet.post_hook(token, {"imageTag": "1.0"}).status_code == 201  # token now cached
    other = open_instance(
        quiet.instance.config.path, plugin_modules=[], plugin_objects=[scripted_backend]
    )  # like `shiphook hooks delete` in another process
    other.hooks.delete(other.hooks.list()[0].id)
    other.close()
    result = quiet.post_hook(token, {"imageTag": "1.1"})
    assert result.status_code == 404
    assert [d["imageTag"] for d in stored_deployments(quiet)] == ["1.0"]
    assert quiet.post_hook(token, {"imageTag": "1.2"}).status_code == 404


def test_hook_ids_are_never_reused(quiet):
    first = quiet.instance.hooks.create(target="web", name="a")
    quiet.instance.hooks.delete(first.id)
    assert quiet.instance.hooks.create(target="web", name="b").id > first.id


def test_the_token_is_checked_before_the_body(quiet):
    result = quiet.post_hook(tokens.new_token(), b"not json")
    assert result.status_code == 404


@pytest.mark.parametrize(
    ("body", "names"),
    [
        (b"not json", "Invalid JSON"),
        (b"[1, 2]", "object"),
        (b'"1.2.0"', "object"),
        (b"{}", "imageTag"),
        (b'{"imageTag": 12}', "imageTag"),
        (b'{"imageTag": null}', "imageTag"),
        (b'{"imageTag": ""}', "imageTag"),
        (b'{"imageTag": "-leading-dash"}', "imageTag"),
        (b'{"imageTag": "has space"}', "imageTag"),
        (b'{"imageTag": "' + b"a" * 129 + b'"}', "imageTag"),
        (b'{"imageTag": "1.0", "extra": 1}', "extra"),
        (b'{"instanceEnvironmentVariables": []}', "instanceEnvironmentVariables"),
    ],
)
def test_malformed_app_bodies_are_400_naming_the_field(quiet, body, names):
    token = quiet.new_hook("web")
    result = quiet.post_hook(token, body)
    assert result.status_code == 400, result.text
    assert names in result.json["description"]
    assert stored_deployments(quiet) == []


def test_a_hook_token_sent_as_the_tag_is_400_and_goes_nowhere(quiet, caplog):
    """A CI job that swapped its variables: stored, logged and handed to the orchestrator as a
    tag is, the token would leak to all three."""
    token, job_token = quiet.new_hook("web"), quiet.new_hook("migrate")
    for sent in (token, tokens.new_token()):
        for caller in (token, job_token):  # an app's tag, a job's optional one
            result = quiet.post_hook(caller, {"imageTag": sent})
            assert result.status_code == 400, result.text
            assert result.json["description"].startswith(
                "imageTag: a hook token, not an image tag: send it in X-Deploy-Hook-Token only "
                "(got 'shk_***')"
            )
    assert stored_deployments(quiet) == []
    assert token not in caplog.text
    # a tag that only starts like one is a tag
    assert quiet.post_hook(token, {"imageTag": "shk_build-7"}).status_code == 201


def test_a_tag_outside_allowed_tags_is_400(quiet):
    token = quiet.new_hook("strict")
    result = quiet.post_hook(token, {"imageTag": "latest"})
    assert result.status_code == 400
    assert "imageTag" in result.json["description"]
    assert "v\\d+" in result.json["description"]
    assert quiet.post_hook(token, {"imageTag": "v1.2.3"}).status_code == 201


@pytest.mark.parametrize(
    ("variables", "names"),
    [
        ([{"name": "1BAD", "value": "x"}], "instanceEnvironmentVariables[0].name"),
        ([{"name": "A-B", "value": "x"}], "instanceEnvironmentVariables[0].name"),
        (
            [{"name": "GREETING", "value": "a"}, {"name": "GREETING", "value": "b"}],
            "instanceEnvironmentVariables[1].name",
        ),
        ([{"name": "SECRET", "value": "x"}], "instanceEnvironmentVariables[0].name"),
        ([{"name": "GREETING", "value": 3}], "instanceEnvironmentVariables[0].value"),
        ([{"name": "GREETING"}], "instanceEnvironmentVariables[0].value"),
        ([{"name": "GREETING", "value": "x", "other": 1}], "instanceEnvironmentVariables[0].other"),
        ({"name": "GREETING"}, "instanceEnvironmentVariables"),
    ],
)
def test_malformed_job_variables_are_400_naming_the_item(quiet, variables, names):
    token = quiet.new_hook("migrate")
    result = quiet.post_hook(token, {"instanceEnvironmentVariables": variables})
    assert result.status_code == 400, result.text
    assert names in result.json["description"]
    assert stored_deployments(quiet) == []


def test_a_target_without_parameters_accepts_any_valid_name(quiet):
    token = quiet.new_hook("report")
    body = {"instanceEnvironmentVariables": [{"name": "ANYTHING_GOES", "value": ""}]}
    assert quiet.post_hook(token, body).status_code == 201


def test_a_body_over_64_kib_is_413(quiet):
    token = quiet.new_hook("web")
    body = b'{"imageTag": "1.0", "pad": "' + b"x" * (64 * 1024) + b'"}'
    result = quiet.post_hook(token, body)
    assert result.status_code == 413
    assert stored_deployments(quiet) == []


ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[0-9a-f]{4}-[0-9a-f]{12}")
TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z")


@pytest.mark.parametrize(
    ("target", "body"),
    [
        ("web", b'{"imageTag": "1.2.0"}'),
        ("web", b'\xef\xbb\xbf{"imageTag": "1.2.0"}'),  # a byte order mark
        ("web", b""),
        ("web", b"{not json"),
        ("web", b'{"imageTag": "1.2.0", "extra": 1}'),
        ("web", b'{"imageTag": "first", "imageTag": "second"}'),
        ("web", b'{"imageTag": "-bad"}'),
        ("strict", b'{"imageTag": "not-allowed"}'),
        ("migrate", b'{"instanceEnvironmentVariables": [{"name": "X", "value": "1"}]}'),
        ("migrate", b'{"instanceEnvironmentVariables": [{"name": "X", "value": "a\\u0000"}]}'),
        ("gone", b'{"imageTag": "1.2.0"}'),  # its backend's target is no longer configured
    ],
)
@pytest.mark.parametrize("token", ["own", "unknown", "not ascii"])
def test_the_plain_hook_path_answers_as_falcon_does(
    quiet, monkeypatch, caplog, target, body, token
):
    """`PlainHookPath` answers plain hook requests in front of Falcon; what it answers is
    what `DeployHookResource` would: status, headers, JSON (but a new deployment's id and
    times) and the access line."""
    sent = {"own": quiet.new_hook(target), "unknown": "shk_" + "a" * 40, "not ascii": "shk_\xe9"}
    assert_answered_as_by_falcon(quiet, monkeypatch, caplog, body, sent[token])


@pytest.mark.parametrize(
    "failure", [RuntimeError("disk on fire"), DatabaseUnavailable("OperationalError")]
)
def test_the_plain_hook_path_fails_as_falcon_does(quiet, monkeypatch, caplog, failure):
    def accept(*args, **kwargs):
        raise failure

    monkeypatch.setattr(quiet.instance.deployments, "accept", accept)
    token = quiet.new_hook("web")
    request_id = {"X-Request-ID": "ci-run-7"}
    assert_answered_as_by_falcon(quiet, monkeypatch, caplog, b"{}", token, request_id)


def assert_answered_as_by_falcon(quiet, monkeypatch, caplog, body, token, headers=None) -> None:
    falcon_app = quiet.app.app
    through_falcon: list[str] = []

    async def falcon_called(scope, receive, send) -> None:
        if scope["type"] == "http":  # not the test client's lifespan events
            through_falcon.append(scope["path"])
        await falcon_app(scope, receive, send)

    monkeypatch.setattr(quiet.app, "app", falcon_called)
    caplog.set_level(logging.INFO, logger="shiphook.access")
    answers = []
    for client in (quiet.client, falcon.testing.TestClient(falcon_app)):
        caplog.clear()
        result = client.simulate_post(
            "/api/v1/dh", body=body, headers={"X-Deploy-Hook-Token": token, **(headers or {})}
        )
        fields = [  # the length aside: a time's microseconds are left out when they are 0
            (k, ID.sub("<id>", v)) for k, v in result.headers.items() if k != "content-length"
        ]
        text = TIME.sub("<time>", ID.sub("<id>", result.text))
        (line,) = [r.getMessage() for r in caplog.records if r.name == "shiphook.access"]
        line = ID.sub("<id>", line.rpartition(" (")[0])  # without the time it took
        answers.append((result.status_code, fields, text, line))
    assert through_falcon == []  # the first was answered in front of it
    assert answers[0] == answers[1]


def test_the_server_keeps_serving_after_bad_requests(quiet):
    token = quiet.new_hook("web")
    for body in (b"{", b"[]", b"\xff\xfe", b'{"imageTag": "x y"}'):
        assert quiet.post_hook(token, body).status_code == 400
    assert quiet.post_hook(token, {"imageTag": "1.0"}).status_code == 201


# -- reading deployments ------------------------------------------------------------------


def test_a_deployment_is_readable_with_its_hook_token_or_the_admin_token(quiet):
    token = quiet.new_hook("web")
    other = quiet.new_hook("web")
    deployment_id = quiet.deploy(token, {"imageTag": "1.0"})
    path = f"/api/v1/deployments/{deployment_id}"

    mine = quiet.client.simulate_get(path, headers={"X-Deploy-Hook-Token": token})
    assert mine.status_code == 200
    assert mine.json["deployment"]["history"][0]["status"] == "queued"
    assert (
        quiet.client.simulate_get(path, headers={"X-Deploy-Hook-Token": other}).status_code == 404
    )
    assert quiet.client.simulate_get(path, headers=ADMIN).status_code == 200
    assert quiet.client.simulate_get(path).status_code == 401
    assert quiet.client.simulate_get("/api/v1/deployments/nope", headers=ADMIN).status_code == 404


# -- admin endpoints ------------------------------------------------------------------------


def test_admin_endpoints_need_the_admin_token(quiet):
    for path in ("/api/v1/targets", "/api/v1/deployments", "/api/v1/targets/web/hooks"):
        assert quiet.client.simulate_get(path).status_code == 401
        wrong = {"Authorization": "Bearer nope"}
        assert quiet.client.simulate_get(path, headers=wrong).status_code == 401
        assert quiet.client.simulate_get(path, headers=ADMIN).status_code == 200
    assert (
        quiet.client.simulate_post("/api/v1/targets/web/hooks", json={"name": "x"}).status_code
        == 401
    )


def test_admin_endpoints_are_off_without_an_admin_token(harness_factory, monkeypatch):
    monkeypatch.delenv("SHIPHOOK_ADMIN_TOKEN")
    harness = harness_factory(start=False)
    result = harness.client.simulate_get("/api/v1/targets", headers=ADMIN)
    assert result.status_code == 403
    assert "SHIPHOOK_ADMIN_TOKEN" in result.json["description"]


# what a request without the admin token may call; every other route and method needs it
PUBLIC = {("GET", "/healthz"), ("HEAD", "/healthz"), ("POST", "/api/v1/dh")}
UNKNOWN_DEPLOYMENT = "01a227f9-c3cc-7bc7-b32b-faf0907280e9"


def admin_routes(app) -> list[tuple[str, str]]:
    """Every method and path the app answers with a responder of its own, with the path's
    fields filled in (the admin token is checked before anything is looked up)."""
    fields = {"{deployment_id}": UNKNOWN_DEPLOYMENT, "{target}": "web", "{hook_id:whole}": "1"}
    found = []
    for route in falcon.inspect.inspect_routes(app.app):  # Falcon, behind `PlainHookPath`
        path = route.path
        for field, value in fields.items():
            path = path.replace(field, value)
        assert "{" not in path, f"give {route.path}'s field a value"
        found += [(m.method, path) for m in route.methods if not m.internal]
    return [r for r in found if r not in PUBLIC]


def test_every_route_but_health_and_the_hook_needs_the_admin_token(quiet):
    routes = admin_routes(quiet.app)
    assert ("POST", f"/api/v1/deployments/{UNKNOWN_DEPLOYMENT}/rollback") in routes
    for method, path in routes:
        hook_readable = (method, path) == ("GET", f"/api/v1/deployments/{UNKNOWN_DEPLOYMENT}")
        for headers, description in [
            (
                {},
                "send the token of the hook that made it in X-Deploy-Hook-Token, or the admin "
                "token as 'Authorization: Bearer <admin token>'"
                if hook_readable
                else "admin token required: send 'Authorization: Bearer <admin token>'",
            ),
            ({"Authorization": "Basic dGVzdA=="}, "admin token required"),
            ({"Authorization": "Bearer"}, "admin token required"),
            ({"Authorization": "Bearer nope"}, "the admin token is not valid"),
            ({"Authorization": f"Bearer {ADMIN_TOKEN}x"}, "the admin token is not valid"),
        ]:
            result = quiet.client.simulate_request(method, path, headers=headers)
            assert result.status_code == 401, (method, path, headers)
            assert result.json["title"] == "401 Unauthorized"
            assert result.json["description"].startswith(description)
            assert result.headers["WWW-Authenticate"] == 'Bearer realm="shiphook admin"'
        answered = quiet.client.simulate_request(method, path, headers=ADMIN).status_code
        assert answered not in (401, 403), (method, path)
    assert quiet.instance.hooks.list() == []  # nothing was created without the token


def test_without_an_admin_token_every_admin_route_is_403(harness_factory, monkeypatch):
    monkeypatch.delenv("SHIPHOOK_ADMIN_TOKEN")
    harness = harness_factory(start=False)
    for method, path in admin_routes(harness.app):
        result = harness.client.simulate_request(method, path, headers=ADMIN)
        assert result.status_code == 403, (method, path)
        assert result.json == {
            "title": "403 Forbidden",
            "description": "the admin API is disabled: "
            "start shiphook with SHIPHOOK_ADMIN_TOKEN (or SHIPHOOK_ADMIN_TOKEN_SHA256) set",
        }


def test_a_deployment_read_with_a_hook_token_ignores_the_admin_token(quiet):
    deployment_id = quiet.deploy(quiet.new_hook("web"), {"imageTag": "1.0"})
    other = quiet.new_hook("web")
    result = quiet.client.simulate_get(
        f"/api/v1/deployments/{deployment_id}", headers={"X-Deploy-Hook-Token": other, **ADMIN}
    )
    assert result.status_code == 404


def test_admin_creates_lists_and_deletes_hooks(quiet):
    created = quiet.client.simulate_post(
        "/api/v1/targets/web/hooks", json={"name": "gha"}, headers=ADMIN
    )
    assert created.status_code == 201
    hook = created.json["hook"]
    assert hook["token"].startswith("shk_")
    assert quiet.post_hook(hook["token"], {"imageTag": "1.0"}).status_code == 201

    listed = quiet.client.simulate_get("/api/v1/targets/web/hooks", headers=ADMIN).json["hooks"]
    assert [h["name"] for h in listed] == ["gha"]
    assert "token" not in listed[0] and "tokenDigest" not in listed[0]
    shown = quiet.client.simulate_get(created.headers["location"], headers=ADMIN)
    assert shown.json == {"hook": listed[0]}

    deleted = quiet.client.simulate_delete(f"/api/v1/hooks/{hook['id']}", headers=ADMIN)
    assert deleted.status_code == 200
    assert quiet.post_hook(hook["token"], {"imageTag": "1.1"}).status_code == 404
    for gone in (quiet.client.simulate_delete, quiet.client.simulate_get):
        result = gone(f"/api/v1/hooks/{hook['id']}", headers=ADMIN)
        assert result.json == {
            "title": "404 Not Found",
            "description": f"no hook with id {hook['id']}",
        }


def test_admin_hook_creation_rejects_bad_input(quiet):
    post = quiet.client.simulate_post
    assert post("/api/v1/targets/nope/hooks", json={"name": "x"}, headers=ADMIN).status_code == 404
    assert post("/api/v1/targets/web/hooks", json={}, headers=ADMIN).status_code == 400
    assert post("/api/v1/targets/web/hooks", json={"name": ""}, headers=ADMIN).status_code == 400
    assert post("/api/v1/targets/web/hooks", body=b"{", headers=ADMIN).status_code == 400


def test_admin_lists_targets_and_deployments(quiet):
    token = quiet.new_hook("web")
    quiet.deploy(token, {"imageTag": "1.0"})
    targets = quiet.client.simulate_get("/api/v1/targets", headers=ADMIN).json["targets"]
    assert {t["name"] for t in targets} == {"web", "api", "strict", "gone", "migrate", "report"}
    listed = quiet.client.simulate_get(
        "/api/v1/deployments", params={"target": "web", "status": "queued"}, headers=ADMIN
    )
    assert [d["imageTag"] for d in listed.json["deployments"]] == ["1.0"]
    bad = quiet.client.simulate_get("/api/v1/deployments", params={"status": "x"}, headers=ADMIN)
    assert bad.status_code == 400
    bad = quiet.client.simulate_get("/api/v1/deployments", params={"limit": "x"}, headers=ADMIN)
    assert bad.status_code == 400


def test_a_target_no_longer_configured_lists_its_deployments_and_a_name_never_seen_is_404(quiet):
    retired = DeploymentCreate(
        id=str(uuid7()), target="retired", kind="app", created_at=datetime.now(UTC), image_tag="1.0"
    )
    quiet.instance.storage.add_deployment(new=retired)

    def listed(target: str) -> falcon.testing.Result:
        return quiet.client.simulate_get(
            "/api/v1/deployments", params={"target": target}, headers=ADMIN
        )

    assert [d["imageTag"] for d in listed("retired").json["deployments"]] == ["1.0"]
    assert listed("strict").json == {"deployments": []}  # configured, nothing deployed yet
    typo = listed("wbe")
    assert typo.status_code == 404
    assert typo.json["description"].startswith("no target named 'wbe' (configured: api, ")


def test_a_target_no_longer_configured_lists_its_hooks_and_a_name_never_seen_is_404(quiet):
    quiet.instance.storage.create_hook(
        name="ci", target="retired", token_digest="0" * 64, now=datetime.now(UTC)
    )

    def listed(target: str) -> falcon.testing.Result:
        return quiet.client.simulate_get(f"/api/v1/targets/{target}/hooks", headers=ADMIN)

    assert [(h["name"], h["target"]) for h in listed("retired").json["hooks"]] == [
        ("ci", "retired")
    ]
    assert listed("strict").json == {"hooks": []}  # configured, no hook yet
    typo = listed("wbe")
    assert typo.status_code == 404
    assert typo.json["description"].startswith("no target named 'wbe' (configured: api, ")
    made = quiet.client.simulate_post(
        "/api/v1/targets/retired/hooks", json={"name": "more"}, headers=ADMIN
    )
    assert made.status_code == 404, made.text  # no new hook for it


# -- query parameters -------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["-1", "0", "1001", "99999999999999999999999", "x", "1.5", ""])
def test_a_bad_limit_is_400_naming_what_it_takes_and_the_value(quiet, value):
    result = quiet.client.simulate_get(
        "/api/v1/deployments", query_string=f"limit={value}", headers=ADMIN
    )
    assert result.status_code == 400
    assert result.json == {
        "title": "400 Bad Request",
        "description": f"limit: expected a whole number from 1 to 1000, got {value!r}",
    }


def test_the_limit_bounds_the_list(quiet):
    token = quiet.new_hook("web")
    for tag in ("1.0", "1.1", "1.2"):
        quiet.deploy(token, {"imageTag": tag})
    listed = quiet.client.simulate_get("/api/v1/deployments", query_string="limit=2", headers=ADMIN)
    assert [d["imageTag"] for d in listed.json["deployments"]] == ["1.2", "1.1"]
    listed = quiet.client.simulate_get("/api/v1/deployments", headers=ADMIN)
    assert len(listed.json["deployments"]) == 3  # 50 without one


@pytest.mark.parametrize(
    "value",
    ["soon", "-1", "-inf", "nan", "inf", "1e400", "", "0x10", "1_0", "1e3", "\u0661\u0660", " 10"],
)
def test_a_bad_wait_is_400_naming_what_it_takes_and_the_value(quiet, value):
    result = quiet.post_hook(quiet.new_hook("web"), {"imageTag": "1.0"}, params={"wait": value})
    assert result.status_code == 400
    assert result.json == {
        "title": "400 Bad Request",
        "description": "wait: expected a number of seconds, 0 or more (it waits 900 at the most), "
        f"got {value!r}",
    }
    assert stored_deployments(quiet) == []


def test_wait_given_twice_is_400(quiet):
    token = quiet.new_hook("web")
    result = quiet.post_hook(token, {"imageTag": "1.0"}, params={"wait": ["5", "6"]})
    assert result.status_code == 400
    assert result.json["description"] == "wait: expected one value, given once"
    assert stored_deployments(quiet) == []


@pytest.mark.parametrize("name", ["target", "status", "limit"])
def test_a_list_filter_given_twice_is_400(quiet, name):
    """Not the last one silently: `?status=queued&status=failed` might be read as either."""
    quiet.deploy(quiet.new_hook("web"), {"imageTag": "1.0"})
    values = {"target": ["web", "api"], "status": ["queued", "failed"], "limit": ["x", "2"]}
    result = quiet.client.simulate_get(
        "/api/v1/deployments", params={name: values[name]}, headers=ADMIN
    )
    assert result.status_code == 400
    assert result.json["description"] == f"{name}: expected one value, given once"


def test_a_misspelt_wait_is_400_and_deploys_nothing(quiet):
    """`?Wait=600` ignored would answer a CI job 201 at once, whatever the rollout does."""
    token = quiet.new_hook("web")
    for params, says in [
        ({"Wait": "600"}, "unknown query parameter Wait: it takes wait"),
        ({"wait": "5", "token": "x"}, "unknown query parameter token: it takes wait"),
        ({"shk_" + "a" * 40: ""}, "unknown query parameter shk_***: it takes wait"),
    ]:
        result = quiet.post_hook(token, {"imageTag": "1.0"}, params=params)
        assert result.status_code == 400, params
        assert result.json["description"].startswith(says), result.json
    assert stored_deployments(quiet) == []


def test_every_admin_route_refuses_a_query_parameter_it_does_not_take(quiet):
    for method, path in admin_routes(quiet.app):
        result = quiet.client.simulate_request(
            method, path, params={"staus": "failed"}, headers=ADMIN
        )
        takes = "target, status, limit" if path == "/api/v1/deployments" else "none"
        assert result.status_code == 400, (method, path)
        assert result.json["description"] == (f"unknown query parameter staus: it takes {takes}"), (
            method,
            path,
        )
    assert quiet.client.simulate_get("/healthz", params={"probe": "1"}).status_code == 200


def test_an_unknown_path_or_method_is_answered_with_what_is_wrong(quiet):
    for method, path in [("DELETE", "/api/v1/hooks/abc"), ("GET", "/api/v1/dh/"), ("GET", "/x")]:
        result = quiet.client.simulate_request(method, path, headers=ADMIN)
        assert result.status_code == 404
        assert result.json["description"].startswith(f"no endpoint {path}: "), result.json
        assert ("whole number" in result.json["description"]) == ("/hooks/" in path)
    escaped = quiet.client.simulate_get("/a%0Ab")
    assert escaped.json["description"].startswith("no endpoint /a\\nb: "), escaped.json
    for method in ("GET", "PUT"):
        result = quiet.client.simulate_request(method, "/api/v1/dh")
        assert result.status_code == 405
        assert result.headers["allow"] == "POST, OPTIONS"
        assert result.json["description"] == (
            f"{method} is not allowed here; this path takes POST, OPTIONS"
        )


def test_the_wait_is_checked_after_the_token_and_before_the_body(quiet):
    bad_wait = {"wait": "soon"}
    assert quiet.post_hook(tokens.new_token(), b"{", params=bad_wait).status_code == 404
    result = quiet.post_hook(quiet.new_hook("web"), b"{", params=bad_wait)
    assert result.json["description"].startswith("wait: ")


def test_a_zero_wait_answers_at_once(quiet):
    result = quiet.post_hook(quiet.new_hook("web"), {"imageTag": "1.0"}, params={"wait": "0"})
    assert result.status_code == 201
    assert result.json["deployment"]["status"] == "queued"


# -- what ?wait answers: the outcome is the service's, the status code the API's ----------------


def deployment_in(status: Status, message: str = "") -> DeploymentPublic:
    now = datetime.now(UTC)
    return DeploymentPublic(
        id=UNKNOWN_DEPLOYMENT,
        target="web",
        kind="app",
        status=status,
        message=message,
        created_at=now,
    )


@pytest.mark.parametrize(
    ("status", "code"),
    [
        (Status.succeeded, 201),
        (Status.failed, 502),
        (Status.rolled_back, 502),
        (Status.superseded, 409),
        (Status.queued, 504),
        (Status.in_progress, 504),
    ],
)
def test_each_state_a_wait_ends_in_has_the_readme_s_status_code(status, code):
    waited = wait_outcome(deployment_in(status), waited=1)
    assert int(WAIT_STATUS[waited.outcome][:3]) == code
    assert (waited.description is None) == (code == 201)
    assert waited.deployment.status == status


def test_a_wait_outcome_says_what_a_ci_job_reads():
    d = UNKNOWN_DEPLOYMENT
    said = {
        status: wait_outcome(deployment_in(status, message), waited=0.3).description
        for status, message in [
            (Status.rolled_back, "task exited with code 1; rolled back"),
            (Status.failed, "task exited with code 1"),
            (Status.superseded, "superseded by deployment X (tag 2.0)"),
            (Status.in_progress, "1/2 tasks updated"),
            (Status.queued, ""),
        ]
    }
    assert said == {
        Status.rolled_back: f"deployment {d} rolled back: task exited with code 1; rolled back",
        Status.failed: f"deployment {d} failed: task exited with code 1",
        Status.superseded: f"deployment {d} was superseded by deployment X (tag 2.0)",
        Status.in_progress: f"deployment {d} is still in_progress after 0.3s; it goes on: "
        f"GET /api/v1/deployments/{d}",
        Status.queued: f"deployment {d} is still queued after 0.3s; it goes on: "
        f"GET /api/v1/deployments/{d}",
    }
    stopping = wait_outcome(deployment_in(Status.in_progress), waited=9, shutting_down=True)
    assert stopping.description == (
        f"deployment {d} is still in_progress, and the server is shutting down; it goes on: "
        f"GET /api/v1/deployments/{d}"
    )


# -- the access log ---------------------------------------------------------------------------


def test_the_access_log_says_what_each_hook_and_admin_request_was_answered(
    quiet, caplog, monkeypatch
):
    caplog.set_level(logging.INFO, logger="shiphook.access")
    token = quiet.new_hook("web")
    accepted = quiet.deploy(token, {"imageTag": "1.0"})
    quiet.post_hook(token, {"imageTag": "1.0"}, params={"wait": "soon"})
    quiet.client.simulate_get("/api/v1/dh")  # no hook request, but a refusal: 405
    quiet.client.simulate_get("/healthz")  # neither
    quiet.client.simulate_get("/api/v1/targets", headers=ADMIN)
    created = quiet.client.simulate_post(
        "/api/v1/targets/web/hooks", json={"name": "ci"}, headers=ADMIN
    )
    hook = created.json["hook"]["id"]
    quiet.client.simulate_delete(f"/api/v1/hooks/{hook}", headers={"Authorization": "Bearer guess"})
    quiet.client.simulate_delete(f"/api/v1/hooks/{hook}", headers=ADMIN)
    quiet.client.simulate_get("/api/v1/deployments/a%0Ab", headers=ADMIN)

    def broken(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(quiet.instance.storage.accept_path, "add_deployments", broken)
    quiet.post_hook(token, {"imageTag": "1.1"})
    lines = [r.getMessage() for r in caplog.records if r.name == "shiphook.access"]
    assert [re.sub(r" \(\d+\.\d ms\)$", "", line) for line in lines] == [
        f"POST /api/v1/dh 201 deployment {accepted} queued",
        "POST /api/v1/dh 400 wait: expected a number of seconds, 0 or more (it waits 900 at the "
        "most), got 'soon'",
        "GET /api/v1/dh 405 GET is not allowed here; this path takes POST, OPTIONS",
        "GET /api/v1/targets 200 ",
        f"POST /api/v1/targets/web/hooks 201 hook {hook} (ci) of target web",
        f"DELETE /api/v1/hooks/{hook} 401 the admin token is not valid",
        f"DELETE /api/v1/hooks/{hook} 200 hook {hook} (ci) of target web",
        "GET /api/v1/deployments/a\\nb 404 no deployment with id 'a\\nb'",
        "POST /api/v1/dh 500 unexpected error",
    ]


def test_healthz(quiet):
    assert quiet.client.simulate_get("/healthz").json == {"status": "ok"}
    assert quiet.client.simulate_head("/healthz").status_code == 200


def test_an_unexpected_error_is_500_with_a_request_id_in_body_and_log(quiet, caplog, monkeypatch):
    token = quiet.new_hook("web")

    def broken(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(quiet.instance.storage.accept_path, "add_deployments", broken)
    result = quiet.post_hook(token, {"imageTag": "1.0"})
    assert result.status_code == 500
    request_id = result.json["requestId"]
    assert "disk on fire" not in result.text
    assert any(request_id in r.getMessage() for r in caplog.records)


def hookless(tag: str) -> Accepted:
    """A deployment of `web` that no hook asked for (as a rollback): no hook to check."""
    new = DeploymentCreate(
        id=str(uuid7()), target="web", kind="app", created_at=datetime.now(UTC), image_tag=tag
    )
    return Accepted(new)


def test_requests_read_within_the_group_commits_turns_share_one_commit(quiet, monkeypatch):
    storage = quiet.instance.storage
    batches: list[list[str]] = []
    add_deployments = storage.accept_path.add_deployments

    def counted(*, batch):
        batches.append([a.new.image_tag for a in batch])
        return add_deployments(batch=batch)

    monkeypatch.setattr(storage.accept_path, "add_deployments", counted)

    async def accept(tag: str, turns: int) -> None:
        for _ in range(turns):  # each sleep(0) is one turn of the event loop
            await asyncio.sleep(0)
        await commits.add(hookless(tag))

    within = range(GroupCommit.TURNS)  # the turns of the first request and those after it
    late = 3 * GroupCommit.TURNS

    async def main() -> None:
        await asyncio.gather(
            *(accept(f"{turns}.{n}", turns) for turns in (*within, late) for n in (0, 1))
        )

    commits = GroupCommit(storage)
    asyncio.run(main())
    first = [f"{turns}.{n}" for turns in within for n in (0, 1)]
    second = [f"{late}.0", f"{late}.1"]
    assert batches == [first, second]  # those read within the turns, then the late ones
    assert sorted(d.image_tag for d in quiet.instance.deployments.list()) == first + second


# -- the accept path on PostgreSQL ------------------------------------------------------------


@pytest.fixture
def pg_storage(postgres_url) -> Iterator[Storage]:
    engine = create_db_engine(postgres_url)
    upgrade(engine)
    storage = Storage(engine)
    try:
        yield storage
    finally:
        storage.close()


def accepted_by(hook: HookPublic, digest: str, tag: str, *, stamp: bool = False) -> Accepted:
    new = DeploymentCreate(
        id=str(uuid7()),
        target=hook.target,
        kind="app",
        created_at=datetime.now(UTC),
        hook_id=hook.id,
        hook_name=hook.name,
        image_tag=tag,
    )
    return Accepted(new, stamp, digest)


def test_on_postgresql_a_batch_is_one_statement_from_the_event_loop(pg_storage):
    """No database thread; the hooks checked in the statement: a deleted hook's rows are left
    out (its callers get `HookGone`), the others' recorded, a stamped hook's use recorded."""
    now = datetime.now(UTC)
    kept = pg_storage.create_hook(name="ci", target="web", token_digest="a" * 64, now=now)
    deleted = pg_storage.create_hook(name="old", target="web", token_digest="b" * 64, now=now)
    pg_storage.delete_hook(hook_id=deleted.id)
    batches: list[list[str]] = []
    add_on_loop = pg_storage.accept_path.add_deployments_on_loop

    async def counted(*, batch):
        batches.append([a.new.image_tag for a in batch])
        return await add_on_loop(batch=batch)

    pg_storage.accept_path.add_deployments_on_loop = counted

    async def main() -> list[BaseException | None]:
        commits = GroupCommit(pg_storage)
        batch = [
            accepted_by(kept, "a" * 64, "1.0", stamp=True),
            accepted_by(deleted, "b" * 64, "1.1"),
            accepted_by(kept, "a" * 64, "1.2"),
        ]
        return await asyncio.gather(*(commits.add(a) for a in batch), return_exceptions=True)

    outcomes = asyncio.run(main())
    assert [type(o).__name__ for o in outcomes] == ["NoneType", "HookGone", "NoneType"]
    assert batches == [["1.0", "1.1", "1.2"]]
    assert pg_storage._threads is None  # the pool of database threads was never started
    recorded = pg_storage.list_deployments(target="web", limit=10)
    assert sorted(d.image_tag for d in recorded) == ["1.0", "1.2"]
    assert all(d.status == Status.queued and d.hook_name == "ci" for d in recorded)
    [hook] = pg_storage.list_hooks()
    assert hook.last_used_at == min(d.created_at for d in recorded)  # the stamped request's

    # a deployment no hook asked for (as a rollback on demand) is recorded without a check; a
    # job's variables keep their JSON shape and text, NUL-free as the API has them
    env = [{"name": "GREETING", "value": 'h\u00e9llo "world"\n'}]
    no_hook = DeploymentCreate(
        id=str(uuid7()), target="migrate", kind="job", created_at=datetime.now(UTC), env=env
    )
    pg_storage.add_deployment(new=no_hook)
    assert pg_storage.get_deployment(deployment_id=no_hook.id).env == env


def end_backends(storage: Storage, *, running: str) -> None:
    """End the PostgreSQL backends whose last statement holds `running`, as a restart or an idle
    timeout would, and wait until they are gone."""
    with storage.engine.connect() as connection:
        ended = (
            connection.exec_driver_sql(
                "SELECT pid FROM pg_stat_activity, pg_terminate_backend(pid) AS ended "
                "WHERE strpos(query, %(running)s) > 0 AND pid <> pg_backend_pid()",
                {"running": running},
            )
            .scalars()
            .all()
        )
    assert ended

    def gone() -> bool:  # in a transaction of its own: each sees the activity anew
        with storage.engine.connect() as connection:
            return not connection.exec_driver_sql(
                "SELECT pid FROM pg_stat_activity WHERE pid = ANY(%(ended)s)", {"ended": ended}
            ).all()

    eventually(gone, "the backends' end")


def test_on_postgresql_the_next_batch_is_sent_before_the_last_ones_callers_are_answered(
    pg_storage, monkeypatch
):
    """...and they are answered even when it cannot be sent."""
    events: list[str] = []
    add_on_loop = pg_storage.accept_path.add_deployments_on_loop

    def sending(*, batch):
        tags = " ".join(a.new.image_tag for a in batch)
        if "2.0" in tags:
            events.append(f"send {tags}")
            raise RuntimeError("no connection to send it on")

        async def sent():
            events.append(f"send {tags}")  # the task's first step sends the statement
            return await add_on_loop(batch=batch)

        return sent()

    monkeypatch.setattr(pg_storage.accept_path, "add_deployments_on_loop", sending)
    monkeypatch.setattr(pg_storage, "timeout", 0.2)  # how long a batch never sent waits

    async def accept(tag: str) -> None:
        await commits.add(hookless(tag))
        events.append(f"answered {tag}")

    async def main(first: str, then: str) -> None:
        one = asyncio.ensure_future(accept(first))
        while not events:  # until its batch is sent
            await asyncio.sleep(0)
        await asyncio.wait_for(asyncio.gather(one, accept(then), return_exceptions=True), 10)

    commits = GroupCommit(pg_storage)
    asyncio.run(main("1.0", "1.1"))
    assert events == ["send 1.0", "send 1.1", "answered 1.0", "answered 1.1"]
    events.clear()
    asyncio.run(main("1.2", "2.0"))  # 2.0's batch cannot be sent; 1.2 is answered all the same
    assert events == ["send 1.2", "send 2.0", "answered 1.2"]


def test_on_postgresql_the_accept_paths_connections_the_server_closed_are_replaced(pg_storage):
    """Before use, without a failed request: the insert's connection on the event loop, and the
    token lookup's in a thread."""
    hook = pg_storage.create_hook(
        name="ci", target="web", token_digest="a" * 64, now=datetime.now(UTC)
    )

    async def add(tag: str) -> BaseException | None:
        commits = GroupCommit(pg_storage)
        [outcome] = await asyncio.gather(
            commits.add(accepted_by(hook, "a" * 64, tag)), return_exceptions=True
        )
        return outcome

    async def main() -> list[BaseException | None]:
        first = await add("1.0")
        end_backends(pg_storage, running="json_to_recordset")
        return [first, await add("2.0"), await add("3.0")]

    assert asyncio.run(main()) == [None, None, None]
    assert asyncio.run(add("4.0")) is None  # another event loop: a connection of its own
    tags = sorted(d.image_tag for d in pg_storage.list_deployments(target="web", limit=10))
    assert tags == ["1.0", "2.0", "3.0", "4.0"]

    lookup = pg_storage.accept_path.hook_by_digest
    assert lookup(token_digest="a" * 64) == lookup(token_digest="a" * 64)  # a connection kept
    end_backends(pg_storage, running="WHERE hook.token_digest")
    found = lookup(token_digest="a" * 64)
    assert found is not None and found.name == "ci"


@pytest.mark.parametrize(("setting", "pragma"), [("", 2), ('sqlite_synchronous = "normal"', 1)])
def test_sqlite_commits_sync_as_the_readme_says(harness_factory, setting, pragma):
    """FULL (2) by default: a 201 survives a power loss; NORMAL (1) when configured: it
    survives shiphook's crash, not always the machine's."""
    storage = harness_factory(start=False, server=setting).instance.storage
    with storage.engine.connect() as connection:
        assert connection.exec_driver_sql("PRAGMA synchronous").scalar_one() == pragma
        assert connection.exec_driver_sql("PRAGMA journal_mode").scalar_one() == "wal"


def test_a_full_sqlite_disk_answers_503_and_logs_once(quiet, caplog):
    """SQLite refusing to grow the file (`max_page_count` at the size it has) as on a full disk."""
    token = quiet.new_hook("migrate")
    engine = quiet.instance.storage.engine
    with engine.connect() as connection:
        pages = connection.exec_driver_sql("PRAGMA page_count").scalar_one()
    # the accept path's own connection, taken at the first request, sees the limit
    event.listen(engine, "checkout", lambda c, *_: c.execute(f"PRAGMA max_page_count={pages}"))
    body = {"instanceEnvironmentVariables": [{"name": "GREETING", "value": "x" * 30000}]}
    answers = [quiet.post_hook(token, body) for _ in range(3)]
    assert [a.status_code for a in answers] == [503] * 3
    assert all(int(a.headers["Retry-After"]) > 0 for a in answers)
    assert answers[0].json["cause"] == "OperationalError"
    logged = [r.getMessage() for r in caplog.records if r.name == "shiphook.storage"]
    assert logged == ["database unreachable: OperationalError: database or disk is full"]
    assert not [r for r in caplog.records if r.name == "shiphook.http"]  # no 500, no traceback
