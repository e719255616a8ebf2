"""Throwaway databases on the test server, built by running the migrations."""

from __future__ import annotations

import psycopg
from alembic import command
from alembic.config import Config
from sqlalchemy.engine import make_url

from tests.support.paths import ROOT


def with_database(url: str, name: str) -> str:
    return make_url(url).set(database=name).render_as_string(hide_password=False)


def recreate_database(admin_url: str, name: str) -> None:
    conninfo = (
        make_url(admin_url).set(drivername="postgresql").render_as_string(hide_password=False)
    )
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')


def drop_database(admin_url: str, name: str) -> None:
    conninfo = (
        make_url(admin_url).set(drivername="postgresql").render_as_string(hide_password=False)
    )
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def alembic_config(url: str) -> Config:
    cfg = Config(str(ROOT / "alembic.ini"))
    cfg.set_main_option("sqlalchemy.url", url)
    return cfg


def migrate(url: str, revision: str = "head") -> None:
    command.upgrade(alembic_config(url), revision)
