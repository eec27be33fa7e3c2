"""The worker loop: claim while slots are free, run each job in a thread, drain on shutdown."""
from __future__ import annotations

import argparse
import logging
import signal
import threading
import time
from typing import Any

from .backends import BACKENDS, FEATURES, BackendConfig, BackendError
from .gateway import Gateway, GatewayBusy, GatewayError, GatewayUnavailable, TokenRejected
from .lease import lease_ttl
from .reporter import Job, Reporter
from .retry import Backoff, polite_delay

log = logging.getLogger("pollclient")

STATUS_EVERY = 60.0  # seconds between "running 2/4, served 10, failed 0" lines
TICK = 0.1  # how often the main thread looks at its flags
MAX_JOBS_PER_CLAIM = 32  # the protocol's limit on max_jobs
SUPERSEDED_PAUSE = 5.0  # seconds to yield when another process polls with our token


class Worker:
    """One worker process: a claim thread, a report thread and one thread per running job."""

    def __init__(self, settings: argparse.Namespace, gateway: Gateway, config: BackendConfig) -> None:
        self.settings = settings
        self.gateway = gateway
        self.config = config
        self.backend = BACKENDS[settings.backend]
        self.capacity: int = settings.max_concurrent
        self.reporter = Reporter(gateway, settings.flush_interval, self._job_done, self._fatal)
        self.stopping = threading.Event()  # no more claims
        self.signals = 0  # only ever incremented by the signal handler, which must not take locks
        self.exit_code = 0
        self.claimed = 0
        self.claim_in_flight = False
        self.claim_state = "starting"  # then connected, busy:<code> or unreachable: logged when it changes
        self.claim_backoff = Backoff(first=1.0, cap=30.0)
        self.ever_connected = False
        self.counts = {"served": 0, "failed": 0, "stopped": 0}
        self.counts_lock = threading.Lock()

    def run(self) -> int:
        """Serve jobs until a signal, a fatal error or --max-jobs; return the exit status."""
        self._install_signal_handlers()
        log.info(
            "pollclient starting: gateway %s, backend %s, models %s, capacity %d",
            self.gateway.base_url, self.settings.backend, ", ".join(self.settings.models), self.capacity,
        )
        flusher = self._start_thread(self.reporter.loop, "reporter")
        poller = self._start_thread(self._claim_loop, "claim")
        next_status = time.monotonic() + STATUS_EVERY
        while not self.signals and not self.stopping.is_set() and not self._all_done():
            time.sleep(TICK)
            if time.monotonic() >= next_status:
                next_status += STATUS_EVERY
                log.info("status: %s", self.status())
        self.stopping.set()
        self.reporter.stop_accepting()
        if self.exit_code:
            self.reporter.take_all()  # the gateway refused us: nothing can be reported or released
        else:
            self._drain()
        self.reporter.close()
        flusher.join(timeout=2)
        # The claim thread may be releasing jobs that came in late: wait for that, but not
        # for a long-poll still open past the drain (its job returns to the queue when the
        # lease expires).
        deadline = time.monotonic() + 20
        while poller.is_alive() and not self.claim_in_flight and time.monotonic() < deadline:
            poller.join(TICK)
        log.info("pollclient stopped: %s", self.status())
        return self.exit_code

    def _start_thread(self, target: Any, name: str) -> threading.Thread:
        """Start a daemon thread whose crash stops the worker instead of leaving it stuck."""

        def guarded() -> None:
            try:
                target()
            except Exception:
                log.exception("internal error in the %s thread", name)
                self._fatal(f"pollclient stopped after an internal error in its {name} thread")

        thread = threading.Thread(target=guarded, name=name, daemon=True)
        thread.start()
        return thread

    def status(self) -> str:
        """Summarize the work so far in one short line."""
        with self.counts_lock:
            counts = dict(self.counts)
        line = f"running {self.reporter.running()}/{self.capacity}"
        line += f", served {counts['served']}, failed {counts['failed']}"
        return line + (f", stopped by the gateway {counts['stopped']}" if counts["stopped"] else "")

    def _all_done(self) -> bool:
        limit = self.settings.max_jobs
        return bool(limit) and self.claimed >= limit and self.reporter.running() == 0

    # -- shutdown --------------------------------------------------------------------

    def _install_signal_handlers(self) -> None:
        try:
            signal.signal(signal.SIGINT, self._on_signal)
            signal.signal(signal.SIGTERM, self._on_signal)
        except ValueError:
            pass  # not the main thread (tests): shutdown comes from elsewhere

    def _on_signal(self, signum: int, frame: Any) -> None:
        # Runs between two bytecodes of the main thread: taking a lock or logging here could
        # deadlock with the code it interrupted, so only count; the main loop does the rest.
        self.signals += 1
        if self.signals >= 3:
            raise SystemExit(130)

    def _drain(self) -> None:
        """Let running jobs finish and the open claim return, for up to --drain-timeout; release the rest."""
        running = self.reporter.running()
        if running:
            log.info(
                "shutting down: letting %d running job(s) finish, up to %g s (Ctrl-C again to release them now)",
                running, self.settings.drain_timeout,
            )
        elif self.claim_in_flight:
            # A job the gateway hands to an abandoned long-poll would wait for its lease to expire.
            log.info("shutting down: waiting for the open claim to return (Ctrl-C again to quit now)")
        else:
            log.info("shutting down")
        deadline = time.monotonic() + self.settings.drain_timeout
        while (
            (self.reporter.running() or self.claim_in_flight)
            and time.monotonic() < deadline and self.signals < 2 and not self.exit_code
        ):
            time.sleep(TICK)
        leftover = self.reporter.take_all()
        if leftover:
            self._release(leftover)

    def _release(self, jobs: list[Job]) -> None:
        """Hand jobs back to the gateway so another worker can take them."""
        try:
            ttl = min(job.lease_ttl for job in jobs)
            results = self.gateway.release([{"id": job.id, "lease": job.lease} for job in jobs], ttl)
        except GatewayError as exc:
            log.warning(
                "could not release %d job(s): %s (the gateway takes them back when their leases expire)", len(jobs), exc
            )
            return
        states = {r.get("id"): r.get("state") or r.get("reason") or "?" for r in results if isinstance(r, dict)}
        log.info("released %d job(s): %s", len(jobs), ", ".join(f"{j.id} ({states.get(j.id, '?')})" for j in jobs))

    def _fatal(self, message: str) -> None:
        """Stop the worker with exit status 1 after a problem retrying cannot fix."""
        if not self.exit_code:
            log.error(message)
            self.exit_code = 1
        self.stopping.set()

    # -- claiming --------------------------------------------------------------------

    def _claim_loop(self) -> None:
        """Hold one long-poll open while slots are free, until shutdown or --max-jobs."""
        while True:
            free = self._free_slots()
            if free is None:
                return
            if free == 0:
                continue  # every slot busy: no poll until one frees
            answer = self._claim(free)
            if answer is not None:
                self._start_jobs(answer)

    def _free_slots(self) -> int | None:
        """Wait up to a second for a free slot; return how many, or None when claiming is over."""
        if self.stopping.is_set():
            return None
        free = self.reporter.wait_for_slot(self.capacity, timeout=1.0)
        if self.settings.max_jobs:
            left = self.settings.max_jobs - self.claimed
            if left <= 0:
                return None
            free = min(free, left)
        return free

    def _claim(self, free: int) -> dict[str, Any] | None:
        """Make one claim; on a failure log the change of state, wait as told and return None."""
        # Raise the flag before looking at `stopping` (the drain reads them the other way
        # round), so a shutdown either prevents this claim or waits for its answer.
        self.claim_in_flight = True
        if self.stopping.is_set():
            self.claim_in_flight = False
            return None
        # Until a claim succeeds, ask for an answer at once: the user sees "connected" (or
        # the error) now rather than after a whole idle long-poll.
        wait = self.settings.poll_wait if self.claim_state == "connected" else 0
        try:
            answer = self.gateway.claim(self.settings.models, min(free, MAX_JOBS_PER_CLAIM), self.capacity, wait,
                                        FEATURES[self.settings.backend])
        except TokenRejected as exc:
            self._fatal(f"the gateway refused the worker token: {exc}")
            return None
        except GatewayBusy as exc:
            delay = polite_delay(exc.retry_after)
            if self.claim_state != f"busy:{exc.code}":
                log.warning("%s (%s); waiting %.0f s between tries, as it asks", exc.reason, exc, delay)
            log.debug("next claim in %.1f s (Retry-After: %.0f s)", delay, exc.retry_after)
            self.claim_state = f"busy:{exc.code}"
            self.stopping.wait(delay)
            return None
        except GatewayUnavailable as exc:
            delay = self.claim_backoff.next()
            if self.claim_state != "unreachable":
                if exc.status:  # it answered, with a 5xx or something that is not JSON
                    log.warning("the gateway at %s failed: %s; retrying with backoff", self.gateway.base_url, exc)
                else:
                    log.warning("cannot reach the gateway at %s: %s; retrying with backoff", self.gateway.base_url, exc)
            log.debug("next claim in %.1f s", delay)
            self.claim_state = "unreachable"
            self.stopping.wait(delay)
            return None
        except GatewayError as exc:
            self._fatal(f"the gateway refused the claim: {exc} (check --api-url and --models)")
            return None
        finally:
            self.claim_in_flight = False
        self.claim_backoff.reset()
        if self.claim_state != "connected":
            self._log_connected(answer, again=self.ever_connected)
            self.claim_state, self.ever_connected = "connected", True
        if answer.get("superseded"):
            # Another process claimed with this token and retired our poll; claiming again
            # at once would retire theirs in turn, back and forth.
            log.warning("another process is using this worker token; give each worker its own token")
            self.stopping.wait(SUPERSEDED_PAUSE)
        return answer

    def _log_connected(self, answer: dict[str, Any], again: bool) -> None:
        worker = answer.get("worker")
        if not isinstance(worker, dict):
            worker = {}
        log.info(
            "%s %s as worker %s (id %s); serving %s; capacity %d",
            "reconnected to" if again else "connected to", self.gateway.base_url,
            worker.get("name", "?"), worker.get("id", "?"), ", ".join(self.settings.models), self.capacity,
        )

    def _start_jobs(self, answer: dict[str, Any]) -> None:
        """Start a thread per claimed job; release at once the jobs that came after shutdown began."""
        late = []
        for entry in answer.get("jobs") or []:
            job = _job_from(entry, answer)
            if job is None:
                log.warning("ignoring a malformed job from the gateway: %.200r", entry)
                continue
            if not self.reporter.add(job):
                late.append(job)
                continue
            self.claimed += 1
            log.info("job %s started: model %s, attempt %d", job.id, job.model, job.attempt)
            threading.Thread(target=self._run_job, args=(job,), name=f"job-{job.id[-8:]}", daemon=True).start()
        if late:
            log.info("shutting down: releasing %d job(s) claimed meanwhile", len(late))
            self._release(late)

    # -- one job ---------------------------------------------------------------------

    def _run_job(self, job: Job) -> None:
        """Feed the backend's events to the reporter until the job ends or is stopped."""
        events = self.backend(job.request, self.config, job.stop)
        end: dict[str, Any] | None = None
        try:
            for event in events:
                if "delta" in event:
                    if not self.reporter.push(job, event["delta"]):
                        break  # the gateway said stop
                elif "finish" in event:
                    end = {"finish": event["finish"]}
                    break
        except BackendError as exc:
            end = {"error": exc.as_report()}
        except Exception as exc:  # a bug in a backend must fail the job, not kill the worker
            log.exception("job %s: the %s backend crashed", job.id, self.settings.backend)
            message = f"worker error: {type(exc).__name__}"
            end = {"error": {"code": "upstream_error", "message": message, "retry": job.next_seq == 0}}
        finally:
            events.close()
        if not job.stop.is_set():
            self.reporter.finish(job, end or {"finish": {"reason": "stop"}})

    def _job_done(self, job: Job, reason: str) -> None:
        """Log how a job ended and count it (called once the gateway has the last word)."""
        seconds = time.monotonic() - job.started
        error = (job.end or {}).get("error")
        if reason == "finished" and job.end and not error:
            outcome = "served"
            finish = job.end["finish"]
            log.info(
                "job %s finished: model %s, %d chunks, %.2f s, %s",
                job.id, job.model, job.next_seq, seconds, finish.get("reason", "stop"),
            )
        elif reason == "finished" and error:
            outcome = "failed"
            log.warning(
                "job %s failed after %.2f s: %s: %s%s", job.id, seconds, error.get("code"), error.get("message"),
                " (the gateway may give it to another worker)" if error.get("retry") and job.next_seq == 0 else "",
            )
        elif reason in ("cancelled", "deadline", "lease_lost", "finished"):
            outcome = "stopped"
            log.info(
                "job %s stopped by the gateway (%s) after %.2f s, %d chunks", job.id, reason, seconds, job.next_seq
            )
        else:
            outcome = "failed"
            log.warning("job %s dropped after %.2f s (%s)", job.id, seconds, reason)
        with self.counts_lock:
            self.counts[outcome] += 1


def _job_from(entry: Any, answer: dict[str, Any]) -> Job | None:
    """Build a Job from one entry of a claim answer, or None when it lacks what a report needs."""
    if not isinstance(entry, dict) or not isinstance(entry.get("id"), str) or not isinstance(entry.get("lease"), str):
        return None
    request = entry.get("request")
    if not isinstance(request, dict):
        request = {}
    attempt = entry.get("attempt")
    return Job(
        id=entry["id"],
        lease=entry["lease"],
        model=str(entry.get("model") or request.get("model") or "?"),
        request=request,
        # The answer's own lease_ttl, where the gateway sends one, speaks for all its jobs.
        lease_ttl=lease_ttl(answer, entry),
        attempt=attempt if isinstance(attempt, int) else 1,
    )
