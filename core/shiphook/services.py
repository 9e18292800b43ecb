"""What the HTTP API and the CLI do, with no knowledge of either: hooks, deployments, targets."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
)
from uuid6 import uuid7

from shiphook import tokens
from shiphook.backends import Target
from shiphook.config import ENV_NAME_PATTERN
from shiphook.errors import InvalidRequest, NotFound, describe_validation_error
from shiphook.models import (
    Deployment,
    DeploymentEvent,
    DeploymentPublic,
    EventPublic,
    Hook,
    HookCreated,
    HookPublic,
    Status,
    utcnow,
)
from shiphook.storage import Storage

OCI_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")


def _oci_tag(value: str) -> str:
    if not OCI_TAG.fullmatch(value):
        raise ValueError(
            "not a valid image tag (1 to 128 of A-Z a-z 0-9 _ . -, not starting with . or -)"
        )
    return value


ImageTag = Annotated[str, AfterValidator(_oci_tag)]


class AppHookBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    imageTag: ImageTag


class EnvironmentVariable(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    name: Annotated[str, StringConstraints(pattern=ENV_NAME_PATTERN, max_length=256)]
    value: Annotated[str, StringConstraints(max_length=32768)]


class JobHookBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    instanceEnvironmentVariables: Annotated[list[EnvironmentVariable], Field(max_length=256)] = []
    imageTag: ImageTag | None = None


EXPECTED = {
    "app": 'expected a JSON object like {"imageTag": "1.2.0"}',
    "job": 'expected a JSON object like {"instanceEnvironmentVariables": '
    '[{"name": "X", "value": "y"}]} (all keys optional)',
}


def parse_hook_body(target: Target, body: bytes) -> AppHookBody | JobHookBody:
    """Validate a hook request body for its target; raise `InvalidRequest` naming the field."""
    model = AppHookBody if target.kind == "app" else JobHookBody
    try:
        parsed = model.model_validate_json(body or b"{}")
    except ValidationError as exc:
        raise InvalidRequest(
            f"{'; '.join(describe_validation_error(exc))}: {EXPECTED[target.kind]}"
        ) from None
    tag = parsed.imageTag
    if tag is not None and target.allowed_tags and not re.fullmatch(target.allowed_tags, tag):
        raise InvalidRequest(
            f"imageTag: {parsed.imageTag!r} is not allowed for target {target.name!r} "
            f"(it must fully match the pattern {target.allowed_tags})"
        )
    if isinstance(parsed, JobHookBody):
        seen: set[str] = set()
        for i, variable in enumerate(parsed.instanceEnvironmentVariables):
            where = f"instanceEnvironmentVariables[{i}].name"
            if variable.name in seen:
                raise InvalidRequest(f"{where}: {variable.name!r} is given twice")
            seen.add(variable.name)
            if target.parameters is not None and variable.name not in target.parameters:
                allowed = ", ".join(target.parameters) or "none"
                raise InvalidRequest(
                    f"{where}: {variable.name!r} is not a parameter of target {target.name!r} "
                    f"(allowed: {allowed})"
                )
    return parsed


def public_deployment(
    deployment: Deployment, history: Iterable[DeploymentEvent] | None = None
) -> dict[str, Any]:
    """The API's view of a deployment; with `history`, its transitions, starting at queued."""
    public = DeploymentPublic.model_validate(deployment, from_attributes=True)
    if history is not None:
        public.history = [
            EventPublic(at=deployment.created_at, status=Status.queued, message=""),
            *(EventPublic.model_validate(e, from_attributes=True) for e in history),
        ]
    data = public.model_dump(
        mode="json", by_alias=True, exclude={"history"} if history is None else None
    )
    return {"id": data.pop("id"), **data}


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
        if target not in self.targets:
            raise NotFound(f"no target named {target!r} (configured: {self._target_names()})")
        name = name.strip()
        if not name or len(name) > 100:
            raise InvalidRequest("name: expected 1 to 100 characters naming the hook's user")
        token = self.new_token()
        hook = self.storage.create_hook(
            name=name, target=target, token_digest=tokens.digest(token), now=self.clock()
        )
        return HookCreated.model_validate({**hook.model_dump(), "token": token})

    def list(self, *, target: str | None = None) -> list[HookPublic]:
        if target is not None and target not in self.targets:
            raise NotFound(f"no target named {target!r} (configured: {self._target_names()})")
        return [
            HookPublic.model_validate(h.model_dump())
            for h in self.storage.list_hooks(target=target)
        ]

    def delete(self, hook_id: int) -> HookPublic:
        hook = self.storage.delete_hook(hook_id)
        if hook is None:
            raise NotFound(f"no hook with id {hook_id}")
        return HookPublic.model_validate(hook.model_dump())

    def authenticate(self, token: str) -> Hook:
        """The hook this token opens; `NotFound` for a malformed, unknown or deleted token."""
        hook = (
            self.storage.hook_by_digest(tokens.digest(token))
            if tokens.is_well_formed(token)
            else None
        )
        if hook is None:
            raise NotFound("no deploy hook matches this token")
        return hook

    def _target_names(self) -> str:
        return ", ".join(sorted(self.targets)) or "none"


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

    def accept(self, hook: Hook, body: bytes) -> Deployment:
        """Validate the body for the hook's target and record a queued deployment."""
        target = self.targets.get(hook.target)
        if target is None:
            raise NotFound(f"this hook's target {hook.target!r} is no longer configured")
        request = parse_hook_body(target, body)
        env = (
            [v.model_dump() for v in request.instanceEnvironmentVariables]
            if isinstance(request, JobHookBody)
            else None
        )
        now = self.clock()
        deployment = Deployment(
            id=self.new_id(),
            target=target.name,
            kind=target.kind,
            hook_id=hook.id,
            hook_name=hook.name,
            image_tag=request.imageTag,
            env=env,
            status=Status.queued,
            created_at=now,
            updated_at=now,
        )
        return self.storage.add_deployment(deployment, touch_hook=hook.id)

    def get(self, deployment_id: str, *, hook: Hook | None = None) -> dict[str, Any]:
        """The deployment with its history; with `hook`, only if that hook created it."""
        deployment = self.storage.get_deployment(deployment_id)
        if deployment is None or (hook is not None and deployment.hook_id != hook.id):
            raise NotFound(f"no deployment with id {deployment_id!r}")
        return public_deployment(deployment, self.storage.history(deployment_id))

    def list(
        self, *, target: str | None = None, status: str | None = None, limit: int = 50
    ) -> list[dict[str, Any]]:
        if status is not None and status not in Status.__members__:
            raise InvalidRequest(
                f"status: {status!r} is not a deployment status "
                f"(expected one of {', '.join(Status.__members__)})"
            )
        if not 1 <= limit <= 1000:
            raise InvalidRequest("limit: expected a number from 1 to 1000")
        return [
            public_deployment(d)
            for d in self.storage.list_deployments(target=target, status=status, limit=limit)
        ]
