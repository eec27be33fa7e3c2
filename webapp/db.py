"""The database handle: one engine per app, short explicit transactions."""
from __future__ import annotations

import fcntl
import functools
import logging
import os
import random
import re
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator, Optional, TypeVar

from flask import Flask, current_app
from sqlalchemy import MetaData, Table, create_engine, event, text
from sqlalchemy.dialects import mysql, sqlite
from sqlalchemy import exc
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker

log = logging.getLogger(__name__)
T = TypeVar("T")

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
        _private_sqlite_files(url)
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
        # LOAD DATA LOCAL lets a server read the client's files; a URL query cannot turn it on.
        connect_args={"local_infile": False},
    )


def _private_sqlite_files(url: str) -> None:
    """Create the SQLite file readable by its owner only, and tighten one made earlier."""
    path = make_url(url).database
    if not path or path == ":memory:" or path.startswith("file:") or not os.path.isdir(os.path.dirname(path) or "."):
        return  # nothing on disk, or a folder that is not there: SQLite's own error says so
    # SQLite gives the -wal and -shm files the database file's mode, so making the file
    # 0600 before SQLite opens it covers all three; an older install's files are tightened.
    os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
    for name in (path, path + "-wal", path + "-shm", path + "-journal"):
        try:
            if os.stat(name).st_mode & 0o077:
                os.chmod(name, 0o600)
        except FileNotFoundError:
            continue
        except OSError as err:  # not ours to change (another user's file): say so, go on
            log.warning("cannot make %s private: %s", name, err.strerror)


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
    dialect = s.get_bind().dialect.name
    shape = (dialect, table.name, tuple(keys), tuple(counters))
    stmt = _upserts.get(shape)
    if stmt is None:
        stmt = _upserts.setdefault(shape, _upsert_statement(dialect, table, *shape[2:]))
    # One statement built once, its values as parameters: building one with the values in
    # it cost 3-4 ms a call, three times a request (bench/findings.md, 2026-11-30).
    s.execute(stmt, rows)


_upserts: dict[tuple[str, str, tuple[str, ...], tuple[str, ...]], Any] = {}


def _upsert_statement(dialect: str, table: Table, keys: tuple[str, ...], counters: tuple[str, ...]) -> Any:
    """Build the insert-or-add statement for one table on one dialect."""
    if dialect == "mysql":
        stmt = mysql.insert(table)
        return stmt.on_duplicate_key_update({c: table.c[c] + stmt.inserted[c] for c in counters})
    stmt = sqlite.insert(table)
    return stmt.on_conflict_do_update(index_elements=list(keys), set_={c: table.c[c] + stmt.excluded[c] for c in counters})


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
        """Run one write transaction: commit on success, roll back on error.

        Lock order. Every writer takes row locks in this order, so no two of our own
        transactions can wait on each other in a cycle: users -> api_keys -> settings (the
        budget's lock row) -> jobs -> usage -> chunks -> workers -> usage_daily ->
        rate_buckets -> held_requests. A foreign key check takes a shared lock on the parent
        row: settling a job takes its worker's that way, and the user's when it starts a day's
        roll-up row, both before any rate bucket. The roll-up and bucket rows, which every
        request of a user shares, come last, so their locks last one round trip to the
        commit. What InnoDB still picks as a deadlock victim, `retrying` runs again.
        """
        with current_app.extensions["pollgate.sessions"]() as session, session.begin():
            yield session

    @contextmanager
    def named_lock(self, name: str, wait: int = 0) -> Iterator[bool]:
        """Hold a lock named `name` across processes for the block; yield False if another holds it past `wait` s.

        MySQL's GET_LOCK covers every node on the server; SQLite lives on one host, where a
        file in the instance folder does.
        """
        if self.engine.dialect.name != "mysql":
            with file_lock(os.path.join(current_app.instance_path, f"{name}.lock")) as got:
                yield got
            return
        with self.engine.connect() as conn:
            got = conn.execute(text("SELECT GET_LOCK(:n, :w)"), {"n": f"pollgate_{name}", "w": wait}).scalar() == 1
            # The lock belongs to the session, not the transaction: end the autobegun one.
            conn.commit()
            try:
                yield got
            finally:
                if got:
                    conn.execute(text("SELECT RELEASE_LOCK(:n)"), {"n": f"pollgate_{name}"})
                    conn.commit()

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


@contextmanager
def file_lock(path: str) -> Iterator[bool]:
    """Hold an exclusive lock on a file for the block; yield False at once if another process holds it."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True


# InnoDB's deadlock victim (1213) and lock wait timeout (1205): the transaction was rolled
# back whole and running it again is the documented remedy (MySQL manual, "How to Minimize
# and Handle Deadlocks").
RETRYABLE_CODES = {1205, 1213}
# The server is gone or refuses us for now: not the caller's fault, and it passes.
# 1040/1203/1226 too many connections, 1053 shutdown, 1927 connection killed, 2002/2003
# cannot connect, 2006 gone away, 2013 lost during a query, 2014/2055 broken link,
# 4031 closed for inactivity.
UNAVAILABLE_CODES = {1040, 1053, 1203, 1226, 1927, 2002, 2003, 2005, 2006, 2013, 2014, 2055, 4031}
RETRY_ATTEMPTS = 5


def _mysql_code(err: BaseException) -> Optional[int]:
    orig = getattr(err, "orig", None)
    args = getattr(orig, "args", None)
    return args[0] if args and isinstance(args[0], int) else None


def is_conflict(err: BaseException) -> bool:
    """Tell whether the database rolled a transaction back only because it collided with another."""
    if not isinstance(err, exc.OperationalError):
        return False
    if _mysql_code(err) in RETRYABLE_CODES:
        return True
    return "database is locked" in str(getattr(err, "orig", ""))


def is_unavailable(err: BaseException) -> bool:
    """Tell whether an error means the database cannot be reached or is too busy right now."""
    if isinstance(err, exc.TimeoutError):  # no pooled connection came free in time
        return True
    if not isinstance(err, (exc.OperationalError, exc.InterfaceError)):
        return False
    if getattr(err, "connection_invalidated", False) or is_conflict(err):
        return True
    code = _mysql_code(err)
    if code is not None:
        return code in UNAVAILABLE_CODES
    return "unable to open database" in str(getattr(err, "orig", ""))


def retrying(fn: Callable[..., T]) -> Callable[..., T]:
    """Run a unit of work again, whole, when the database picks it as a deadlock victim.

    The unit must open its own transactions and be safe to repeat: everything it wrote in
    the failed try was rolled back.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        for attempt in range(RETRY_ATTEMPTS):
            try:
                return fn(*args, **kwargs)
            except exc.OperationalError as err:
                if not is_conflict(err) or attempt == RETRY_ATTEMPTS - 1:
                    raise
                log.info("%s collided with another transaction (try %d), running it again",
                         fn.__name__, attempt + 1)
                # Jitter spreads the colliders out so they do not meet again at once.
                time.sleep(random.uniform(0, 0.02 * 2 ** attempt))
        raise AssertionError("unreachable")

    return wrapper
