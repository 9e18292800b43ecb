"""What a backend plugin implements: the `Backend` base class and the types it exchanges.

A backend is one orchestrator (Swarm, Kubernetes, Nomad, ...). Its class declares the options it
takes in `[backends.<name>]` and the locator keys it reads from `[targets.<name>]` as pydantic
models; shiphook validates both at start and hands the backend validated instances. Every method
runs on a deployer worker thread, never on the thread that answers HTTP requests, so blocking
client libraries are fine. Methods raise `BackendError` for anything the orchestrator refused or
could not be asked.
"""

from __future__ import annotations

import json
import os
import re
import ssl
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar, Generic, Literal, TypeVar, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from shiphook.errors import one_line

Kind = Literal["app", "job"]
State = Literal["running", "succeeded", "failed", "rolled_back"]  # of a `Progress`
# numbers and switches in a config are TOML's: strict, so that "10" or "no" (strings), or true
# for a number and 1 for a switch, are refused; durations finite and within a year, so that
# every clock and timer computed from them holds them
YEAR = 365 * 24 * 3600
Duration = Annotated[float, Field(ge=0, le=YEAR, strict=True, allow_inf_nan=False)]
Seconds = Annotated[Duration, Field(gt=0)]
Flag = Annotated[bool, Field(strict=True)]
ENV_NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*$"


class NoOptions(BaseModel):
    """The options model of a backend or target that takes no keys of its own."""

    model_config = ConfigDict(extra="forbid")


class ConnectionOptions(NoOptions):
    """Backend keys every orchestrator connection has; a backend's `Options` may extend it."""

    timeout: Seconds = Field(30.0, description="seconds per API call")
    poll_interval: Annotated[Seconds, Field(ge=0.01)] = Field(
        1.0, description="seconds between progress reads of a rollout or job run"
    )


class BackendError(Exception):
    """The orchestrator refused a call or could not be reached.

    `transient=True` means the same call may work later (connection refused, timeouts, 5xx,
    version conflicts): the deployer retries it with backoff within the target's retry budget.
    `transient=False` (the default) means retrying cannot help (not found, forbidden, invalid):
    the deployment fails at once with `message`, which should be the orchestrator's own words.
    `retry_after` is the delay in seconds the orchestrator asked for (an HTTP `Retry-After`): the
    deployer waits at least that long before the retry, or gives up at once if that is more than
    the target's retry budget has left.
    """

    def __init__(
        self, message: str, *, transient: bool = False, retry_after: float | None = None
    ) -> None:
        self.message = one_line(message)  # an orchestrator's words: stored, logged and shown
        super().__init__(self.message)
        self.transient = transient
        self.retry_after = retry_after


class PluginBug(BackendError):
    """A backend call raised what the contract does not allow, or returned it: permanent, and
    what the call did before is unknown."""


def connection_failure(exc: BaseException) -> str:
    """Why a connection failed, in the words of the system call or TLS handshake under the HTTP
    client's wrappers (requests and urllib3 put their pool, their retries and reprs of their
    connection objects around it): "Connection refused", "timed out", "Name or service not
    known", "certificate verify failed: self-signed certificate"."""
    chain, seen = [exc], {id(exc)}
    while (inner := _inner(chain[-1])) is not None and id(inner) not in seen:
        chain.append(inner)
        seen.add(id(inner))
    names = {type(e).__name__ for e in chain}  # the clients' own, not imported here
    if names & {"ReadTimeoutError", "ReadTimeout"}:  # it connected, and did not answer
        waited = re.search(r"read timeout=([\d.]+)", str(exc))
        return f"no answer within {float(waited[1]):g} s" if waited else "no answer in time"
    cause = chain[-1]
    if isinstance(cause, ssl.SSLCertVerificationError) and cause.verify_message:
        said = f"certificate verify failed: {cause.verify_message}"
    elif isinstance(cause, OSError) and cause.strerror and not isinstance(cause, ssl.SSLError):
        said = f"{cause.strerror}: {cause.filename}" if cause.filename else cause.strerror
    else:
        text = re.sub(r"\s*\(_ssl\.c:\d+\)|_ssl\.c:\d+: ", "", str(cause))
        said = one_line(text) or type(cause).__name__
    return f"the proxy: {said}" if "ProxyError" in names else said


def file_stamp(path: str | os.PathLike[str] | None) -> tuple[int, int, int] | None:
    """Inode, modification time and size of a file a backend's client is made from (a
    kubeconfig, a token file): once the file is rewritten or replaced, one of them differs, and
    the backend makes its client again. None for no file, or one that is not there now."""
    if path is None:
        return None
    try:
        found = os.stat(path)
    except OSError:
        return None
    return found.st_ino, found.st_mtime_ns, found.st_size


def _inner(exc: BaseException) -> BaseException | None:
    """What `exc` wraps: urllib3's `reason`, an exception among its arguments (requests',
    urllib3's `ProtocolError`), or the one it was raised from."""
    for inner in (getattr(exc, "reason", None), *exc.args):
        if isinstance(inner, BaseException):
            return inner
    return exc.__cause__ or exc.__context__


class TargetSettings(BaseModel):
    """The keys every `[targets.<name>]` has, whatever its backend: shiphook's own."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Kind
    backend: str
    rollout_timeout: Seconds = 600.0
    on_failure: Literal["rollback", "leave"] = "rollback"
    retry_budget: Duration = 300.0
    allowed_tags: str | None = None
    parameters: tuple[Annotated[str, Field(pattern=ENV_NAME_PATTERN)], ...] | None = None
    max_concurrent_runs: int = Field(1, ge=1, le=100, strict=True)
    call_timeout: Seconds = 120.0

    @field_validator("allowed_tags")
    @classmethod
    def _compiles(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"not a valid regular expression: {exc}") from None
        return value

    @model_validator(mode="after")
    def _fits_kind(self) -> TargetSettings:
        if self.kind == "app" and self.parameters is not None:
            raise ValueError("parameters applies to job targets only")
        return self

    def allows(self, tag: str) -> bool:
        """Whether `allowed_tags`, if set (and not empty), matches the whole of `tag`."""
        return not self.allowed_tags or re.fullmatch(self.allowed_tags, tag) is not None


TargetOptionsT = TypeVar("TargetOptionsT", bound=BaseModel)


class Target(TargetSettings, Generic[TargetOptionsT]):
    """A deployable thing as configured in `[targets.<name>]`, handed to every backend call.

    `options` is the backend's `TargetOptions` instance (its locator keys, validated); annotate
    `target: Target[MyTargetOptions]` to have `target.options.<key>` typed (a bare `Target` works
    too).
    """

    name: str
    options: TargetOptionsT


@dataclass(frozen=True)
class TargetState:
    """What `Backend.describe` found: the target exists, the image it runs now, and in `detail`
    a few words on what it is (`shiphook check` prints them)."""

    image: str | None
    detail: str = ""


@dataclass(frozen=True)
class Progress:
    """Where a rollout, job run or rollback stands, in the orchestrator's own words.

    `state` is `running` until the orchestrator's own signals say the work ended, then
    `succeeded` or `failed`, or `rolled_back` when a rollout failed and the orchestrator already
    returned the target to what ran before (its own automatic rollback: shiphook does not roll
    back again); `message` is shown to the operator and to a waiting CI job.
    """

    state: State
    message: str = ""

    def __post_init__(self) -> None:  # the orchestrator's words: stored, logged and shown
        object.__setattr__(self, "message", one_line(self.message))


Ref = dict[str, Any]
"""A backend's own reference to a rollout or run (service version, revision, job name, ...).

It is stored with the deployment as JSON and handed back to `progress` and `rollback`, also by
another shiphook process after a restart, so it must hold everything needed to find the work again.
"""


class Backend(ABC):
    """Base class of every orchestrator backend.

    Subclasses set `name` (what `plugin = "..."` in the config names), `description` (one line
    `shiphook plugins` shows), `Options` and `TargetOptions` (pydantic models; use
    `extra="forbid"` so typos are reported), and the capability flags; then implement the
    abstract methods. `__init__` receives the validated `Options` instance and must not contact
    the orchestrator: `serve` starts, and keeps accepting hooks, while an orchestrator is down.

    `deploy` and `run_job` receive the deployment id and must be idempotent for it: after a
    crash the deployer calls them again for the same deployment, and that must not start a
    second rollout or run (derive names from the id, or find the work the first call started).
    """

    name: ClassVar[str]
    description: ClassVar[str] = ""
    Options: ClassVar[type[BaseModel]] = NoOptions
    TargetOptions: ClassVar[type[BaseModel]] = NoOptions
    kinds: ClassVar[frozenset[Kind]] = frozenset({"app", "job"})
    can_rollback: ClassVar[bool] = True
    concurrent_runs: ClassVar[bool] = True
    """Whether several runs of one job target can go at once (`max_concurrent_runs` > 1)."""
    run_env_as_given: ClassVar[bool] = True
    """Whether a job run's variables reach its process under their own names, over the job's
    own; False: the orchestrator passes them another way, which the backend's documentation
    says (Nomad's dispatch meta, which the task reads as `NOMAD_META_<name>`)."""
    poll_interval: float = 1.0
    """Seconds between `progress` calls while work runs; a backend may set it per instance
    (from an option, say)."""

    def __init__(self, options: BaseModel) -> None:
        self.options = options

    @abstractmethod
    def check(self) -> str:
        """Contact the orchestrator; return a one-line description of what answered.

        Raise `BackendError` with the orchestrator's message when it is unreachable or unfit
        (for example not a swarm manager).
        """

    @abstractmethod
    def describe(self, target: Target) -> TargetState:
        """Find the target's workload; return the image it runs now.

        Raise a permanent `BackendError` when it does not exist or is of the wrong kind.
        """

    @abstractmethod
    def deploy(self, target: Target, *, image_tag: str, deployment_id: str) -> Ref:
        """Start rolling the app target to `image_tag`; return a reference for `progress`,
        with `image`: the full image reference rolled out (shown to users).

        Deploying the image already running is not an error: the reference's progress reports
        success at once (and an `image` equal to the one running tells shiphook no rollout
        started).
        """

    def run_job(
        self,
        target: Target,
        *,
        env: dict[str, str],
        image_tag: str | None,
        deployment_id: str,
    ) -> Ref:
        """Start one run of the job target with `env` merged over its own environment; return
        a reference for `progress`, with `image`: the image this run runs (shown to users).

        `env` and `image_tag` apply to this run only: the next run merges over, and without an
        `image_tag` runs, what the target had before shiphook's overrides. Only called when
        `kinds` has "job".
        """
        raise BackendError(f"the {self.name} backend runs no jobs")

    @abstractmethod
    def progress(self, target: Target, ref: Ref) -> Progress:
        """Read where the work `ref` names stands, from the orchestrator's own signals."""

    def rollback(self, target: Target, ref: Ref) -> Ref:
        """Return the app target to what ran before the rollout `ref`; return a reference for
        `progress`. Only called when `can_rollback` is true; use the orchestrator's native
        rollback where it has one."""
        raise BackendError(f"the {self.name} backend cannot roll back")

    def close(self) -> None:  # noqa: B027 - optional hook, most backends hold nothing to release
        """Release clients and connections; called once when shiphook stops."""


@dataclass
class BackendRegistry:
    """Backend classes by name, as the plugins registered them."""

    classes: dict[str, type[Backend]] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)

    def register(self, backend_class: type[Backend], *, source: str = "") -> None:
        if not (isinstance(backend_class, type) and issubclass(backend_class, Backend)):
            raise TypeError(f"{backend_class!r} is not a subclass of shiphook.Backend")
        name = backend_class.name
        if name in self.classes and self.classes[name] is not backend_class:
            raise ValueError(
                f"two plugins register a backend named {name!r}: "
                f"{self.sources[name]} and {source}; disable one with [server] disabled_plugins"
            )
        self.classes[name] = backend_class
        self.sources[name] = source


def capabilities(backend: type[Backend]) -> list[str]:
    """What the backend's capability flags allow, in words (`shiphook plugins` shows them)."""
    allowed = sorted(backend.kinds)
    allowed += ["rollback"] if backend.can_rollback else []
    if "job" in backend.kinds:
        allowed += ["concurrent-runs"] if backend.concurrent_runs else []
        allowed += ["run-env-as-given"] if backend.run_env_as_given else []
    return allowed


class PluginCall:
    """A call of plugin code on a daemon thread of its own, which the caller waits for as long
    as it chooses (`done`); a call that never returns is left to its thread."""

    def __init__(self, name: str, function: Callable[..., Any], /, *args: Any, **kwargs: Any):
        self.done = threading.Event()
        self.started = time.monotonic()
        self._outcome: list[tuple[bool, Any]] = []
        self._lock = threading.Lock()
        self._then: Callable[[], None] | None = None

        def call() -> None:
            try:
                self._outcome.append((True, function(*args, **kwargs)))
            except BaseException as exc:  # raised in the caller's thread, by `result`
                self._outcome.append((False, exc))
            finally:
                with self._lock:
                    self.done.set()
                    then = self._then
                if then is not None:
                    then()

        threading.Thread(target=call, name=name, daemon=True).start()

    def then(self, callback: Callable[[], None]) -> bool:
        """Have `callback` called on the call's thread when the call ends; False, and never
        called, if it has ended already."""
        with self._lock:
            if self.done.is_set():
                return False
            self._then = callback
            return True

    def result(self) -> Any:
        """What the call returned, or raise what it raised (once `done`)."""
        returned, value = self._outcome[0]
        if not returned:
            raise value
        return value


# what each method returns by the contract above, checked on every call by the deployer and
# by `shiphook check`: what does not fit is a bug in the plugin, which fails that deployment
RETURNS: dict[str, tuple[type, str]] = {
    "check": (str, "a line of text"),
    "describe": (TargetState, "a TargetState, its image one line of printable text"),
    "progress": (Progress, "a Progress in one of the states " + ", ".join(get_args(State))),
    "deploy": (dict, "a JSON object (a Ref) naming the image, one printable line, as image"),
    "run_job": (dict, "a JSON object (a Ref) naming the image, one printable line, as image"),
    "rollback": (dict, "a JSON object (a Ref)"),
}
T = TypeVar("T")


def checked_return(backend: Backend, method: str, value: T) -> T:
    """`value`, which `backend.<method>` returned, if the contract allows it; else a permanent
    BackendError that says it is a bug in the plugin."""
    if method not in RETURNS:
        return value
    expected, what = RETURNS[method]
    if isinstance(value, expected) and _fits(method, value):
        return value
    raise PluginBug(
        f"the {backend.name} backend's {method} returned {value!r:.100}, not {what}: "
        "a bug in the plugin"
    )


def _fits(method: str, value: Any) -> bool:
    """Whether a value of the right type holds what the contract asks of it: an image, where
    one is named, is one line of printable text (it is stored, logged and shown)."""
    if isinstance(value, Progress):
        return value.state in get_args(State)
    if isinstance(value, TargetState):
        return value.image is None or value.image.isprintable()
    if isinstance(value, dict):
        image = value.get("image")
        if image is None and method == "rollback":
            return _is_json(value)
        return _is_json(value) and isinstance(image, str) and image.isprintable()
    return True


def _is_json(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True
