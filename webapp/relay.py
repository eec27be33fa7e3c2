"""Follow a job from the API side: wait for its claim, then tail its chunks until it ends."""
from __future__ import annotations

import time
from typing import Iterator, Optional, Union

from flask import current_app

from . import jobs, maintenance, wake
from .errors import ApiError
from .models import TERMINAL, Chunk, Job, utcnow

Event = tuple[str, Union[list[Chunk], Job, None]]


def wait_for_start(job_id: int, patience: float) -> Job:
    """Wait until a worker claims the job and sends something, it ends, or patience runs out.

    Raises a 503 with Retry-After when no worker claims the job within DISPATCH_TIMEOUT.
    """
    cfg = current_app.config
    started = time.monotonic()
    topic = wake.job_topic(job_id)
    seen = ("queued", 0)
    while True:
        since = wake.stamp(topic)
        job, _ = jobs.read_progress(job_id, 0)
        if job.state in TERMINAL or job.next_seq > 0:
            return job
        if (job.state, job.attempts) != seen:
            # Claimed, or queued again after a lost worker: the wait starts over.
            seen, started = (job.state, job.attempts), time.monotonic()
        waited = time.monotonic() - started
        if job.state == "queued" and waited >= cfg["DISPATCH_TIMEOUT"]:
            if jobs.expire_unclaimed(job_id):
                raise ApiError(
                    503,
                    f"No worker picked up the request for model '{job.model}' within "
                    f"{cfg['DISPATCH_TIMEOUT']:g} seconds. Try again shortly.",
                    code="no_worker_available",
                    retry_after=cfg["DISPATCH_TIMEOUT"] / 3,
                )
            continue
        if job.state == "running" and waited >= patience:
            return job
        maintenance.housekeep()
        limit = cfg["DISPATCH_TIMEOUT"] if job.state == "queued" else patience
        wake.wait(topic, since, min(cfg["WAKE_RECHECK"], max(0.0, limit - waited)))


def follow(job_id: int) -> Iterator[Event]:
    """Yield ("chunks", [...]) as output arrives, ("heartbeat", None) on silence, then ("end", job)."""
    cfg = current_app.config
    topic = wake.job_topic(job_id)
    seq = 0
    last_sent = time.monotonic()
    while True:
        # The stamp comes first: news committed after it rings a bell we will see.
        since = wake.stamp(topic)
        job, chunks = jobs.read_progress(job_id, seq)
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
            jobs.expire_job(job_id)
            continue
        maintenance.housekeep()
        quiet = time.monotonic() - last_sent
        timeout = min(cfg["WAKE_RECHECK"], max(0.0, cfg["HEARTBEAT_INTERVAL"] - quiet))
        if not wake.wait(topic, since, timeout) and quiet + timeout >= cfg["HEARTBEAT_INTERVAL"]:
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
