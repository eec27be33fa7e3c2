"""A small worker written straight from docs/worker-protocol.md, and a raw stream reader, for tests over HTTP."""
from __future__ import annotations

import http.client
import json
import threading
import time
from typing import Any, Callable, Optional
from urllib.parse import urlsplit

import requests


class ProtoWorker:
    """Speak the worker protocol with requests: claim, report, release."""

    def __init__(self, base: str, token: str, models=("echo",), kind: str = "test", site: str = "",
                 features: Optional[list[str]] = None) -> None:
        self.base = base
        self.models = list(models)
        self.kind, self.site = kind, site
        self.features = features  # sent in each claim when given
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"Bearer {token}"

    def post(self, path: str, body: Any, timeout: float = 30) -> requests.Response:
        """POST JSON to a protocol path."""
        return self.session.post(f"{self.base}/worker/v1/{path}", json=body, timeout=timeout)

    def claim(self, max_jobs: int = 1, wait: float = 0, models: Optional[list[str]] = None) -> list[dict]:
        """Claim jobs; return them with a local seq counter."""
        body = {"models": models or self.models, "max_jobs": max_jobs, "wait": wait, "kind": self.kind, "version": "1",
                "site": self.site}
        if self.features is not None:
            body["features"] = self.features
        r = self.post("claim", body, timeout=wait + 30)
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
            raise AssertionError(f"the worker thread hit {len(self.errors)} error(s): {self.errors!r}") \
                from self.errors[0]
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


def sse_events(body: str) -> list[tuple[int, str]]:
    """Split an event stream into (id, data) pairs, skipping comments."""
    found = []
    for block in body.split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.split("\n") if line and not line.startswith(":"))
        if fields:
            found.append((int(fields["id"]), fields["data"]))
    return found


class StreamReader:
    """One streamed chat completion read raw over HTTP in a thread: every line on the wire and when it came.

    Comment lines (": keep-alive") are kept as they are; `contents` gives each content
    delta with its arrival time. `base` may carry a path (/api under Passenger).
    """

    def __init__(self, base: str, key: str, content: str, model: str = "echo", timeout: float = 60) -> None:
        parts = urlsplit(base)
        self.path = parts.path.rstrip("/") + "/v1/chat/completions"
        self.conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
        self.body = {"model": model, "stream": True, "messages": [{"role": "user", "content": content}]}
        self.key = key
        self.status: Optional[int] = None
        self.lines: list[tuple[float, str]] = []
        self.error: Optional[BaseException] = None
        self.news = threading.Condition()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.conn.request("POST", self.path, body=json.dumps(self.body),
                              headers={"Authorization": f"Bearer {self.key}", "Content-Type": "application/json"})
            response = self.conn.getresponse()
            self.status = response.status
            pending = b""
            # read1 hands over what has arrived, so each line's time is when its bytes came.
            while data := response.read1(65536):
                at = time.monotonic()
                *complete, pending = (pending + data).split(b"\n")
                with self.news:
                    self.lines.extend((at, line.decode()) for line in complete if line)
                    self.news.notify_all()
        except BaseException as err:  # the test reads .error
            self.error = err
        finally:
            self.conn.close()
            with self.news:
                self.news.notify_all()

    def wait_until(self, condition: Callable[["StreamReader"], Any], timeout: float, what: str) -> Any:
        """Wait until condition(self) is truthy and return it, or fail naming what never came."""
        end = time.monotonic() + timeout
        with self.news:
            while not (found := condition(self)):
                left = end - time.monotonic()
                assert left > 0 and self.thread.is_alive(), f"no {what} within {timeout:g} s: {self.lines[-5:]} " \
                                                            f"status={self.status} error={self.error!r}"
                self.news.wait(left)
        return found

    def wait_for_news(self, timeout: float) -> None:
        """Sleep until another line arrives, the response ends, or the timeout passes."""
        with self.news:
            if self.thread.is_alive():
                self.news.wait(timeout)

    def join(self, timeout: float = 60) -> "StreamReader":
        """Wait until the response ended."""
        self.thread.join(timeout)
        assert not self.thread.is_alive(), f"the stream was still open after {timeout:g} s"
        return self

    def contents(self) -> list[tuple[float, str]]:
        """Each content delta with its arrival time."""
        found = []
        for at, line in list(self.lines):
            if line.startswith("data: {"):
                choices = json.loads(line[6:]).get("choices") or [{}]
                text = choices[0].get("delta", {}).get("content")
                if text:
                    found.append((at, text))
        return found

    @property
    def text(self) -> str:
        """The content received so far."""
        return "".join(text for _, text in self.contents())
