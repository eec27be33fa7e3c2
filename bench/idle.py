"""Idle cost: database queries per second with nothing, one idle worker, or one idle stream."""
from __future__ import annotations

import os
import shutil
import threading
import time
from typing import Any

import requests

from latency import openai_client
from stack import Site, Stack, utcnow
from stats import Row

# A held job must neither expire nor need heartbeats while it is watched.
IDLE_ENV = {"POLLGATE_LEASE_TTL": "120", "POLLGATE_JOB_TIMEOUT": "300"}
TARGET = 2.0  # queries per second
# Many held streams: issue 12 asks that a waiting stream cost <= 0.05 queries a second, so
# that what a process pays while idle does not grow with the streams it holds.
STREAMS = 40
PER_STREAM = 0.05


def run_idle(stack: Stack, seconds: float) -> list[Row]:
    """Measure the three idle cases, each on a freshly started gateway."""
    site = stack.new_site("idle")
    folder = os.path.join(site.instance, "counts")
    figures: dict[str, dict[str, float]] = {}

    start(stack, site, folder)
    time.sleep(1.0)  # let gunicorn's workers finish booting
    figures["nothing connected"] = measure(stack, folder, seconds)

    since = utcnow()
    base = stack.gateway_base
    stack.start_pollclient(site, base, site.tokens[0], "pollclient-idle")
    stack.wait_workers(site, 1, since)
    time.sleep(1.5)  # past the first (wait 0) claim, into the long-poll
    figures["1 idle worker"] = measure(stack, folder, seconds)
    stack.stop_named("pollclient")

    # The gateway keeps serving an abandoned long-poll until its wait ends: start afresh.
    for count in (1, STREAMS):
        start(stack, site, folder)
        with HeldStreams(stack.gateway_base, site, count):
            time.sleep(1.5)
            figures[f"{count} idle stream{'s' if count > 1 else ''}"] = measure(stack, folder, seconds)
            stack.stop_gateway()  # ends the streams from the server side, so the readers return

    rows = []
    for case, fig in figures.items():
        print(f"  idle, {case}: {describe(fig)}")
        if "questions" in fig:
            value, shown = fig["questions"], f"{fig['questions']:.2f} q/s (Questions), +{fig['pings']:.2f} pings/s"
        else:
            value = fig["queries"]
            shown = f"{value:.2f} q/s (statements+commits+rollbacks), +{fig['begins']:.2f} BEGIN/s"
        if not case.startswith(f"{STREAMS} "):  # judged per process below
            rows.append(Row(f"idle, {case}", shown, f"<= {TARGET:g} q/s", value <= TARGET))
    # Idle cost is paid per process that serves a stream: compare per process, so streams
    # that landed on both processes do not read as a cost of the streams themselves.
    many, one = figures[f"{STREAMS} idle streams"], figures["1 idle stream"]
    key = "questions" if "questions" in many else "queries"
    per_process = many[key] / max(1, many["processes"])
    each = (per_process - one[key] / max(1, one["processes"])) / (STREAMS / max(1, many["processes"]) - 1)
    print(f"  idle, {STREAMS} streams on {many['processes']} processes: {per_process:.2f} q/s per process, "
          f"{each:.3f} q/s for each stream beyond a process's first")
    rows.append(Row(f"idle, {STREAMS} idle streams, per process", f"{per_process:.2f} q/s", "<= 1 q/s",
                    per_process <= 1.0))
    rows.append(Row("idle, each held stream beyond a process's first", f"{each:.3f} q/s",
                    f"<= {PER_STREAM:g} q/s", each <= PER_STREAM))
    return rows


def describe(fig: dict[str, float]) -> str:
    """Say what one idle window cost, server counters first, then what SQLAlchemy sent."""
    parts = []
    if "questions" in fig:
        parts.append(f"Questions {fig['questions']:.2f}/s (plus {fig['pings']:.2f} COM_PING/s from pool_pre_ping)")
    sent = ", ".join(f"{fig[k]:.2f} {k}" for k in ("statements", "begins", "commits", "rollbacks")
                     if fig[k])
    return "; ".join(parts + [f"SQLAlchemy sent per second: {sent or 'nothing'}"])


def start(stack: Stack, site: Site, folder: str) -> None:
    """Start the gateway with the idle settings and the statement counter."""
    stack.stop_gateway()  # its workers write counts into folder until they exit
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder, exist_ok=True)
    stack.start_gateway(site, {**IDLE_ENV, "BENCH_COUNT_DIR": folder}, config="count_queries.py")


def read_counts(folder: str) -> dict[str, dict[str, int]]:
    """Read the counts each gunicorn worker published in folder, by worker."""
    found = {}
    for name in os.listdir(folder):
        if name.startswith("queries-") and not name.endswith(".tmp"):
            with open(os.path.join(folder, name)) as f:
                found[name] = dict(zip(("statements", "begins", "commits", "rollbacks"), map(int, f.read().split())))
    return found


def measure(stack: Stack, folder: str, seconds: float) -> dict[str, float]:
    """Count queries over a window; on MariaDB, Questions minus the counting's own SHOWs."""
    server = stack.mariadb is not None
    if server:
        before = server_counts(stack)
        own = {k: v - before[k] for k, v in server_counts(stack).items()}  # what one sample adds
        s0 = server_counts(stack)
    c0 = read_counts(folder)
    t0 = time.monotonic()
    time.sleep(seconds)
    c1 = read_counts(folder)
    elapsed = time.monotonic() - t0
    keys = ("statements", "begins", "commits", "rollbacks")
    delta = {worker: {k: n[k] - c0.get(worker, {}).get(k, 0) for k in keys} for worker, n in c1.items()}
    rate = {k: sum(d[k] for d in delta.values()) / elapsed for k in keys}
    # The processes that sent anything in the window: what an idle cost is paid by.
    rate["processes"] = sum(1 for d in delta.values() if any(d.values()))
    # What MariaDB's Questions counts: statements plus COMMIT/ROLLBACK, never a BEGIN.
    result = {"queries": rate["statements"] + rate["commits"] + rate["rollbacks"], **rate}
    if server:
        s1 = server_counts(stack)
        result = {"questions": (s1["Questions"] - s0["Questions"] - own["Questions"]) / elapsed,
                  "pings": (s1["Com_admin_commands"] - s0["Com_admin_commands"]) / elapsed, **result}
    return result


def server_counts(stack: Stack) -> dict[str, int]:
    """Read MariaDB's Questions and Com_admin_commands (COM_PING lands in the latter)."""
    return stack.status("Questions", "Com_admin_commands")


class HeldStreams:
    """Open streams whose jobs a bench worker claimed, answered once each, then left silent."""

    def __init__(self, base: str, site: Site, count: int = 1) -> None:
        self.base = base
        self.site = site
        self.count = count
        self.started = threading.Semaphore(0)
        self.readers = [threading.Thread(target=self._read, daemon=True) for _ in range(count)]
        self.error: list[BaseException] = []

    def __enter__(self) -> "HeldStreams":
        worker = requests.Session()
        worker.headers["Authorization"] = f"Bearer {self.site.worker_tokens(2)[1]}"
        claim: dict[str, Any] = {"models": ["bench-hold"], "max_jobs": 1, "wait": 0, "kind": "bench", "version": "1"}
        url = f"{self.base}/worker/v1"
        worker.post(f"{url}/claim", json=claim, timeout=30).raise_for_status()  # advertise the model
        for reader in self.readers:
            reader.start()
        jobs: list[dict[str, Any]] = []
        end = time.monotonic() + 30
        while len(jobs) < self.count and time.monotonic() < end:
            answer = worker.post(f"{url}/claim", timeout=30,
                                 json={**claim, "max_jobs": min(32, self.count - len(jobs)), "capacity": self.count, "wait": 5})
            if not answer.ok:
                raise RuntimeError(f"the bench worker's claim was refused: {answer.status_code} {answer.text}")
            jobs += answer.json()["jobs"]
        if len(jobs) < self.count:
            raise RuntimeError(f"{self.count - len(jobs)} held jobs were never claimable")
        # One chunk takes each request from waiting-for-start into the stream's tail loop,
        # its steady state; after that the worker stays silent (no heartbeats needed).
        entries = [{"id": job["id"], "lease": job["lease"], "chunks": [{"seq": 0, "delta": {"content": "x"}}]}
                   for job in jobs]
        worker.post(f"{url}/chunks", json={"jobs": entries}, timeout=30).raise_for_status()
        worker.close()
        for _ in range(self.count):
            if not self.started.acquire(timeout=30):
                raise RuntimeError(f"a held stream never started: {self.error}")
        return self

    def _read(self) -> None:
        client = openai_client(self.base, self.site.key)
        try:
            stream = client.chat.completions.create(
                model="bench-hold", messages=[{"role": "user", "content": "hold"}], stream=True
            )
            for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    self.started.release()
        except Exception as err:  # the gateway stopping ends the stream with an error
            self.error.append(err)
        finally:
            client.close()

    def __exit__(self, *exc) -> None:
        for reader in self.readers:
            reader.join(timeout=10)
