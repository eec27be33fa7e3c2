"""The migrations build exactly the schema the models describe, on SQLite and MariaDB."""
from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from webapp import migrate
from webapp.db import Base, db


def test_migrations_match_the_models(app):
    with app.app_context(), db.engine.connect() as connection:
        diff = compare_metadata(MigrationContext.configure(connection), Base.metadata)
    assert diff == [], "a model changed without a migration (or the reverse)"


def test_nothing_is_pending_after_upgrade(app):
    with app.app_context():
        assert migrate.pending() == []
