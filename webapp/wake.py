"""Cheap cross-process wake-ups: bell files whose mtime changes when there is news.

One thread per process stats the files that someone waits on, once per tick, instead of
anyone querying the database; every process on the host (Passenger's pool, gunicorn's
workers) shares the folder. Waiters still re-check the database every WAKE_RECHECK
seconds, which covers nodes that do not share the folder.
"""
from __future__ import annotations

import logging
import os
import threading
import time
import zlib
from typing import Optional

from flask import current_app

log = logging.getLogger(__name__)

JOB_BUCKETS = 64  # job bells are hashed into a fixed set of files: nothing to clean up


def bell_dir() -> str:
    """Return the folder that holds the bell files, creating it on first use."""
    ext = current_app.extensions
    path = ext.get("pollgate.bells")
    if path is None:
        # Once per app: every stamp, ring and wait asks, several times a request.
        path = current_app.config.get("WAKE_DIR") or os.path.join(current_app.instance_path, "bells")
        os.makedirs(path, exist_ok=True)
        ext["pollgate.bells"] = path
    return path


def _file(topic: str) -> str:
    if topic.startswith("job:"):
        topic = f"job-{zlib.crc32(topic.encode()) % JOB_BUCKETS}"
    return os.path.join(bell_dir(), topic)


def job_topic(job_id: int) -> str:
    """Name the bell a job's followers wait on."""
    return f"job:{job_id}"


def worker_topic(worker_id: int) -> str:
    """Name the bell a worker's newest long-poll rings to retire older ones."""
    return f"worker-{worker_id}"


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
    return _mtime(_file(topic))


def wait(topic: str, since: int, timeout: float, event: Optional[threading.Event] = None) -> bool:
    """Sleep until the topic's bell changes from `since`, `event` is set, or the timeout passes."""
    return wait_any({topic: since}, timeout, event)


def wait_any(stamps: dict[str, int], timeout: float, event: Optional[threading.Event] = None) -> bool:
    """Sleep until any of these bells changes from its stamp, `event` is set, or the timeout passes."""
    if event is not None and event.is_set():
        return True
    if timeout <= 0:
        return False
    watched = tuple((_file(topic), since) for topic, since in stamps.items())
    return _watcher.wait(watched, timeout, current_app.config["WAKE_TICK"], event)


def _mtime(path: str) -> int:
    try:
        return os.stat(path).st_mtime_ns
    except OSError:
        return 0


class _Watcher:
    """One thread per process stats the bells someone waits on and wakes those waiters.

    Idle waiters then cost nothing but an Event each, however many threads wait.
    """

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.waiters: set[tuple[tuple[tuple[str, int], ...], threading.Event]] = set()
        self.tick = 0.005
        self.pid = 0

    def wait(self, watched: tuple[tuple[str, int], ...], timeout: float, tick: float,
             event: Optional[threading.Event] = None) -> bool:
        """Register, sleep on an Event (the caller's, which others may set too) until it is set or the timeout passes."""
        entry = (watched, event or threading.Event())
        with self.cond:
            if self.pid != os.getpid():
                # First use in this process (or after a fork): the parent's thread is gone.
                self.pid = os.getpid()
                self.waiters = set()
                threading.Thread(target=self.run, name="pollgate-bells", daemon=True).start()
            self.tick = tick
            self.waiters.add(entry)
            self.cond.notify()
        try:
            return entry[1].wait(timeout)
        finally:
            with self.cond:
                self.waiters.discard(entry)

    def run(self) -> None:
        """Stat each watched bell once per tick and set the events of waiters it concerns."""
        while True:
            with self.cond:
                while not self.waiters:
                    self.cond.wait()
                waiters = list(self.waiters)
                tick = self.tick
            stamps = {path: _mtime(path) for watched, _ in waiters for path, _ in watched}
            for watched, event in waiters:
                if any(stamps[path] != since for path, since in watched):
                    event.set()
            time.sleep(tick)


_watcher = _Watcher()
