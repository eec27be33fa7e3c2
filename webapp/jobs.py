"""Every job state transition, each one short transaction; views and cron call these.

States: queued -> running -> completed | failed | cancelled | expired; a running job whose
worker vanished goes back to queued while it has streamed nothing.
"""
from __future__ import annotations

import datetime as dt
import json
import random
import secrets
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, TypeVar

from flask import current_app
from sqlalchemy import and_, or_, select, update
from sqlalchemy.orm import Session

from . import events, features, settings, wake
from .db import db, retrying
from .models import Chunk, Job, Worker, utcnow

A = TypeVar("A")


def _seconds(name: str) -> dt.timedelta:
    return dt.timedelta(seconds=current_app.config[name])


def submit_job(
    user_id: int,
    api_key_id: Optional[int],
    model: str,
    request: dict[str, Any],
    stream: bool,
    priority: int = 0,
    kind: str = "chat",
    admit: Optional[Callable[[Session, Job, dt.datetime], A]] = None,
    reader: bool = False,
    record: Optional[Callable[[Session, Job, dt.datetime], None]] = None,
    provider: str = "",
    pinned_worker_id: Optional[int] = None,
) -> tuple[Job, Optional[A]]:
    """Queue a job, wake the workers, and return the job with what `admit` returned.

    `admit` runs first in the same transaction: it may raise to refuse the job (rate
    limits) and may raise its priority (the user's tier). `record` runs last, after the
    job row: it adds rows that must exist exactly when the job does (its usage row, its
    rate counters). Those counters are the user's busiest rows, so they are written just
    before the commit and their locks are held for one round trip, not the whole unit.
    A deadlock runs the whole unit again. With `reader`, the submitting request relays the
    answer and must renew the job's reader expiry (relay.Reader), or the reaper cancels the job.
    `provider` ("" for any) and `pinned_worker_id` limit which workers may claim it (webapp/routing.py).
    """
    queued, admitted = _insert_jobs(user_id, api_key_id, model, request, stream, priority, kind, admit, reader,
                                    record, provider, pinned_worker_id, 1)
    wake.ring("jobs")
    return queued[0], admitted


def submit_jobs(n: int, user_id: int, api_key_id: Optional[int], model: str, request: dict[str, Any], stream: bool,
                priority: int = 0, kind: str = "chat", admit=None, reader: bool = False, record=None,
                provider: str = "", pinned_worker_id: Optional[int] = None) -> tuple[list[Job], Any]:
    """Queue n alike jobs, all or none, as submit_job queues one; return them with what the last `admit` returned.

    `admit` and `record` run for each job in turn, so each admission counts the jobs before
    it: a limit with room for fewer than n refuses the lot, and nothing is queued.
    """
    queued, admitted = _insert_jobs(user_id, api_key_id, model, request, stream, priority, kind, admit, reader,
                                    record, provider, pinned_worker_id, n)
    wake.ring("jobs")
    return queued, admitted


@retrying
def _insert_jobs(user_id, api_key_id, model, request, stream, priority, kind, admit, reader, record, provider,
                 pinned_worker_id, n):
    now = utcnow()
    request_json = json.dumps(request, separators=(",", ":"))
    queued = [Job(
        public_id=("chatcmpl-" if kind == "chat" else "job-") + secrets.token_urlsafe(18),
        kind=kind,
        user_id=user_id,
        api_key_id=api_key_id,
        model=model,
        state="queued",
        priority=priority,
        stream=stream,
        request_json=request_json,
        created_at=now,
        deadline_at=now + _seconds("JOB_TIMEOUT"),
        reader_expires_at=now + _seconds("HOLD_TTL") if reader else None,
        provider=provider,
        pinned_worker_id=pinned_worker_id,
        needs=features.needs_value(request),
    ) for _ in range(n)]
    admitted = None
    with db.begin() as s:
        for job in queued:
            # A second job's rows come after the first one's rate counters, against the lock
            # order, harmlessly: its inserts lock only rows nobody else sees yet (READ COMMITTED
            # takes no gap locks), and the user, key and counter rows it touches are ours already.
            if admit is not None:
                admitted = admit(s, job, now)
            aging_ms = int(current_app.config["PRIORITY_AGING"] * 1000)
            job.rank = int(now.replace(tzinfo=dt.timezone.utc).timestamp() * 1000) - job.priority * aging_ms
            s.add(job)
            if record is not None:
                record(s, job, now)
    return queued, admitted


def _claimable(worker: Worker, models: Sequence[str], image_models: Sequence[str], providers: Sequence[str],
               offered: Sequence[str], now: dt.datetime):
    wanted = [and_(Job.kind == "chat", Job.model.in_(list(models)))] if models else []
    if image_models:
        wanted.append(and_(Job.kind == "image", Job.model.in_(list(image_models))))
    query = select(Job.id).where(
        Job.state == "queued",
        or_(*wanted),
        Job.deadline_at > now,
        # Routing, checked on the rows ix_jobs_claim leads to: a job for a provider only goes
        # to a worker answering to it ("" is any), a pinned job only to its worker.
        Job.provider.in_(["", *providers]),
        or_(Job.pinned_worker_id.is_(None), Job.pinned_worker_id == worker.id),
        # A job that needs a feature (logprobs) only goes to a worker that declared it; a
        # worker with none, the common case, matches needs = "" alone.
        Job.needs.in_(features.claimable_needs(offered)),
    )
    if not worker.shared:
        # Least privilege: a worker sees only its owner's jobs unless an admin shared it.
        query = query.where(Job.user_id == worker.user_id)
    return query.order_by(Job.rank, Job.id)


def _lease_values(worker: Worker, now: dt.datetime) -> dict[str, Any]:
    return {
        "state": "running",
        "worker_id": worker.id,
        "lease_token": secrets.token_urlsafe(24),
        "lease_expires_at": now + _seconds("LEASE_TTL"),
        "attempts": Job.attempts + 1,
        "claimed_at": now,
    }


def claim_jobs(worker: Worker, models: Sequence[str], max_jobs: int, image_models: Sequence[str] = (),
               providers: Sequence[str] = (), offered: Sequence[str] = ()) -> list[Job]:
    """Hand up to max_jobs queued jobs to this worker; exactly one worker wins each job.

    `providers` are the names the worker answers to (routing.provider_names): it gets jobs
    for any provider and jobs for one of these. `offered` are the features it declared in
    this claim (webapp/features.py): it gets jobs that need none of them or only these.
    """
    now = utcnow()
    query = _claimable(worker, models, image_models, providers, offered, now)
    if db.uses_skip_locked():
        won = _claim_skip_locked(query, worker, max_jobs, now)
    else:
        won = _claim_by_swap(query, worker, max_jobs, now)
    if not won:
        return []
    with db.read() as s:
        jobs = s.scalars(select(Job).where(Job.id.in_(won)).order_by(Job.rank, Job.id)).all()
    wake.ring(*(wake.job_topic(j.id) for j in jobs))
    return list(jobs)


@retrying
def _claim_skip_locked(query, worker: Worker, max_jobs: int, now: dt.datetime) -> list[int]:
    with db.begin() as s:
        # SKIP LOCKED: rows another claimer has locked are passed over, not waited on,
        # and the state flip happens in the same short transaction.
        ids = s.scalars(query.limit(max_jobs).with_for_update(skip_locked=True)).all()
        for job_id in ids:
            s.execute(update(Job).where(Job.id == job_id).values(**_lease_values(worker, now)))
        return list(ids)


def _claim_by_swap(query, worker: Worker, max_jobs: int, now: dt.datetime) -> list[int]:
    with db.read() as s:
        # Read candidates without locks; a wide window leaves room to spread out when
        # other claimers win the head of the queue first.
        candidates = list(s.scalars(query.limit(max(16, max_jobs * 8))).all())
    won: list[int] = []
    while candidates and len(won) < max_jobs:
        job_id = candidates.pop(0)
        if _swap(job_id, worker, now):
            won.append(job_id)
        else:
            # Lost a race: others are claiming the same head of the queue. Spread out
            # over the rest instead of queueing behind them on each row's lock.
            random.shuffle(candidates)
    return won


@retrying
def _swap(job_id: int, worker: Worker, now: dt.datetime) -> bool:
    # Compare-and-swap, one row per transaction so no claimer holds two row locks:
    # the UPDATE whose row count is 1 owns the job.
    with db.begin() as s:
        result = s.execute(update(Job).where(Job.id == job_id, Job.state == "queued").values(**_lease_values(worker, now)))
    return result.rowcount == 1


@dataclass
class Report:
    """One job's entry in a worker's chunk report, already validated."""

    public_id: str
    lease: str
    chunks: list[tuple[int, dict[str, Any]]]
    finish: Optional[dict[str, Any]] = None
    error: Optional[dict[str, Any]] = None


@retrying
def apply_report(worker: Worker, report: Report) -> dict[str, Any]:
    """Store one job's chunks and finish, renew its lease, and say whether to stop."""
    now = utcnow()
    rang: list[str] = []
    cap_mb = settings.get("max_answer_mb")
    with db.begin() as s:
        # The row lock serialises a retried report racing the original one.
        job = s.scalar(select(Job).where(Job.public_id == report.public_id).with_for_update())
        verdict = _check_lease(job, worker, report, now)
        if verdict is not None:
            return verdict
        assert job is not None
        gap = too_large = False
        for seq, delta in sorted(report.chunks, key=lambda c: c[0]):
            if seq < job.next_seq:
                continue  # already stored by an earlier try of this report
            if seq > job.next_seq:
                gap = True
                break
            stored = json.dumps(delta, separators=(",", ":"))
            if cap_mb and job.output_bytes + len(stored) > cap_mb * 1_000_000:
                too_large = True
                break
            s.add(Chunk(job_id=job.id, seq=seq, delta_json=stored, created_at=now))
            job.output_bytes += len(stored)
            job.next_seq += 1
            job.first_chunk_at = job.first_chunk_at or now
        job.lease_expires_at = now + _seconds("LEASE_TTL")
        rang.append(wake.job_topic(job.id))
        if too_large:
            # What was stored stays (the client has it); the rest would only fill the disk.
            _fail_or_requeue(s, job, {"code": "answer_too_large", "message": f"The answer passed this site's cap of "
                                      f"{cap_mb} MB per request; the rest was dropped."}, now)
            result = {"id": job.public_id, "ok": False, "next_seq": job.next_seq, "stop": True, "reason": "too_large"}
        elif gap:
            result = {"id": job.public_id, "ok": False, "next_seq": job.next_seq, "stop": False, "reason": "seq_gap"}
        elif report.finish is not None:
            _complete(s, job, report.finish, now)
            result = {"id": job.public_id, "ok": True, "next_seq": job.next_seq, "stop": True, "reason": "finished"}
        elif report.error is not None:
            if _fail_or_requeue(s, job, report.error, now):
                rang.append("jobs")
            result = {"id": job.public_id, "ok": True, "next_seq": job.next_seq, "stop": True, "reason": "finished"}
        else:
            result = {"id": job.public_id, "ok": True, "next_seq": job.next_seq, "stop": False}
    wake.ring(*rang)
    return result


def _check_lease(job: Optional[Job], worker: Worker, report: Report, now: dt.datetime) -> Optional[dict]:
    """Return the answer for a report that may not write, or None when it may."""
    if job is None or job.worker_id != worker.id or job.lease_token != report.lease:
        return {"id": report.public_id, "ok": False, "next_seq": 0, "stop": True, "reason": "lease_lost"}
    base = {"id": job.public_id, "next_seq": job.next_seq, "stop": True}
    if job.state in ("completed", "failed"):
        return {**base, "ok": True, "reason": "finished"}
    if job.state == "cancelled":
        return {**base, "ok": False, "reason": "cancelled"}
    if job.state == "expired" or job.deadline_at <= now:
        if job.state == "running":
            _end(job, "expired", now, "deadline", "The job ran past its deadline.")
            wake.ring(wake.job_topic(job.id))
        return {**base, "ok": False, "reason": "deadline"}
    if job.state != "running":
        return {**base, "ok": False, "next_seq": 0, "reason": "lease_lost"}
    return None


def _end(job: Job, state: str, now: dt.datetime, code: Optional[str] = None, message: Optional[str] = None) -> None:
    job.state = state
    job.finished_at = now
    job.lease_expires_at = None
    if code is not None:
        job.error_code = code
        job.error_message = message


def _complete(s, job: Job, finish: dict[str, Any], now: dt.datetime) -> None:
    _end(job, "completed", now)
    job.finish_reason = finish.get("reason") or "stop"
    usage = finish.get("usage") or {}
    if usage:
        job.prompt_tokens = usage.get("prompt_tokens")
        job.completion_tokens = usage.get("completion_tokens")
        job.usage_source = "worker"
    s.execute(update(Worker).where(Worker.id == job.worker_id).values(jobs_served=Worker.jobs_served + 1))


def _fail_or_requeue(s, job: Job, error: dict[str, Any], now: dt.datetime) -> bool:
    """Fail the job, or queue it again when the worker asks and nothing was streamed."""
    s.execute(update(Worker).where(Worker.id == job.worker_id).values(jobs_failed=Worker.jobs_failed + 1))
    if error.get("retry") and job.next_seq == 0 and job.attempts < current_app.config["JOB_MAX_ATTEMPTS"]:
        _requeue(job)
        return True
    _end(job, "failed", now, error.get("code") or "upstream_error", error.get("message") or "The worker failed.")
    return False


def _requeue(job: Job) -> None:
    job.state = "queued"
    job.worker_id = None
    job.lease_token = None
    job.lease_expires_at = None


@retrying
def release_job(worker: Worker, public_id: str, lease: str) -> dict[str, Any]:
    """Hand a job back: re-queue it if it streamed nothing, else fail it."""
    now = utcnow()
    with db.begin() as s:
        job = s.scalar(select(Job).where(Job.public_id == public_id).with_for_update())
        if job is None or job.worker_id != worker.id or job.lease_token != lease or job.state != "running":
            return {"id": public_id, "ok": False, "state": job.state if job else "unknown"}
        if job.next_seq == 0:
            _requeue(job)
            job.attempts = max(0, job.attempts - 1)  # a clean hand-back is not a fault
        else:
            _end(job, "failed", now, "worker_released", "The worker shut down while answering.")
        state, job_id = job.state, job.id
    wake.ring(wake.job_topic(job_id), *(["jobs"] if state == "queued" else []))
    return {"id": public_id, "ok": True, "state": state}


@retrying
def cancel_job(job_id: int, code: str = "cancelled", message: str = "The client went away.") -> bool:
    """Cancel a job that is not finished yet; its worker is told on its next report."""
    now = utcnow()
    with db.begin() as s:
        result = s.execute(
            update(Job)
            .where(Job.id == job_id, Job.state.in_(("queued", "running")))
            .values(state="cancelled", finished_at=now, error_code=code, error_message=message, lease_expires_at=None)
        )
    wake.ring(wake.job_topic(job_id))
    return result.rowcount == 1


@retrying
def await_resume(job_id: int, grace: float) -> bool:
    """Give a job whose reader left `grace` seconds for a new one before the reaper cancels it.

    Only a job that has a reader expiry gets one: a background job has none and runs on
    whoever reads it or not.
    """
    until = utcnow() + dt.timedelta(seconds=grace)
    with db.begin() as s:
        result = s.execute(
            update(Job)
            .where(Job.id == job_id, Job.state.in_(("queued", "running")), Job.reader_expires_at.isnot(None))
            .values(reader_expires_at=until)
        )
    return result.rowcount == 1


def find_job(public_id: str, user_id: int) -> Optional[Job]:
    """Return the user's job with this public id, or None (another user's job is none of theirs)."""
    with db.read() as s:
        return s.scalar(select(Job).where(Job.public_id == public_id, Job.user_id == user_id))


@retrying
def expire_unclaimed(job_id: int) -> bool:
    """Give up on a job no worker picked up; False if a worker claimed it meanwhile."""
    with db.begin() as s:
        result = s.execute(
            update(Job)
            .where(Job.id == job_id, Job.state == "queued")
            .values(
                state="expired",
                finished_at=utcnow(),
                error_code="no_worker",
                error_message="No worker picked up the request in time.",
            )
        )
    return result.rowcount == 1


@retrying
def expire_job(job_id: int) -> bool:
    """End a job that ran past its deadline."""
    with db.begin() as s:
        result = s.execute(
            update(Job)
            .where(Job.id == job_id, Job.state.in_(("queued", "running")))
            .values(
                state="expired",
                finished_at=utcnow(),
                lease_expires_at=None,
                error_code="deadline",
                error_message="The job ran past its deadline.",
            )
        )
    wake.ring(wake.job_topic(job_id))
    return result.rowcount == 1


def read_progress(job_id: int, from_seq: int) -> tuple[Job, list[Chunk]]:
    """Read a job and its chunks from from_seq on; chunks are fetched only when there are new ones."""
    with db.read() as s:
        job = s.get(Job, job_id)
        chunks: list[Chunk] = []
        if job is not None and job.next_seq > from_seq:
            chunks = list(
                s.scalars(select(Chunk).where(Chunk.job_id == job_id, Chunk.seq >= from_seq).order_by(Chunk.seq))
            )
    # Closing the session ended the read: a snapshot must not outlive one look.
    return job, chunks


def reap_expired(limit: int = 200) -> dict[str, int]:
    """Re-queue or fail jobs whose lease lapsed, cancel jobs nobody reads, expire jobs past their deadline."""
    now = utcnow()
    counts = {"requeued": 0, "failed": 0, "expired": 0, "unread": 0}
    live = Job.state.in_(("queued", "running"))
    with db.read() as s:
        rows = s.execute(
            select(Job.id, Job.lease_token, Job.deadline_at, Job.reader_expires_at)
            .where(
                or_(
                    (Job.state == "running") & (Job.lease_expires_at < now),
                    live & (Job.deadline_at < now),
                    live & (Job.reader_expires_at < now),
                )
            )
            .limit(limit)
        ).all()
    for job_id, lease, deadline, reader in rows:
        outcome = events.contain("reap", f"job {job_id}", _reap_one, job_id, lease, deadline, reader, now)
        if outcome:
            counts[outcome] += 1
    return counts


def _reap_one(job_id: int, lease: Optional[str], deadline: dt.datetime, reader: Optional[dt.datetime],
              now: dt.datetime) -> Optional[str]:
    if deadline < now:
        return "expired" if expire_job(job_id) else None
    if reader is not None and reader < now:
        # The request that relays this job stopped renewing: its process died (or lost the
        # database for longer than HOLD_TTL). Nobody will read the answer; stop the worker.
        gone = cancel_job(job_id, "client_gone", "Nobody is reading the answer any more: its request ended.")
        return "unread" if gone else None
    return _reap_lease(job_id, lease, now)


@retrying
def _reap_lease(job_id: int, lease: Optional[str], now: dt.datetime) -> Optional[str]:
    with db.begin() as s:
        job = s.scalar(select(Job).where(Job.id == job_id).with_for_update())
        # Compare the lease so a report that renewed it meanwhile wins over the reaper.
        if job is None or job.state != "running" or job.lease_token != lease or job.lease_expires_at >= now:
            return None
        worker_id = job.worker_id
        s.execute(update(Worker).where(Worker.id == worker_id).values(jobs_failed=Worker.jobs_failed + 1))
        if job.next_seq == 0 and job.attempts < current_app.config["JOB_MAX_ATTEMPTS"]:
            _requeue(job)
            outcome = "requeued"
        else:
            message = "The worker stopped answering." + (
                " The answer was cut off; it is not repeated by another worker." if job.next_seq else ""
            )
            _end(job, "failed", now, "worker_lost", message)
            job.lease_token = None  # a late report from the lost worker gets lease_lost
            outcome = "failed"
    wake.ring(wake.job_topic(job_id), *(["jobs"] if outcome == "requeued" else []))
    events.record("worker_lost", f"worker {worker_id}",
                  f"job {job_id} {'queued again' if outcome == 'requeued' else 'failed'}: its lease lapsed")
    return outcome

