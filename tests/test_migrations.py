"""Migrations: upgrade to head, down to base, up again on PostgreSQL; and the models
agree with what the migrations build (autogenerate finds nothing to add)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, inspect

from backend.models import Base
from tests.support.databases import alembic_config, drop_database, recreate_database, with_database


@pytest.fixture
def scratch_url(admin_database_url: str) -> Iterator[str]:
    name = f"orch_migrations_{os.environ.get('PYTEST_XDIST_WORKER', 'gw0')}"
    recreate_database(admin_database_url, name)
    yield with_database(admin_database_url, name)
    drop_database(admin_database_url, name)


def tables(url: str) -> set[str]:
    engine = create_engine(url)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def test_upgrade_downgrade_upgrade(scratch_url: str) -> None:
    cfg = alembic_config(scratch_url)
    command.upgrade(cfg, "head")
    assert {t.name for t in Base.metadata.sorted_tables} <= tables(scratch_url)
    command.downgrade(cfg, "base")
    assert tables(scratch_url) <= {"alembic_version"}
    command.upgrade(cfg, "head")
    assert {t.name for t in Base.metadata.sorted_tables} <= tables(scratch_url)


def test_models_and_migrations_agree(database: str) -> None:
    engine = create_engine(database)
    try:
        with engine.connect() as conn:
            ctx = MigrationContext.configure(
                conn, opts={"compare_type": True, "compare_server_default": True}
            )
            diff = compare_metadata(ctx, Base.metadata)
    finally:
        engine.dispose()
    assert diff == [], f"models and migrations differ; add a migration: {diff}"


def test_one_head_and_date_prefixed_files() -> None:
    script = ScriptDirectory.from_config(alembic_config("postgresql+psycopg://unused/x"))
    assert len(script.get_heads()) == 1, "branched migration history; merge the heads"
    for rev in script.walk_revisions():
        assert rev.path is not None
        name = os.path.basename(rev.path)
        assert name[:4].isdigit() and name[4] == "_", f"{name} is not date-prefixed"
