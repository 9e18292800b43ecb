"""The HTTP API: a Falcon ASGI app built by `create_app` from the collaborators it is given.

Resources are thin: they read the request, call a service and shape the answer. Who may call a
resource is declared once, on its class (`@falcon.before(admin_only)`). Services raise domain
errors; `ERROR_STATUS` maps each to an HTTP status in one place, and `_bad_parameter` answers a
query parameter that `req.get_param_as_int/float` refused in the same JSON shape. `AccessLog`
writes a line per hook request and admin API request from the answer as sent. In front of
Falcon, `PlainHookPath` answers the plain hook request, most of what shiphook answers under
load, with the same answers as `DeployHookResource` at a fraction of the cost.
"""

from __future__ import annotations

import hmac
import logging
import re
import time
import uuid
from collections.abc import Callable
from typing import Any

import falcon
import falcon.asgi
import falcon.media
import orjson
from falcon.asgi import Request, Response

from shiphook.backends import Target
from shiphook.errors import (
    AdminDisabled,
    Conflict,
    DatabaseUnavailable,
    InvalidRequest,
    NotFound,
    PayloadTooLarge,
    RequestTimeout,
    ShiphookError,
    Unauthenticated,
    Unprocessable,
    quoted,
    shown_key,
)
from shiphook.http.waiters import Waiters
from shiphook.models import HookIdentity
from shiphook.services import (
    LIST_LIMITS,
    WHOLE_NUMBER,
    Deployments,
    Hooks,
    NewHookBody,
    WaitOutcome,
    parse_json_body,
    public_target,
    wait_outcome,
)
from shiphook.tokens import TOKEN_HEADER, digest, redacted

log = logging.getLogger("shiphook.http")
access_log = logging.getLogger("shiphook.access")

MAX_BODY = 64 * 1024
DH = "/api/v1/dh"  # the deploy hook
JSON = falcon.MEDIA_JSON.encode()
SECONDS = re.compile(r"[0-9]+(\.[0-9]+)?", re.ASCII)  # `?wait`


class WholeNumberConverter(falcon.routing.BaseConverter):
    """`{hook_id:whole}`: Falcon's `int` converter, of ASCII digits only."""

    def convert(self, value: str) -> int | None:
        return int(value) if WHOLE_NUMBER.fullmatch(value) else None  # 60 digits at the most


ERROR_STATUS: dict[type[ShiphookError], str] = {
    InvalidRequest: falcon.HTTP_400,
    Unauthenticated: falcon.HTTP_401,
    AdminDisabled: falcon.HTTP_403,
    NotFound: falcon.HTTP_404,
    RequestTimeout: falcon.HTTP_408,
    Conflict: falcon.HTTP_409,
    PayloadTooLarge: falcon.HTTP_413,
    Unprocessable: falcon.HTTP_422,
    DatabaseUnavailable: falcon.HTTP_503,
}
DOMAIN_ERRORS = tuple(ERROR_STATUS)
# scope["extensions"][SHUTDOWN], set by `shiphook serve`: a future of the event loop, done once
# the server begins to shut down (it then accepts no connection and waits for the requests), or
# the client has gone (nothing then waits for the answer)
SHUTDOWN = "shiphook.shutdown"
# scope["extensions"][BODY_CUT], set by `shiphook serve` when the connection closed before the
# request's body had all arrived (the client went, or body_timeout passed): the ASGI server then
# ends the body as if it were complete, and what came of it must not be acted on
BODY_CUT = "shiphook.body_cut"
BODY_CUT_SHORT = (
    "the request body did not all arrive: the connection closed, or [server] body_timeout passed"
)
RETRY_AFTER = "5"  # seconds a caller is told to wait when the database is unavailable

# How `?wait` answers each outcome (`shiphook.services.wait_outcome`).
WAIT_STATUS = {
    WaitOutcome.succeeded: falcon.HTTP_201,
    WaitOutcome.failed: falcon.HTTP_502,
    WaitOutcome.superseded: falcon.HTTP_409,
    WaitOutcome.unfinished: falcon.HTTP_504,
}


class AdminGuard:
    """Checks `Authorization: Bearer <admin token>` against the token's SHA-256; without one,
    admin is off."""

    def __init__(self, admin_digest: str | None) -> None:
        self._digest = admin_digest

    def check(self, req: Request) -> None:
        if self._digest is None:
            raise AdminDisabled(
                "the admin API is disabled: start shiphook with SHIPHOOK_ADMIN_TOKEN (or "
                "SHIPHOOK_ADMIN_TOKEN_SHA256) set"
            )
        scheme, _, given = (req.get_header("Authorization") or "").partition(" ")
        if scheme.lower() != "bearer" or not given:
            raise Unauthenticated(
                "admin token required: send 'Authorization: Bearer <admin token>'"
            )
        given = given.strip()
        if not given.isascii() or not hmac.compare_digest(digest(given), self._digest):
            raise Unauthenticated("the admin token is not valid")


async def admin_only(req: Request, resp: Response, resource: Any, params: dict) -> None:
    """Runs before every responder of an admin resource (`@falcon.before(admin_only)` on its
    class): the admin token (`resource.admin`, an `AdminGuard`), or 401 / 403. Every such
    request, refused or not, gets an access line."""
    req.context.logged_since = time.perf_counter()
    resource.admin.check(req)


async def hook_token_or_admin(req: Request, resp: Response, resource: Any, params: dict) -> None:
    """Runs before the responders of a resource that a deploy hook's token opens as well as the
    admin token: passes them `hook`, the hook whose token was sent (it sees only what it
    created), or `None` for the admin."""
    req.context.logged_since = time.perf_counter()
    token = single_header(req, TOKEN_HEADER)
    if token is None:
        if req.get_header("Authorization") is None:
            raise Unauthenticated(
                f"send the token of the hook that made it in {TOKEN_HEADER}, or the admin "
                "token as 'Authorization: Bearer <admin token>'"
            )
        resource.admin.check(req)
        params["hook"] = None
    else:
        params["hook"] = await resource.hooks.storage.call(resource.hooks.authenticate, token)


def single_header(req: Request, name: str) -> str | None:
    """A header that holds one value (a token, a key), without the spaces and tabs around it,
    which are no part of a field's value (RFC 9110, 5.5): a proxy may drop them. Falcon joins a
    field sent more than once with commas, so a comma is refused."""
    value = req.get_header(name)
    if value is None:
        return None
    if "," in value:
        raise InvalidRequest(f"{name}: expected one value, without a comma (sent twice?)")
    return value.strip(" \t")


def takes_params(req: Request, *names: str) -> None:
    """A query parameter the route does not take is refused, not ignored: `?Wait=600` read as
    no wait would answer a CI job 201 for a deployment that then fails."""
    if req.query_string and (unknown := sorted(set(req.params) - set(names))):
        takes = f"it takes {', '.join(names)}" if names else "it takes none"
        shown = redacted(shown_key(unknown[0]))
        raise InvalidRequest(f"unknown query parameter {shown}: {takes}")


def one_param(req: Request, name: str) -> str | None:
    """A query parameter, given once at the most: which of two values a proxy, a log reader or
    the server would take is anyone's guess, so a second one is refused."""
    given = req.get_param_as_list(name) or ()
    if len(given) > 1:
        raise InvalidRequest(f"{name}: expected one value, given once")
    return given[0] if given else None


async def read_body(req: Request) -> bytes:
    """The request's body (the connection answers one that is late: [server] body_timeout)."""
    if req.content_length is not None and req.content_length > MAX_BODY:
        raise PayloadTooLarge(
            f"request body is {req.content_length} bytes; the limit is {MAX_BODY}"
        )
    body = await req.bounded_stream.read(MAX_BODY + 1)
    if req.scope.get("extensions", {}).get(BODY_CUT):
        raise RequestTimeout(BODY_CUT_SHORT)
    if len(body) > MAX_BODY:
        raise PayloadTooLarge(f"request body exceeds the limit of {MAX_BODY} bytes")
    return body


def deployment_location(deployment_id: str) -> str:
    return f"/api/v1/deployments/{deployment_id}"


class DeployHookResource:
    """`POST /api/v1/dh`: the hook contract; the accept path."""

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

    async def on_post(self, req: Request, resp: Response) -> None:
        req.context.logged_since = time.perf_counter()  # for `AccessLog`
        token = single_header(req, TOKEN_HEADER)
        if token is None:
            raise InvalidRequest(f"missing header {TOKEN_HEADER}: send the hook's token in it")
        hook = await self.hooks.authenticate_deploy(token)
        takes_params(req, "wait")
        wait = self._wait_seconds(req)
        deployment, created = await self.deployments.accept(
            hook,
            await read_body(req),
            idempotency_key=single_header(req, "Idempotency-Key"),
        )
        if created:
            self.notify(deployment["target"])
        else:
            resp.set_header("Idempotent-Replayed", "true")
        resp.location = deployment_location(deployment["id"])
        if not wait:
            resp.status = falcon.HTTP_201
            resp.media = {"deployment": deployment}
            return
        shutdown = req.scope.get("extensions", {}).get(SHUTDOWN)
        await self.waiters.wait(deployment["id"], wait, until=shutdown)
        try:
            current = await self.deployments.storage.call(self.deployments.get, deployment["id"])
        except DatabaseUnavailable as exc:  # it is committed: say so, as at any deadline
            resp.status = falcon.HTTP_504
            resp.set_header("Retry-After", RETRY_AFTER)
            resp.media = _error_body(
                falcon.HTTP_504,
                f"deployment {deployment['id']} was accepted, but its state cannot be read now "
                f"({exc.message}): GET /api/v1/deployments/{deployment['id']}",
                deployment=deployment,
            )
            return
        waited = wait_outcome(
            current, waited=wait, shutting_down=shutdown is not None and shutdown.done()
        )
        resp.status = WAIT_STATUS[waited.outcome]
        if waited.description is None:
            resp.media = {"deployment": waited.deployment.to_json()}
        else:
            resp.media = _error_body(
                resp.status, waited.description, deployment=waited.deployment.to_json()
            )

    def _wait_seconds(self, req: Request) -> float:
        """`?wait`, capped by `max_wait`; 0 (answer at once) without it. What Python's float()
        takes beyond ASCII decimals ("1_0", "1e3", other scripts' digits, spaces) is no number
        of seconds."""
        given = one_param(req, "wait")
        if given is not None and not SECONDS.fullmatch(given):
            raise falcon.HTTPInvalidParam("Not a number of seconds.", "wait")
        return min(float(given) if given is not None else 0.0, self.max_wait)


class PlainHookPath:
    """The ASGI app `create_app` returns: Falcon, with the plain hook request answered in front
    of it. Under load nearly every request is `POST /api/v1/dh` with its token and a body, and
    Falcon's request and response objects, routing and middleware cost more per request than
    the accept path itself (bench/README.md). A request with no query, one token header, no
    Idempotency-Key and a Content-Length within `MAX_BODY` is answered here, by the same
    services and with the same status, headers, JSON and access line as `DeployHookResource`
    (a test holds the two equal); any other goes to Falcon untouched."""

    def __init__(self, app: falcon.asgi.App, resource: DeployHookResource) -> None:
        self.app = app
        self.resource = resource

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        token = _plain_hook_token(scope)
        if token is None:
            return await self.app(scope, receive, send)
        first = await receive()  # as Falcon does first (a client waiting for 100 Continue)
        if first["type"] != "http.request":
            return  # the client is gone: nothing to answer, as in Falcon
        started = time.perf_counter()
        resource = self.resource
        headers: dict[str, str] = {}
        try:
            hook = await resource.hooks.authenticate_deploy(token)
            body = await _body(scope, first, receive)
            deployment, _ = await resource.deployments.accept(hook, body)
            resource.notify(deployment["target"])
        except DOMAIN_ERRORS as error:
            status, headers, answer = error_answer(error)
        except Exception as error:
            request_id = b",".join(v for n, v in scope["headers"] if n == b"x-request-id")
            answer = unexpected_answer(request_id.decode("latin-1"), "POST", DH, error)
            status = falcon.HTTP_500
        else:
            status, answer = falcon.HTTP_201, {"deployment": deployment}
            headers["Location"] = deployment_location(deployment["id"])
        content = orjson.dumps(answer)
        fields = [(k.lower().encode(), v.encode("latin-1")) for k, v in headers.items()]
        fields += [(b"content-length", b"%d" % len(content)), (b"content-type", JSON)]
        await send({"type": "http.response.start", "status": int(status[:3]), "headers": fields})
        await send({"type": "http.response.body", "body": content})
        log_access("POST", DH, status, answer, started)


def _plain_hook_token(scope: dict) -> str | None:
    """The token of a plain hook request (see `PlainHookPath`), None for any other request."""
    if scope["type"] != "http" or scope["path"] != DH or scope["method"] != "POST":
        return None
    if scope["query_string"]:
        return None
    headers = scope["headers"]
    if not isinstance(headers, list):  # any iterable of pairs (ASGI), which Falcon reads again
        headers = scope["headers"] = [tuple(pair) for pair in headers]
    token = length = None
    for name, value in headers:
        if name == b"x-deploy-hook-token":
            if token is not None or b"," in value:  # Falcon says what is wrong with it
                return None
            token = value
        elif name == b"content-length":
            length = value
        elif name == b"idempotency-key":
            return None
    if token is None or length is None or not (length.isdigit() and len(length) <= 6):
        return None
    if int(length) > MAX_BODY:
        return None
    return token.decode("latin-1").strip(" \t")


async def _body(scope: dict, first: dict, receive: Callable) -> bytes:
    """The body of a plain hook request from its `first` event on, all of it (its length is
    within `MAX_BODY`), as `read_body` reads it."""
    message, chunks = first, [first.get("body", b"")]
    while message.get("more_body", False):
        message = await receive()
        chunks.append(message.get("body", b""))
    if message["type"] != "http.request" or scope.get("extensions", {}).get(BODY_CUT):
        raise RequestTimeout(BODY_CUT_SHORT)
    return b"".join(chunks)


class AccessLog:
    """Middleware: one line per hook request and per admin API request (uvicorn's access log is
    off), read from the answer as its responder or the error handlers shaped it; never a header
    nor the query string, so never a token."""

    async def process_response(
        self, req: Request, resp: Response, resource: Any, req_succeeded: bool
    ) -> None:
        started = req.context.get("logged_since")
        if started is not None:
            log_access(req.method, req.path, resp.status, resp.media or {}, started)


def log_access(method: str, path: str, status: str, answer: dict, started: float) -> None:
    """The access line of an answer, `started` at `time.perf_counter()`."""
    if not access_log.isEnabledFor(logging.INFO):
        return
    if "deployment" in answer:
        outcome = f"deployment {answer['deployment']['id']} {answer['deployment']['status']}"
    elif "hook" in answer:
        hook = answer["hook"]
        outcome = f"hook {hook['id']} ({hook['name']}) of target {hook['target']}"
    elif "requestId" in answer:
        outcome = "unexpected error"
    else:
        outcome = _one_short_line(answer.get("description", ""))
    args = (method, _one_short_line(path, 200), str(status)[:3], outcome)
    args += ((time.perf_counter() - started) * 1e3,)
    # made directly: `info()` would first walk the stack for a caller no line shows
    access_log.handle(
        access_log.makeRecord(
            access_log.name, logging.INFO, __file__, 0, "%s %s %s %s (%.1f ms)", args, None
        )
    )


def _one_short_line(text: str, limit: int = 300) -> str:
    """A description as an access line shows it: escaped and cut short, as it may quote what
    the caller sent, and any token in it masked."""
    text = redacted(text)
    if not text.isprintable():
        text = text.encode("unicode_escape").decode("ascii")
    return text if len(text) <= limit else f"{text[:limit]}..."


@falcon.before(admin_only)
class DeploymentsResource:
    """The admin's deployments: the recent ones, and rolling one back."""

    def __init__(
        self, deployments: Deployments, notify: Callable[[str], None], admin: AdminGuard
    ) -> None:
        self.deployments = deployments
        self.notify = notify
        self.admin = admin
        self.db = deployments.storage.call

    async def on_get(self, req: Request, resp: Response) -> None:
        takes_params(req, "target", "status", "limit")
        limit = one_param(req, "limit")  # refused when given twice; read as a number below
        if limit is not None and not WHOLE_NUMBER.fullmatch(limit):
            raise falcon.HTTPInvalidParam("Not a whole number.", "limit")
        found = await self.db(
            self.deployments.list,
            target=one_param(req, "target"),
            status=one_param(req, "status"),
            limit=req.get_param_as_int(
                "limit", min_value=LIST_LIMITS.start, max_value=LIST_LIMITS[-1], default=50
            ),
        )
        resp.media = {"deployments": [d.to_json() for d in found]}

    async def on_post_rollback(self, req: Request, resp: Response, deployment_id: str) -> None:
        takes_params(req)
        deployment = await self.db(self.deployments.rollback, deployment_id)
        self.notify(deployment.target)
        resp.status = falcon.HTTP_201
        resp.location = deployment_location(deployment.id)
        resp.media = {"deployment": deployment.to_json()}


@falcon.before(hook_token_or_admin)
class DeploymentResource:
    """One deployment with its history, for the hook that created it or the admin."""

    def __init__(self, hooks: Hooks, deployments: Deployments, admin: AdminGuard) -> None:
        self.hooks = hooks
        self.deployments = deployments
        self.admin = admin

    async def on_get(
        self, req: Request, resp: Response, deployment_id: str, hook: HookIdentity | None
    ) -> None:
        takes_params(req)
        deployment = await self.deployments.storage.call(
            self.deployments.get, deployment_id, hook=hook
        )
        resp.media = {"deployment": deployment.to_json()}


@falcon.before(admin_only)
class TargetsResource:
    def __init__(self, targets: dict[str, Target], admin: AdminGuard) -> None:
        self.targets = targets
        self.admin = admin

    async def on_get(self, req: Request, resp: Response) -> None:
        takes_params(req)
        resp.media = {"targets": [public_target(t) for t in self.targets.values()]}


@falcon.before(admin_only)
class HooksResource:
    def __init__(self, hooks: Hooks, admin: AdminGuard) -> None:
        self.hooks = hooks
        self.admin = admin
        self.db = hooks.storage.call

    async def on_get(self, req: Request, resp: Response, target: str) -> None:
        takes_params(req)
        found = await self.db(self.hooks.list, target=target)
        resp.media = {"hooks": [h.to_json() for h in found]}

    async def on_post(self, req: Request, resp: Response, target: str) -> None:
        takes_params(req)
        body = parse_json_body(
            NewHookBody,
            await read_body(req),
            'expected a JSON object like {"name": "gitlab-ci"}',
        )
        created = await self.db(self.hooks.create, target=target, name=body.name)
        resp.status = falcon.HTTP_201
        resp.location = f"/api/v1/hooks/{created.id}"
        resp.media = {"hook": created.to_json()}

    async def on_get_item(self, req: Request, resp: Response, hook_id: int) -> None:
        takes_params(req)
        resp.media = {"hook": (await self.db(self.hooks.get, hook_id)).to_json()}

    async def on_delete_item(self, req: Request, resp: Response, hook_id: int) -> None:
        takes_params(req)
        deleted = await self.db(self.hooks.delete, hook_id)
        resp.media = {"hook": deleted.to_json()}


class HealthResource:
    async def on_get(self, req: Request, resp: Response) -> None:
        resp.media = {"status": "ok"}

    on_head = on_get  # some load balancers' health checks


def _error_body(status: str, description: str, **more: Any) -> dict[str, Any]:
    """Every error's JSON: `{"title": "400 Bad Request", "description": ...}`, then `more`."""
    return {"title": status, "description": description, **more}


def error_answer(error: ShiphookError) -> tuple[str, dict[str, str], dict[str, Any]]:
    """The status, headers and JSON of a domain error's answer (one of `DOMAIN_ERRORS`)."""
    status = next(ERROR_STATUS[c] for c in type(error).__mro__ if c in ERROR_STATUS)
    headers, body = {}, _error_body(status, error.message)
    if status == falcon.HTTP_401:
        headers["WWW-Authenticate"] = 'Bearer realm="shiphook admin"'
    if isinstance(error, DatabaseUnavailable):
        body["cause"] = error.cause
        headers["Retry-After"] = RETRY_AFTER
    return status, headers, body


async def _domain_error(req: Request, resp: Response, error: ShiphookError, params: dict) -> None:
    resp.status, headers, resp.media = error_answer(error)
    resp.set_headers(headers)


# the name in the description of Falcon's `HTTPInvalidParam`: 'The "limit" parameter is invalid.'
FALCON_PARAMETER = re.compile(r'The "([^"]+)" parameter')


def _bad_parameter(expected: dict[str, str]):
    """The handler of a query parameter `req.get_param_as_int/float` refused: like every other
    400, it names the parameter, what `expected` says it takes, and the value given."""

    async def handle(
        req: Request, resp: Response, error: falcon.HTTPInvalidParam, params: dict
    ) -> None:
        named = FALCON_PARAMETER.match(error.description or "")
        name = named[1] if named else None
        if name in expected:
            description = f"{name}: expected {expected[name]}, got {quoted(req.get_param(name))}"
        else:
            description = error.description or ""
        resp.status = falcon.HTTP_400
        resp.media = _error_body(falcon.HTTP_400, description)

    return handle


async def _no_route(req: Request, resp: Response, error: falcon.HTTPError, params: dict) -> None:
    req.context.logged_since = time.perf_counter()  # a refusal, as an admin call's is
    resp.status = falcon.HTTP_404
    hint = " (a hook's id is a whole number)" if req.path.startswith("/api/v1/hooks/") else ""
    resp.media = _error_body(
        falcon.HTTP_404,
        f"no endpoint {_one_short_line(req.path, 100)}: the API's paths are in the README{hint}",
    )


async def _method_not_allowed(
    req: Request, resp: Response, error: falcon.HTTPMethodNotAllowed, params: dict
) -> None:
    req.context.logged_since = time.perf_counter()
    allowed = (error.headers or {}).get("Allow", "")
    resp.status = falcon.HTTP_405
    resp.set_header("Allow", allowed)
    resp.media = _error_body(
        falcon.HTTP_405, f"{req.method} is not allowed here; this path takes {allowed}"
    )


async def _unexpected_error(req: Request, resp: Response, error: Exception, params: dict) -> None:
    resp.status = falcon.HTTP_500
    resp.media = unexpected_answer(req.get_header("X-Request-ID"), req.method, req.path, error)


def unexpected_answer(
    request_id: str | None, method: str, path: str, error: Exception
) -> dict[str, Any]:
    """The JSON of a 500, its request id (the one the client sent, or a new one) logged with
    the error."""
    request_id = request_id or uuid.uuid4().hex
    log.error("request %s: %s %s failed", request_id, method, path, exc_info=error)
    return _error_body(
        falcon.HTTP_500,
        "an unexpected error occurred; quote the request id when reporting it",
        requestId=request_id,
    )


def create_app(
    *,
    hooks: Hooks,
    deployments: Deployments,
    targets: dict[str, Target],
    notify: Callable[[str], None],
    waiters: Waiters,
    admin_digest: str | None,
    max_wait: float = 900,
) -> PlainHookPath:
    """Build the API. `notify` is called after each committed deployment (the deployer's wake-up);
    `waiters` serves `?wait`."""
    app = falcon.asgi.App(middleware=[AccessLog()])
    app.router_options.converters["whole"] = WholeNumberConverter
    json_handler = falcon.media.JSONHandler(dumps=orjson.dumps, loads=orjson.loads)
    app.req_options.media_handlers[falcon.MEDIA_JSON] = json_handler
    app.resp_options.media_handlers[falcon.MEDIA_JSON] = json_handler
    admin = AdminGuard(admin_digest)
    deployments_resource = DeploymentsResource(deployments, notify, admin)
    hooks_resource = HooksResource(hooks, admin)

    app.add_route("/healthz", HealthResource())
    hook_resource = DeployHookResource(hooks, deployments, notify, waiters, max_wait)
    app.add_route(DH, hook_resource)
    app.add_route("/api/v1/deployments", deployments_resource)
    app.add_route(
        "/api/v1/deployments/{deployment_id}", DeploymentResource(hooks, deployments, admin)
    )
    app.add_route(
        "/api/v1/deployments/{deployment_id}/rollback", deployments_resource, suffix="rollback"
    )
    app.add_route("/api/v1/targets", TargetsResource(targets, admin))
    app.add_route("/api/v1/targets/{target}/hooks", hooks_resource)
    app.add_route("/api/v1/hooks/{hook_id:whole}", hooks_resource, suffix="item")

    app.add_error_handler(Exception, _unexpected_error)
    app.add_error_handler(falcon.HTTPRouteNotFound, _no_route)
    app.add_error_handler(falcon.HTTPMethodNotAllowed, _method_not_allowed)
    app.add_error_handler(DOMAIN_ERRORS, _domain_error)
    # what each query parameter read with `req.get_param_as_int/float` takes
    parameters = {
        "wait": f"a number of seconds, 0 or more (it waits {max_wait:g} at the most)",
        "limit": f"a whole number from {LIST_LIMITS.start} to {LIST_LIMITS[-1]}",
    }
    app.add_error_handler(falcon.HTTPInvalidParam, _bad_parameter(parameters))
    return PlainHookPath(app, hook_resource)
