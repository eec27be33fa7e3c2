"""The database handle: one engine per app, short explicit transactions."""
from __future__ import annotations

import re
from contextlib import contextmanager
from typing import Any, Iterable, Iterator

from flask import Flask, current_app
from sqlalchemy import MetaData, Table, create_engine, event, text
from sqlalchemy.dialects import mysql, sqlite
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker

# Named constraints let Alembic drop and alter them on MySQL and SQLite alike.
NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    """Declarative base whose metadata carries the naming convention."""

    metadata = MetaData(naming_convention=NAMING)


def make_engine(url: str, pool_size: int = 2, pool_recycle: int = 280) -> Engine:
    """Create an engine tuned for the dialect the URL names."""
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
        _serialize_sqlite(engine)
        return engine
    return create_engine(
        url,
        pool_size=pool_size,
        max_overflow=0,
        pool_pre_ping=True,
        pool_recycle=pool_recycle,
        # Every session ends its own transaction (db.read() and db.begin() close or commit),
        # so the pool's extra ROLLBACK on return would be one more query per wake-up.
        pool_reset_on_return=None,
        # READ COMMITTED: a long-poll that re-reads sees other processes' commits at once.
        isolation_level="READ COMMITTED",
    )


def _serialize_sqlite(engine: Engine) -> None:
    """Make every SQLite transaction BEGIN IMMEDIATE, in WAL mode, with a busy wait."""

    @event.listens_for(engine, "connect")
    def on_connect(dbapi_conn, _record) -> None:
        # Take transaction control from the driver so "begin" below decides the lock.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def on_begin(conn) -> None:
        if conn.get_execution_options().get("pollgate_read_only"):
            # Reads run beside the writer under WAL, without taking its lock.
            conn.exec_driver_sql("BEGIN")
        else:
            # A deferred transaction that later writes fails with SQLITE_BUSY at once
            # instead of waiting; taking the write lock up front makes an orderly queue.
            conn.exec_driver_sql("BEGIN IMMEDIATE")


def server_supports_skip_locked(engine: Engine) -> bool:
    """Tell whether the server accepts FOR UPDATE SKIP LOCKED (MySQL 8.0.1+, MariaDB 10.6+)."""
    if engine.dialect.name != "mysql":
        return False
    with engine.connect() as conn:
        version = conn.execute(text("SELECT VERSION()")).scalar_one()
    return skip_locked_from_version(version)


def skip_locked_from_version(version: str) -> bool:
    """Parse a server version string and tell whether it has SKIP LOCKED."""
    numbers = tuple(int(n) for n in re.findall(r"\d+", version)[:3])
    if "mariadb" in version.lower():
        return numbers >= (10, 6)
    return numbers >= (8, 0, 1)


def upsert_add(s: Session, table: Table, rows: list[dict[str, Any]], keys: Iterable[str], counters: Iterable[str]) -> None:
    """Insert rows, or add their counters to the rows that already hold the same unique key."""
    counters = list(counters)
    if s.get_bind().dialect.name == "mysql":
        stmt = mysql.insert(table).values(rows)
        stmt = stmt.on_duplicate_key_update({c: table.c[c] + stmt.inserted[c] for c in counters})
    else:
        stmt = sqlite.insert(table).values(rows)
        stmt = stmt.on_conflict_do_update(
            index_elements=list(keys), set_={c: table.c[c] + stmt.excluded[c] for c in counters}
        )
    s.execute(stmt)


class Database:
    """Unbound handle that blueprints, cron and the installer import."""

    def init_app(self, app: Flask) -> None:
        """Build the app's engine and session factory from its config."""
        engine = make_engine(
            app.config["DATABASE_URL"],
            pool_size=app.config["DB_POOL_SIZE"],
            pool_recycle=app.config["DB_POOL_RECYCLE"],
        )
        app.extensions["pollgate.engine"] = engine
        app.extensions["pollgate.sessions"] = sessionmaker(engine, expire_on_commit=False)
        app.extensions["pollgate.readers"] = sessionmaker(
            engine.execution_options(pollgate_read_only=True), expire_on_commit=False
        )
        app.extensions["pollgate.skip_locked"] = None  # decided on first claim

    @property
    def engine(self) -> Engine:
        """Return the current app's engine."""
        return current_app.extensions["pollgate.engine"]

    def read(self) -> Session:
        """Open a session for reading only; use it in a `with` so the read ends."""
        return current_app.extensions["pollgate.readers"]()

    @contextmanager
    def begin(self) -> Iterator[Session]:
        """Run one write transaction: commit on success, roll back on error."""
        with current_app.extensions["pollgate.sessions"]() as session, session.begin():
            yield session

    def uses_skip_locked(self) -> bool:
        """Decide once per process which claim path this server gets."""
        ext = current_app.extensions
        if ext["pollgate.skip_locked"] is None:
            choice = current_app.config["CLAIM_PATH"]
            if choice == "auto":
                ext["pollgate.skip_locked"] = server_supports_skip_locked(self.engine)
            else:
                ext["pollgate.skip_locked"] = choice == "skip_locked"
        return ext["pollgate.skip_locked"]


db = Database()
