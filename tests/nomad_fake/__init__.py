"""A fake of Nomad's HTTP API on 127.0.0.1, for the Nomad backend's tests.

It answers what the behaviour document (docs/nomad-api-behaviour.md, "the document"
below) says Nomad answers, for the endpoints of its section 2 that a deploy backend uses: routing
on the decoded path by suffix (job ids with `/`), plain-text errors with Nomad's texts and codes,
one cluster-wide index, Version and JobModifyIndex moved only by spec changes (an unchanged
register still creates an evaluation), deployments created by a "scheduler" a moment after the
register, auto-revert, dispatch idempotency by the `idempotency_token` QUERY parameter only (the
python-nomad body key is ignored), ACLs with tokens and capabilities, and the batch reschedule.

What each allocation does is driven by its task's image tag, or by the job's meta `FAKE_OUTCOME`
(meta wins), and a dispatch's meta `EXIT`:

| tag / FAKE_OUTCOME | service allocation                    | batch allocation                  |
|--------------------|---------------------------------------|-----------------------------------|
| anything else      | runs, turns healthy                   | runs, exits 0 (meta EXIT=N: N)    |
| `unhealthy...`     | runs, turns unhealthy                 | exits 0                           |
| `exit-N...`        | exits N: failed, unhealthy            | exits N: failed                   |
| `driver-error...`  | Docker's pull error: failed           | the same                          |
| `stall...`         | stays pending (progress deadline)     | stays pending                     |

A dispatch's meta `EXIT` that is not a number exits 1. Only service allocations get a health
(`DeploymentStatus`; client/allocrunner/health_hook.go watches no other job type), and only
service jobs get deployments (the system scheduler of Nomad 1.9 and 1.10 creates none). A failed
batch allocation is rescheduled by the scheduler's plan of the evaluation its failure queued, a
moment (`reschedule_delay`) after the failure. A stop (`DELETE /v1/job/:id`) makes a new
version with `Stop` set; a purge (`?purge=true`) deletes the job, after which its deployments
and allocations are listed whatever incarnation they belong to (state_store.go
DeploymentsByJobID and AllocsByJob).

Simplifications (the backend does not depend on them): one node, no blocking queries, no
restarts between a task's exit and its allocation failing, job status changes do not move
ModifyIndex, no garbage collection, a failed service allocation is not rescheduled, canaries
are counted (`DesiredCanaries`) but placed like the other allocations and never wait for a
promotion, and deregistering a job that does not exist answers 404 `job not found`.
"""

from __future__ import annotations

import copy
import heapq
import itertools
import json
import re
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

SECOND = 1_000_000_000
ZERO_TIME = "0001-01-01T00:00:00Z"

# the suffixes of /v1/job/<id>/..., in the order Nomad's handler tries them (document 1.3)
JOB_SUFFIXES = (
    *("/evaluate", "/allocations", "/evaluations", "/periodic/force", "/plan", "/summary"),
    *("/dispatch", "/dispatch/payload", "/versions", "/revert", "/deployments", "/deployment"),
    *("/stable", "/scale", "/services", "/submission", "/actions", "/action", "/tag"),
)

JOB_KEYS = (
    *("Stop", "Region", "Namespace", "ID", "ParentID", "Name", "Type", "Priority", "AllAtOnce"),
    *("Datacenters", "NodePool", "Constraints", "Affinities", "Spreads", "TaskGroups", "Update"),
    *("Multiregion", "Periodic", "ParameterizedJob", "Dispatched", "DispatchIdempotencyToken"),
    *("Payload", "Meta", "ConsulToken", "ConsulNamespace", "VaultToken", "VaultNamespace"),
    *("NomadTokenID", "Status", "StatusDescription", "Stable", "Version", "SubmitTime"),
    *("CreateIndex", "ModifyIndex", "JobModifyIndex", "UI", "VersionTag"),
)
# what Job.SpecChanged copies from the existing job before comparing (document 3.2)
NOT_SPEC = (
    *("Status", "StatusDescription", "Stable", "Version", "CreateIndex", "ModifyIndex"),
    *("JobModifyIndex", "SubmitTime"),
)
# fields of api.Job that the server never copies from a request
NOT_FROM_API = (*NOT_SPEC, "Dispatched", "DispatchIdempotencyToken", "NomadTokenID", "ParentID")
GROUP_KEYS = (
    *("Name", "Count", "Update", "Migrate", "Constraints", "Scaling", "RestartPolicy"),
    *("Disconnect", "Tasks", "EphemeralDisk", "Meta", "ReschedulePolicy", "Affinities"),
    *("Spreads", "Networks", "Consul", "Services", "Volumes", "ShutdownDelay"),
    *("StopAfterClientDisconnect", "MaxClientDisconnect", "PreventRescheduleOnLost"),
)
TASK_KEYS = (
    *("Name", "Driver", "User", "Config", "Env", "Services", "Vault", "Consul", "Templates"),
    *("Constraints", "Affinities", "Resources", "RestartPolicy", "DispatchPayload", "Lifecycle"),
    *("Meta", "KillTimeout", "LogConfig", "Artifacts", "Leader", "ShutdownDelay"),
    *("VolumeMounts", "ScalingPolicies", "KillSignal", "Kind", "CSIPluginConfig", "Identity"),
    *("Identities", "Actions", "Schedule"),
)
DEFAULT_UPDATE = {
    "Stagger": 30 * SECOND,
    "MaxParallel": 1,
    "HealthCheck": "checks",
    "MinHealthyTime": 10 * SECOND,
    "HealthyDeadline": 300 * SECOND,
    "ProgressDeadline": 600 * SECOND,
    "AutoRevert": False,
    "AutoPromote": False,
    "Canary": 0,
}
ENFORCE = "Enforcing job modify index"
GO_DURATION = re.compile(r"(\d+(\.\d*)?(ns|us|µs|ms|s|m|h))+|0")  # what time.ParseDuration takes
TERMINAL_DEPLOYMENT = ("successful", "failed", "cancelled")
GO_TRUE = ("1", "t", "T", "TRUE", "true", "True")  # what strconv.ParseBool reads as true
TERMINAL_ALLOC = ("complete", "failed", "lost")
CAPABILITIES = ("read-job", "submit-job", "dispatch-job")


class NomadError(Exception):
    """An error answer: Nomad's plain-text body and its code."""

    def __init__(self, status: int, text: str, index: int | None = None) -> None:
        super().__init__(text)
        self.status = status
        self.text = text
        self.index = index  # GET /v1/job/:id sets X-Nomad-Index before its 404


@dataclass
class Fault:
    """An injected answer for requests whose method and decoded path match."""

    method: str
    path: re.Pattern[str]
    status: int
    text: str
    times: int


@dataclass
class Token:
    accessor: str
    secret: str
    capabilities: frozenset[str]
    management: bool = False


@dataclass
class Request:
    """One request as the fake saw it: method, decoded path, query and JSON body."""

    method: str
    path: str
    query: dict[str, str]
    body: Any
    headers: dict[str, str] = field(default_factory=dict)


def _now_ns() -> int:
    return time.time_ns()


def _rfc3339(ns: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ns / SECOND)) + f".{ns % SECOND:09d}Z"


def _get_ci(body: dict[str, Any], name: str, default: Any = None) -> Any:
    """A request field matched as Go's encoding/json matches it: case-insensitively."""
    for key, value in body.items():
        if key.lower() == name.lower():
            return value
    return default


def _outcome(job: dict[str, Any], task: dict[str, Any]) -> str:
    meta = {**(job.get("Meta") or {}), **(task.get("Meta") or {})}
    if meta.get("FAKE_OUTCOME"):
        return meta["FAKE_OUTCOME"]
    image = str((task.get("Config") or {}).get("image") or "")
    name = image.split("@", 1)[0]
    return name.rsplit(":", 1)[1] if ":" in name.rsplit("/", 1)[-1] else "latest"


class NomadFake:
    """The fake agent. `start()` serves it on 127.0.0.1; `address` is its URL."""

    def __init__(self, *, acl: bool = False, delay: float = 0.15, region: str = "global") -> None:
        self.acl = acl
        self.delay = delay
        """Seconds the "scheduler" and "client" take per step (eval, alloc start, health)."""
        self.region = region
        self.batch_reschedules = 1  # Nomad's default batch reschedule policy: 1 attempt
        self.reschedule_delay = delay
        """Seconds from a batch allocation's failure to the plan that reschedules it (or not)."""
        self.broken: list[str] = []  # the fake's own failures in its scheduler, raised at stop()
        self.lock = threading.RLock()
        self._index = 1
        self.jobs: dict[tuple[str, str], dict[str, Any]] = {}
        self.namespaces = {"default"}  # a job registered in another is refused, as Nomad does
        self.versions: dict[tuple[str, str], list[dict[str, Any]]] = {}
        self.evals: dict[str, dict[str, Any]] = {}
        self.deployments: dict[str, dict[str, Any]] = {}
        self.allocs: dict[str, dict[str, Any]] = {}
        self.tokens: dict[str, Token] = {}
        self.requests: list[Request] = []
        self.faults: list[Fault] = []
        self.holds: list[Fault] = []
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self._wake = threading.Condition(self.lock)
        self._stopped = False
        self._server: ThreadingHTTPServer | None = None
        self._threads: list[threading.Thread] = []
        self.management = self.token(management=True)

    # -- lifecycle and test controls ------------------------------------------------------

    def start(self) -> NomadFake:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _handle(self) -> None:
                fake._serve(self)

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _handle

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        for target in (self._server.serve_forever, self._scheduler):
            thread = threading.Thread(target=target, daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        with self.lock:
            self._stopped = True
            self._wake.notify_all()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        for thread in self._threads:
            thread.join(5)
        assert not self.broken, "the fake Nomad's scheduler failed:\n" + "\n".join(self.broken)

    @property
    def address(self) -> str:
        assert self._server is not None
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def token(self, *capabilities: str, management: bool = False) -> str:
        """A new ACL token's secret, with these capabilities in every namespace."""
        unknown = set(capabilities) - set(CAPABILITIES)
        assert not unknown, unknown
        secret = str(uuid.uuid4())
        self.tokens[secret] = Token(str(uuid.uuid4()), secret, frozenset(capabilities), management)
        return secret

    def fail(self, method: str, path: str, status: int, text: str, times: int = 1) -> None:
        """Answer the next `times` requests whose decoded path fully matches `path` (a regular
        expression) with `status` and `text`: for what a single agent has no trigger for (`No
        cluster leader`, `rpc error: ` prefixes of a forwarded request)."""
        with self.lock:
            self.faults.append(Fault(method.upper(), re.compile(path), status, text, times))

    def hold(self, method: str, path: str, seconds: float, times: int = 1) -> None:
        """Do what the next `times` matching requests ask, then hold each answer `seconds`: a
        client that dies meanwhile never learns what it did."""
        with self.lock:
            self.holds.append(Fault(method.upper(), re.compile(path), 0, str(seconds), times))

    def calls(self, method: str, path: str) -> list[Request]:
        """The requests seen so far whose decoded path fully matches `path`."""
        with self.lock:
            return [r for r in self.requests if r.method == method and re.fullmatch(path, r.path)]

    def job(self, job_id: str, namespace: str = "default") -> dict[str, Any] | None:
        with self.lock:
            found = self.jobs.get((namespace, job_id))
            return copy.deepcopy(self._job_out(found)) if found else None

    def children(self, parent: str, namespace: str = "default") -> list[dict[str, Any]]:
        with self.lock:
            return [
                copy.deepcopy(self._job_out(j))
                for (ns, _), j in self.jobs.items()
                if ns == namespace and j["ParentID"] == parent
            ]

    def put_job(self, job: dict[str, Any], namespace: str = "default") -> dict[str, Any]:
        """Register `job` (an api.Job, as `nomad job run` would) and return the answer."""
        with self.lock:
            return self._register(namespace, job, enforce=False, modify_index=0, token=None)

    def wait_idle(self, timeout: float = 30) -> None:
        """Until nothing is scheduled any more, save stalled work."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if not self._timers:
                    return
            time.sleep(0.02)
        raise AssertionError("the fake Nomad still has work scheduled")

    # -- the scheduler's clock ------------------------------------------------------------------

    def _after(self, seconds: float, action: Callable[[], None]) -> None:
        heapq.heappush(self._timers, (time.monotonic() + seconds, next(self._seq), action))
        self._wake.notify_all()

    def _scheduler(self) -> None:
        with self.lock:
            while not self._stopped:
                if not self._timers:
                    self._wake.wait(1)
                    continue
                due, _, action = self._timers[0]
                now = time.monotonic()
                if due > now:
                    self._wake.wait(due - now)
                    continue
                heapq.heappop(self._timers)
                try:
                    action()
                except Exception:  # a bug of the fake's: the others still run, stop() says it
                    self.broken.append(traceback.format_exc())

    def _next_index(self) -> int:
        self._index += 1
        return self._index

    # -- HTTP -------------------------------------------------------------------------------

    def _serve(self, handler: BaseHTTPRequestHandler) -> None:
        split = urlsplit(handler.path)
        path = unquote(split.path)  # Nomad routes on the decoded path
        query = {k: v[-1] for k, v in parse_qs(split.query, keep_blank_values=True).items()}
        length = int(handler.headers.get("Content-Length") or 0)
        raw = handler.rfile.read(length) if length else b""
        method = handler.command
        status, headers, payload = 200, {}, None
        try:
            body: Any = None
            if raw:
                try:
                    body = json.loads(raw)
                except ValueError as exc:
                    raise NomadError(400, f"invalid character in JSON body: {exc}") from None
            with self.lock:
                self.requests.append(Request(method, path, query, body, dict(handler.headers)))
                for fault in self.faults:
                    if fault.method == method and fault.path.fullmatch(path) and fault.times:
                        fault.times -= 1
                        raise NomadError(fault.status, fault.text)
                if query.get("region", self.region) != self.region:
                    raise NomadError(500, "No path to region")
                secret = handler.headers.get("X-Nomad-Token", "").strip()
                authorization = handler.headers.get("Authorization", "")
                if not secret and authorization.startswith("Bearer "):
                    secret = authorization.removeprefix("Bearer ").strip()
                payload, index = self._route(method, path, query, body, raw, secret)
            if index is not None:
                headers["X-Nomad-Index"] = str(index)
                headers["X-Nomad-KnownLeader"] = "true"
                headers["X-Nomad-LastContact"] = "0"
            data = json.dumps(payload).encode()
            headers["Content-Type"] = "application/json"
        except NomadError as exc:
            status, data = exc.status, exc.text.encode()
            headers["Content-Type"] = "text/plain; charset=utf-8"
            if exc.index is not None:
                headers["X-Nomad-Index"] = str(exc.index)
        with self.lock:
            held = [h for h in self.holds if h.method == method and h.path.fullmatch(path)]
            for h in held[:1]:
                h.times -= 1
                if h.times == 0:
                    self.holds.remove(h)
        for h in held[:1]:
            time.sleep(float(h.text))
        try:
            handler.send_response(status)
            for name, value in headers.items():
                handler.send_header(name, value)
            handler.send_header("Content-Length", str(len(data)))
            handler.end_headers()
            handler.wfile.write(data)
        except OSError:
            handler.close_connection = True  # the client went away

    def _authorize(self, secret: str, capability: str) -> Token | None:
        if not self.acl:
            return None
        token = self.tokens.get(secret)
        if token is None or not (token.management or capability in token.capabilities):
            raise NomadError(403, "Permission denied")
        return token

    def _route(
        self, method: str, path: str, query: dict[str, str], body: Any, raw: bytes, secret: str
    ) -> tuple[Any, int | None]:
        namespace = query.get("namespace") or "default"
        if not query.get("index", "0").isdigit():  # parseWait and parseConsistency: 400s
            raise NomadError(400, "Invalid index")
        if "wait" in query and not GO_DURATION.fullmatch(query["wait"]):
            raise NomadError(400, "Invalid wait time")
        if path == "/v1/status/leader":
            return "127.0.0.1:4647", None
        if path == "/v1/jobs":
            if method not in ("PUT", "POST"):
                raise NomadError(405, "Invalid method")
            return self._register_request(None, namespace, body, raw, secret, query)
        if path.startswith("/v1/job/"):
            rest = path.removeprefix("/v1/job/")
            for suffix in JOB_SUFFIXES:
                if rest.endswith(suffix):
                    return self._job_op(
                        suffix, rest[: -len(suffix)], method, namespace, body, raw, secret, query
                    )
            return self._job_op("", rest, method, namespace, body, raw, secret, query)
        if path.startswith("/v1/deployment/"):
            rest = path.removeprefix("/v1/deployment/")
            self._reads(method, secret)
            if rest.startswith("allocations/"):
                found = rest.removeprefix("allocations/")
                allocs = [a for a in self.allocs.values() if a["DeploymentID"] == found]
                return [self._alloc_out(a) for a in allocs], self._index
            deployment = self.deployments.get(rest)
            if deployment is None:
                raise NomadError(404, "deployment not found")
            return self._deployment_out(deployment), deployment["ModifyIndex"]
        if path.startswith("/v1/evaluation/"):
            self._reads(method, secret)
            found = self.evals.get(path.removeprefix("/v1/evaluation/"))
            if found is None:
                raise NomadError(404, "eval not found")
            return found, found["ModifyIndex"]
        if path.startswith("/v1/allocation/"):
            self._reads(method, secret)
            alloc = self.allocs.get(path.removeprefix("/v1/allocation/"))
            if alloc is None:
                raise NomadError(404, "alloc not found")
            return self._alloc_out(alloc), alloc["ModifyIndex"]
        raise NomadError(404, f"Invalid URL path {path}")  # what the mux answers elsewhere

    def _reads(self, method: str, secret: str) -> None:
        if method != "GET":
            raise NomadError(405, "Invalid method")
        self._authorize(secret, "read-job")

    def _job_op(
        self,
        suffix: str,
        job_id: str,
        method: str,
        namespace: str,
        body: Any,
        raw: bytes,
        secret: str,
        query: dict[str, str],
    ) -> tuple[Any, int | None]:
        key = (namespace, job_id)
        job = self.jobs.get(key)
        if suffix == "":
            if method in ("PUT", "POST"):
                return self._register_request(job_id, namespace, body, raw, secret, query)
            if method == "DELETE":
                return self._deregister(key, secret, purge=query.get("purge") in GO_TRUE)
            self._reads(method, secret)
            if job is None:
                raise NomadError(404, "job not found", index=self._jobs_index())
            return self._job_out(job), job["ModifyIndex"]
        if suffix == "/dispatch":
            return self._dispatch(job_id, namespace, method, body, raw, secret, query)
        if suffix == "/revert":
            return self._revert(job_id, namespace, method, body, raw, secret)
        if suffix == "/stable":
            if method not in ("PUT", "POST"):
                raise NomadError(405, "Invalid method")
            self._authorize(secret, "submit-job")
            if job is None:
                raise NomadError(500, f'job "{job_id}" not found')
            index = self._set_stable(
                key,
                int(_get_ci(body or {}, "JobVersion", 0)),
                bool(_get_ci(body or {}, "Stable", False)),
            )
            return {"Index": index}, index
        if suffix == "/versions":
            self._authorize(secret, "read-job")
            if job is None:
                raise NomadError(404, "job versions not found")
            versions = [self._job_out(v) for v in self.versions[key]]
            return {"Versions": versions, "Diffs": None, **self._meta(job["ModifyIndex"])}, (
                job["ModifyIndex"]
            )
        if method != "GET":
            raise NomadError(405, "Invalid method")
        self._authorize(secret, "read-job")
        # those of the job's current incarnation; every one when it is gone or with ?all=true
        every = job is None or query.get("all") in GO_TRUE
        create_index = job["CreateIndex"] if job else None
        if suffix in ("/deployments", "/deployment"):
            mine = [
                d
                for d in self.deployments.values()
                if d["Namespace"] == namespace
                and d["JobID"] == job_id
                and (every or d["JobCreateIndex"] == create_index)
            ]
            if suffix == "/deployment":
                latest = max(mine, key=lambda d: d["CreateIndex"], default=None)
                return self._deployment_out(latest), self._index
            in_memdb_order = sorted(mine, key=lambda d: d["ID"])  # by UUID, not by time
            return [self._deployment_out(d) for d in in_memdb_order], self._index
        if suffix == "/allocations":
            allocs = [
                a
                for a in self.allocs.values()
                if a["Namespace"] == namespace
                and a["JobID"] == job_id
                and (every or a["_JobCreateIndex"] == create_index)
            ]
            return [self._alloc_out(a) for a in allocs], self._index
        if suffix == "/evaluations":
            evals = [e for e in self.evals.values() if e["JobID"] == job_id]
            return evals, self._index
        if suffix == "/summary":
            if job is None:
                raise NomadError(404, "job not found")
            return self._summary(job), job["ModifyIndex"]
        raise NomadError(404, f"Invalid URL path /v1/job/{job_id}{suffix}")

    def _jobs_index(self) -> int:
        """The `jobs` table's index: the last write to any job."""
        return max((j["ModifyIndex"] for j in self.jobs.values()), default=0)

    @staticmethod
    def _meta(index: int) -> dict[str, Any]:
        return {"Index": index, "LastContact": 0, "KnownLeader": True, "NextToken": ""}

    # -- jobs ------------------------------------------------------------------------------

    def _register_request(
        self,
        path_id: str | None,
        namespace: str,
        body: Any,
        raw: bytes,
        secret: str,
        query: dict[str, str],
    ) -> tuple[Any, int]:
        if not raw:
            raise NomadError(400, "Request body is empty")
        if not isinstance(body, dict):
            raise NomadError(
                400, "json: cannot unmarshal value into Go value of type api.JobRegisterRequest"
            )
        job = _get_ci(body, "Job")
        if not isinstance(job, dict):
            raise NomadError(400, "Job must be specified")
        if not job.get("ID"):
            raise NomadError(400, "Job ID hasn't been provided")
        if path_id is not None and path_id != job["ID"]:
            raise NomadError(400, "Job ID does not match name")
        if self.acl and secret and secret not in self.tokens:  # anonymous: checked at row 9
            raise NomadError(403, "Permission denied")
        namespace = query.get("namespace") or _get_ci(body, "Namespace") or job.get("Namespace")
        namespace = namespace or "default"
        problems = self._validate(job)
        if namespace not in self.namespaces:
            problems.append(f'job "{job["ID"]}" is in nonexistent namespace "{namespace}"')
        if problems:
            text = f"{len(problems)} error{'s' if len(problems) > 1 else ''} occurred:\n"
            raise NomadError(500, text + "".join(f"\t* {p}\n" for p in problems) + "\n")
        token = self._authorize(secret, "submit-job")
        answer = self._register(
            namespace,
            job,
            enforce=bool(_get_ci(body, "EnforceIndex", False)),
            modify_index=int(_get_ci(body, "JobModifyIndex", 0) or 0),
            token=token,
        )
        return answer, answer["Index"]

    @staticmethod
    def _validate(job: dict[str, Any]) -> list[str]:
        problems = []
        if not job.get("TaskGroups"):
            problems.append("Missing job task groups")
        for group in job.get("TaskGroups") or ():
            if not group.get("Tasks"):
                problems.append(
                    f"Task group {group.get('Name')} validation failed: "
                    "Missing tasks for task group"
                )
            for task in group.get("Tasks") or ():
                if task.get("Driver") == "docker" and not (task.get("Config") or {}).get("image"):
                    problems.append(
                        f"Task group {group.get('Name')} validation failed: Task "
                        f"{task.get('Name')} validation failed: image must be specified"
                    )
        return problems

    @staticmethod
    def _canonical(api_job: dict[str, Any], namespace: str) -> dict[str, Any]:
        """api.Job -> the stored job: only api.Job's keys, Canonicalize()'s defaults."""
        job: dict[str, Any] = {key: None for key in JOB_KEYS}
        for key, value in api_job.items():
            if key in JOB_KEYS and key not in NOT_FROM_API:
                job[key] = copy.deepcopy(value)
        job["Namespace"] = namespace
        job["Type"] = job["Type"] or "service"
        job["Name"] = job["Name"] or job["ID"]
        job["Priority"] = job["Priority"] or 50
        job["Region"] = job["Region"] or "global"
        job["Stop"] = bool(job["Stop"])
        job["Meta"] = job["Meta"] or None
        job["ParentID"], job["Dispatched"], job["DispatchIdempotencyToken"] = "", False, ""
        job_update = job["Update"] or {}
        groups = []
        for given in job["TaskGroups"] or ():
            group = {key: copy.deepcopy(given.get(key)) for key in GROUP_KEYS}
            group["Count"] = 1 if group["Count"] is None else group["Count"]
            group["Tasks"] = [
                {k: copy.deepcopy(t.get(k)) for k in TASK_KEYS} for t in given["Tasks"]
            ]
            update = group["Update"] or (job_update or None)
            if job["Type"] == "service" and update is None:
                update = dict(DEFAULT_UPDATE)  # DefaultUpdateStrategy, as api.Job.Canonicalize()
            if job["Type"] in ("service", "system") and update is not None:
                group["Update"] = {**DEFAULT_UPDATE, **job_update, **update}
            else:
                group["Update"] = None
            groups.append(group)
        job["TaskGroups"] = groups
        job["Update"] = (
            {
                "Stagger": job_update.get("Stagger", 0),
                "MaxParallel": job_update.get("MaxParallel", 0),
            }
            | {k: 0 for k in ("HealthCheck", "MinHealthyTime", "HealthyDeadline")}
            | {
                "ProgressDeadline": 0,
                "AutoRevert": False,
                "AutoPromote": False,
                "Canary": 0,
                "HealthCheck": "",
            }
        )
        return job

    @staticmethod
    def _spec(job: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in job.items() if k not in NOT_SPEC}

    def _register(
        self,
        namespace: str,
        api_job: dict[str, Any],
        *,
        enforce: bool,
        modify_index: int,
        token: Token | None,
        stored: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """The Job.Register RPC from the EnforceIndex check on (document 2.2, 3.2). `stored`
        is a whole stored version to upsert as it is (auto-revert)."""
        job = copy.deepcopy(stored) if stored else self._canonical(api_job, namespace)
        if token is not None and stored is None:
            job["NomadTokenID"] = token.accessor
        key = (namespace, job["ID"])
        existing = self.jobs.get(key)
        if enforce:
            if existing is not None and modify_index == 0:
                raise NomadError(500, f"{ENFORCE} 0: job already exists")
            if existing is not None and modify_index != existing["JobModifyIndex"]:
                raise NomadError(
                    500,
                    f"{ENFORCE} {modify_index}: job exists with conflicting job modify index: "
                    f"{existing['JobModifyIndex']}",
                )
            if existing is None and modify_index != 0:
                raise NomadError(500, f"{ENFORCE} {modify_index}: job does not exist")
        no_eval = bool(job["Periodic"] or job["ParameterizedJob"])
        if existing is not None:
            if existing["Type"] != job["Type"]:
                raise NomadError(
                    500, f'cannot update job from type "{existing["Type"]}" to "{job["Type"]}"'
                )
            if bool(existing["ParameterizedJob"]) != bool(job["ParameterizedJob"]):
                which = "non-parameterized job to being parameterized"
                if existing["ParameterizedJob"]:
                    which = "parameterized job to being non-parameterized"
                raise NomadError(500, f"cannot update {which}")
            if self._spec(existing) == self._spec(job):
                if no_eval:
                    return self._register_answer("", 0, existing["JobModifyIndex"], 0)
                evaluation = self._new_eval(existing, "job-register")
                index = evaluation["CreateIndex"]
                return self._register_answer(
                    evaluation["ID"], index, existing["JobModifyIndex"], index
                )
        index = self._next_index()
        job["Version"] = existing["Version"] + 1 if existing else 0
        job["CreateIndex"] = existing["CreateIndex"] if existing else index
        job["ModifyIndex"] = job["JobModifyIndex"] = index
        if stored is None:
            job["Stable"] = False
            job["SubmitTime"] = _now_ns()
        job["Status"], job["StatusDescription"] = "pending", ""
        self.jobs[key] = job
        self._keep_version(key, job)
        if no_eval:
            return self._register_answer("", 0, index, index)
        evaluation = self._new_eval(job, "job-register", index=index)
        return self._register_answer(evaluation["ID"], index, index, index)

    def _keep_version(self, key: tuple[str, str], job: dict[str, Any]) -> None:
        """The newest JobTrackedVersions (6) versions, the newest stable one among them (it
        takes the oldest's place when it would go: state_store.go upsertJobVersion)."""
        versions = self.versions.setdefault(key, [])
        versions.insert(0, copy.deepcopy(job))
        stable = next((i for i, v in enumerate(versions) if v["Stable"]), None)
        if stable is not None and stable > 5:
            versions[5], versions[stable] = versions[stable], versions[5]
        del versions[6:]

    def _deregister(self, key: tuple[str, str], secret: str, *, purge: bool) -> tuple[Any, int]:
        """Job.Deregister: a stop upserts the job with Stop set (a new version), a purge deletes
        it; then an evaluation stops its allocations and cancels its deployment."""
        self._authorize(secret, "submit-job")
        job = self.jobs.get(key)
        if job is None:
            raise NomadError(404, "job not found")
        index = self._next_index()
        if purge:
            del self.jobs[key]
            del self.versions[key]
        else:
            job = copy.deepcopy(job)
            job.update(Stop=True, Version=job["Version"] + 1)
            job.update(ModifyIndex=index, JobModifyIndex=index, SubmitTime=_now_ns())
            self.jobs[key] = job
            self._keep_version(key, job)
        if (job["ParameterizedJob"] and not job["Dispatched"]) or job["Periodic"]:
            return self._register_answer("", 0, index, index), index
        evaluation = self._new_eval(job, "job-deregister")
        eval_index = evaluation["CreateIndex"]
        return self._register_answer(evaluation["ID"], eval_index, index, eval_index), eval_index

    def _register_answer(self, eval_id: str, eval_index: int, jmi: int, index: int) -> dict:
        return {
            "EvalID": eval_id,
            "EvalCreateIndex": eval_index,
            "JobModifyIndex": jmi,
            "Warnings": "",
            **self._meta(index),
        }

    def _set_stable(self, key: tuple[str, str], version: int, stable: bool) -> int:
        index = self._next_index()
        for stored in self.versions.get(key, ()):
            if stored["Version"] == version:
                stored["Stable"] = stable
        job = self.jobs.get(key)
        if job is not None and job["Version"] == version:
            job["Stable"] = stable
            job["ModifyIndex"] = index
        return index

    def _job_status(self, job: dict[str, Any]) -> str:
        if job["Stop"]:
            return "dead"
        parameterized = job["ParameterizedJob"] and not job["Dispatched"]
        if parameterized or job["Periodic"] or job["Type"] == "system":
            return "running"  # until stopped
        key = (job["Namespace"], job["ID"])
        allocs = [
            a
            for a in self.allocs.values()
            if (a["Namespace"], a["JobID"]) == key and a["_JobCreateIndex"] == job["CreateIndex"]
        ]
        if any(a["ClientStatus"] not in TERMINAL_ALLOC for a in allocs):
            return "running"
        evals = [e for e in self.evals.values() if (e["Namespace"], e["JobID"]) == key]
        if any(e["Status"] in ("pending", "blocked") for e in evals):
            return "pending"
        return "dead"

    def _job_out(self, job: dict[str, Any]) -> dict[str, Any]:
        if self.jobs.get((job["Namespace"], job["ID"])) is job:
            job["Status"] = self._job_status(job)
        return job

    def _summary(self, job: dict[str, Any]) -> dict[str, Any]:
        key = (job["Namespace"], job["ID"])
        groups = {}
        for group in job["TaskGroups"]:
            counts = dict.fromkeys(
                ("Queued", "Complete", "Failed", "Running", "Starting", "Lost", "Unknown"), 0
            )
            for alloc in self.allocs.values():
                if (alloc["Namespace"], alloc["JobID"]) == key and alloc["TaskGroup"] == group[
                    "Name"
                ]:
                    status = alloc["ClientStatus"]
                    name = {"pending": "Starting"}.get(status, status.capitalize())
                    if name in counts:
                        counts[name] += 1
            groups[group["Name"]] = counts
        children = None
        if job["ParameterizedJob"] and not job["Dispatched"]:
            states = [self._job_status(c) for c in self.jobs.values() if c["ParentID"] == job["ID"]]
            children = {s.capitalize(): states.count(s) for s in ("pending", "running", "dead")}
        return {
            "JobID": job["ID"],
            "Namespace": job["Namespace"],
            "Summary": groups,
            "Children": children,
            "CreateIndex": job["CreateIndex"],
            "ModifyIndex": job["ModifyIndex"],
        }

    # -- revert and dispatch ---------------------------------------------------------------

    def _revert(
        self, job_id: str, namespace: str, method: str, body: Any, raw: bytes, secret: str
    ) -> tuple[Any, int]:
        if method not in ("PUT", "POST"):
            raise NomadError(405, "Invalid method")
        if not raw:
            raise NomadError(400, "Request body is empty")
        body = body if isinstance(body, dict) else {}
        if not _get_ci(body, "JobID"):
            raise NomadError(400, "JobID must be specified")
        if _get_ci(body, "JobID") != job_id:
            raise NomadError(400, "Job ID does not match")
        token = self._authorize(secret, "submit-job")
        key = (namespace, job_id)
        current = self.jobs.get(key)
        if current is None:
            raise NomadError(500, f'job "{job_id}" not found')
        version = int(_get_ci(body, "JobVersion", 0) or 0)
        if version == current["Version"]:
            raise NomadError(500, "can't revert to current version")
        prior = _get_ci(body, "EnforcePriorVersion")
        if prior is not None and int(prior) != current["Version"]:
            raise NomadError(
                500, f"Current job has version {current['Version']}; enforcing version {prior}"
            )
        old = next((v for v in self.versions[key] if v["Version"] == version), None)
        if old is None:
            raise NomadError(
                500, f'job "{job_id}" in namespace "{namespace}" at version {version} not found'
            )
        answer = self._register(
            namespace,
            {k: v for k, v in old.items() if k not in NOT_FROM_API},
            enforce=prior is not None,
            modify_index=current["JobModifyIndex"],
            token=token,
        )
        return answer, answer["Index"]

    def _dispatch(
        self,
        job_id: str,
        namespace: str,
        method: str,
        body: Any,
        raw: bytes,
        secret: str,
        query: dict[str, str],
    ) -> tuple[Any, int]:
        if method not in ("PUT", "POST"):
            raise NomadError(405, "Invalid method")
        if not raw:
            raise NomadError(400, "Request body is empty")
        body = body if isinstance(body, dict) else {}
        if _get_ci(body, "JobID") not in (None, "", job_id):
            raise NomadError(400, "Job ID does not match")
        meta = _get_ci(body, "Meta") or {}
        for value in meta.values():
            if not isinstance(value, str):
                kind = "number" if isinstance(value, int | float) else type(value).__name__
                raise NomadError(
                    400,
                    f"json: cannot unmarshal {kind} into Go struct field "
                    "JobDispatchRequest.Meta of type string",
                )
        # the query parameter wins; in the body only IdempotencyToken in any case (Go's
        # decoder matches field names case-insensitively but never folds underscores)
        token = query.get("idempotency_token") or _get_ci(body, "IdempotencyToken") or ""
        self._authorize(secret, "dispatch-job")
        parent = self.jobs.get((namespace, job_id))
        if parent is None:
            raise NomadError(500, "parameterized job not found")
        if not parent["ParameterizedJob"] or parent["Dispatched"]:
            raise NomadError(500, f'Specified job "{job_id}" is not a parameterized job')
        if parent["Stop"]:
            raise NomadError(500, f'Specified job "{job_id}" is stopped')
        spec = parent["ParameterizedJob"]
        payload = _get_ci(body, "Payload")
        if spec.get("Payload") == "required" and not payload:
            raise NomadError(500, "Payload is not provided but required by parameterized job")
        if spec.get("Payload") == "forbidden" and payload:
            raise NomadError(500, "Payload provided but forbidden by parameterized job")
        required = spec.get("MetaRequired") or []
        allowed = set(required) | set(spec.get("MetaOptional") or [])
        unpermitted = [k for k in meta if k not in allowed]
        if unpermitted:
            raise NomadError(
                500,
                f"Dispatch request included unpermitted metadata keys: [{' '.join(unpermitted)}]",
            )
        missing = [k for k in required if k not in meta]
        if missing:
            raise NomadError(
                500, f"Dispatch did not provide required meta keys: [{' '.join(missing)}]"
            )
        # under self.lock, the checks above, the token's lookup and the copy below see one state
        # of the parent (document 2.8 gives their order; Job.Dispatch in nomad/job_endpoint.go
        # reads the parent once, from one state snapshot, for all three)
        if token:
            for child in self.jobs.values():
                if (
                    child["Namespace"] == namespace
                    and child["ParentID"] == job_id
                    and child["DispatchIdempotencyToken"] == token
                ):
                    answer = {
                        "DispatchedJobID": child["ID"],
                        "EvalID": "",
                        "EvalCreateIndex": 0,
                        "JobCreateIndex": child["CreateIndex"],
                        **self._meta(child["ModifyIndex"]),
                    }
                    return answer, child["ModifyIndex"]
        child = copy.deepcopy(parent)
        child_id = f"{job_id}/dispatch-{int(time.time())}-{uuid.uuid4().hex[:8]}"
        job_index = self._next_index()
        child.update(
            ID=child_id,
            Name=child_id,
            ParentID=job_id,
            Dispatched=True,
            DispatchIdempotencyToken=token,
            Meta={**(parent["Meta"] or {}), **meta} or None,
            Payload=payload,
            Version=0,
            Stable=False,
            SubmitTime=_now_ns(),
            CreateIndex=job_index,
            ModifyIndex=job_index,
            JobModifyIndex=job_index,
            Status="pending",
        )
        self.jobs[(namespace, child_id)] = child
        self.versions[(namespace, child_id)] = [copy.deepcopy(child)]
        evaluation = self._new_eval(child, "job-register")
        index = evaluation["CreateIndex"]
        answer = {
            "DispatchedJobID": child_id,
            "EvalID": evaluation["ID"],
            "EvalCreateIndex": index,
            "JobCreateIndex": job_index,
            **self._meta(index),
        }
        return answer, index

    # -- the scheduler ---------------------------------------------------------------------

    def _new_eval(
        self,
        job: dict[str, Any],
        triggered_by: str,
        *,
        index: int | None = None,
        deployment_id: str = "",
        processed: bool = True,
    ) -> dict[str, Any]:
        index = index or self._next_index()
        evaluation = {
            "ID": str(uuid.uuid4()),
            "Namespace": job["Namespace"],
            "Priority": job["Priority"],
            "Type": job["Type"],
            "TriggeredBy": triggered_by,
            "JobID": job["ID"],
            "JobModifyIndex": job["JobModifyIndex"],
            "DeploymentID": deployment_id,
            "Status": "pending",
            "StatusDescription": "",
            "FailedTGAllocs": None,
            "BlockedEval": "",
            "CreateIndex": index,
            "ModifyIndex": index,
            "CreateTime": _now_ns(),
            "ModifyTime": _now_ns(),
        }
        self.evals[evaluation["ID"]] = evaluation
        if processed:
            self._after(self.delay, lambda: self._process_eval(evaluation))
        return evaluation

    def _process_eval(self, evaluation: dict[str, Any]) -> None:
        key = (evaluation["Namespace"], evaluation["JobID"])
        job = self.jobs.get(key)
        index = self._complete(evaluation)
        live = [
            a
            for a in self.allocs.values()
            if (a["Namespace"], a["JobID"]) == key and a["DesiredStatus"] == "run"
        ]
        if job is None or job["Stop"]:  # stopped or purged: nothing runs any more
            self._stop(key, live, index, "Cancelled because job is stopped")
            return
        current = [
            a
            for a in live
            if a["JobVersion"] == job["Version"] and a["_JobCreateIndex"] == job["CreateIndex"]
        ]
        if job["Type"] == "batch" and any(a["ClientStatus"] for a in current):
            return  # a batch job's allocations run once
        if current and job["Type"] != "batch":
            # allocations of this version exist: no change, no new deployment
            latest = self._latest_deployment(key, job["CreateIndex"])
            if latest is not None and latest["JobVersion"] == job["Version"]:
                evaluation["DeploymentID"] = latest["ID"]
            return
        # the old version's allocations are replaced
        self._stop(key, live, index, "Cancelled due to newer version of job")
        deployment = None
        groups = [g for g in job["TaskGroups"] if (g["Update"] or {}).get("MaxParallel", 0) > 0]
        if job["Type"] == "service" and groups and any(g["Count"] > 0 for g in groups):
            deployment = self._new_deployment(job, groups)
            evaluation["DeploymentID"] = deployment["ID"]
        for group in job["TaskGroups"]:
            for n in range(group["Count"]):
                self._place(job, group, n, evaluation["ID"], deployment)

    def _stop(self, key: tuple[str, str], live: list[dict], index: int, cancelled: str) -> None:
        """Cancel the job's running deployment (`cancelled`: why) and stop `live` allocations."""
        for active in self.deployments.values():
            if (active["Namespace"], active["JobID"]) == key and active["Status"] == "running":
                self._end_deployment(active, "cancelled", cancelled)
        for alloc in live:
            alloc.update(DesiredStatus="stop", ModifyIndex=index)
            if alloc["ClientStatus"] in ("pending", "running"):
                alloc.update(ClientStatus="complete", ClientDescription="All tasks have completed")

    def _latest_deployment(self, key: tuple[str, str], create_index: int) -> dict | None:
        mine = [
            d
            for d in self.deployments.values()
            if (d["Namespace"], d["JobID"]) == key and d["JobCreateIndex"] == create_index
        ]
        return max(mine, key=lambda d: d["CreateIndex"], default=None)

    def _new_deployment(self, job: dict[str, Any], groups: list[dict[str, Any]]) -> dict:
        index = self._next_index()
        now = _now_ns()
        states = {}
        for group in groups:
            update = group["Update"]
            deadline = update["ProgressDeadline"]
            states[group["Name"]] = {
                "AutoRevert": bool(update["AutoRevert"]),
                "AutoPromote": bool(update["AutoPromote"]),
                "ProgressDeadline": deadline,
                "RequireProgressBy": _rfc3339(now + deadline) if deadline else ZERO_TIME,
                "Promoted": False,
                "PlacedCanaries": None,
                "DesiredCanaries": update["Canary"],
                "DesiredTotal": group["Count"],
                "PlacedAllocs": 0,
                "HealthyAllocs": 0,
                "UnhealthyAllocs": 0,
                "_generation": 0,
            }
        deployment = {
            "ID": str(uuid.uuid4()),
            "Namespace": job["Namespace"],
            "JobID": job["ID"],
            "JobVersion": job["Version"],
            "JobModifyIndex": job["ModifyIndex"],
            "JobSpecModifyIndex": job["JobModifyIndex"],
            "JobCreateIndex": job["CreateIndex"],
            "IsMultiregion": False,
            "TaskGroups": states,
            "Status": "running",
            "StatusDescription": "Deployment is running",
            "EvalPriority": job["Priority"],
            "CreateIndex": index,
            "ModifyIndex": index,
            "CreateTime": now,
            "ModifyTime": now,
        }
        self.deployments[deployment["ID"]] = deployment
        for name, state in states.items():
            if state["ProgressDeadline"]:
                self._arm_deadline(deployment, name)
        return deployment

    def _arm_deadline(self, deployment: dict[str, Any], group: str) -> None:
        state = deployment["TaskGroups"][group]
        state["_generation"] += 1
        generation = state["_generation"]

        def check() -> None:
            if deployment["Status"] == "running" and state["_generation"] == generation:
                self._fail_deployment(deployment, "Failed due to progress deadline")

        self._after(state["ProgressDeadline"] / SECOND, check)

    def _end_deployment(self, deployment: dict[str, Any], status: str, description: str) -> int:
        index = self._next_index()
        deployment.update(
            Status=status, StatusDescription=description, ModifyIndex=index, ModifyTime=_now_ns()
        )
        return index

    def _fail_deployment(self, deployment: dict[str, Any], base: str) -> None:
        """Fail it; with AutoRevert, re-register the latest stable version (document 3.4)."""
        key = (deployment["Namespace"], deployment["JobID"])
        job = self.jobs.get(key)
        description = base
        revert_to = None
        if job is not None and any(s["AutoRevert"] for s in deployment["TaskGroups"].values()):
            stable = [v for v in self.versions[key] if v["Stable"]]
            if not stable:
                description += " - no stable job version to auto revert to"
            else:
                revert_to = max(stable, key=lambda v: v["Version"])
                if self._spec(revert_to) == self._spec(job):
                    description += (
                        f" - not rolling back to stable job version {revert_to['Version']} "
                        "as current job has same specification"
                    )
                    revert_to = None
                else:
                    description += f" - rolling back to job version {revert_to['Version']}"
        self._end_deployment(deployment, "failed", description)
        if revert_to is not None:
            self._register(key[0], {}, enforce=False, modify_index=0, token=None, stored=revert_to)
            # the register made a job-register eval; Nomad's says deployment-watcher
            reverted = self.jobs[key]
            for evaluation in self.evals.values():
                if evaluation["CreateIndex"] == reverted["JobModifyIndex"]:
                    evaluation.update(
                        TriggeredBy="deployment-watcher", DeploymentID=deployment["ID"]
                    )

    def _place(
        self,
        job: dict[str, Any],
        group: dict[str, Any],
        n: int,
        eval_id: str,
        deployment: dict[str, Any] | None,
        previous: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        index = self._next_index()
        now = _now_ns()
        alloc = {
            "ID": str(uuid.uuid4()),
            "EvalID": eval_id,
            "Name": f"{job['ID']}.{group['Name']}[{n}]",
            "Namespace": job["Namespace"],
            "NodeID": "f2a1b1d4-6cde-4c6b-9b7e-000000000001",
            "NodeName": "fake-node",
            "JobID": job["ID"],
            "JobType": job["Type"],
            "JobVersion": job["Version"],
            "TaskGroup": group["Name"],
            "DesiredStatus": "run",
            "DesiredDescription": "",
            "ClientStatus": "pending",
            "ClientDescription": "No tasks have started",
            "DesiredTransition": {
                "Migrate": None,
                "Reschedule": None,
                "ForceReschedule": None,
                "NoShutdownDelay": None,
            },
            "TaskStates": None,
            "DeploymentID": deployment["ID"] if deployment else "",
            "DeploymentStatus": None,
            "FollowupEvalID": "",
            "NextAllocation": "",
            "PreviousAllocation": previous["ID"] if previous else "",
            "RescheduleTracker": None,
            "PreemptedAllocations": None,
            "PreemptedByAllocation": "",
            "CreateIndex": index,
            "ModifyIndex": index,
            "CreateTime": now,
            "ModifyTime": now,
            "_JobCreateIndex": job["CreateIndex"],
            "_attempt": (previous["_attempt"] + 1) if previous else 0,
        }
        if previous is not None:
            alloc["RescheduleTracker"] = {
                "Events": [
                    {
                        "RescheduleTime": now,
                        "PrevAllocID": previous["ID"],
                        "PrevNodeID": previous["NodeID"],
                        "Delay": 5 * SECOND,
                    }
                ]
            }
        self.allocs[alloc["ID"]] = alloc
        if deployment is not None:
            deployment["TaskGroups"][group["Name"]]["PlacedAllocs"] += 1
        self._after(self.delay, lambda: self._start_alloc(alloc, job, group))
        return alloc

    @staticmethod
    def _event(kind: str, display: str, **fields: Any) -> dict[str, Any]:
        event = {
            "Type": kind,
            "Time": _now_ns(),
            "Message": "",
            "DisplayMessage": display,
            "Details": {},
            "FailsTask": False,
            "RestartReason": "",
            "SetupError": "",
            "DriverError": "",
            "ExitCode": 0,
            "Signal": 0,
            "KillTimeout": 0,
            "KillError": "",
            "KillReason": "",
            "StartDelay": 0,
            "DownloadError": "",
            "ValidationError": "",
            "DiskLimit": 0,
            "FailedSibling": "",
            "VaultError": "",
            "TaskSignalReason": "",
            "TaskSignal": "",
            "DriverMessage": "",
            "GenericSource": "",
        }
        event.update(fields)
        return event

    def _task_states(
        self, alloc: dict[str, Any], events: dict[str, list[dict]], state: str, failed: bool
    ) -> None:
        now = _rfc3339(_now_ns())
        alloc["TaskStates"] = {
            name: {
                "State": state,
                "Failed": failed,
                "Restarts": 0,
                "LastRestart": ZERO_TIME,
                "StartedAt": now if state != "pending" else None,
                "FinishedAt": now if state == "dead" else ZERO_TIME,
                "Events": evs,
                "TaskHandle": None,
                "Paused": "",
            }
            for name, evs in events.items()
        }
        alloc["ModifyIndex"] = self._next_index()
        alloc["ModifyTime"] = _now_ns()

    def _start_alloc(self, alloc: dict[str, Any], job: dict[str, Any], group: dict) -> None:
        if alloc["DesiredStatus"] != "run":
            return
        outcomes = {t["Name"]: _outcome(job, t) for t in group["Tasks"]}
        received = [
            self._event("Received", "Task received by client"),
            self._event("Task Setup", "Building Task Directory", Message="Building Task Directory"),
        ]
        events = {name: list(received) for name in outcomes}
        if any(o.startswith("stall") for o in outcomes.values()):
            self._task_states(alloc, events, "pending", False)
            return
        broken = {name: o for name, o in outcomes.items() if o.startswith("driver-error")}
        if broken:
            for name in broken:
                task = next(t for t in group["Tasks"] if t["Name"] == name)
                image = (task.get("Config") or {}).get("image")
                error = (
                    f"Failed to pull `{image}`: Error response from daemon: manifest for "
                    f"{image} not found: manifest unknown: manifest unknown"
                )
                events[name] += [
                    self._event(
                        "Driver Failure", error, DriverError=error, Details={"driver_error": error}
                    ),
                    self._event(
                        "Not Restarting",
                        "Error was unrecoverable",
                        RestartReason="Error was unrecoverable",
                        FailsTask=True,
                    ),
                ]
            self._task_states(alloc, events, "dead", True)
            self._alloc_ended(alloc, job, group, failed=True)
            return
        for name in events:
            events[name].append(self._event("Started", "Task started by client"))
        self._task_states(alloc, events, "running", False)
        alloc.update(ClientStatus="running", ClientDescription="Tasks are running")
        self._after(self.delay, lambda: self._settle_alloc(alloc, job, group, outcomes, events))

    def _settle_alloc(self, alloc, job, group, outcomes, events) -> None:
        if alloc["DesiredStatus"] != "run":
            return
        exits = {}
        for name, outcome in outcomes.items():
            found = re.match(r"exit-(\d+)", outcome)
            if found:
                exits[name] = int(found.group(1))
            elif job["Type"] == "batch" and (job["Meta"] or {}).get("EXIT"):
                code = job["Meta"]["EXIT"]
                exits[name] = int(code) if code.isascii() and code.isdigit() else 1
        if job["Type"] == "batch" or any(exits.values()):
            policy = "3 in interval 24h0m0s" if job["Type"] == "batch" else "2 in interval 30m0s"
            for name in events:
                code = exits.get(name, 0)
                events[name].append(
                    self._event(
                        "Terminated",
                        f"Exit Code: {code}",
                        ExitCode=code,
                        Details={"exit_code": str(code)},
                    )
                )
                if code:
                    reason = f'Exceeded allowed attempts {policy} and mode is "fail"'
                    events[name].append(
                        self._event("Not Restarting", reason, RestartReason=reason, FailsTask=True)
                    )
            failed = any(exits.values())
            self._task_states(alloc, events, "dead", failed)
            self._alloc_ended(alloc, job, group, failed=failed)
            return
        if job["Type"] == "service":
            self._set_health(alloc, not any(o.startswith("unhealthy") for o in outcomes.values()))

    def _alloc_ended(self, alloc, job, group, *, failed: bool) -> None:
        if failed:
            alloc.update(ClientStatus="failed", ClientDescription="Failed tasks")
        else:
            alloc.update(ClientStatus="complete", ClientDescription="All tasks have completed")
        alloc["ModifyIndex"] = self._next_index()
        if job["Type"] == "service" and failed:
            self._set_health(alloc, False)
        if job["Type"] == "batch" and failed and alloc["_attempt"] < self.batch_reschedules:
            # eligible for a reschedule (Nomad's default batch policy: one more allocation): the
            # client's update queues an evaluation (Node.UpdateAlloc, nomad/node_endpoint.go);
            # the scheduler's plan of it gives the allocation a follow-up evaluation, delayed by
            # the policy, which places the next allocation (scheduler/reconcile.go). Until the
            # plan the failed allocation has neither FollowupEvalID nor NextAllocation, and the
            # job is pending (document 3.3)
            evaluation = self._new_eval(job, "alloc-failure", processed=False)
            self._after(
                self.reschedule_delay, lambda: self._plan_reschedule(alloc, job, group, evaluation)
            )

    def _plan_reschedule(self, alloc, job, group, evaluation) -> None:
        self._complete(evaluation)
        if self._current(job):
            followup = self._new_eval(job, "alloc-failure", processed=False)
            alloc.update(FollowupEvalID=followup["ID"], ModifyIndex=self._next_index())
            self._after(self.delay, lambda: self._reschedule(alloc, job, group, followup))

    def _reschedule(self, alloc, job, group, followup) -> None:
        self._complete(followup)
        if self._current(job):
            n = int(alloc["Name"].rsplit("[", 1)[1][:-1])
            follow = self._place(job, group, n, followup["ID"], None, previous=alloc)
            alloc.update(NextAllocation=follow["ID"], ModifyIndex=self._next_index())

    def _complete(self, evaluation: dict[str, Any]) -> int:
        index = self._next_index()
        evaluation.update(Status="complete", ModifyIndex=index, ModifyTime=_now_ns())
        return index

    def _current(self, job: dict[str, Any]) -> bool:
        """Whether `job` is still the job of its ID (not purged and registered anew), not
        stopped."""
        stored = self.jobs.get((job["Namespace"], job["ID"]))
        return (
            stored is not None
            and stored["CreateIndex"] == job["CreateIndex"]
            and not stored["Stop"]
        )

    def _set_health(self, alloc: dict[str, Any], healthy: bool) -> None:
        index = self._next_index()
        alloc["DeploymentStatus"] = {
            "Healthy": healthy,
            "Timestamp": _rfc3339(_now_ns()),
            "Canary": False,
            "ModifyIndex": index,
        }
        alloc["ModifyIndex"] = index
        deployment = self.deployments.get(alloc["DeploymentID"])
        if deployment is None or deployment["Status"] != "running":
            return
        state = deployment["TaskGroups"][alloc["TaskGroup"]]
        if healthy:
            state["HealthyAllocs"] += 1
            if state["ProgressDeadline"]:
                self._arm_deadline(deployment, alloc["TaskGroup"])  # progress made
        else:
            state["UnhealthyAllocs"] += 1
            if not state["ProgressDeadline"]:
                self._fail_deployment(deployment, "Failed due to unhealthy allocations")
            return
        if all(s["HealthyAllocs"] >= s["DesiredTotal"] for s in deployment["TaskGroups"].values()):
            self._end_deployment(deployment, "successful", "Deployment completed successfully")
            self._set_stable(
                (deployment["Namespace"], deployment["JobID"]), deployment["JobVersion"], True
            )

    @staticmethod
    def _deployment_out(deployment: dict[str, Any] | None) -> dict[str, Any] | None:
        if deployment is None:
            return None
        groups = {
            name: {k: v for k, v in state.items() if not k.startswith("_")}
            for name, state in deployment["TaskGroups"].items()
        }
        return deployment | {"TaskGroups": groups}

    def _alloc_out(self, alloc: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in alloc.items() if not k.startswith("_")}
