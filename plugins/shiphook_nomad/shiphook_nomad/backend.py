"""The Nomad backend.

An app target is a task of a service (or system) job: a deploy reads the job, sets the task's
`config.image`, and registers it back with `EnforceIndex` and the `JobModifyIndex` it read; Nomad's
deployment does the rest, by the group's `update` block, and shiphook follows the deployment of the
version it registered. A job target is a parameterized batch job: a run dispatches it with the
overrides as `Meta` and an idempotency token derived from the deployment id, and follows the child
job's allocations; a run with an image tag of its own dispatches in a window on the job (below).
What Nomad does and answers is in docs/nomad-api-behaviour.md.

Everything goes through python-nomad. Its `Nomad` class reads NOMAD_ADDR, NOMAD_TOKEN and the like
from the environment; the API classes are built here from the config file's values alone.
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

import nomad.api
import nomad.api.exceptions
import requests
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    FilePath,
    SecretStr,
    field_validator,
    model_validator,
)
from shiphook import (
    Backend,
    BackendError,
    ConnectionOptions,
    Flag,
    ImageRepository,
    Progress,
    Ref,
    Target,
    TargetState,
    connection_failure,
    file_stamp,
    repository_of,
)

log = logging.getLogger("shiphook.nomad")
T = TypeVar("T")

# job meta shiphook writes in the same register as its change, so that a repeated call for the
# same deployment finds the work the first one started
META_DEPLOYMENT = "shiphook_deployment"

# A job run with an image tag of its own opens a window on the parameterized job: a register that
# puts its image on the job, its dispatch (the child copies the job), a register that puts the
# job's own image back. Both registers go with EnforceIndex, so of the runs racing for one job (in
# one shiphook process or in several) one opens its window and the others wait. The window's meta
# says whose it is, the image to put back and since when; and the window makes a dispatch meta key
# of that run's own required, which only that run sends. Nomad checks a dispatch's meta against the
# same snapshot of the job that it copies into the child (Job.Dispatch in nomad/job_endpoint.go),
# so no other dispatch (another run's, a person's) copies the window's image, and a run whose
# window was taken over cannot dispatch with the taker's.
META_RUN = "shiphook_run"  # the deployment id of the run whose image the job carries
META_IMAGE_BASE = "shiphook_image_base"  # the job's own image, put back when the window closes
META_RUN_SINCE = "shiphook_run_since"  # when the window opened, UTC
WINDOW_KEY = "shiphook_run_"  # + the run's id: the meta key its window makes required
WINDOW_META = (META_RUN, META_IMAGE_BASE, META_RUN_SINCE)
WINDOW_CALLS = 3
"""A live run holds its window for three API calls (register, dispatch, register): a window open
for longer than that many `timeout`s is left by a run that is gone, and is taken over."""
REFUSED_KEYS = re.compile(r"(unpermitted metadata keys|required meta keys): \[([^\]]*)\]")

REGISTER_ATTEMPTS = 5
"""How often a register refused for a moved JobModifyIndex is re-read and sent again."""

# 500 answers that a later call can get past; every other 500 is Nomad refusing the request
ENFORCE_INDEX = "Enforcing job modify index"
TRANSIENT_TEXTS = (ENFORCE_INDEX, "No cluster leader", "rpc error: EOF", "connection refused")
ROLLING_BACK = re.compile(r"rolling back to job version (\d+)")
# task events that say why a task failed, in Nomad's DisplayMessage
FAILING_EVENTS = (
    *("Driver Failure", "Not Restarting", "Setup Failure", "Failed Validation"),
    *("Task hook failed", "Failed Artifact Download", "Killing", "Sibling Task Failed"),
)


class NomadOptions(ConnectionOptions):
    """`[backends.<name>]` with `plugin = "nomad"`: how to reach a Nomad agent. NOMAD_ADDR,
    NOMAD_TOKEN and the other NOMAD_* variables, and the proxy and CA-bundle variables, are never
    read: the config file alone says how Nomad is reached."""

    address: str = Field("http://127.0.0.1:4646", description="http(s)://host:port of an agent")
    token: SecretStr | None = Field(None, description="ACL token (secret ID)")
    token_file: FilePath | None = Field(None, description="file holding the ACL token")
    namespace: str = Field("default", min_length=1, description="the jobs' namespace")
    region: str | None = Field(None, description="the jobs' region; default: the agent's")
    tls_ca_cert: FilePath | None = Field(None, description="CA that signed Nomad's certificate")
    tls_client_cert: FilePath | None = Field(None, description="client certificate (PEM)")
    tls_client_key: FilePath | None = Field(None, description="client certificate's key (PEM)")
    tls_verify: Flag = Field(True, description="verify Nomad's certificate")

    @field_validator("address")
    @classmethod
    def _is_an_address(cls, value: str) -> str:
        if re.match(r"https?://[^/]*@", value):
            raise ValueError("an address holds no credentials: give the ACL token as token")
        if not re.fullmatch(r"https?://(\[[0-9A-Fa-f:.]+\]|[^/\s:\[\]]+)(:\d+)?/?", value):
            raise ValueError("expected http://host:port or https://host:port")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _consistent(self) -> NomadOptions:
        if self.token is not None and self.token_file is not None:
            raise ValueError("token and token_file are alternatives: set one")
        self.acl_token()  # a token that cannot be sent is a config error, never quoted
        if (self.tls_client_cert is None) != (self.tls_client_key is None):
            raise ValueError("tls_client_cert and tls_client_key go together: set both or neither")
        if self.address.startswith("http://") and any(
            f is not None for f in (self.tls_ca_cert, self.tls_client_cert)
        ):
            raise ValueError("TLS files need an https:// address")
        return self

    def acl_token(self) -> str | None:
        """The ACL token, from `token` or `token_file`: one line of printable ASCII, as
        Nomad's secret IDs are (anything else could not go into a header)."""
        if self.token is not None:
            token, source = self.token.get_secret_value().strip(), "token"
        elif self.token_file is not None:
            try:
                token = self.token_file.read_text().strip()
            except (OSError, UnicodeError) as exc:
                raise ValueError(f"cannot read token_file {self.token_file}: {exc}") from None
            source = f"token_file {self.token_file}"
            if not token:
                raise ValueError(f"{source} is empty")
        else:
            return None
        if not re.fullmatch(r"[!-~]+", token):
            raise ValueError(
                f"{source}: expected an ACL token, one line of printable ASCII without spaces "
                "(a secret ID, like Nomad's)"
            )
        return token


class NomadTargetOptions(BaseModel):
    """Locator keys of a `[targets.<name>]` on a nomad backend."""

    model_config = ConfigDict(extra="forbid")

    job: str = Field(min_length=1, description="the Nomad job's ID")
    group: str | None = Field(None, description="the task group; may be omitted if only one")
    task: str | None = Field(None, description="the task; may be omitted if only one")
    image: ImageRepository | None = Field(
        None, description="repository to deploy from; default: the one the task runs now"
    )


class Client:
    """The python-nomad API objects shiphook uses, built with every setting given explicitly
    (`nomad.Nomad` would fill missing ones from NOMAD_* variables)."""

    def __init__(self, options: NomadOptions) -> None:
        token = options.acl_token()
        session = requests.Session()
        session.trust_env = False  # no proxy or CA bundle from the environment
        cert: tuple[str, ...] = ()
        if options.tls_client_cert is not None:
            cert = (str(options.tls_client_cert), str(options.tls_client_key))
        settings = {
            "address": options.address,
            "namespace": options.namespace,
            "token": token or None,
            "timeout": options.timeout,
            "region": options.region,
            "verify": str(options.tls_ca_cert) if options.tls_ca_cert else options.tls_verify,
            "cert": cert,
            "session": session,
        }
        self.session = session
        self.job = nomad.api.Job(**settings)
        self.deployment = nomad.api.Deployment(**settings)
        self.leader = nomad.api.status.Leader(**settings)


NomadTarget = Target[NomadTargetOptions]


class NomadBackend(Backend):
    """Nomad service jobs (app targets) and parameterized batch jobs (job targets)."""

    name = "nomad"
    description = "HashiCorp Nomad: service jobs rolled to a new tag, parameterized jobs dispatched"
    Options = NomadOptions
    TargetOptions = NomadTargetOptions
    kinds = frozenset({"app", "job"})
    can_rollback = True
    concurrent_runs = True  # each run is a child job of its own
    run_env_as_given = False  # dispatch meta: the task reads ${NOMAD_META_<name>}

    def __init__(self, options: NomadOptions) -> None:
        super().__init__(options)
        self.options: NomadOptions = options
        self.poll_interval = options.poll_interval
        self._client: Client | None = None
        self._client_lock = threading.Lock()
        self._made_from: tuple[int, int, int] | None = None  # the token_file's file_stamp
        # run_job calls under way, by deployment: a lock each, and how many calls hold or wait
        self._run_calls: dict[str, tuple[threading.Lock, int]] = {}
        self._runs = threading.Condition()
        # runs whose window progress closed after run_job could not
        self._windows_closed: set[str] = set()

    @property
    def api(self) -> Client:
        """The client, made again once `token_file` changes: a token rotated in it is sent
        from the next call on, without a restart."""
        with self._client_lock:
            seen = file_stamp(self.options.token_file)
            if self._client is not None and seen != self._made_from:
                # not closed: another thread may be in a call on it; its pool goes with it
                log.info("%s changed: reading it again", self.options.token_file)
                self._client = None
            if self._client is None:
                try:
                    self._client = Client(self.options)
                except ValueError as exc:  # unreadable or empty now: perhaps being rewritten
                    raise BackendError(str(exc), transient=True) from None
                self._made_from = seen
            return self._client

    @property
    def stale_after(self) -> float:
        """Seconds after which a run's window on a job is taken to be left by a run that is
        gone."""
        return WINDOW_CALLS * self.options.timeout

    def close(self) -> None:
        """Let the run_job calls under way end first (a deployer that stops leaves them to their
        threads), so that a stop leaves no window open on a job; at most `stale_after` seconds."""
        deadline = time.monotonic() + self.stale_after
        with self._runs:
            while self._run_calls and (left := deadline - time.monotonic()) > 0:
                self._runs.wait(left)
            if self._run_calls:
                log.warning(
                    "stopping while job runs %s are being started; a restart resumes them",
                    ", ".join(sorted(self._run_calls)),
                )
        with self._client_lock:
            if self._client is not None:
                self._client.session.close()
                self._client = None

    @contextmanager
    def _errors(self, doing: str) -> Iterator[None]:
        """Turn what python-nomad raises into BackendError, transient where a retry can help."""
        try:
            yield
        except nomad.api.exceptions.BaseNomadException as exc:
            answer = exc.nomad_resp
            if not isinstance(answer, requests.Response):  # refused, reset, timed out
                raise BackendError(
                    f"cannot reach Nomad at {self.options.address}: {connection_failure(answer)}",
                    transient=True,
                ) from None
            text = answer.text.strip() or answer.reason
            status = answer.status_code
            transient = status in (502, 503, 504) or (
                status == 500 and any(t in text for t in TRANSIENT_TEXTS)
            )
            message = f"{doing}: {text}"
            if status == 403:
                message += f" (check the ACL token's capabilities in namespace {self._ns})"
            raise BackendError(message, transient=transient) from None
        except requests.RequestException as exc:  # an answer that is not JSON, a stream timeout
            raise BackendError(
                f"{doing}: no usable answer from Nomad at {self.options.address}: {exc}",
                transient=True,
            ) from None

    def _call(self, doing: str, function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        with self._errors(doing):
            return function(*args, **kwargs)

    @property
    def _ns(self) -> str:
        return self.options.namespace

    def _job(self, job_id: str) -> dict[str, Any]:
        return self._call(f"read job {job_id}", self.api.job.get_job, job_id)

    def _register(self, job: dict[str, Any], modify_index: int) -> dict[str, Any]:
        body = {"Job": job, "EnforceIndex": True, "JobModifyIndex": modify_index}
        return self._call(f"register job {job['ID']}", self.api.job.register_job, job["ID"], body)

    def _register_change(
        self, job_id: str, change: Callable[[dict[str, Any]], T | None]
    ) -> tuple[dict[str, Any], T | None, dict[str, Any] | None]:
        """Read the job, let `change` edit it in place, register it with EnforceIndex.

        `change` returns non-None to mean "nothing to register, here is the answer". An index
        conflict means the job changed after it was read: read it again and redo the change.
        Returns the job as read, `change`'s answer, and Nomad's register answer.
        """
        for _attempt in range(REGISTER_ATTEMPTS):
            job = self._job(job_id)
            done = change(job)
            if done is not None:
                return job, done, None
            read_index = job["JobModifyIndex"]
            try:
                return job, None, self._register(job, read_index)
            except BackendError as exc:
                if ENFORCE_INDEX in exc.message:
                    continue
                raise
        raise BackendError(
            f"job {job_id}: {ENFORCE_INDEX} refused {REGISTER_ATTEMPTS} times in a row "
            "(something else keeps registering it)",
            transient=True,
        )

    # -- check and describe ---------------------------------------------------------------

    def check(self) -> str:
        leader = self._call("read the cluster leader", self.api.leader.get_leader)
        where = f"namespace {self._ns}" + (
            f", region {self.options.region}" if self.options.region else ""
        )
        return f"Nomad at {self.options.address} (leader {leader}; {where})"

    def describe(self, target: NomadTarget) -> TargetState:
        job = self._job_of_kind(target)
        if target.kind == "job":
            # said up front by `shiphook check`; a run sends the names anyway, for Nomad to refuse
            spec = job["ParameterizedJob"]
            declared = set(_user_keys(spec.get("MetaRequired"))) | set(
                spec.get("MetaOptional") or ()
            )
            undeclared = sorted(set(target.parameters or ()) - declared)
            if undeclared:
                raise BackendError(
                    f"target {target.name}'s parameters {undeclared} are not declared in job "
                    f"{job['ID']}'s parameterized block (meta_required / meta_optional: "
                    f"{sorted(declared)}): Nomad refuses to dispatch with undeclared meta keys"
                )
            _, task = _locate(job, target, image_needed=False)
            image = (task.get("Config") or {}).get("image")
            window = Window.on(job)
            if window is not None and self._stale(window):
                raise BackendError(
                    f"job {job['ID']} has carried the image of run {window.run} ({image}) since "
                    f"{window.since_text}, longer than a run holds it ({self.stale_after:g} s): "
                    "that run ended without putting the job's own image back (its shiphook was "
                    "killed in between). Meanwhile Nomad refuses dispatches without meta "
                    f"{_window_key(window.run)}. The next run of this target puts "
                    f"{window.base or 'its own image'} back; or register the job again from "
                    "its jobspec"
                )
            base = window.base if window is not None else None
            return TargetState(image=base or image, detail=f"parameterized batch job {job['ID']}")
        group, task = _locate(job, target)
        return TargetState(
            image=task["Config"]["image"],
            detail=f"{job['Type']} job {job['ID']}, group {group['Name']} "
            f"({group['Count']} allocations), task {task['Name']}, version {job['Version']}",
        )

    def _job_of_kind(self, target: NomadTarget) -> dict[str, Any]:
        job = self._job(target.options.job)
        self._check_job(job, target)
        return job

    def _check_job(self, job: dict[str, Any], target: NomadTarget) -> None:
        """A job shiphook can deploy to or run for `target`: of its kind, not stopped, and for an
        app, one whose deployments end without a person's promotion."""
        parameterized = bool(job.get("ParameterizedJob")) and not job.get("Dispatched")
        if target.kind == "app" and (job["Type"] not in ("service", "system") or parameterized):
            raise BackendError(
                f"job {job['ID']} is a {'parameterized ' if parameterized else ''}{job['Type']} "
                f"job, but target {target.name} is of kind 'app', which needs a service or "
                "system job: point the target at such a job or change its kind"
            )
        if target.kind == "job" and (job["Type"] != "batch" or not parameterized):
            raise BackendError(
                f"job {job['ID']} is not a parameterized batch job, but target "
                f"{target.name} is of kind 'job', which needs one (a batch job with a "
                "parameterized block): point the target at such a job or change its kind"
            )
        verb = "deploy" if target.kind == "app" else "run"
        if job.get("Stop"):
            raise BackendError(
                f"job {job['ID']} is stopped: shiphook does not start a stopped job; start it "
                f"(nomad job start {job['ID']}, or nomad job run) and {verb} again"
            )
        if target.kind == "app" and job["Type"] == "service":
            group, _ = _locate(job, target)
            update = group.get("Update") or {}
            if update.get("Canary") and not update.get("AutoPromote"):
                raise BackendError(
                    f"group {group['Name']} of job {job['ID']} has canary = {update['Canary']} "
                    "without auto_promote: each of its deployments waits for a person to "
                    "promote it (nomad deployment promote), which shiphook does not do; set "
                    "auto_promote = true in its update block, or canary = 0"
                )

    # -- app deploys --------------------------------------------------------------------

    def deploy(self, target: NomadTarget, *, image_tag: str, deployment_id: str) -> Ref:
        job_id = target.options.job
        ours = self._version_of(job_id, deployment_id)
        if ours is not None:  # an earlier call registered it
            _, task = _locate(ours, target)
            image = task["Config"]["image"]
            return self._app_ref(ours, target, image, ours["Version"], ours["Version"] - 1)

        def change(job: dict[str, Any]) -> None:
            self._check_job(job, target)
            _, task = _locate(job, target)
            current = task["Config"]["image"]
            wanted = f"{target.options.image or repository_of(current)}:{image_tag}"
            if current != wanted:
                task["Config"]["image"] = wanted
                job["Meta"] = dict(job.get("Meta") or {}) | {META_DEPLOYMENT: deployment_id}
            # else registered as it is: Nomad judges whether anything changed (an eval, no
            # new version when nothing did)
            return None

        job, _, answer = self._register_change(job_id, change)
        assert answer is not None
        _, task = _locate(job, target)
        if answer["JobModifyIndex"] == job["JobModifyIndex"]:  # Nomad saw no change
            return self._app_ref(job, target, task["Config"]["image"], job["Version"], None)
        # EnforceIndex held, so the job was still at the version read: this is the next one
        image = task["Config"]["image"]
        return self._app_ref(job, target, image, job["Version"] + 1, job["Version"])

    def _version_of(self, job_id: str, deployment_id: str) -> dict[str, Any] | None:
        """The oldest kept version of the job that this deployment registered."""
        answer = self._call(f"read versions of job {job_id}", self.api.job.get_versions, job_id)
        mine = [
            v
            for v in answer.get("Versions") or ()
            if (v.get("Meta") or {}).get(META_DEPLOYMENT) == deployment_id
        ]
        return min(mine, key=lambda v: v["Version"], default=None)

    def _app_ref(
        self,
        job: dict[str, Any],
        target: NomadTarget,
        image: str,
        version: int,
        previous: int | None,
    ) -> Ref:
        """`previous` is the version this deployment's register replaced; None: it changed
        nothing."""
        group, _ = _locate(job, target)
        update = group.get("Update") or {}
        return {
            "op": "deploy",
            "job": job["ID"],
            "namespace": self._ns,
            "group": group["Name"],
            "version": version,
            "image": image,
            "previous_version": previous,
            "updated": previous is not None,
            "created": job["CreateIndex"],  # the job's incarnation: a purge and register start anew
            # Nomad creates deployments only for service groups with an update block
            # (max_parallel > 0); its system scheduler (before 1.11) creates none
            "watch": "deployment"
            if job["Type"] == "service" and update.get("MaxParallel") and group["Count"]
            else "allocations",
        }

    def progress(self, target: NomadTarget, ref: Ref) -> Progress:
        if ref["op"] == "run":
            left_open = self._window_left_open(target, ref)
            progress = self._run_progress(ref)
            if progress.state == "running" or not left_open:
                return progress
            return Progress(progress.state, progress.message + left_open)
        if ref["op"] == "rollback" and not ref["updated"]:  # nothing to undo, or undone before
            return Progress("succeeded", f"job {ref['job']} runs {ref['image']}")
        # a deploy that changed nothing (the job already ran this image: its version is the
        # current one) is followed all the same: the version's deployment or allocations say
        # whether it runs healthy (an earlier rollout of it may have failed and been left)
        if ref["watch"] == "allocations":
            return self._allocations_progress(ref)
        deployments = self._call(
            f"read deployments of job {ref['job']}", self.api.job.get_deployments, ref["job"]
        )
        # the deployment list is in UUID order, not by time: pick by version (and incarnation:
        # once the job is purged, the list holds the deployments of every one)
        created = ref.get("created")
        mine = [
            d
            for d in deployments
            if d["JobVersion"] == ref["version"] and created in (None, d["JobCreateIndex"])
        ]
        if not mine and not ref["updated"]:  # Nomad collects old deployments
            return self._allocations_progress(ref)
        if not mine:
            # a job purged meanwhile: Nomad's "job not found"; registered again: another job
            _check_incarnation(ref, self._job(ref["job"]))
            latest = max(deployments, key=lambda d: d["CreateIndex"], default=None)
            if latest is not None and latest["JobVersion"] > ref["version"]:
                return Progress(
                    "failed",
                    f"job {ref['job']} version {ref['version']} was replaced by version "
                    f"{latest['JobVersion']} before Nomad deployed it: it was changed outside "
                    "this deployment",
                )
            was = f" (latest: version {latest['JobVersion']})" if latest else ""
            return Progress(
                "running",
                f"waiting for Nomad to create the deployment of version {ref['version']}{was}",
            )
        deployment = max(mine, key=lambda d: d["CreateIndex"])
        status, description = deployment["Status"], deployment["StatusDescription"]
        if status == "successful" and not ref["updated"]:
            return Progress("succeeded", f"job {ref['job']} already runs {ref['image']}")
        if status == "successful":
            return Progress(
                "succeeded",
                f"{description} (job {ref['job']} version {ref['version']}, {ref['image']})",
            )
        if status not in ("failed", "cancelled"):
            counts = ", ".join(
                f"{name}: {s['HealthyAllocs']} of {s['DesiredTotal']} healthy"
                + (f", {s['UnhealthyAllocs']} unhealthy" if s["UnhealthyAllocs"] else "")
                for name, s in (deployment.get("TaskGroups") or {}).items()
            )
            return Progress("running", f"deployment {deployment['ID'][:8]} {status}: {counts}")
        why = description + self._failing_allocation(
            ref["job"], lambda a: a.get("DeploymentID") == deployment["ID"]
        )
        reverted = ROLLING_BACK.search(description)
        if reverted is None:
            return Progress("failed", why)
        return self._auto_revert_progress(ref, int(reverted.group(1)), why, deployments)

    def _auto_revert_progress(
        self, ref: Ref, stable: int, why: str, deployments: list[dict[str, Any]]
    ) -> Progress:
        """Nomad re-registered stable version `stable` as a newer version: follow its
        deployment, and report the whole as rolled back once it is done."""
        newer = [d for d in deployments if d["JobVersion"] > ref["version"]]
        back = max(newer, key=lambda d: d["CreateIndex"], default=None)
        if back is not None and back["Status"] in ("failed", "cancelled"):
            return Progress(
                "failed",
                f"{why}; Nomad's rollback to version {stable} failed too: "
                f"{back['StatusDescription']}",
            )
        if back is None or back["Status"] != "successful":
            return Progress("running", f"{why}; Nomad is rolling back")
        job = self._job(ref["job"])
        image = next(
            (
                t["Config"].get("image")
                for g in job["TaskGroups"]
                if g["Name"] == ref["group"]
                for t in g["Tasks"]
                if t.get("Config")
            ),
            None,
        )
        return Progress(
            "rolled_back",
            f"{why}; Nomad rolled job {ref['job']} back to version {stable}"
            + (f" ({image})" if image else "")
            + f" as version {back['JobVersion']}",
        )

    def _allocations_progress(self, ref: Ref) -> Progress:
        """A group without an update block gets no deployment: its version's allocations are
        placed at once, and turn healthy or fail."""
        job = self._job(ref["job"])
        _check_incarnation(ref, job)
        if job["Version"] != ref["version"]:
            return Progress(
                "failed",
                f"job {ref['job']} is at version {job['Version']}, not {ref['version']} as this "
                "deployment registered it: it was changed outside this deployment",
            )
        allocs = self._allocations(ref["job"])
        live = [a for a in allocs if a["DesiredStatus"] == "run"]
        mine = [a for a in live if a["JobVersion"] == ref["version"]]
        failed = self._failing_allocation(
            ref["job"], lambda a: a["JobVersion"] == ref["version"], allocs
        )
        if failed:
            return Progress("failed", f"job {ref['job']} version {ref['version']}{failed}")
        if job["Type"] == "system":
            # one allocation per eligible node, and no health: Nomad's client watches the
            # health of service allocations only (client/allocrunner/health_hook.go)
            running = [a for a in mine if a["ClientStatus"] == "running"]
            counts = f"{len(running)} of {len(live)} allocations running version {ref['version']}"
            if running and len(running) == len(live):
                return Progress("succeeded", f"{counts} ({ref['image']})")
            return Progress("running", counts)
        wanted = sum(g["Count"] for g in job["TaskGroups"])
        healthy = [
            a
            for a in mine
            if a["ClientStatus"] == "running" and (a.get("DeploymentStatus") or {}).get("Healthy")
        ]
        counts = f"{len(healthy)} of {wanted} allocations of version {ref['version']} healthy"
        if len(healthy) >= wanted:
            return Progress("succeeded", f"{counts} ({ref['image']})")
        return Progress("running", counts)

    def _allocations(self, job_id: str) -> list[dict[str, Any]]:
        return self._call(f"read allocations of job {job_id}", self.api.job.get_allocations, job_id)

    def _failing_allocation(
        self,
        job_id: str,
        chosen: Callable[[dict[str, Any]], bool],
        allocs: list[dict[str, Any]] | None = None,
    ) -> str:
        """`; allocation <id> <status>: task <name>: <why>` for a failed or unhealthy
        allocation, in the task events' own words; empty when there is none."""
        if allocs is None:
            try:
                allocs = self._allocations(job_id)
            except BackendError:
                return ""  # the deployment's own description still stands
        bad = [
            a
            for a in allocs
            if chosen(a)
            and (
                a["ClientStatus"] == "failed"
                or (a.get("DeploymentStatus") or {}).get("Healthy") is False
            )
        ]
        if not bad:
            return ""
        alloc = max(bad, key=lambda a: a["ModifyIndex"])
        state = "failed" if alloc["ClientStatus"] == "failed" else "unhealthy"
        return f"; allocation {alloc['ID'][:8]} {state}" + _task_failure(alloc)

    def rollback(self, target: NomadTarget, ref: Ref) -> Ref:
        answer = {**ref, "op": "rollback", "updated": False}
        if not ref["updated"]:
            return answer  # this deployment changed nothing, so there is nothing to undo
        job_id = ref["job"]
        job = self._job(job_id)
        versions = (
            self._call(f"read versions of job {job_id}", self.api.job.get_versions, job_id).get(
                "Versions"
            )
            or []
        )
        # what ran before this deployment, as every backend restores it (the latest stable
        # version would skip a failure left in place before it)
        back = next((v for v in versions if v["Version"] == ref["previous_version"]), None)
        _check_incarnation(ref, job)
        if job["Version"] != ref["version"]:
            _, task = _locate(job, target)
            if back is not None and task["Config"]["image"] == _image(back, ref["group"]):
                # an earlier call reverted: follow the version it made, which may yet fail
                return answer | {
                    "version": job["Version"],
                    "image": task["Config"]["image"],
                    "reverted_to": back["Version"],
                    "updated": True,
                }
            raise BackendError(
                f"job {job_id} is at version {job['Version']}, not {ref['version']} as this "
                "deployment left it: something else changed it, so shiphook does not roll it "
                "back; look at the job and deploy again"
            )
        if back is None:
            raise BackendError(
                f"job {job_id} keeps no version before {ref['version']} to revert to; roll it "
                f"back by hand (nomad job revert {job_id} <version>)"
            )
        self._call(
            f"revert job {job_id} to version {back['Version']}",
            self.api.job.revert_job,
            job_id,
            back["Version"],
            enforce_prior_version=job["Version"],
        )
        return answer | {
            "version": job["Version"] + 1,
            "image": _image(back, ref["group"]),
            "reverted_to": back["Version"],
            "updated": True,
        }

    # -- job runs --------------------------------------------------------------------------

    def run_job(
        self,
        target: NomadTarget,
        *,
        env: dict[str, str],
        image_tag: str | None,
        deployment_id: str,
    ) -> Ref:
        with self._run_call(deployment_id):
            return self._run(target, env, image_tag, deployment_id)

    @contextmanager
    def _run_call(self, deployment_id: str) -> Iterator[None]:
        """One run_job call of a deployment at a time: a call the deployer gave up on and its
        retry take turns (before 1.11 Nomad may make two children of two dispatches with one
        idempotency token at once). Counted, so that close() lets the calls under way end."""
        with self._runs:
            lock, calls = self._run_calls.get(deployment_id, (threading.Lock(), 0))
            self._run_calls[deployment_id] = (lock, calls + 1)
        try:
            with lock:
                yield
        finally:
            with self._runs:
                lock, calls = self._run_calls.pop(deployment_id)
                if calls > 1:
                    self._run_calls[deployment_id] = (lock, calls - 1)
                self._runs.notify_all()

    def _run(
        self, target: NomadTarget, env: dict[str, str], image_tag: str | None, deployment_id: str
    ) -> Ref:
        job_id = target.options.job
        image, windowed, taken_over = self._ready_to_dispatch(target, image_tag, deployment_id)
        meta = dict(env)
        if windowed:
            meta[_window_key(deployment_id)] = deployment_id
        try:
            child = self._dispatch(job_id, meta, deployment_id)["DispatchedJobID"]
        except BaseException:
            if windowed:  # the job's own image back, so that other runs need not wait for this one
                with contextlib.suppress(BackendError):
                    self._close_window(target, deployment_id)
            raise
        ref = {
            "op": "run",
            "job": job_id,
            "namespace": self._ns,
            "child": child,
            "image": image,
            "deployment": deployment_id,
        }
        if taken_over is not None:
            ref["took_over_window_of"] = taken_over
        if windowed:
            try:
                self._close_window(target, deployment_id)
            except BackendError as exc:  # the run is under way: progress closes the window
                log.warning(
                    "job %s: run %s dispatched %s, but its window stays open for now: %s",
                    job_id,
                    deployment_id,
                    child,
                    exc.message,
                )
                ref["window"] = "open"
        return ref

    def _ready_to_dispatch(
        self, target: NomadTarget, image_tag: str | None, deployment_id: str
    ) -> tuple[str, bool, str | None]:
        """Leave the job ready for this run's dispatch: as it is, or with this run's window
        open. Returns the image the run runs, whether it dispatches in its own window, and the
        run whose stale window it took over, if it did."""
        job_id = target.options.job
        plan: dict[str, Any] = {}

        def change(job: dict[str, Any]) -> bool | None:
            """None: register the job as edited here; True: dispatch with the job as it is."""
            self._check_job(job, target)
            _, task = _locate(job, target)
            current = task["Config"]["image"]
            window = Window.on(job)
            mine = window is not None and window.run == deployment_id
            if window is not None and not mine:
                self._wait_for(job_id, window)  # unless it is stale: then it is taken over
            base = (window.base if window is not None else None) or current
            image = base
            if image_tag:
                image = f"{target.options.image or repository_of(base)}:{image_tag}"
            taken_over = window.run if window is not None and not mine else None
            plan.update(image=image, windowed=image != base, taken_over=taken_over)
            if image == base:
                if window is None:
                    return True  # the job runs this image already
                _clear_window(job, task, base)  # a window no other run will close
                return None
            required = job["ParameterizedJob"].get("MetaRequired") or ()
            if mine and current == image and _window_key(deployment_id) in required:
                return True  # an earlier call for this deployment opened it
            _set_window(job, task, deployment_id, image, base, _now())
            return None

        self._register_change(job_id, change)
        return plan["image"], plan["windowed"], plan["taken_over"]

    def _stale(self, window: Window) -> bool:
        age = window.age(_now())
        return age is None or age > self.stale_after

    def _wait_for(self, job_id: str, window: Window) -> None:
        """Raise a transient error naming the run whose window is open on the job, unless the
        window is stale (left by a run that is gone): then this run takes it over."""
        if self._stale(window):
            log.warning(
                "job %s: run %s's window has been open since %s, longer than a run holds one "
                "(%g s): taking it over (%s goes back on the job)",
                job_id,
                window.run,
                window.since_text,
                self.stale_after,
                window.base,
            )
            return
        age = max(0.0, window.age(_now()) or 0.0)
        raise BackendError(
            f"job {job_id} carries the image of run {window.run} (its window opened {age:.0f} s "
            "ago); waiting for that run to dispatch and put the job's own image back (a window "
            f"open for more than {self.stale_after:g} s is taken over)",
            transient=True,
        )

    def _close_window(self, target: NomadTarget, deployment_id: str) -> None:
        """Put the job's own image back, if the run's window is still open."""

        def change(job: dict[str, Any]) -> bool | None:
            window = Window.on(job)
            if window is None or window.run != deployment_id:
                return True  # closed already, or taken over by another run
            _, task = _locate(job, target)
            _clear_window(job, task, window.base)
            return None

        self._register_change(target.options.job, change)

    def _dispatch(self, job_id: str, meta: dict[str, str], deployment_id: str) -> dict[str, Any]:
        """Dispatch with the overrides as Meta. The idempotency token goes in the query string,
        where Nomad reads it (python-nomad's dispatch_job sends it in the body, where Nomad does
        not): a repeated dispatch for this deployment gets the same child job back."""
        try:
            return self._call(
                f"dispatch job {job_id}",
                lambda: self.api.job.request(
                    job_id,
                    "dispatch",
                    method="post",
                    json={"Meta": meta or None},
                    params={"idempotency_token": f"shiphook-{deployment_id}"},
                ).json(),
            )
        except BackendError as exc:
            refused = REFUSED_KEYS.search(exc.message)
            keys = refused.group(2).split() if refused else []
            if not keys or not all(key.startswith(WINDOW_KEY) for key in keys):
                raise
            why = (
                "this run's window on the job was taken over by another run"
                if refused.group(1).startswith("unpermitted")
                else "another run's window opened on the job after this run read it"
            )
            raise BackendError(f"{exc.message}: {why}; waiting", transient=True) from None

    def _window_left_open(self, target: NomadTarget, ref: Ref) -> str:
        """Close the window run_job left open; '' once it is closed, else why it is not."""
        if ref.get("window") != "open" or ref["deployment"] in self._windows_closed:
            return ""
        try:
            self._close_window(target, ref["deployment"])
        except BackendError as exc:
            return f"; job {ref['job']} still carries this run's image ({exc.message})"
        self._windows_closed.add(ref["deployment"])
        return ""

    def _child_status(self, child: str) -> str:
        """A dispatched job's status; `dead` once Nomad has collected it (every allocation of
        it had ended)."""
        with self._errors(f"read job {child}"):
            try:
                return self.api.job.get_job(child)["Status"]
            except nomad.api.exceptions.URLNotFoundNomadException:
                return "dead"

    def _run_progress(self, ref: Ref) -> Progress:
        """The child's allocations: the one without a NextAllocation is the last attempt (a
        failed batch allocation is rescheduled once by default)."""
        child = ref["child"]
        allocs = self._allocations(child)
        if not allocs:
            job = self._job(child)  # 404 once the child is garbage-collected
            return Progress("running", f"job {child} {job['Status']}: no allocation placed yet")
        last = [a for a in allocs if not a.get("NextAllocation")]
        failed = [a for a in last if a["ClientStatus"] in ("failed", "lost")]
        for alloc in failed:
            if alloc.get("FollowupEvalID"):
                continue  # Nomad reschedules it
            status = self._child_status(child)
            if status != "dead":
                # an evaluation is still open (the one its failure queued: Nomad writes the
                # reschedule when the scheduler plans it), or other allocations still run
                return Progress(
                    "running",
                    f"job {child} {status}: allocation {alloc['ID'][:8]} "
                    f"{alloc['ClientStatus']}; waiting for the job to end",
                )
            attempts = f" (attempt {len(allocs)})" if len(allocs) > 1 else ""
            return Progress(
                "failed",
                f"job {child}: allocation {alloc['ID'][:8]} {alloc['ClientStatus']}{attempts}"
                + _task_failure(alloc),
            )
        if last and all(a["ClientStatus"] == "complete" for a in last):
            return Progress(
                "succeeded", f"job {child} completed: {len(last)} allocation(s) complete"
            )
        states = ", ".join(sorted(a["ClientStatus"] for a in last))
        return Progress("running", f"job {child}: allocations {states}")


@dataclass(frozen=True)
class Window:
    """A job run's window on a parameterized job, as the job's meta says it."""

    run: str
    base: str | None
    since: datetime | None

    @classmethod
    def on(cls, job: dict[str, Any]) -> Window | None:
        meta = job.get("Meta") or {}
        if not meta.get(META_RUN):
            return None
        try:
            since: datetime | None = datetime.fromisoformat(meta.get(META_RUN_SINCE) or "")
        except ValueError:
            since = None
        if since is not None and since.tzinfo is None:
            since = None  # not written by shiphook
        return cls(meta[META_RUN], meta.get(META_IMAGE_BASE), since)

    def age(self, now: datetime) -> float | None:
        """Seconds the window has been open; None when the job does not say."""
        return None if self.since is None else (now - self.since).total_seconds()

    @property
    def since_text(self) -> str:
        return _utc_text(self.since) if self.since is not None else "an unknown time"


def _now() -> datetime:
    return datetime.now(UTC)


def _utc_text(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _window_key(run: str) -> str:
    return WINDOW_KEY + re.sub(r"[^0-9A-Za-z]", "", run)


def _user_keys(keys: list[str] | None) -> list[str]:
    """The meta keys of a parameterized block without the ones windows add."""
    return [key for key in keys or () if not key.startswith(WINDOW_KEY)]


def _set_window(
    job: dict[str, Any], task: dict[str, Any], run: str, image: str, base: str, now: datetime
) -> None:
    """Edit `job` to carry run `run`'s window: its image, its meta, its meta key required."""
    task["Config"]["image"] = image
    meta = {k: v for k, v in (job.get("Meta") or {}).items() if k not in WINDOW_META}
    job["Meta"] = meta | {META_RUN: run, META_IMAGE_BASE: base, META_RUN_SINCE: _utc_text(now)}
    spec = job["ParameterizedJob"]
    spec["MetaRequired"] = [*_user_keys(spec.get("MetaRequired")), _window_key(run)]


def _clear_window(job: dict[str, Any], task: dict[str, Any], base: str | None) -> None:
    """Edit `job` back to carrying no window: its own image `base` (when known) and meta."""
    if base:
        task["Config"]["image"] = base
    meta = {k: v for k, v in (job.get("Meta") or {}).items() if k not in WINDOW_META}
    job["Meta"] = meta or None
    spec = job["ParameterizedJob"]
    spec["MetaRequired"] = _user_keys(spec.get("MetaRequired")) or None


def _check_incarnation(ref: Ref, job: dict[str, Any]) -> None:
    """Raise when the job is not the one this deployment registered: it was purged and
    registered again (its versions started anew)."""
    if ref.get("created") not in (None, job["CreateIndex"]):
        raise BackendError(
            f"job {ref['job']} was purged and registered again during this deployment: "
            "shiphook neither follows nor rolls back the new job; look at it and deploy again"
        )


def _locate(
    job: dict[str, Any], target: NomadTarget, *, image_needed: bool = True
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The target's group and task in `job` (each may be left out when there is only one)."""
    options = target.options
    groups = job.get("TaskGroups") or []
    group = _one(groups, options.group, f"job {job['ID']}", "group")
    task = _one(group.get("Tasks") or [], options.task, f"group {group['Name']}", "task")
    if image_needed and not isinstance((task.get("Config") or {}).get("image"), str):
        raise BackendError(
            f"task {task['Name']} of job {job['ID']} has no config.image (driver "
            f"{task.get('Driver')}): shiphook deploys image tags of docker or podman tasks"
        )
    return group, task


def _one(items: list[dict[str, Any]], name: str | None, where: str, what: str) -> dict[str, Any]:
    names = [i["Name"] for i in items]
    if name is not None:
        for item in items:
            if item["Name"] == name:
                return item
        raise BackendError(f"{where} has no {what} {name} (it has: {', '.join(names) or 'none'})")
    if len(items) != 1:
        raise BackendError(
            f"{where} has {len(items)} {what}s ({', '.join(names)}): name one with "
            f"`{what} = ...` in the target"
        )
    return items[0]


def _image(job: dict[str, Any], group: str) -> str | None:
    for g in job.get("TaskGroups") or ():
        if g["Name"] == group:
            for task in g.get("Tasks") or ():
                image = (task.get("Config") or {}).get("image")
                if image:
                    return image
    return None


def _task_failure(alloc: dict[str, Any]) -> str:
    """`: task <name>: <event>, <event>` from the failing task's events, e.g. `Exit Code: 1`."""
    for name, state in sorted((alloc.get("TaskStates") or {}).items()):
        if not state.get("Failed") and state.get("State") != "dead":
            continue
        said = []
        for event in state.get("Events") or ():
            failing = event["Type"] in FAILING_EVENTS or (
                event["Type"] == "Terminated" and event.get("ExitCode")
            )
            message = event.get("DisplayMessage") or event.get("Message")
            if failing and message and message not in said:
                said.append(message)
        if said:
            return f": task {name}: " + "; ".join(said[-3:])
    return ""
