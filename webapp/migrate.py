"""Run the Alembic migrations in migrations/ against the app's database, under a lock."""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import text
from sqlalchemy.engine import Connection

from .db import db

MIGRATIONS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "migrations")
LOCK_NAME = "pollgate_migrate"


def alembic_config(connection: Connection) -> Config:
    """Build an Alembic config that reuses this connection."""
    cfg = Config()
    cfg.set_main_option("script_location", MIGRATIONS)
    cfg.attributes["connection"] = connection
    return cfg


@contextmanager
def migration_lock(connection: Connection, timeout: int = 60) -> Iterator[None]:
    """Hold a server-wide lock so two installers cannot migrate at once (MySQL GET_LOCK)."""
    if connection.dialect.name != "mysql":
        yield  # SQLite: BEGIN IMMEDIATE already serialises the writers
        return
    got = connection.execute(text("SELECT GET_LOCK(:name, :timeout)"), {"name": LOCK_NAME, "timeout": timeout}).scalar()
    # The lock belongs to the session, not the transaction: end the autobegun transaction
    # so Alembic can run one transaction per migration and commit each.
    connection.commit()
    if got != 1:
        raise RuntimeError("another installer is migrating this database; try again in a minute")
    try:
        yield
    finally:
        connection.execute(text("SELECT RELEASE_LOCK(:name)"), {"name": LOCK_NAME})
        connection.commit()


def upgrade(revision: str = "head") -> None:
    """Apply every pending migration."""
    with db.engine.connect() as connection, migration_lock(connection):
        command.upgrade(alembic_config(connection), revision)
        connection.commit()


def pending() -> list[str]:
    """List the migrations not yet applied, oldest first."""
    with db.engine.connect() as connection:
        current = MigrationContext.configure(connection).get_current_heads()
        connection.rollback()
    script = ScriptDirectory(MIGRATIONS)
    heads = script.get_heads()
    revisions = script.iterate_revisions(heads, current or "base")
    return [r.revision for r in reversed(list(revisions))]
