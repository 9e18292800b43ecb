"""The schema migrations, on SQLite and PostgreSQL: they build the schema the models describe, and
every row written before a migration reads back the same after it."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from conftest import plugin_env, run_cli, scripted_config
from shiphook.db import _alembic_config, create_db_engine, upgrade
from shiphook.fastpath import KeyTaken
from shiphook.models import Deployment, DeploymentCreate, Status
from shiphook.storage import Storage
from sqlmodel import SQLModel
from sqlmodel.sql.sqltypes import UTCDateTime

CREATED = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)


def migrate(engine: sa.Engine, action, revision: str) -> None:
    config = _alembic_config()
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        action(config, revision)


def test_the_migrations_build_the_schema_the_models_describe(database_url):
    engine = create_db_engine(database_url)
    upgrade(engine)
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        assert compare_metadata(context, SQLModel.metadata) == []


def test_dropping_updated_at_keeps_every_deployment_and_its_indexes(database_url):
    engine = create_db_engine(database_url)
    upgrade(engine, "0001")
    # the table as revision 0001 made it: today's columns and updated_at
    columns = [c._copy() for c in Deployment.__table__.c]
    table_0001 = sa.Table(
        "deployment", sa.MetaData(), *columns, sa.Column("updated_at", UTCDateTime())
    )
    finished = {
        "id": "0193a000-0000-7000-8000-000000000001",
        "target": "web",
        "kind": "app",
        "status": Status.rolled_back,
        "message": "rolled back",
        "hook_id": 1,
        "hook_name": "ci",
        "image_tag": "1.2",
        "env": None,
        "created_at": CREATED,
        "started_at": CREATED + timedelta(seconds=1),
        "finished_at": CREATED + timedelta(seconds=9),
        "previous_image": "registry.test/web:1.1",
        "backend_ref": {"image": "registry.test/web:1.2", "version": 7},
        "rollback_ref": {"version": 8},
        "superseded_by": None,
        "rollback_of": None,
        "slot": 0,
        "idempotency_key": "build-1",
        "request_digest": "d" * 64,
        "updated_at": CREATED + timedelta(seconds=9),
    }
    queued = {
        **{c.name: None for c in columns},
        "id": "0193a000-0000-7000-8000-000000000002",
        "target": "migrate",
        "kind": "job",
        "status": Status.queued,
        "message": "",
        "env": [{"name": "GREETING", "value": "hi"}],
        "created_at": CREATED,
        "updated_at": CREATED,
    }
    with engine.begin() as connection:
        connection.execute(sa.insert(table_0001), [finished, queued])

    upgrade(engine)

    assert "updated_at" not in {c["name"] for c in sa.inspect(engine).get_columns("deployment")}
    storage = Storage(engine)
    for row in (finished, queued):
        stored = storage.get_deployment(deployment_id=row["id"])
        assert stored.model_dump() == {k: v for k, v in row.items() if k != "updated_at"}
        assert type(stored.status) is Status
    assert [d.id for d in storage.list_deployments(status="queued")] == [queued["id"]]
    # the idempotency index is still unique per hook and key, and only where a key is given
    again = {"target": "web", "kind": "app", "created_at": CREATED, "hook_id": 1}
    storage.add_deployment(new=DeploymentCreate(id="0193a000-0000-7000-8000-000000000003", **again))
    storage.add_deployment(new=DeploymentCreate(id="0193a000-0000-7000-8000-000000000004", **again))
    with pytest.raises(KeyTaken):
        storage.add_deployment(
            new=DeploymentCreate(
                id="0193a000-0000-7000-8000-000000000005", idempotency_key="build-1", **again
            )
        )

    migrate(engine, command.downgrade, "0001")
    with engine.connect() as connection:
        restored = dict(
            connection.execute(sa.select(table_0001.c.id, table_0001.c.updated_at)).all()
        )
    assert restored[finished["id"]] == finished["finished_at"]
    assert restored[queued["id"]] == CREATED
    assert restored["0193a000-0000-7000-8000-000000000003"] == CREATED
    [updated_at] = [
        c for c in sa.inspect(engine).get_columns("deployment") if c["name"] == "updated_at"
    ]
    assert not updated_at["nullable"]


def run_on_a_newer_schema(database_url: str, tmp_path: Path, *command_line: str) -> Any:
    """The CLI on a database whose schema is 0099, which no shiphook here knows."""
    engine = create_db_engine(database_url)
    upgrade(engine)
    with engine.begin() as connection:
        connection.exec_driver_sql("UPDATE alembic_version SET version_num = '0099'")
    engine.dispose()
    env = plugin_env(SHIPHOOK_DATABASE_URL=database_url)
    return run_cli(*command_line, config=scripted_config(tmp_path), env=env, check=False)


@pytest.mark.parametrize("command_line", [["hooks", "list"], ["db", "upgrade"], ["serve"]])
def test_a_schema_a_newer_shiphook_wrote_is_one_line_and_exit_2(
    database_url, tmp_path, command_line
):
    """What a downgrade of shiphook meets."""
    result = run_on_a_newer_schema(database_url, tmp_path, *command_line)
    assert result.returncode == 2, result.stderr
    [line] = result.stderr.splitlines()
    assert line.startswith("shiphook: SHIPHOOK_DATABASE_URL: cannot use "), line
    assert line.endswith(
        ": its schema is unknown to this shiphook (Can't locate revision identified by '0099'): "
        "a newer version wrote it; run that version, or restore the database as it was before "
        "that version's upgrade"
    ), line


def test_check_says_a_schema_a_newer_shiphook_wrote_is_not_usable_and_exits_1(
    database_url, tmp_path
):
    """`serve` refuses such a database (above): `check` says so, rather than all is well."""
    result = run_on_a_newer_schema(database_url, tmp_path, "check")
    assert result.returncode == 1, result.stdout + result.stderr
    assert ": NOT USABLE: schema 0099, unknown to this shiphook (written by a newer version?)" in (
        result.stdout
    )
