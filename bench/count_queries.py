"""Gunicorn config for the idle benchmark: each worker counts its SQL round trips into a file.

MariaDB has a server-side counter (Questions); SQLite has none, so this hook counts what
SQLAlchemy sends: statements, BEGINs, commits and rollbacks (not the pool's own
reset-on-return ROLLBACK, nor pool_pre_ping's COM_PING). Load it with `gunicorn -c`.
"""
from __future__ import annotations

import os
import threading
import time

from sqlalchemy import event
from sqlalchemy.engine import Engine

COUNT_DIR = os.environ.get("BENCH_COUNT_DIR", ".")
counts = {"statements": 0, "begins": 0, "commits": 0, "rollbacks": 0}


# Class-level listeners registered in the master reach every engine the forked workers build.
@event.listens_for(Engine, "before_cursor_execute")
def _statement(conn, cursor, statement: str, *_args) -> None:
    # SQLite's BEGIN IMMEDIATE is a statement here; MySQL drivers send no BEGIN at all.
    counts["begins" if statement.lstrip()[:5].upper() == "BEGIN" else "statements"] += 1


@event.listens_for(Engine, "commit")
def _commit(*_args) -> None:
    counts["commits"] += 1


@event.listens_for(Engine, "rollback")
def _rollback(*_args) -> None:
    counts["rollbacks"] += 1


def _dump_forever() -> None:
    path = os.path.join(COUNT_DIR, f"queries-{os.getpid()}")
    while True:
        with open(path + ".tmp", "w") as f:
            f.write(" ".join(str(v) for v in counts.values()))
        os.replace(path + ".tmp", path)
        time.sleep(0.05)


def post_worker_init(worker) -> None:
    """Start the thread that publishes this worker's counts (threads do not survive fork)."""
    threading.Thread(target=_dump_forever, name="bench-count", daemon=True).start()

