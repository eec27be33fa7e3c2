"""Follow a job from the API side: wait for its claim, then tail its chunks until it ends.

The request that relays a job is its reader. The process's tailer renews its hold (its
held-request slot and its job's reader expiry) every HOLD_RENEW seconds, so a reader whose
process dies is noticed within HOLD_TTL, and wakes it when its job moved on another node;
a bell wakes it for news from this host. Between wake-ups a reader reads nothing. It rides
out a database blip of up to DB_OUTAGE_GRACE seconds; and where the server shows it the
client's socket, a reader notices a client that hung up. `end_request` ends a reader, the
one way every API request ends.
"""
from __future__ import annotations

import logging
import socket
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Union

from flask import current_app, request

from . import budget, jobs, maintenance, usage, wake
from .db import is_unavailable
from .errors import ApiError, ClientGone, database_unavailable
from .models import TERMINAL, Chunk, Job, utcnow
from .tailer import Followed, Tailer, tailer

log = logging.getLogger(__name__)

Progress = tuple[str, Union[list[Chunk], Job, None]]


@dataclass
class Reader:
    """The API request relaying one job: its job, its held-request slot, its client's socket and its tailer entry.

    A request with several choices has a reader per job; the first holds the request's slot,
    the others hold None (not 0, which is a slot taken where there is no shared cap).
    """

    job_id: int
    hold: Optional[int]
    sock: Any
    followed: Followed
    tailer: Tailer
    detached: bool = False  # the job is a background one: it runs on whether this request reads it or not

    @classmethod
    def for_request(cls, job_id: int, hold: Optional[int], detached: bool = False) -> "Reader":
        """Make the reader of the current request; the tailer looks after it until `close`."""
        env = request.environ
        sock = env.get("gunicorn.socket") or env.get("werkzeug.socket")
        mine = tailer()
        return cls(job_id, hold, sock, mine.follow(job_id, hold), mine, detached)

    def close(self) -> None:
        """Stop the tailer's renewals: the request ended."""
        self.tailer.forget(self.followed)

    def wait(self, topic: str, since: int, timeout: float) -> bool:
        """Sleep until the job's bell rings, the tailer says it moved, or the timeout passes; tell which."""
        return wake.wait(topic, since, timeout, self.followed.news)

    def client_gone(self) -> bool:
        """Tell whether the client closed its connection (False where the server hides the socket)."""
        if self.sock is None:
            return False
        timeout = self.sock.gettimeout()
        try:
            # An orderly close reads as b"" without taking anything off the socket. Timeout 0
            # as well as MSG_DONTWAIT: gevent's socket ignores the flag and waits for data.
            self.sock.settimeout(0)
            return self.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except (BlockingIOError, InterruptedError):
            return False  # open, nothing sent: the client is waiting for us
        except OSError as err:
            # A reset connection is gone; a socket that cannot peek (TLS) tells us nothing.
            return isinstance(err, (ConnectionResetError, BrokenPipeError))
        finally:
            self.sock.settimeout(timeout)


def end_request(reader: Reader, ended: bool, deltas: Optional[list[dict[str, Any]]] = None,
                grace: float = 0.0) -> None:
    """End an API request the one way: stop its job unless it ended, settle its usage, give its slot back.

    Pass `deltas` when the request relayed every chunk of the ended job, and `grace` when
    its client could come back for the rest: a stream's job then runs on that long for a
    resume before the reaper cancels it. Each step stands alone: if the database is
    unreachable now, the job's reader expiry lapses and the reaper cancels and settles it
    within HOLD_TTL.
    """
    reader.close()
    if ended or reader.detached:
        pass  # a background job runs on without its readers
    elif grace > 0:
        _contained(reader, "keep", lambda: jobs.await_resume(reader.job_id, grace))
    else:
        # The caller will never read this job's answer: do not let a worker go on producing it.
        _contained(reader, "cancel", lambda: jobs.cancel_job(reader.job_id, "client_gone", "The client went away."))
    # Settling gives the shared slot back in settlement's transaction; if that fails, the slot goes alone.
    if _contained(reader, "settle", lambda: usage.settle(reader.job_id, deltas if ended else None, hold=reader.hold)):
        if reader.hold is not None:  # None: another reader of the request holds its slot
            budget.release_local()
    else:
        _contained(reader, "release", lambda: budget.release(reader.hold))


def _contained(reader: Reader, name: str, step: Callable[[], Any]) -> bool:
    """Run one step of ending a request; log a failure instead of raising it, and tell whether it ran."""
    try:
        step()
        return True
    except Exception:
        log.warning("job %s: could not %s now; the reaper will", reader.job_id, name, exc_info=True)
        return False


def read(reader: Reader, from_seq: int) -> tuple[Job, list[Chunk]]:
    """Read the reader's job from from_seq on, riding out a database blip."""
    outage: Optional[float] = None
    delay = 0.1
    while True:
        try:
            # Cleared first: a change the tailer sees from here on wakes the next wait.
            reader.followed.news.clear()
            job, chunks = jobs.read_progress(reader.job_id, from_seq)
            reader.followed.saw(job)
            return job, chunks
        except Exception as err:
            if not is_unavailable(err):
                raise
            outage = outage or time.monotonic()
            if time.monotonic() - outage >= current_app.config["DB_OUTAGE_GRACE"]:
                raise database_unavailable() from err
            log.warning("job %s: cannot read the database (%s); trying again", reader.job_id, err.__class__.__name__)
            # Back off to 1 s; the pool's pre-ping reconnects once the server is back.
            time.sleep(delay)
            delay = min(1.0, delay * 2)


class Dispatch:
    """Watch how long a job has waited in the queue since it was last (re-)queued."""

    def __init__(self) -> None:
        self.seen: tuple[str, int] = ("queued", 0)
        self.since = time.monotonic()

    def waited(self, job: Job) -> float:
        """Return seconds in the current state; give up with a 503 past DISPATCH_TIMEOUT in the queue."""
        if (job.state, job.attempts) != self.seen:
            # Claimed, or queued again after a lost worker: the wait starts over.
            self.seen, self.since = (job.state, job.attempts), time.monotonic()
        waited = time.monotonic() - self.since
        timeout = current_app.config["DISPATCH_TIMEOUT"]
        # A background job (no reader expiry) waits for a worker until its deadline, watched or not.
        background = job.reader_expires_at is None
        if job.state == "queued" and not background and waited >= timeout and jobs.expire_unclaimed(job.id):
            raise ApiError(
                503,
                f"No worker picked up the request for model '{job.model}' within {timeout:g} seconds. "
                "Try again shortly.",
                code="no_worker_available",
                retry_after=timeout / 3,
            )
        return waited


def wait_for_start(reader: Reader, patience: float) -> tuple[Job, list[Chunk]]:
    """Wait until a worker claims the job and sends something, it ends, or patience runs out.

    Returns the job with the chunks read so far, for `follow` to start from. Raises a 503
    with Retry-After when no worker claims the job within DISPATCH_TIMEOUT, and ClientGone
    when the client hangs up.
    """
    cfg = current_app.config
    topic = wake.job_topic(reader.job_id)
    dispatch = Dispatch()
    news = True
    while True:
        if news:
            # The stamp comes first: news committed after it rings a bell we will see.
            since = wake.stamp(topic)
            job, chunks = read(reader, 0)
            if job.state in TERMINAL or job.next_seq > 0:
                return job, chunks
        waited = dispatch.waited(job)
        if job.state == "queued":
            continue_for = cfg["DISPATCH_TIMEOUT"] - waited
        elif waited >= patience:
            return job, chunks
        else:
            continue_for = patience - waited
        if reader.client_gone():
            raise ClientGone()
        maintenance.housekeep()
        news = reader.wait(topic, since, min(cfg["WAKE_RECHECK"], max(0.0, continue_for)))


def collect(reader: Reader) -> tuple[Job, list[dict[str, Any]]]:
    """Follow a job to its end, for an answer that is not streamed; return it with every delta."""
    deltas: list[dict[str, Any]] = []
    for kind, payload in follow(reader):
        if kind == "chunks":
            deltas.extend(chunk.delta for chunk in payload)
        elif kind == "end":
            return payload, deltas
    raise AssertionError("follow ends with the job's end")


def follow(reader: Reader, first: Optional[tuple[Job, list[Chunk]]] = None, seq: int = 0) -> Iterator[Progress]:
    """Yield ("chunks", [...]) from chunk `seq` on as output arrives, ("heartbeat", None) on silence, then ("end", job).

    `first` is what `wait_for_start` read, taken as the first look instead of reading again.
    """
    cfg = current_app.config
    topic = wake.job_topic(reader.job_id)
    dispatch = Dispatch()
    last_sent = time.monotonic()
    news = True
    while True:
        if first is not None:
            # Read before any stamp of ours: stamp 0 makes the first wait return at once, so
            # news since that read costs one more look, never a missed bell.
            since, (job, chunks), first = 0, first, None
        elif news:
            # The stamp comes first: news committed after it rings a bell we will see.
            since = wake.stamp(topic)
            job, chunks = read(reader, seq)
        else:
            chunks = []  # nothing moved: the job as last read stands
        if chunks:
            seq += len(chunks)
            last_sent = time.monotonic()
            yield "chunks", chunks
        if job.state in TERMINAL and seq >= job.next_seq:
            yield "end", job
            return
        if chunks:
            continue
        if utcnow() >= job.deadline_at:
            jobs.expire_job(job.id)
            news = True  # read what the expiry left
            continue
        # A job queued again after losing its worker must find another within DISPATCH_TIMEOUT.
        dispatch.waited(job)
        if reader.client_gone():
            raise ClientGone()
        maintenance.housekeep()
        quiet = time.monotonic() - last_sent
        timeout = min(cfg["WAKE_RECHECK"], max(0.0, cfg["HEARTBEAT_INTERVAL"] - quiet))
        news = reader.wait(topic, since, timeout)
        if not news and quiet + timeout >= cfg["HEARTBEAT_INTERVAL"]:
            last_sent = time.monotonic()
            yield "heartbeat", None


# How a worker's error code reaches the API client: status and OpenAI code.
WORKER_ERRORS = {
    "invalid_request": (400, "invalid_request"),
    "context_length_exceeded": (400, "context_length_exceeded"),
    "content_filter": (400, "content_filter"),
    "model_not_found": (404, "model_not_found"),
    "rate_limited": (429, "rate_limit_exceeded"),
    "needs_human": (503, "worker_needs_human"),
    "deadline": (504, "timeout"),
    "no_worker": (503, "no_worker_available"),
    "cancelled": (503, "cancelled"),
    "client_gone": (503, "cancelled"),
}


def job_error(job: Job) -> ApiError:
    """Turn a job that did not complete into the error its client receives."""
    status, code = WORKER_ERRORS.get(job.error_code or "", (502, "upstream_error"))
    message = job.error_message or "The worker could not answer."
    if job.error_code not in WORKER_ERRORS and job.error_code:
        message = f"{message} ({job.error_code})"
    retry: Optional[float] = 5.0 if status in (429, 503) else None
    return ApiError(status, message, code=code, retry_after=retry)
