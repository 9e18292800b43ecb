"""What the HTTP API and the CLI do, with no knowledge of either: hooks, deployments, targets."""

from __future__ import annotations

import codecs
import hashlib
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Annotated, Any, TypeVar, get_args

import jiter
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
)
from pydantic.alias_generators import to_camel
from uuid_utils import uuid7

from shiphook import tokens
from shiphook.backends import ENV_NAME_PATTERN, Target
from shiphook.config import NAME_PATTERN, NAME_RULE
from shiphook.errors import (
    Conflict,
    InvalidRequest,
    NotFound,
    Unprocessable,
    describe_validation_error,
    quoted,
    shown_key,
)
from shiphook.fastpath import Accepted, GroupCommit, HookGone, KeyTaken
from shiphook.images import normalised, repository_of, tag_of
from shiphook.models import (
    Deployment,
    DeploymentBase,
    DeploymentCreate,
    DeploymentPublic,
    EventPublic,
    HookCreated,
    HookIdentity,
    HookPublic,
    Status,
    utcnow,
)
from shiphook.storage import Storage

M = TypeVar("M", bound=BaseModel)
STAMP_RESOLUTION = timedelta(seconds=1)
NO_SUCH_HOOK = "no deploy hook matches this token"
IDEMPOTENCY_WINDOW = timedelta(hours=24)
OCI_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
DEPLOYMENT_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
HOOK_IDS = range(1, 2**31)  # the id column is a 32-bit SQL INTEGER on PostgreSQL
LIST_LIMITS = range(1, 1001)  # how many deployments one listing may ask for
# an id or a count as sent: ASCII digits (`int()` reads other scripts' too), few enough to quote
WHOLE_NUMBER = re.compile(r"-?[0-9]{1,60}", re.ASCII)


def _oci_tag(value: str) -> str:
    if not OCI_TAG.fullmatch(value):
        raise ValueError(
            "not a valid image tag (1 to 128 of A-Z a-z 0-9 _ . -, not starting with . or -)"
        )
    if value.startswith(tokens.PREFIX) and tokens.is_well_formed(value):
        # stored, logged and sent to the orchestrator as a tag is, a token would leak there
        raise ValueError(f"a hook token, not an image tag: send it in {tokens.TOKEN_HEADER} only")
    return value


ImageTag = Annotated[str, AfterValidator(_oci_tag)]


def _no_nul(value: str) -> str:
    if "\0" in value:
        raise ValueError("a NUL character cannot be passed in a process environment")
    return value


class AppHookBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    imageTag: ImageTag


class EnvironmentVariable(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    name: Annotated[str, StringConstraints(pattern=ENV_NAME_PATTERN, max_length=256)]
    value: Annotated[str, StringConstraints(max_length=32768), AfterValidator(_no_nul)]


class JobHookBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    instanceEnvironmentVariables: Annotated[list[EnvironmentVariable], Field(max_length=256)] = []
    imageTag: ImageTag | None = None


EXPECTED = {
    "app": 'expected a JSON object like {"imageTag": "1.2.0"}',
    "job": 'expected a JSON object like {"instanceEnvironmentVariables": '
    '[{"name": "X", "value": "y"}], "imageTag": "1.2.0"} (all keys optional)',
}


class NewHookBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    name: str


def parse_json_body(model: type[M], body: bytes, expected: str) -> M:
    """Parse a JSON body whatever its Content-Type (curl --data sends a form type); an empty
    body is `{}`. Raise `InvalidRequest` naming each wrong field and showing what is expected,
    or the key an object repeats."""
    # a UTF-8 byte order mark is skipped: files saved by some Windows editors begin with one
    body = body.removeprefix(codecs.BOM_UTF8) or b"{}"
    try:
        parsed = model.model_validate_json(body)
    except ValidationError as exc:
        lines = describe_validation_error(exc, model=model)
        raise InvalidRequest(f"{'; '.join(lines)}: {expected}") from None
    try:  # pydantic keeps a repeated key's last value; a proxy or a reviewer may read the first
        jiter.from_json(body, catch_duplicate_keys=True)
    except ValueError as exc:  # 'Detected duplicate key "<key as sent>" at line 1 column 30'
        quoted, _, where = str(exc).removeprefix("Detected duplicate key ").rpartition(" at ")
        key = shown_key(quoted.strip('"'))
        raise InvalidRequest(f"key {key} given twice (at {where}): give each key once") from None
    return parsed


def parse_hook_body(target: Target, body: bytes) -> AppHookBody | JobHookBody:
    """Validate a hook request body for its target; raise `InvalidRequest` naming the field."""
    model = AppHookBody if target.kind == "app" else JobHookBody
    parsed = parse_json_body(model, body, EXPECTED[target.kind])
    tag = parsed.imageTag
    if tag is not None and not target.allows(tag):
        raise InvalidRequest(
            f"imageTag: {quoted(parsed.imageTag)} is not allowed for target {target.name!r} "
            f"(it must fully match the pattern {target.allowed_tags})"
        )
    if isinstance(parsed, JobHookBody):
        seen: set[str] = set()
        for i, variable in enumerate(parsed.instanceEnvironmentVariables):
            where = f"instanceEnvironmentVariables[{i}].name"
            if variable.name in seen:
                raise InvalidRequest(f"{where}: {quoted(variable.name)} is given twice")
            seen.add(variable.name)
            if target.parameters is not None and variable.name not in target.parameters:
                allowed = ", ".join(target.parameters) or "none"
                raise InvalidRequest(
                    f"{where}: {quoted(variable.name)} is not a parameter of target "
                    f"{target.name!r} (allowed: {allowed})"
                )
    return parsed


def public_deployment(
    deployment: Deployment | DeploymentCreate,
    history: Iterable[EventPublic] | None = None,
) -> DeploymentPublic:
    """The API's view of a deployment; with `history`, every transition from queued on."""
    public = DeploymentPublic.model_validate(deployment)
    if history is not None:
        public.history = [
            EventPublic(at=public.created_at, status=Status.queued, message=""),
            *history,
        ]
        if public.status == Status.superseded:  # recorded on the row, in bulk
            public.history.append(
                EventPublic(at=public.finished_at, status=public.status, message=public.message)
            )
    return public


def _holds_times(annotation: Any) -> bool:
    return annotation is datetime or datetime in get_args(annotation)


# each field the API shows with its JSON key, once at import; and the keys of those that hold times
_JSON_KEYS = tuple(
    (name, DeploymentPublic.model_fields[name].alias) for name in DeploymentBase.model_fields
)
_JSON_TIMES = tuple(
    DeploymentPublic.model_fields[name].alias
    for name, field in DeploymentBase.model_fields.items()
    if _holds_times(field.annotation)
)


def new_deployment_json(new: DeploymentCreate) -> dict[str, Any]:
    """`public_deployment(new).to_json()` without building the model, for the accept path's
    answer to every request (a test holds the two equal)."""
    values = vars(new)
    answer = {key: values[name] for name, key in _JSON_KEYS}
    for key in _JSON_TIMES:
        if answer[key] is not None:
            answer[key] = answer[key].isoformat().replace("+00:00", "Z")
    return answer


def public_target(target: Target) -> dict[str, Any]:
    """The API's and the CLI's view of a configured target: its keys, camelCase, and the
    backend's `options`."""
    shown = target.model_dump(mode="json", serialize_as_any=True)
    return {to_camel(key): value for key, value in shown.items()}


# -- arguments checked without the database (the CLI opens it only once they are valid) ------


def configured_target(targets: dict[str, Target], name: str) -> Target:
    """The target of this name; `NotFound` naming the configured ones."""
    target = targets.get(name)
    if target is None:
        configured = ", ".join(sorted(targets)) or "none"
        raise NotFound(f"no target named {quoted(name)} (configured: {configured})")
    return target


def hook_name(name: str) -> str:
    """A new hook's name, stripped; `InvalidRequest` unless 1 to 100 printable characters, and
    nothing that logs and answers would mask as a token (a token pasted in the wrong field
    would be stored and shown in clear)."""
    name = name.strip()
    if not name or len(name) > 100 or not name.isprintable():
        raise InvalidRequest("name: expected 1 to 100 printable characters naming the hook's user")
    if tokens.looks_like_token(name):
        raise InvalidRequest(
            "name: holds what looks like a token (shk_..., or a run of 32 or more letters and "
            "digits): name the hook's user instead"
        )
    return name


def check_hook_id(hook_id: int) -> None:
    """`NotFound` for what no hook's id can be."""
    if hook_id not in HOOK_IDS:
        raise NotFound(f"no hook with id {hook_id}")


def check_deployment_id(deployment_id: str) -> None:
    """`NotFound` for what no deployment's id can be."""
    if not DEPLOYMENT_ID.fullmatch(deployment_id):
        raise NotFound(f"no deployment with id {quoted(deployment_id)}")


def check_deployment_filters(*, target: str | None, status: str | None, limit: int) -> None:
    """`InvalidRequest` naming a filter of the deployments list that cannot match."""
    if target is not None and not re.fullmatch(NAME_PATTERN, target):
        raise InvalidRequest(
            f"target: expected a target's name ({NAME_RULE}), got {quoted(target)}"
        )
    if status is not None and status not in Status.__members__:
        raise InvalidRequest(
            f"status: {quoted(status)} is not a deployment status "
            f"(expected one of {', '.join(Status.__members__)})"
        )
    if limit not in LIST_LIMITS:
        raise InvalidRequest(
            f"limit: expected a number from {LIST_LIMITS.start} to {LIST_LIMITS[-1]}"
        )


class Hooks:
    """Creating, listing, deleting and authenticating deploy hooks."""

    def __init__(
        self,
        storage: Storage,
        targets: dict[str, Target],
        *,
        clock: Callable[[], datetime] = utcnow,
        new_token: Callable[[], str] = tokens.new_token,
    ) -> None:
        self.storage = storage
        self.targets = targets
        self.clock = clock
        self.new_token = new_token

    def create(self, *, target: str, name: str) -> HookCreated:
        configured_target(self.targets, target)
        name = hook_name(name)
        token = self.new_token()
        hook = self.storage.create_hook(
            name=name, target=target, token_digest=tokens.digest(token), now=self.clock()
        )
        return HookCreated(**hook.model_dump(), token=token)

    def list(self, *, target: str | None = None) -> list[HookPublic]:
        found = self.storage.list_hooks(target=target)
        # a target no longer configured lists its hooks (to delete them); a name never seen is
        # a typo
        if not found and target is not None:
            configured_target(self.targets, target)
        return found

    def get(self, hook_id: int) -> HookPublic:
        check_hook_id(hook_id)
        for hook in self.storage.list_hooks(hook_id=hook_id):
            return hook
        raise NotFound(f"no hook with id {hook_id}")

    def delete(self, hook_id: int) -> HookPublic:
        check_hook_id(hook_id)
        hook = self.storage.delete_hook(hook_id=hook_id)
        if hook is None:
            raise NotFound(f"no hook with id {hook_id}")
        return hook

    def authenticate(self, token: str) -> HookIdentity:
        """The hook this token opens; `NotFound` for a malformed, unknown or deleted token."""
        digest = _token_digest(token)
        hook = (
            self.storage.accept_path.hook_by_digest(token_digest=digest)
            if tokens.is_well_formed(token)
            else None
        )
        if hook is None:
            raise NotFound(NO_SUCH_HOOK)
        return hook

    async def authenticate_deploy(self, token: str) -> HookIdentity:
        """`authenticate` for the accept path, on the event loop: a known token is answered from
        a cache (the deployment's insert checks the hook again, in its own transaction, so a
        deleted hook still records nothing), others are looked up through `Storage.call`."""
        digest = _token_digest(token)
        hook = self.storage.accept_path.known_hook(token_digest=digest)
        if hook is None and tokens.is_well_formed(token):
            hook = await self.storage.call(
                self.storage.accept_path.hook_by_digest, token_digest=digest, remember=True
            )
        if hook is None:
            raise NotFound(NO_SUCH_HOOK)
        return hook


def _token_digest(token: str) -> str:
    if not token.isascii():  # no token is; the digest is of its ASCII bytes
        raise NotFound(NO_SUCH_HOOK)
    return tokens.digest(token)


class Deployments:
    """Accepting hook requests as deployments, and reading them back."""

    def __init__(
        self,
        storage: Storage,
        targets: dict[str, Target],
        *,
        clock: Callable[[], datetime] = utcnow,
        new_id: Callable[[], str] = lambda: str(uuid7()),
    ) -> None:
        self.storage = storage
        self.targets = targets
        self.clock = clock
        self.new_id = new_id
        self._stamped: dict[int, datetime] = {}
        self.commits = GroupCommit(storage)

    async def accept(
        self, hook: HookIdentity, body: bytes, *, idempotency_key: str | None = None
    ) -> tuple[dict[str, Any], bool]:
        """Validate the body for the hook's target and record a queued deployment; return its
        JSON. With an idempotency key already used by this hook within 24 hours for the same
        request, returns that deployment instead; the second value says whether a new one was
        created.
        """
        target = self.targets.get(hook.target)
        if target is None:
            raise NotFound(f"this hook's target {hook.target!r} is no longer configured")
        request = parse_hook_body(target, body)
        digest = None
        if idempotency_key is not None:
            _check_idempotency_key(idempotency_key)
            digest = hashlib.sha256(request.model_dump_json().encode()).hexdigest()
            replayed = await self.storage.call(self._replay, hook, idempotency_key, digest)
            if replayed is not None:
                return public_deployment(replayed).to_json(), False
        now = self.clock()
        new = DeploymentCreate(
            id=self.new_id(),
            target=target.name,
            kind=target.kind,
            created_at=now,
            hook_id=hook.id,
            hook_name=hook.name,
            image_tag=request.imageTag,
            env=[v.model_dump() for v in request.instanceEnvironmentVariables]
            if isinstance(request, JobHookBody)
            else None,
            idempotency_key=idempotency_key,
            request_digest=digest,
        )
        accepted = Accepted(new, self._due_for_stamp(hook.id, now), hook.token_digest)
        try:
            await self.commits.add(accepted)
        except HookGone:
            raise NotFound(NO_SUCH_HOOK) from None
        except KeyTaken:  # the same key raced us; answer with the winner
            replayed = await self.storage.call(self._replay, hook, idempotency_key, digest)
            if replayed is None:
                raise
            return public_deployment(replayed).to_json(), False
        return new_deployment_json(new), True

    def _due_for_stamp(self, hook_id: int, now: datetime) -> bool:
        """`last_used_at` is kept to the second: a burst of requests stamps it once."""
        last = self._stamped.get(hook_id)
        if last is not None and now - last < STAMP_RESOLUTION:
            return False
        self._stamped[hook_id] = now
        return True

    def _replay(self, hook: HookIdentity, key: str, digest: str | None) -> Deployment | None:
        earlier = self.storage.deployment_by_key(hook_id=hook.id, idempotency_key=key)
        if earlier is None:
            return None
        if earlier.created_at < self.clock() - IDEMPOTENCY_WINDOW:
            self.storage.release_key(deployment_id=earlier.id)
            return None
        if earlier.request_digest != digest:
            raise Unprocessable(
                f"Idempotency-Key {quoted(key)} was used for a different request "
                f"(deployment {earlier.id}); send the same body to retry it, or a new key"
            )
        return earlier

    def rollback(self, deployment_id: str) -> DeploymentPublic:
        """Queue a new deployment of the image the target ran successfully before this one."""
        source = self._stored(deployment_id)
        if source.kind != "app":
            raise InvalidRequest(f"deployment {deployment_id} is a job run; only apps roll back")
        if source.status == Status.superseded:
            raise Conflict(
                f"deployment {deployment_id} was superseded: it never ran, so there is nothing "
                f"to roll back; roll back the one that ran instead ({source.superseded_by} or "
                "its successor)"
            )
        target = self.targets.get(source.target)
        if target is None:
            raise NotFound(f"target {source.target!r} is no longer configured")
        # a success of the same tag (the tag deployed again) is no way back
        earlier = self.storage.last_success(
            target=source.target, before=source.id, other_than=source.image_tag
        )
        tag = earlier.image_tag if earlier is not None else self._replaced_tag(source)
        if tag is None or tag == source.image_tag:
            raise Conflict(
                f"nothing to roll back to: no deployment of {source.target} with another tag "
                f"than {source.image_tag} succeeded before {deployment_id}, and the image it "
                "replaced is unknown or of that tag"
            )
        if not target.allows(tag):
            raise Conflict(
                f"the tag to roll back to, {tag!r}, is not allowed for target {target.name!r} "
                f"(allowed_tags {target.allowed_tags}): deploy an allowed tag instead"
            )
        new = DeploymentCreate(
            id=self.new_id(),
            target=source.target,
            kind=source.kind,
            created_at=self.clock(),
            image_tag=tag,
            rollback_of=source.id,
        )
        self.storage.add_deployment(new=new)
        return public_deployment(new)

    @staticmethod
    def _replaced_tag(source: Deployment) -> str | None:
        """The tag of the image `source` replaced, if that came from the repository `source`
        deployed from: a rollback deploys a tag, from the target's repository."""
        deployed = (source.backend_ref or {}).get("image")
        replaced = source.previous_image
        if (
            deployed is not None
            and replaced is not None
            and normalised(repository_of(replaced)) != normalised(repository_of(deployed))
        ):
            raise Conflict(
                f"deployment {source.id} replaced {replaced}, from another "
                f"repository than it deployed ({repository_of(deployed)}), and a rollback "
                "deploys a tag from the target's repository: roll back by hand"
            )
        return tag_of(replaced)

    def get(self, deployment_id: str, *, hook: HookIdentity | None = None) -> DeploymentPublic:
        """The deployment with its history; with `hook`, only if that hook created it."""
        deployment = self._stored(deployment_id)
        if hook is not None and deployment.hook_id != hook.id:
            raise NotFound(f"no deployment with id {deployment_id!r}")
        history = self.storage.histories(deployment_ids=[deployment_id])[deployment_id]
        return public_deployment(deployment, history)

    def _stored(self, deployment_id: str) -> Deployment:
        """The deployment with this id; `NotFound` without a query for what is no id."""
        check_deployment_id(deployment_id)
        deployment = self.storage.get_deployment(deployment_id=deployment_id)
        if deployment is None:
            raise NotFound(f"no deployment with id {deployment_id!r}")
        return deployment

    def list(
        self, *, target: str | None = None, status: str | None = None, limit: int = 50
    ) -> list[DeploymentPublic]:
        """Recent deployments, newest first, each with its history."""
        check_deployment_filters(target=target, status=status, limit=limit)
        found = self.storage.list_deployments(target=target, status=status, limit=limit)
        # a target no longer configured lists its deployments; a name never seen is a typo
        unknown = not found and target is not None and target not in self.targets
        if unknown and not self.storage.list_deployments(target=target, status=None, limit=1):
            configured_target(self.targets, target)
        histories = self.storage.histories(deployment_ids=[d.id for d in found])
        return [public_deployment(d, histories[d.id]) for d in found]


class WaitOutcome(StrEnum):
    """What a deployment's state means to a caller who waited for its end (`?wait`)."""

    succeeded = "succeeded"  # rolled out, or the job run completed
    failed = "failed"  # failed, or failed and was rolled back
    superseded = "superseded"  # a newer deployment of its target replaced it before it started
    unfinished = "unfinished"  # still queued or in progress: the wait ended first


WAIT_OUTCOMES = {
    Status.succeeded: WaitOutcome.succeeded,
    Status.failed: WaitOutcome.failed,
    Status.rolled_back: WaitOutcome.failed,
    Status.superseded: WaitOutcome.superseded,
    Status.queued: WaitOutcome.unfinished,
    Status.in_progress: WaitOutcome.unfinished,
}


@dataclass(frozen=True)
class Waited:
    """The answer to a caller who waited: the outcome, what they read when it is not a success
    (`None` when it is), and the deployment as it is now."""

    outcome: WaitOutcome
    description: str | None
    deployment: DeploymentPublic


def wait_outcome(
    deployment: DeploymentPublic, *, waited: float, shutting_down: bool = False
) -> Waited:
    """What a wait of `waited` seconds for `deployment` (read once the wait ended: at the
    deployment's end, at the deadline, or when the server began to shut down) comes to."""
    outcome = WAIT_OUTCOMES[Status(deployment.status)]
    status, message, ident = deployment.status, deployment.message, deployment.id
    if outcome is WaitOutcome.succeeded:
        description = None
    elif outcome is WaitOutcome.superseded:  # the message names the newer deployment and its tag
        description = f"deployment {ident} was {message}"
    elif outcome is WaitOutcome.unfinished:
        when = ", and the server is shutting down" if shutting_down else f" after {waited:g}s"
        description = (
            f"deployment {ident} is still {status}{when}; it goes on: "
            f"GET /api/v1/deployments/{ident}"
        )
    else:
        description = f"deployment {ident} {status.replace('_', ' ')}: {message}"
    return Waited(outcome, description, deployment)


def _check_idempotency_key(key: str) -> None:
    if not 1 <= len(key) <= 255 or not key.isprintable() or not key.isascii():
        raise InvalidRequest("Idempotency-Key: expected 1 to 255 printable ASCII characters")
    if tokens.holds_token(key):  # it is stored as it is
        raise InvalidRequest(
            "Idempotency-Key: holds what looks like a hook token: send it in "
            f"{tokens.TOKEN_HEADER} only"
        )
