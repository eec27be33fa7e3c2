"""Batch every running job's output into one POST /worker/v1/chunks at a time."""
from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .backends import StopSignal
from .gateway import Gateway, GatewayBusy, GatewayError, GatewayUnavailable, TokenRejected
from .lease import DEFAULT_LEASE_TTL, heartbeat_interval, retry_cap
from .retry import Backoff, polite_delay

log = logging.getLogger("pollclient")

# The gateway refuses more than 2000 chunks or 4 MB in one report (413); stay well under.
MAX_BATCH_CHUNKS = 500
MAX_BATCH_BYTES = 512 * 1024


@dataclass
class Job:
    """One claimed job: its lease, its output not yet acknowledged, and how it ended."""

    id: str
    lease: str
    model: str
    request: dict[str, Any]
    lease_ttl: float = DEFAULT_LEASE_TTL
    attempt: int = 1
    stop: StopSignal = field(default_factory=StopSignal)
    unacked: list[dict[str, Any]] = field(default_factory=list)  # chunks in seq order
    next_seq: int = 0  # the seq of the next chunk the backend produces
    end: dict[str, Any] | None = None  # {"finish": {...}} or {"error": {...}}
    started: float = field(default_factory=time.monotonic)
    last_report: float = field(default_factory=time.monotonic)  # when the lease was last renewed
    flushed: bool = False  # whether any of this job's output has been sent

    @property
    def pending(self) -> bool:
        """Tell whether the job has something the gateway has not acknowledged."""
        return bool(self.unacked) or self.end is not None


# Called once per job that leaves the table: the job and why ("finished", "cancelled", ...).
DoneCallback = Callable[[Job, str], None]


class Reporter:
    """Hold the running jobs and flush their output to the gateway from one thread."""

    def __init__(self, gateway: Gateway, flush_interval: float, on_done: DoneCallback, on_fatal: Callable[[str], None]):
        self.gateway = gateway
        self.flush_interval = flush_interval
        self.on_done = on_done
        self.on_fatal = on_fatal
        self.cond = threading.Condition()
        self.jobs: dict[str, Job] = {}
        self.accepting = True
        self.closed = False
        self.last_flush = -math.inf  # when output (not a mere heartbeat) was last sent
        self.retry_at = -math.inf
        self.backoff = Backoff(first=0.5, cap=5.0)
        self.max_chunks = MAX_BATCH_CHUNKS
        self.max_bytes = MAX_BATCH_BYTES
        self.failing = False

    # -- called by the job threads and the claim loop -------------------------------

    def add(self, job: Job) -> bool:
        """Start tracking a claimed job; refuse it once shutdown has begun."""
        with self.cond:
            if not self.accepting:
                return False
            self.jobs[job.id] = job
            self.cond.notify_all()
            return True

    def push(self, job: Job, delta: dict[str, Any]) -> bool:
        """Queue one delta for the gateway; return False when the job was stopped."""
        with self.cond:
            if self.jobs.get(job.id) is not job or job.stop.is_set():
                return False
            job.unacked.append({"seq": job.next_seq, "delta": delta})
            job.next_seq += 1
            self.cond.notify_all()
            return True

    def finish(self, job: Job, end: dict[str, Any]) -> None:
        """Queue the job's finish or error; the job leaves once the gateway confirms it."""
        with self.cond:
            if self.jobs.get(job.id) is job:
                job.end = end
                self.cond.notify_all()

    def running(self) -> int:
        """Count the jobs the worker still holds."""
        with self.cond:
            return len(self.jobs)

    def wait_for_slot(self, capacity: int, timeout: float) -> int:
        """Wait until fewer than capacity jobs run (or timeout); return the free slots."""
        with self.cond:
            self.cond.wait_for(lambda: len(self.jobs) < capacity or not self.accepting, timeout)
            return max(0, capacity - len(self.jobs))

    def stop_accepting(self) -> None:
        """Refuse new jobs from now on: the worker is shutting down."""
        with self.cond:
            self.accepting = False
            self.cond.notify_all()

    def take_all(self) -> list[Job]:
        """Stop every job still held and forget it, to release it to the gateway."""
        with self.cond:
            jobs = list(self.jobs.values())
            self.jobs.clear()
            self.cond.notify_all()
        for job in jobs:
            job.stop.set()
        return jobs

    def close(self) -> None:
        """Make the flush loop return."""
        with self.cond:
            self.closed = True
            self.cond.notify_all()

    # -- the flush thread ----------------------------------------------------------

    def loop(self) -> None:
        """Flush until closed: output at most every flush_interval, heartbeats as the lease asks (lease.py)."""
        while True:
            with self.cond:
                while not self.closed:
                    now = time.monotonic()
                    due = self._next_due()
                    if due <= now:
                        break
                    self.cond.wait(None if due == math.inf else due - now)
                if self.closed:
                    return
                now = time.monotonic()
                entries = self._take_batch(now)
                for entry in entries:
                    if entry["chunks"] or "finish" in entry or "error" in entry:
                        self.jobs[entry["id"]].flushed = True
                        self.last_flush = now  # heartbeats alone do not delay the next output
            if entries:
                self._send(entries)

    def _next_due(self) -> float:
        """Return when the next report is due: leading edge for output, then throttled."""
        due = math.inf
        for job in self.jobs.values():
            if job.pending:
                # A job's first delta goes at once: it is the client's time to first token,
                # and must not wait out another job's interval. After that, output from
                # every job is batched into one report per flush_interval (the first delta
                # after a quiet spell still goes at once, as last_flush is old by then).
                due = min(due, self.last_flush + self.flush_interval if job.flushed else -math.inf)
            due = min(due, job.last_report + heartbeat_interval(job.lease_ttl))
        return max(due, self.retry_at)

    def _take_batch(self, now: float) -> list[dict[str, Any]]:
        """Build the report entries: each job's unacknowledged chunks, a prefix if the batch is full."""
        entries = []
        chunks_left, bytes_left = self.max_chunks, self.max_bytes
        for job in self.jobs.values():
            # Renew leases that are half-way to the next heartbeat while a report goes anyway.
            if not job.pending and now - job.last_report < heartbeat_interval(job.lease_ttl) / 2:
                continue
            chunks = []
            for chunk in job.unacked:
                size = len(json.dumps(chunk))
                if chunks_left <= 0 or (size > bytes_left and chunks_left < self.max_chunks):
                    break
                chunks.append(chunk)
                chunks_left -= 1
                bytes_left -= size
            entry: dict[str, Any] = {"id": job.id, "lease": job.lease, "chunks": chunks}
            if job.end is not None and len(chunks) == len(job.unacked):
                entry.update(job.end)
            entries.append(entry)
        return entries

    def _send(self, entries: list[dict[str, Any]]) -> None:
        sent_at = time.monotonic()
        # One report speaks for every job in it: time it by the shortest lease.
        ttl = self._shortest_ttl()
        try:
            results = self.gateway.report(entries, ttl)
        except TokenRejected as exc:
            self.on_fatal(f"the gateway refused the worker token: {exc}")
            self._retry_later(5.0)
            return
        except GatewayBusy as exc:
            # Waiting out a long Retry-After would let the leases lapse: try again within
            # the lease's retry cap, and say so.
            delay = polite_delay(exc.retry_after, cap=retry_cap(ttl))
            self._note_failure(
                f"{exc.reason} ({exc}); it asks for {exc.retry_after:.0f} s, "
                f"but reports are retried every {delay:.1f} s to keep the leases"
            )
            self._retry_later(delay)
            return
        except GatewayUnavailable as exc:
            self._note_failure(f"cannot send output to the gateway: {exc}; retrying")
            self._retry_later(self.backoff.next(cap=retry_cap(ttl)))
            return
        except GatewayError as exc:
            self._reject(entries, exc)
            return
        if self.failing:
            log.info("reports reach the gateway again")
        self.failing = False
        self.backoff.reset()
        self._apply(entries, results, sent_at)

    def _apply(self, entries: list[dict[str, Any]], results: list[dict[str, Any]], sent_at: float) -> None:
        by_id = {r["id"]: r for r in results if isinstance(r, dict) and isinstance(r.get("id"), str)}
        done: list[tuple[Job, str]] = []
        with self.cond:
            self.retry_at = -math.inf
            for entry in entries:
                job = self.jobs.get(entry["id"])
                result = by_id.get(entry["id"])
                if job is None or job.lease != entry["lease"]:
                    continue  # released or dropped while the report was on its way
                if result is None:
                    log.warning("job %s: the gateway's answer did not mention it", job.id)
                    continue
                next_seq = result.get("next_seq")
                if result.get("stop"):
                    done.append((self._drop(job), str(result.get("reason") or "stopped")))
                elif result.get("ok"):
                    _ack(job, next_seq)
                    job.last_report = sent_at
                elif result.get("reason") == "seq_gap" and isinstance(next_seq, int):
                    # Resend from what the gateway expects; the next flush picks it up.
                    _ack(job, next_seq)
                    if (job.unacked[0]["seq"] if job.unacked else job.next_seq) != next_seq:
                        log.error("job %s: the gateway wants chunk %d, no longer held; dropping it", job.id, next_seq)
                        done.append((self._drop(job), "seq_lost"))
                else:
                    log.warning("job %s: unexpected report answer %s; dropping it", job.id, result)
                    done.append((self._drop(job), "rejected"))
            self.cond.notify_all()
        for job, reason in done:
            self.on_done(job, reason)

    def _reject(self, entries: list[dict[str, Any]], exc: GatewayError) -> None:
        """Handle a whole-report refusal (400, 413): nothing in it was stored."""
        chunks = sum(len(e["chunks"]) for e in entries)
        if exc.status == 413 and chunks > 1:
            self.max_chunks = max(1, min(self.max_chunks, chunks) // 2)
            self.max_bytes = max(1024, self.max_bytes // 2)
            log.warning("the gateway found a report too large; sending at most %d chunks at a time", self.max_chunks)
            return
        # Sending the same body again would fail the same way: give these jobs up, and after a
        # 400 tell their clients why at once rather than when the leases lapse.
        log.error("the gateway refused a report, so %d job(s) fail: %s", len(entries), exc)
        with self.cond:
            jobs = [self._drop(job) for job in (self.jobs.get(entry["id"]) for entry in entries) if job is not None]
            self.cond.notify_all()
        reasons = self._fail_refused(jobs, exc) if exc.status == 400 and jobs else {}
        for job in jobs:
            self.on_done(job, reasons.get(job.id, "rejected"))

    def _fail_refused(self, jobs: list[Job], exc: GatewayError) -> dict[str, str]:
        """Fail jobs whose report got a 400 with one error-only report each; return the gateway's reason per job."""
        # Sent once, outside the flush loop: if this report fails too, the leases lapse as before.
        message = f"The worker's output was refused by the gateway: {exc.detail}"
        error = {"code": "invalid_output", "message": message[:2000], "retry": False}
        for job in jobs:
            job.end = {"error": error}
        try:
            results = self.gateway.report(
                [{"id": job.id, "lease": job.lease, "error": error} for job in jobs], min(j.lease_ttl for j in jobs)
            )
        except GatewayError as failure:
            log.error("could not fail the refused job(s) at the gateway either: %s", failure)
            return {}
        answered = [r for r in results if isinstance(r, dict) and isinstance(r.get("id"), str)]
        return {r["id"]: str(r.get("reason") or "rejected") for r in answered}

    def _drop(self, job: Job) -> Job:
        """Forget a job and stop its backend (the caller holds the lock)."""
        del self.jobs[job.id]
        job.stop.set()
        return job

    def _note_failure(self, message: str) -> None:
        if not self.failing:
            log.warning(message)
        else:
            log.debug(message)
        self.failing = True

    def _retry_later(self, delay: float) -> None:
        with self.cond:
            self.retry_at = time.monotonic() + delay

    def _shortest_ttl(self) -> float:
        with self.cond:
            return min((job.lease_ttl for job in self.jobs.values()), default=DEFAULT_LEASE_TTL)


def _ack(job: Job, next_seq: Any) -> None:
    """Drop the chunks the gateway has stored: every seq below next_seq."""
    if isinstance(next_seq, int) and not isinstance(next_seq, bool):
        job.unacked = [chunk for chunk in job.unacked if chunk["seq"] >= next_seq]
