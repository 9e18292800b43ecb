"""Database tables and the public shapes of what they hold.

A family per entity: the table (SQLModel), the create model (what a new row is made of), and the
public model the API and CLI show (never a table object). A deployment's fields are each declared
once, in a chain of models the table and the public model extend: adding a column is adding it
to the model it belongs to, and a migration. The create and public models are plain pydantic:
the accept path builds one per request, and a SQLModel table object costs some fifty
microseconds to construct. Times are timezone-aware UTC, ISO 8601 with `Z` outside.
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

import sqlalchemy as sa
from pydantic import BaseModel, ConfigDict
from pydantic.alias_generators import to_camel
from sqlalchemy import JSON, Index, text
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


def status_column() -> sa.Enum:
    """A `Status` column: its value as text in a VARCHAR(16), no database enum type nor CHECK
    constraint, so that SQLite and PostgreSQL keep the rows and schema they had as plain text."""
    return sa.Enum(
        Status,
        native_enum=False,
        create_constraint=False,
        length=16,
        values_callable=lambda statuses: [s.value for s in statuses],
    )


class PublicModel(BaseModel):
    """camelCase JSON, like the hook contract's own `imageTag`."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, from_attributes=True)

    def to_json(self) -> dict[str, Any]:
        """The JSON object the API and `--json` print."""
        return self.model_dump(mode="json", by_alias=True)


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
# Each field once: DeploymentBase (what the API shows) <- DeploymentCreate (+ what the accept path
# keeps to itself) <- Deployment, the table (+ what the deployer keeps to itself); and
# DeploymentBase <- DeploymentPublic. The bases are plain pydantic models whose fields carry
# SQLModel's column arguments, which the table reads.


class DeploymentBase(BaseModel):
    """A deployment as the API shows it: what was asked for, and what became of it."""

    id: str = Field(primary_key=True, max_length=36)
    target: str = Field(max_length=63)
    kind: str = Field(max_length=8)
    status: Status = Field(default=Status.queued, sa_type=status_column())
    message: str = ""
    hook_id: int | None = None
    hook_name: str | None = None
    image_tag: str | None = Field(default=None, max_length=128)
    env: list[dict[str, str]] | None = Field(default=None, sa_type=JSON)
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    previous_image: str | None = None
    backend_ref: dict[str, Any] | None = Field(default=None, sa_type=JSON)
    superseded_by: str | None = None
    rollback_of: str | None = None


class DeploymentCreate(DeploymentBase):
    """A new deployment as the accept path records it: queued, nothing started (the defaults).
    Its values come from validated input and the clock."""

    idempotency_key: str | None = Field(default=None, max_length=255)
    request_digest: str | None = Field(default=None, max_length=64)


class Deployment(SQLModel, DeploymentCreate, table=True):
    __table_args__ = (
        # status first: the deployer looks for queued and in-progress work across all targets,
        # and takes a target's queue in id order
        Index("ix_deployment_status_target_id", "status", "target", "id"),
        Index(
            "ix_deployment_idempotency",
            "hook_id",
            "idempotency_key",
            unique=True,
            sqlite_where=text("idempotency_key IS NOT NULL"),
            postgresql_where=text("idempotency_key IS NOT NULL"),
        ),
    )

    rollback_ref: dict[str, Any] | None = Field(default=None, sa_type=JSON)
    slot: int | None = None


class DeploymentEvent(SQLModel, table=True):
    __tablename__ = "deployment_event"

    id: int | None = Field(default=None, primary_key=True)
    deployment_id: str = Field(index=True, max_length=36)
    at: datetime
    status: Status = Field(sa_type=status_column())
    message: str = ""


class EventPublic(PublicModel):
    at: datetime
    status: Status
    message: str


def _deployment_json_name(field: str) -> str:
    """camelCase, but `env` keeps the name the hook contract gives it."""
    return "instanceEnvironmentVariables" if field == "env" else to_camel(field)


class DeploymentPublic(DeploymentBase, PublicModel):
    model_config = ConfigDict(alias_generator=_deployment_json_name)

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
