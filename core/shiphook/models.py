"""Database tables and the public shapes of what they hold.

A family per entity: the table (SQLModel), the create model (what a new row is made of), and the
public model the API and CLI show (never a table object). Create and public models are
dataclasses or plain pydantic: the accept path builds one of each per request, and a SQLModel
table object costs some fifty microseconds to construct. Times are timezone-aware UTC, ISO 8601
with `Z` outside.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict
from pydantic import Field as PydanticField
from pydantic.alias_generators import to_camel
from sqlalchemy import JSON, Column, Index, text
from sqlmodel import Field, SQLModel


def utcnow() -> datetime:
    return datetime.now(UTC)


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


class PublicModel(BaseModel):
    """camelCase JSON, like the hook contract's own `imageTag`."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, from_attributes=True)


# -- hooks ------------------------------------------------------------------


class Hook(SQLModel, table=True):
    __table_args__ = {"sqlite_autoincrement": True}  # an id, like a token, is never reused

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(max_length=100)
    target: str = Field(index=True, max_length=63)
    token_digest: str = Field(unique=True, max_length=64)
    created_at: datetime
    last_used_at: datetime | None = None


class HookIdentity(BaseModel):
    """What the accept path needs of the hook a token opened."""

    id: int
    name: str
    target: str
    token_digest: str


class HookPublic(PublicModel):
    id: int
    name: str
    target: str
    created_at: datetime
    last_used_at: datetime | None


class HookCreated(HookPublic):
    """The only shape that ever carries the token: the answer to creating the hook."""

    token: str


# -- deployments --------------------------------------------------------------


class Deployment(SQLModel, table=True):
    __table_args__ = (
        # status first: the deployer looks for queued and in-progress work across all targets
        Index("ix_deployment_status_target", "status", "target"),
        Index(
            "ix_deployment_idempotency",
            "hook_id",
            "idempotency_key",
            unique=True,
            sqlite_where=text("idempotency_key IS NOT NULL"),
            postgresql_where=text("idempotency_key IS NOT NULL"),
        ),
    )

    id: str = Field(primary_key=True, max_length=36)
    target: str = Field(max_length=63)
    kind: str = Field(max_length=8)
    hook_id: int | None = None
    hook_name: str | None = None
    image_tag: str | None = Field(default=None, max_length=128)
    env: list[dict[str, str]] | None = Field(default=None, sa_column=Column(JSON))
    status: str = Field(default=Status.queued, max_length=16)
    message: str = ""
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    previous_image: str | None = None
    backend_ref: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))
    rollback_ref: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))
    superseded_by: str | None = None
    rollback_of: str | None = None
    slot: int | None = None
    idempotency_key: str | None = Field(default=None, max_length=255)
    request_digest: str | None = Field(default=None, max_length=64)


@dataclass(frozen=True)
class DeploymentCreate:
    """A new deployment as the accept path records it: queued, nothing started. A dataclass,
    not a model: its values come from validated input and the clock, and it costs a tenth."""

    id: str
    target: str
    kind: str
    created_at: datetime
    hook_id: int | None = None
    hook_name: str | None = None
    image_tag: str | None = None
    env: list[dict[str, str]] | None = None
    rollback_of: str | None = None
    idempotency_key: str | None = None
    request_digest: str | None = None


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


class DeploymentPublic(PublicModel):
    id: str
    target: str
    kind: str
    status: str = Status.queued
    message: str = ""
    hook_id: int | None = None
    hook_name: str | None = None
    image_tag: str | None = None
    env: list[dict[str, str]] | None = PydanticField(
        default=None, alias="instanceEnvironmentVariables"
    )
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    previous_image: str | None = None
    backend_ref: dict[str, Any] | None = None
    superseded_by: str | None = None
    rollback_of: str | None = None
    history: list[EventPublic] | None = None

    def to_json(self) -> dict[str, Any]:
        """The JSON object the API and `--json` print; `history` only where it was read."""
        return self.model_dump(
            mode="json", by_alias=True, exclude={"history"} if self.history is None else None
        )


class Lease(SQLModel, table=True):
    """Who works on a target's slot: one slot per app target, `max_concurrent_runs` per job."""

    target: str = Field(primary_key=True, max_length=63)
    slot: int = Field(primary_key=True)
    owner: str = Field(max_length=64)
    expires_at: datetime
