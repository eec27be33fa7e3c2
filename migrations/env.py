"""Alembic environment: reuse the connection migrate.upgrade() hands over, or build the app."""
from alembic import context

from webapp import models  # noqa: F401  (registers the tables on the metadata)
from webapp.db import Base

config = context.config


def run(connection) -> None:
    """Migrate over one connection, one transaction per migration (MySQL DDL commits anyway)."""
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        render_as_batch=connection.dialect.name == "sqlite",  # SQLite cannot ALTER most things
        transaction_per_migration=True,
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


connection = config.attributes.get("connection")
if connection is not None:
    run(connection)
else:
    from webapp import create_app

    with create_app().app_context():
        from webapp.db import db

        with db.engine.connect() as conn:
            run(conn)
            conn.commit()
