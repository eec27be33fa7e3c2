"""Load: streamed throughput through pollclient workers, and racing claims for double claims."""
from __future__ import annotations

import collections
import contextlib
import json
import os
import random
import threading
import time
from typing import Any, Optional

import requests

import cpu
from latency import stage_row
from profile import Profile
from stack import PYTHON, Site, Stack, utcnow
from stats import Row, ms, spread_ms

HERE = os.path.dirname(os.path.abspath(__file__))


def run_throughput(stack: Stack, workers: int, slots: int, clients: int, seconds: float, warmup: float,
                   procs: int) -> list[Row]:
    """Drive `clients` streaming threads at `workers` echo pollclients for warmup + seconds."""
    site = stack.new_site("throughput")
    base = stack.start_gateway(site)
    since = utcnow()
    for i, token in enumerate(site.worker_tokens(workers)):
        stack.start_pollclient(site, base, token, f"pollclient-{i}", "--max-concurrent", str(slots))
    stack.wait_workers(site, workers, since, timeout=90)
    time.sleep(1.0)
    records, (measure_from, stop_at), watch = drive(stack, base, site.key, clients, procs, warmup, seconds,
                                                    site.instance, REQUEST_COUNTERS)
    stack.stop_named("pollclient")
    stack.stop_gateway()
    rows = throughput_rows(records, measure_from, stop_at, clients, workers, slots)
    rows.append(stage_row(site, [(r["start"], r["first"], r["id"]) for r in records
                                 if measure_from <= r["end"] <= stop_at and r["id"]], "  TTFT stages"))
    rows.append(Row("  CPU in cores", watch.cpu_used))
    done = sum(1 for r in records if measure_from <= r["end"] <= stop_at and not r["error"])
    if watch.server and done:
        print("  server, per completed request: " + ", ".join(f"{k} {v / done:.1f}" for k, v in watch.server.items()))
        rows.append(Row("  server questions per request", f"{watch.server['Questions'] / done:.1f} "
                        f"(+{watch.server['Com_admin_commands'] / done:.1f} pings)"))
    return rows


def drive(stack: Stack, base: str, key: str, clients: int, procs: int, warmup: float, seconds: float, folder: str,
          counters: tuple[str, ...], *extra: str, grace: float = 90,
          profile: Optional[Profile] = None) -> tuple[list[dict[str, Any]], tuple[float, float], "Watch"]:
    """Run `clients` threads in `procs` client processes over a warm-up and a window (clients.py
    options in `extra`), waiting up to `grace` s past it for their last requests; return every
    request's record, the window and what was watched over it (and `profile` sampled it)."""
    start_at = time.time() + 3.0  # the client processes import openai meanwhile
    measure_from, stop_at = start_at + warmup, start_at + warmup + seconds
    outs = []
    for p in range(procs):
        share = clients // procs + (p < clients % procs)
        out = os.path.join(folder, f"clients-{p}.json")
        outs.append(out)
        stack.spawn(f"clients-{p}", [PYTHON, os.path.join(HERE, "clients.py"), "--base", base,
                                     "--threads", str(share), "--start-at", str(start_at),
                                     "--stop-at", str(stop_at), "--out", out, *extra],
                    {**os.environ, "BENCH_API_KEY": key})
    time.sleep(max(0.0, measure_from - time.time()))
    with Watch(stack, counters, "over the window") as watch, profile or contextlib.nullcontext():
        time.sleep(max(0.0, stop_at - time.time()))
    wait_named(stack, "clients-", stop_at + grace)
    records: list[dict[str, Any]] = []
    for out in outs:
        with open(out) as f:
            records += json.load(f)
    return records, (measure_from, stop_at), watch


# MariaDB counters that tell what a request or a claim costs the server (COM_PING is an admin command).
REQUEST_COUNTERS = ("Questions", "Com_select", "Com_insert", "Com_update", "Com_commit", "Com_rollback",
                    "Com_admin_commands")
CLAIM_COUNTERS = ("Com_select", "Com_update", "Com_commit", "Com_rollback", "Innodb_row_lock_waits",
                  "Innodb_row_lock_time")


class Watch:
    """Measure CPU per process group, and MariaDB counters, over a with-block; print the CPU."""

    def __init__(self, stack: Stack, counters: tuple[str, ...], label: str) -> None:
        self.stack = stack
        self.counters = counters if stack.mariadb is not None else ()
        self.label = label
        self.groups = stack.cpu_groups()
        self.server: dict[str, int] = {}
        self.cpu_used = ""

    def __enter__(self) -> "Watch":
        self.cpu = cpu.sample(self.groups)
        self.server = self.stack.status(*self.counters) if self.counters else {}
        self.started = time.monotonic()
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is not None:
            return  # interrupted: a partial window says nothing
        self.cpu_used = cpu.share(self.cpu, cpu.sample(self.groups), time.monotonic() - self.started)
        print(f"  CPU in cores {self.label}: {self.cpu_used}")
        if self.counters:
            after = self.stack.status(*self.counters)
            self.server = {k: after[k] - self.server[k] for k in self.counters}


def wait_named(stack: Stack, prefix: str, until: float) -> None:
    """Wait for tracked processes to exit by themselves, up to a wall-clock moment."""
    for name, proc in [(n, p) for n, p in stack.procs if n.startswith(prefix)]:
        proc.wait(timeout=max(1.0, until - time.time()))
        if proc.returncode != 0:
            raise RuntimeError(f"{name} failed; see {stack.dir}/{name}.log")
    stack.stop_named(prefix)


def in_window(records: list[dict[str, Any]], t0: float, t1: float) -> tuple[list[dict], list[dict], dict[str, float]]:
    """Return the requests that succeeded inside [t0, t1], every failed one, and the successes' latency spread."""
    ok = [r for r in records if t0 <= r["end"] <= t1 and r["error"] is None]
    errors = [r for r in records if r["error"]]
    return ok, errors, spread_ms([r["end"] - r["start"] for r in ok])


def throughput_rows(records: list[dict[str, Any]], t0: float, t1: float, clients: int, workers: int,
                    slots: int) -> list[Row]:
    """Count what finished inside the window; errors count over the whole run."""
    ok, errors, latency = in_window(records, t0, t1)
    span = t1 - t0
    first = spread_ms([r["first"] - r["start"] for r in ok if r["first"]])
    print(f"  throughput, {clients} client threads on {workers}x{slots} slots, {span:.0f} s window: "
          f"{len(ok)} ok, {len(errors)} errors in {len(records)} requests; latency {ms(latency['p50'])} p50, "
          f"{ms(latency['p99'])} p99; first token {ms(first['p50'])} p50, {ms(first['p99'])} p99")
    for message, n in collections.Counter(r["error"] for r in errors).most_common(3):
        print(f"    {n}x {message}")
    label = f"{workers}x{slots} slots, {clients} clients"
    return [
        Row(f"throughput ({label})", f"{len(ok) / span:.1f} req/s"),
        Row("  chunks relayed", f"{sum(r['chunks'] for r in ok) / span:.0f} chunks/s"),
        Row("  errors", f"{len(errors)} of {len(records)}", "0", not errors),
        Row("  latency p50 / p99", f"{ms(latency['p50'])} / {ms(latency['p99'])}"),
    ]


def run_claims(stack: Stack, paths: list[str], jobs: int, claimers: int) -> list[Row]:
    """Race claimers over queued jobs on each claim path, each on a fresh database and gateway."""
    return [row for path in paths for row in claims_on(stack, path, jobs, claimers)]


def claims_on(stack: Stack, path: str, jobs: int, claimers: int) -> list[Row]:
    """Queue jobs, race the claimers for them through the gateway and check nothing went twice."""
    site = stack.new_site(f"claims-{path}")
    base = stack.start_gateway(site, {"POLLGATE_CLAIM_PATH": path})
    tokens = site.worker_tokens(claimers)
    queue_jobs(site, jobs)
    race = Race(base, tokens, jobs)
    with Watch(stack, CLAIM_COUNTERS, "during the race") as watch:
        race.run()
    if watch.server:
        print("  server: " + ", ".join(f"{k} {v}" for k, v in watch.server.items()))
    doubles, unclaimed = check_claims(site, race.claimed)
    stack.stop_gateway()
    rate = len({c[0] for c in race.claimed}) / race.wall if race.wall else 0.0
    print(f"  claims, {path}: {len(race.claimed)} claimed by {claimers} workers in {race.wall:.2f} s "
          f"({rate:.0f}/s), {race.calls} calls, {doubles} double, {unclaimed} left queued, "
          f"errors {dict(race.errors) or 0}")
    rows = [
        Row(f"claims {path}: double claims", str(doubles), "0", doubles == 0),
        Row(f"claims {path}: {jobs} jobs", f"{race.wall:.2f} s, {rate:.0f} claims/s, {race.calls} claim calls"),
        Row(f"claims {path}: CPU in cores", watch.cpu_used),
    ]
    if race.errors or unclaimed:
        failed = f"{sum(race.errors.values())} / {unclaimed}"
        rows.append(Row(f"claims {path}: errors / unclaimed", failed, "0 / 0", False))
    return rows


def queue_jobs(site: Site, count: int) -> None:
    """Queue jobs with the gateway's own submit_job, in-process on the shared database."""
    from webapp import jobs

    uid = site.user_id()
    with site.flask_app().app_context():
        for i in range(count):
            request = {"model": "bench-claim", "messages": [{"role": "user", "content": f"job {i}"}]}
            jobs.submit_job(uid, None, "bench-claim", request, stream=False)


class Race:
    """Claimer threads, one token each, released together; they stop once every job is taken."""

    def __init__(self, base: str, tokens: list[str], total: int, limit: float = 60.0) -> None:
        self.base = base
        self.tokens = tokens
        self.total = total
        self.limit = limit
        self.lock = threading.Lock()
        self.claimed: list[tuple[str, int, str]] = []  # (job id, worker id, lease)
        self.errors: collections.Counter = collections.Counter()
        self.calls = 0
        self.done = threading.Event()
        self.barrier = threading.Barrier(len(tokens) + 1)
        self.wall = 0.0

    def run(self) -> None:
        """Start the claimers, release them at once and time until the last job is claimed."""
        threads = [threading.Thread(target=self._claimer, args=(i, t), daemon=True) for i, t in enumerate(self.tokens)]
        for t in threads:
            t.start()
        self.barrier.wait(timeout=60)
        started = time.monotonic()
        self.done.wait(self.limit)
        self.wall = time.monotonic() - started
        self.done.set()
        for t in threads:
            t.join(timeout=35)

    def _claimer(self, index: int, token: str) -> None:
        rng = random.Random(index)
        session = requests.Session()
        session.headers["Authorization"] = f"Bearer {token}"
        url = f"{self.base}/worker/v1/claim"
        # Open the connection before the start, so the race measures claims, not TCP setup.
        session.post(url, json={"models": ["bench-warm"], "max_jobs": 1, "wait": 0}, timeout=30)
        self.barrier.wait(timeout=60)
        while not self.done.is_set():
            body = {"models": ["bench-claim"], "max_jobs": rng.randint(1, 4), "wait": 0,
                    "kind": "bench", "version": "1"}
            try:
                answer = session.post(url, json=body, timeout=30)
            except requests.RequestException as err:
                self._error(type(err).__name__)
                continue
            if answer.status_code in (429, 503):
                self._error(f"HTTP {answer.status_code}")
                time.sleep(min(2.0, float(answer.headers.get("Retry-After") or 1)))
                continue
            if not answer.ok:
                self._error(f"HTTP {answer.status_code}")
                continue
            data = answer.json()
            with self.lock:
                self.calls += 1
                self.claimed += [(j["id"], data["worker"]["id"], j["lease"]) for j in data["jobs"]]
                if len(self.claimed) >= self.total:
                    self.done.set()
        session.close()

    def _error(self, kind: str) -> None:
        with self.lock:
            self.errors[kind] += 1
        time.sleep(0.05)  # an error must not become a hot loop


def check_claims(site: Site, claimed: list[tuple[str, int, str]]) -> tuple[int, int]:
    """Count jobs handed out twice (by the answers and by the database) and jobs left queued."""
    from sqlalchemy import select

    from webapp.models import Job

    with site.reader() as s:
        rows = {r.public_id: r for r in s.execute(
            select(Job.public_id, Job.state, Job.worker_id, Job.lease_token, Job.attempts)
            .where(Job.model == "bench-claim")
        )}
    per_job = collections.Counter(job_id for job_id, _, _ in claimed)
    doubles = sum(n - 1 for n in per_job.values())
    # A claimer whose lease is not the one stored lost the job to someone: also a double claim.
    stale = sum(1 for job_id, worker, lease in claimed
                if (rows[job_id].worker_id, rows[job_id].lease_token) != (worker, lease))
    retried = sum(1 for r in rows.values() if r.attempts > 1)
    unclaimed = sum(1 for r in rows.values() if r.state == "queued")
    return max(doubles, stale, retried), unclaimed
