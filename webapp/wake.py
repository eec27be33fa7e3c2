"""Cheap cross-process wake-ups: bell files whose mtime changes when there is news.

A waiter stats one small file per tick instead of querying the database; every process on
the host (Passenger's pool, gunicorn's workers) shares the folder. The database is still
re-checked every WAKE_RECHECK seconds, which covers nodes that do not share the folder.
"""
from __future__ import annotations

import logging
import os
import time
import zlib

from flask import current_app

log = logging.getLogger(__name__)

JOB_BUCKETS = 64  # job bells are hashed into a fixed set of files: nothing to clean up


def bell_dir() -> str:
    """Return the folder that holds the bell files, creating it on first use."""
    path = current_app.config.get("WAKE_DIR") or os.path.join(current_app.instance_path, "bells")
    os.makedirs(path, exist_ok=True)
    return path


def _file(topic: str) -> str:
    if topic.startswith("job:"):
        topic = f"job-{zlib.crc32(topic.encode()) % JOB_BUCKETS}"
    return os.path.join(bell_dir(), topic)


def job_topic(job_id: int) -> str:
    """Name the bell a job's followers wait on."""
    return f"job:{job_id}"


def ring(*topics: str) -> None:
    """Wake everyone waiting on these topics; call after the news is committed."""
    for topic in topics:
        path = _file(topic)
        now = time.time_ns()
        try:
            try:
                os.utime(path, ns=(now, now))
            except FileNotFoundError:
                with open(path, "a"):
                    pass
                os.utime(path, ns=(now, now))
        except OSError as err:
            # A missed bell only costs latency: waiters re-check the database anyway.
            log.warning("cannot ring %s: %s", path, err)


def stamp(topic: str) -> int:
    """Read a topic's bell; take it before reading the database, then wait on it."""
    try:
        return os.stat(_file(topic)).st_mtime_ns
    except OSError:
        return 0


def wait(topic: str, since: int, timeout: float) -> bool:
    """Sleep until the topic's bell changes from `since` or the timeout passes."""
    tick = current_app.config["WAKE_TICK"]
    path = _file(topic)
    end = time.monotonic() + max(0.0, timeout)
    while True:
        try:
            if os.stat(path).st_mtime_ns != since:
                return True
        except OSError:
            pass
        left = end - time.monotonic()
        if left <= 0:
            return False
        time.sleep(min(tick, left))
