"""Database tables and the public shapes of what they hold.

A family per entity: the base fields, the table, and the public model the API and CLI show
(never a table object). Times are timezone-aware UTC, and ISO 8601 with `Z` outside.
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from pydantic import ConfigDict, field_serializer
from pydantic.alias_generators import to_camel
from sqlalchemy import JSON, Column, Index
from sqlmodel import Field, SQLModel


def utcnow() -> datetime:
    return datetime.now(UTC)


def isoformat(moment: datetime | None) -> str | None:
    if moment is None:
        return None
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class Status(StrEnum):
    queued = "queued"
    in_progress = "in_progress"
    succeeded = "succeeded"
    failed = "failed"
    rolled_back = "rolled_back"
    superseded = "superseded"

    @property
    def terminal(self) -> bool:
        return self not in (Status.queued, Status.in_progress)


TERMINAL = tuple(s.value for s in Status if s.terminal)


class PublicModel(SQLModel):
    """camelCase JSON, like the hook contract's own `imageTag`."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True)

    @field_serializer("*", when_used="json")
    def _times(self, value: Any) -> Any:
        return isoformat(value) if isinstance(value, datetime) else value


# -- hooks ------------------------------------------------------------------


class HookBase(SQLModel):
    name: str = Field(max_length=100)
    target: str = Field(index=True, max_length=63)


class Hook(HookBase, table=True):
    id: int | None = Field(default=None, primary_key=True)
    token_digest: str = Field(unique=True, max_length=64)
    created_at: datetime
    last_used_at: datetime | None = None


class HookPublic(PublicModel, HookBase):
    id: int
    created_at: datetime
    last_used_at: datetime | None


class HookCreated(HookPublic):
    """The only shape that ever carries the token: the answer to creating the hook."""

    token: str


# -- deployments --------------------------------------------------------------


class DeploymentBase(SQLModel):
    target: str = Field(max_length=63)
    kind: str = Field(max_length=8)
    hook_id: int | None = Field(default=None, index=True)
    hook_name: str | None = None
    image_tag: str | None = Field(default=None, max_length=128)
    env: list[dict[str, str]] | None = Field(default=None, sa_column=Column(JSON))
    status: str = Field(default=Status.queued, max_length=16)
    message: str = ""
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    previous_image: str | None = None
    backend_ref: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))
    superseded_by: str | None = None
    rollback_of: str | None = None


class Deployment(DeploymentBase, table=True):
    __table_args__ = (
        Index("ix_deployment_target_status", "target", "status"),
        Index("ix_deployment_idempotency", "hook_id", "idempotency_key", unique=True),
    )

    id: str = Field(primary_key=True, max_length=36)
    rollback_ref: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))
    slot: int | None = None
    updated_at: datetime
    idempotency_key: str | None = Field(default=None, max_length=255)
    request_digest: str | None = Field(default=None, max_length=64)


class DeploymentEvent(SQLModel, table=True):
    __tablename__ = "deployment_event"

    id: int | None = Field(default=None, primary_key=True)
    deployment_id: str = Field(index=True, max_length=36)
    at: datetime
    status: str = Field(max_length=16)
    message: str = ""


class EventPublic(PublicModel):
    at: datetime
    status: str
    message: str


class DeploymentPublic(PublicModel, DeploymentBase):
    id: str
    env: list[dict[str, str]] | None = Field(default=None, alias="instanceEnvironmentVariables")
    history: list[EventPublic] = []


class Lease(SQLModel, table=True):
    """Who works on a target's slot: one slot per app target, `max_concurrent_runs` per job."""

    target: str = Field(primary_key=True, max_length=63)
    slot: int = Field(primary_key=True)
    owner: str = Field(max_length=64)
    expires_at: datetime
