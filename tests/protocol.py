"""A small worker written straight from docs/worker-protocol.md, for driving tests over HTTP."""
from __future__ import annotations

import threading
import time
from typing import Any, Callable, Optional

import requests


class ProtoWorker:
    """Speak the worker protocol with requests: claim, report, release."""

    def __init__(self, base: str, token: str, models=("echo",)) -> None:
        self.base = base
        self.models = list(models)
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"Bearer {token}"

    def post(self, path: str, body: Any, timeout: float = 30) -> requests.Response:
        """POST JSON to a protocol path."""
        return self.session.post(f"{self.base}/worker/v1/{path}", json=body, timeout=timeout)

    def claim(self, max_jobs: int = 1, wait: float = 0, models: Optional[list[str]] = None) -> list[dict]:
        """Claim jobs; return them with a local seq counter."""
        r = self.post("claim", {"models": models or self.models, "max_jobs": max_jobs, "wait": wait,
                                "kind": "test", "version": "1"}, timeout=wait + 30)
        r.raise_for_status()
        jobs = r.json()["jobs"]
        for job in jobs:
            job["_seq"] = 0
        return jobs

    def report(self, job: dict, deltas=(), finish=None, error=None, seq: Optional[int] = None) -> dict:
        """Send deltas (and a finish or error) for one job; return its answer entry."""
        start = job["_seq"] if seq is None else seq
        entry: dict[str, Any] = {
            "id": job["id"], "lease": job["lease"],
            "chunks": [{"seq": start + i, "delta": d} for i, d in enumerate(deltas)],
        }
        if finish is not None:
            entry["finish"] = finish
        if error is not None:
            entry["error"] = error
        r = self.post("chunks", {"jobs": [entry]})
        r.raise_for_status()
        answer = r.json()["jobs"][0]
        job["_seq"] = max(job["_seq"], answer["next_seq"])
        return answer

    def say(self, job: dict, text: str, finish: Optional[dict] = None) -> dict:
        """Stream text word by word in one report."""
        words = [w + " " for w in text.split(" ")]
        words[-1] = words[-1][:-1]
        return self.report(job, [{"content": w} for w in words], finish=finish)

    def release(self, job: dict) -> dict:
        """Hand a job back."""
        r = self.post("release", {"jobs": [{"id": job["id"], "lease": job["lease"]}]})
        r.raise_for_status()
        return r.json()["jobs"][0]


def echo_handler(worker: ProtoWorker, job: dict) -> None:
    """Answer with the last user message, word by word."""
    content = job["request"]["messages"][-1]["content"]
    if isinstance(content, list):
        content = " ".join(p["text"] for p in content if p.get("type") == "text")
    worker.say(job, content, finish={"reason": "stop"})


class WorkerThread:
    """Run a ProtoWorker in the background, handing each job to a handler function.

    Leaving the `with` block stops claiming, waits for running handlers, and raises the first
    error a claim or a handler hit, unless the test says it expects some (expect_errors=True)
    and reads `.errors` itself.
    """

    def __init__(self, base: str, token: str, handler: Callable[[ProtoWorker, dict], None] = echo_handler,
                 models=("echo",), expect_errors: bool = False) -> None:
        self.worker = ProtoWorker(base, token, models)
        self.handler = handler
        self.expect_errors = expect_errors
        self.stopping = threading.Event()
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.jobs: list[threading.Thread] = []

    def __enter__(self) -> "WorkerThread":
        # Advertise the models at once so /v1/models lists them before the first request.
        for job in self.worker.claim(wait=0):
            self._start(job)
        self.thread.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.stopping.set()
        # A claim waits at most 0.5 s; handlers get a bound, so a stuck one cannot hang the test.
        bound = 30 if exc_type is None else 5
        end = time.monotonic() + bound
        self.thread.join(timeout=bound)
        for thread in self.jobs:  # complete now: the claim loop has ended
            thread.join(timeout=max(0.01, end - time.monotonic()))
        stuck = [t for t in [self.thread, *self.jobs] if t.is_alive()]
        if exc_type is not None or self.expect_errors:
            return  # the test's own failure says more; or the test reads .errors itself
        if self.errors:
            raise AssertionError(f"the worker thread hit {len(self.errors)} error(s): {self.errors!r}") from self.errors[0]
        assert not stuck, f"{len(stuck)} worker handler(s) still running {bound} s after the test ended"

    def _loop(self) -> None:
        while not self.stopping.is_set():
            try:
                for job in self.worker.claim(max_jobs=4, wait=0.5):
                    self._start(job)
            except BaseException as err:  # raised by __exit__
                self.errors.append(err)
                return

    def _start(self, job: dict) -> None:
        thread = threading.Thread(target=self._run, args=(job,), daemon=True)
        self.jobs.append(thread)
        thread.start()

    def _run(self, job: dict) -> None:
        try:
            self.handler(self.worker, job)
        except BaseException as err:  # raised by __exit__
            self.errors.append(err)

