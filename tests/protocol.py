"""A small worker written straight from docs/worker-protocol.md, for driving tests over HTTP."""
from __future__ import annotations

import threading
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
    """Run a ProtoWorker in the background, handing each job to a handler function."""

    def __init__(self, base: str, token: str, handler: Callable[[ProtoWorker, dict], None] = echo_handler,
                 models=("echo",)) -> None:
        self.worker = ProtoWorker(base, token, models)
        self.handler = handler
        self.stopping = threading.Event()
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> "WorkerThread":
        # Advertise the models at once so /v1/models lists them before the first request.
        self.worker.claim(wait=0)
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopping.set()
        self.thread.join(timeout=10)

    def _loop(self) -> None:
        while not self.stopping.is_set():
            try:
                for job in self.worker.claim(max_jobs=4, wait=0.5):
                    threading.Thread(target=self._run, args=(job,), daemon=True).start()
            except requests.RequestException as err:  # the server is shutting down
                self.errors.append(err)
                return

    def _run(self, job: dict) -> None:
        try:
            self.handler(self.worker, job)
        except BaseException as err:  # surfaced by tests that check .errors
            self.errors.append(err)
