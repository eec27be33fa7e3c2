"""One thread per process looks after every open API request it serves, one statement at a time.

Each open request used to re-read its job every WAKE_RECHECK seconds and renew its hold
every HOLD_RENEW seconds: a process holding hundreds of streams spent its CPU on the
database for requests that had nothing new. Now the tailer asks once per WAKE_RECHECK
which of the followed jobs moved, wakes only those requests, and renews every hold in
one transaction per HOLD_RENEW. A request still reads its own job when its bell rings
(news from this host) or the tailer wakes it (news from another node).
"""
from __future__ import annotations

import datetime as dt
import logging
import os
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Optional

from flask import Flask, current_app
from sqlalchemy import select, update

from .db import db
from .models import HeldRequest, Job, utcnow

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Followed:
    """What one open request last read of its job, and the event the tailer sets when that changed."""

    job_id: int
    hold: Optional[int]  # None: the request's slot is another entry's
    seen: Optional[tuple[int, str]] = None
    news: threading.Event = field(default_factory=threading.Event)

    def saw(self, job: Job) -> None:
        """Note what the request just read, so only a later change wakes it."""
        self.seen = (job.next_seq, job.state)


class Tailer:
    """The process's watcher of followed jobs and renewer of their holds (see the module's docstring)."""

    def __init__(self, app: Flask) -> None:
        self.app = app
        self.lock = threading.Lock()
        # Weak: a request that ends without saying so (a killed thread) stops being renewed,
        # so its slot lapses as a dead process's does.
        self.followed: weakref.WeakSet[Followed] = weakref.WeakSet()
        self.pid = 0  # the process whose thread runs; none after a fork or once it stopped

    def follow(self, job_id: int, hold: Optional[int]) -> Followed:
        """Start looking after a request; the caller keeps the returned Followed alive while it runs."""
        entry = Followed(job_id, hold)
        with self.lock:
            if self.pid != os.getpid():
                # First use in this process, after a fork (the parent's thread is gone), or
                # after the thread stopped for want of requests.
                self.pid = os.getpid()
                self.followed = weakref.WeakSet()
                threading.Thread(target=self.run, name="pollgate-tailer", daemon=True).start()
            self.followed.add(entry)
        return entry

    def forget(self, entry: Followed) -> None:
        """Stop looking after a request that ended."""
        with self.lock:
            self.followed.discard(entry)

    def run(self) -> None:
        """Look every WAKE_RECHECK seconds, renew every HOLD_RENEW seconds; never die, stop when idle."""
        cfg = self.app.config
        look_due = renew_due = 0.0
        while True:
            now = time.monotonic()
            look_due = look_due or now + cfg["WAKE_RECHECK"]
            renew_due = renew_due or now + cfg["HOLD_RENEW"]
            time.sleep(max(0.0, min(look_due, renew_due) - now))
            with self.lock:
                followed = list(self.followed)
                if not followed:
                    # Idle: stop, so an app that serves nothing more holds no thread.
                    self.pid = 0
                    return
            try:
                with self.app.app_context():
                    if time.monotonic() >= renew_due:
                        renew(followed, cfg["HOLD_TTL"])
                        renew_due = 0.0
                    if time.monotonic() >= look_due:
                        moved(followed)
                        look_due = 0.0
            except Exception as err:
                # The database is away: wake everyone, so each request meets the outage in its
                # own read and rides it out (or ends) as DB_OUTAGE_GRACE says. Both are retried.
                log.warning("tailer: cannot reach the database (%s)", err.__class__.__name__)
                look_due = renew_due = 0.0
                for entry in followed:
                    entry.news.set()


def moved(followed: list[Followed]) -> None:
    """Wake each request whose job's progress differs from what it last read."""
    with db.read() as s:
        found = s.execute(select(Job.id, Job.next_seq, Job.state).where(Job.id.in_({e.job_id for e in followed})))
        rows = {job_id: (seq, state) for job_id, seq, state in found}
    for entry in followed:
        if rows.get(entry.job_id) != entry.seen:
            entry.news.set()


def renew(followed: list[Followed], ttl: float) -> None:
    """Tell the database these requests are alive: push their jobs' and slots' expiry on, in one transaction."""
    until = utcnow() + dt.timedelta(seconds=ttl)
    jobs = sorted({e.job_id for e in followed})
    holds = sorted({e.hold for e in followed if e.hold})
    with db.begin() as s:
        # Lock order: jobs before held_requests; ids in order, so two processes never cross.
        # A background job has no reader expiry, and a stream resumed on it gives it none.
        s.execute(update(Job).where(Job.id.in_(jobs), Job.state.in_(("queued", "running")),
                                    Job.reader_expires_at.isnot(None))
                  .values(reader_expires_at=until))
        if holds:
            s.execute(update(HeldRequest).where(HeldRequest.id.in_(holds)).values(expires_at=until))


def tailer() -> Tailer:
    """Return this app's tailer, made on first use."""
    ext = current_app.extensions
    found = ext.get("pollgate.tailer")
    if found is None:
        found = ext.setdefault("pollgate.tailer", Tailer(current_app._get_current_object()))
    return found
