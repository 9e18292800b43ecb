"""The HTTP API: a Falcon ASGI app built by `create_app` from the collaborators it is given.

Resources are thin: they read the request, call a service and shape the answer. Services raise
domain errors; `ERROR_STATUS` maps each to an HTTP status in one place.
"""

from __future__ import annotations

import hmac
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

import falcon
import falcon.asgi
import falcon.media
import orjson

from shiphook.backends import Target
from shiphook.errors import (
    AdminDisabled,
    Conflict,
    DatabaseUnavailable,
    InvalidRequest,
    NotFound,
    PayloadTooLarge,
    ShiphookError,
    Unauthenticated,
    Unprocessable,
)
from shiphook.http.waiters import Waiters
from shiphook.models import Status
from shiphook.services import (
    Deployments,
    Hooks,
    NewHookBody,
    parse_json_body,
    public_target,
)

log = logging.getLogger("shiphook.http")
access_log = logging.getLogger("shiphook.access")

TOKEN_HEADER = "X-Deploy-Hook-Token"
MAX_BODY = 64 * 1024

ERROR_STATUS: dict[type[ShiphookError], str] = {
    InvalidRequest: falcon.HTTP_400,
    Unauthenticated: falcon.HTTP_401,
    AdminDisabled: falcon.HTTP_403,
    NotFound: falcon.HTTP_404,
    Conflict: falcon.HTTP_409,
    PayloadTooLarge: falcon.HTTP_413,
    Unprocessable: falcon.HTTP_422,
    DatabaseUnavailable: falcon.HTTP_503,
}
# scope["extensions"][SHUTDOWN], set by `shiphook serve`: a future of the event loop, done once
# the server begins to shut down (it then accepts no connection and waits for the requests)
SHUTDOWN = "shiphook.shutdown"
RETRY_AFTER = "5"  # seconds a caller is told to wait when the database is unavailable

# How `?wait` answers, by the state the deployment is in when the wait ends.
WAIT_STATUS = {
    Status.succeeded: falcon.HTTP_201,
    Status.failed: falcon.HTTP_502,
    Status.rolled_back: falcon.HTTP_502,
    Status.superseded: falcon.HTTP_409,
    Status.queued: falcon.HTTP_504,
    Status.in_progress: falcon.HTTP_504,
}


class AdminGuard:
    """Checks `Authorization: Bearer <admin token>`; without a configured token, admin is off."""

    def __init__(self, token: str | None) -> None:
        self._token = token.encode() if token else None

    def check(self, req: falcon.asgi.Request) -> None:
        if self._token is None:
            raise AdminDisabled(
                "the admin API is disabled: start shiphook with SHIPHOOK_ADMIN_TOKEN set"
            )
        scheme, _, given = (req.get_header("Authorization") or "").partition(" ")
        if scheme.lower() != "bearer" or not given:
            raise Unauthenticated(
                "admin token required: send 'Authorization: Bearer <admin token>'"
            )
        if not hmac.compare_digest(given.strip().encode(), self._token):
            raise Unauthenticated("the admin token is not valid")


async def read_body(req: falcon.asgi.Request) -> bytes:
    if req.content_length is not None and req.content_length > MAX_BODY:
        raise PayloadTooLarge(
            f"request body is {req.content_length} bytes; the limit is {MAX_BODY}"
        )
    body = await req.bounded_stream.read(MAX_BODY + 1)
    if len(body) > MAX_BODY:
        raise PayloadTooLarge(f"request body exceeds the limit of {MAX_BODY} bytes")
    return body


class DeployHookResource:
    def __init__(
        self,
        hooks: Hooks,
        deployments: Deployments,
        notify: Callable[[str], None],
        waiters: Waiters,
        max_wait: float,
    ) -> None:
        self.hooks = hooks
        self.deployments = deployments
        self.notify = notify
        self.waiters = waiters
        self.max_wait = max_wait
        self.db = deployments.storage.call

    async def on_post(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        started = time.perf_counter()
        try:
            outcome = await self._deploy(req, resp)
        except Exception as error:
            reason = error.message if isinstance(error, ShiphookError) else "unexpected error"
            _log_access(req, _status_of(error), reason, started)
            raise
        _log_access(req, resp.status, outcome, started)

    async def _deploy(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> str:
        """Answer the hook request; return what the access log says of it."""
        token = req.get_header(TOKEN_HEADER)
        if token is None:
            raise InvalidRequest(f"missing header {TOKEN_HEADER}: send the hook's token in it")
        hook = await self.hooks.authenticate_deploy(token)
        wait = self._wait_seconds(req)
        deployment, created = await self.deployments.accept(
            hook, await read_body(req), idempotency_key=req.get_header("Idempotency-Key")
        )
        if created:
            self.notify(deployment["target"])
        else:
            resp.set_header("Idempotent-Replayed", "true")
        resp.location = f"/api/v1/deployments/{deployment['id']}"
        if not wait:
            resp.status = falcon.HTTP_201
            resp.media = {"deployment": deployment}
            return f"deployment {deployment['id']} {deployment['status']}"
        shutdown = req.scope.get("extensions", {}).get(SHUTDOWN)
        await self.waiters.wait(deployment["id"], wait, until=shutdown)
        outcome = (await self.db(self.deployments.get, deployment["id"])).to_json()
        resp.status = WAIT_STATUS[Status(outcome["status"])]
        if resp.status == falcon.HTTP_201:
            resp.media = {"deployment": outcome}
        else:
            stopping = shutdown is not None and shutdown.done()
            resp.media = {
                "title": resp.status,
                "description": wait_outcome(outcome, wait, shutting_down=stopping),
                "deployment": outcome,
            }
        return f"deployment {outcome['id']} {outcome['status']}"

    def _wait_seconds(self, req: falcon.asgi.Request) -> float:
        raw = req.get_param("wait")
        if raw is None:
            return 0.0
        try:
            seconds = float(raw)
        except ValueError:
            seconds = -1.0
        if not 0 <= seconds < float("inf"):
            raise InvalidRequest(
                f"wait: expected a number of seconds from 0 to {self.max_wait:g}, got {raw!r}"
            )
        return min(seconds, self.max_wait)


def _status_of(error: Exception) -> str:
    """The status the error handlers answer `error` with."""
    for kind in type(error).__mro__:
        if kind in ERROR_STATUS:
            return ERROR_STATUS[kind]
    return falcon.HTTP_500


def _log_access(req: falcon.asgi.Request, status: str, outcome: str, started: float) -> None:
    """One line per hook request (uvicorn's access log is off); never a header nor the query
    string, so never a token."""
    if access_log.isEnabledFor(logging.INFO):
        args = (
            req.method,
            req.path,
            str(status)[:3],
            outcome,
            (time.perf_counter() - started) * 1e3,
        )
        # made directly: `info()` would first walk the stack for a caller no line shows
        access_log.handle(
            access_log.makeRecord(
                access_log.name, logging.INFO, __file__, 0, "%s %s %s %s (%.1f ms)", args, None
            )
        )


def wait_outcome(deployment: dict[str, Any], waited: float, *, shutting_down: bool = False) -> str:
    """What a waiting CI job reads when the rollout did not simply succeed."""
    status, message, ident = deployment["status"], deployment["message"], deployment["id"]
    if status == Status.superseded:  # the message names the newer deployment and its tag
        return f"deployment {ident} was {message}"
    if status in (Status.queued, Status.in_progress):
        when = ", and the server is shutting down" if shutting_down else f" after {waited:g}s"
        return (
            f"deployment {ident} is still {status}{when}; it goes on: "
            f"GET /api/v1/deployments/{ident}"
        )
    return f"deployment {ident} {status.replace('_', ' ')}: {message}"


class DeploymentsResource:
    def __init__(
        self,
        hooks: Hooks,
        deployments: Deployments,
        guard: AdminGuard,
        notify: Callable[[str], None],
    ) -> None:
        self.hooks = hooks
        self.deployments = deployments
        self.guard = guard
        self.notify = notify
        self.db = deployments.storage.call

    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        self.guard.check(req)
        found = await self.db(
            self.deployments.list,
            target=req.get_param("target"),
            status=req.get_param("status"),
            limit=_int_param(req, "limit", 50),
        )
        resp.media = {"deployments": [d.to_json() for d in found]}

    async def on_get_item(
        self, req: falcon.asgi.Request, resp: falcon.asgi.Response, deployment_id: str
    ) -> None:
        token = req.get_header(TOKEN_HEADER)
        hook = None
        if token is not None:
            hook = await self.db(self.hooks.authenticate, token)
        else:
            self.guard.check(req)
        deployment = await self.db(self.deployments.get, deployment_id, hook=hook)
        resp.media = {"deployment": deployment.to_json()}

    async def on_post_rollback(
        self, req: falcon.asgi.Request, resp: falcon.asgi.Response, deployment_id: str
    ) -> None:
        self.guard.check(req)
        deployment = await self.db(self.deployments.rollback, deployment_id)
        self.notify(deployment.target)
        resp.status = falcon.HTTP_201
        resp.location = f"/api/v1/deployments/{deployment.id}"
        resp.media = {"deployment": deployment.to_json()}


class TargetsResource:
    def __init__(self, targets: dict[str, Target], guard: AdminGuard) -> None:
        self.targets = targets
        self.guard = guard

    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        self.guard.check(req)
        resp.media = {"targets": [public_target(t) for t in self.targets.values()]}


class HooksResource:
    def __init__(self, hooks: Hooks, guard: AdminGuard) -> None:
        self.hooks = hooks
        self.guard = guard
        self.db = hooks.storage.call

    async def on_get(
        self, req: falcon.asgi.Request, resp: falcon.asgi.Response, target: str
    ) -> None:
        self.guard.check(req)
        found = await self.db(self.hooks.list, target=target)
        resp.media = {"hooks": [h.model_dump(mode="json", by_alias=True) for h in found]}

    async def on_post(
        self, req: falcon.asgi.Request, resp: falcon.asgi.Response, target: str
    ) -> None:
        self.guard.check(req)
        body = parse_json_body(
            NewHookBody, await read_body(req), 'expected a JSON object like {"name": "gitlab-ci"}'
        )
        created = await self.db(self.hooks.create, target=target, name=body.name)
        resp.status = falcon.HTTP_201
        resp.location = f"/api/v1/hooks/{created.id}"
        resp.media = {"hook": created.model_dump(mode="json", by_alias=True)}

    async def on_delete_item(
        self, req: falcon.asgi.Request, resp: falcon.asgi.Response, hook_id: int
    ) -> None:
        self.guard.check(req)
        deleted = await self.db(self.hooks.delete, hook_id)
        resp.media = {"hook": deleted.model_dump(mode="json", by_alias=True)}


class HealthResource:
    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        resp.media = {"status": "ok"}


def _int_param(req: falcon.asgi.Request, name: str, default: int) -> int:
    raw = req.get_param(name)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError:
        raise InvalidRequest(f"{name}: expected a whole number, got {raw!r}") from None


def _domain_error_handler(status: str):
    async def handle(req, resp, error: ShiphookError, params) -> None:
        resp.status = status
        resp.media = {"title": status, "description": error.message}
        if status == falcon.HTTP_401:
            resp.set_header("WWW-Authenticate", 'Bearer realm="shiphook admin"')
        if isinstance(error, DatabaseUnavailable):
            resp.media["cause"] = error.cause
            resp.set_header("Retry-After", RETRY_AFTER)

    return handle


async def _unexpected_error(req, resp, error: Exception, params) -> None:
    request_id = req.get_header("X-Request-ID") or uuid.uuid4().hex
    log.error("request %s: %s %s failed", request_id, req.method, req.path, exc_info=error)
    resp.status = falcon.HTTP_500
    resp.media = {
        "title": falcon.HTTP_500,
        "description": "an unexpected error occurred; quote the request id when reporting it",
        "requestId": request_id,
    }


def create_app(
    *,
    hooks: Hooks,
    deployments: Deployments,
    targets: dict[str, Target],
    notify: Callable[[str], None],
    waiters: Waiters,
    admin_token: str | None,
    max_wait: float = 900,
    middleware: list[Any] | None = None,
) -> falcon.asgi.App:
    """Build the API. `notify` is called after each committed deployment (the deployer's wake-up);
    `waiters` serves `?wait`."""
    app = falcon.asgi.App(middleware=middleware or [])
    json_handler = falcon.media.JSONHandler(dumps=orjson.dumps, loads=orjson.loads)
    app.req_options.media_handlers[falcon.MEDIA_JSON] = json_handler
    app.resp_options.media_handlers[falcon.MEDIA_JSON] = json_handler
    guard = AdminGuard(admin_token)
    deployments_resource = DeploymentsResource(hooks, deployments, guard, notify)
    hooks_resource = HooksResource(hooks, guard)

    app.add_route("/healthz", HealthResource())
    app.add_route("/api/v1/dh", DeployHookResource(hooks, deployments, notify, waiters, max_wait))
    app.add_route("/api/v1/deployments", deployments_resource)
    app.add_route("/api/v1/deployments/{deployment_id}", deployments_resource, suffix="item")
    app.add_route(
        "/api/v1/deployments/{deployment_id}/rollback", deployments_resource, suffix="rollback"
    )
    app.add_route("/api/v1/targets", TargetsResource(targets, guard))
    app.add_route("/api/v1/targets/{target}/hooks", hooks_resource)
    app.add_route("/api/v1/hooks/{hook_id:int}", hooks_resource, suffix="item")

    app.add_error_handler(Exception, _unexpected_error)
    for error, status in ERROR_STATUS.items():
        app.add_error_handler(error, _domain_error_handler(status))
    return app
