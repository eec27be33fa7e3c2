"""What fault tests watch a node through: a raw API client that sees every byte, and workers that ride out faults."""
from __future__ import annotations

import contextlib
import http.client
import json
import socket
import threading
import time
from typing import Any, Callable, Optional
from urllib.parse import urlsplit

import requests


class Call:
    """One chat completion on its own connection, read raw in a thread: every event, and how it ended.

    `ended` is "closed" when the server finished the response; otherwise it says what broke it.
    """

    def __init__(self, url: str, key: str, content: str, stream: bool = True, timeout: float = 40) -> None:
        parts = urlsplit(url)
        self.conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
        self.content, self.stream, self.key = content, stream, key
        self.status: Optional[int] = None
        self.headers: dict[str, str] = {}
        self.events: list[Any] = []  # each data: payload parsed, or "[DONE]"
        self.reply: Any = None  # a non-streamed body
        self.ended: Optional[str] = None
        self.started = time.monotonic()
        self.answered_at: Optional[float] = None
        self.ended_at: Optional[float] = None
        self.done = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        body = {"model": "echo", "stream": self.stream, "messages": [{"role": "user", "content": self.content}]}
        try:
            self.conn.request("POST", "/v1/chat/completions", body=json.dumps(body),
                              headers={"Authorization": f"Bearer {self.key}", "Content-Type": "application/json"})
            response = self.conn.getresponse()
            self.status, self.answered_at = response.status, time.monotonic()
            self.headers = {name.lower(): value for name, value in response.getheaders()}
            if self.headers.get("content-type", "").startswith("text/event-stream"):
                self._read_events(response)
            else:
                self.reply = json.loads(response.read())
            self.ended = "closed"
        except Exception as err:  # what the test asserts on
            self.ended = f"broken: {err!r}"
        finally:
            self.ended_at = time.monotonic()
            self.conn.close()
            self.done.set()

    def _read_events(self, response: http.client.HTTPResponse) -> None:
        # read1, not readline: readline takes a stream cut off mid-way for a clean end,
        # read1 raises IncompleteRead unless the last chunk of the response arrived.
        pending = b""
        while data := response.read1(65536):
            *lines, pending = (pending + data).split(b"\n")
            for line in lines:
                if line.startswith(b"data: "):
                    payload = line[6:].strip()
                    self.events.append("[DONE]" if payload == b"[DONE]" else json.loads(payload))

    def hang_up(self) -> None:
        """Close the connection from the client side, as a client that walks away does."""
        with contextlib.suppress(OSError, AttributeError):
            self.conn.sock.shutdown(socket.SHUT_RDWR)

    def wait(self, timeout: float) -> "Call":
        """Wait until the response ended; fail if it did not within timeout."""
        assert self.done.wait(timeout), f"the response was still open after {timeout:g} s: {self}"
        return self

    @property
    def text(self) -> str:
        """Return the content received so far."""
        if self.reply is not None and "choices" in self.reply:
            return self.reply["choices"][0]["message"]["content"] or ""
        return "".join(e["choices"][0]["delta"].get("content") or ""
                       for e in self.events if isinstance(e, dict) and e.get("choices"))

    @property
    def error(self) -> Optional[dict]:
        """Return the error the client got, as an event in the stream or as the body."""
        for item in (self.reply, *self.events):
            if isinstance(item, dict) and "error" in item:
                return item["error"]
        return None

    @property
    def completed(self) -> bool:
        """Tell whether the answer ended the OpenAI way: a finish_reason, then [DONE] (streams)."""
        if not self.stream:
            return self.status == 200 and self.reply["choices"][0]["finish_reason"] is not None
        finishes = [e for e in self.events if isinstance(e, dict) and e.get("choices")
                    and e["choices"][0]["finish_reason"]]
        return self.ended == "closed" and self.events[-1:] == ["[DONE]"] and bool(finishes) and self.error is None

    def __repr__(self) -> str:
        return (f"<Call {self.content!r} status={self.status} ended={self.ended} text={self.text!r} "
                f"error={self.error} last events={self.events[-3:]}>")


# -- workers that ride out a faulty gateway ----------------------------------------------


class Shift:
    """One job in a test worker's hands; `send` reports on it and keeps every answer."""

    def __init__(self, crew: "Crew", token: str, job: dict) -> None:
        self.crew, self.token, self.job = crew, token, job
        self.seq = 0
        self.answers: list[dict] = []
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"Bearer {token}"

    @property
    def prompt(self) -> str:
        return self.job["request"]["messages"][-1]["content"]

    @property
    def told(self) -> Optional[str]:
        """Return why the gateway said to stop, if it did."""
        return next((a.get("reason") for a in self.answers if a.get("stop")), None)

    def send(self, *texts: str, finish: bool = False, patience: float = 60) -> dict:
        """Report deltas (and the finish); resend the same report while the gateway or network fails."""
        chunks = [{"seq": self.seq + i, "delta": {"content": text}} for i, text in enumerate(texts)]
        entry: dict[str, Any] = {"id": self.job["id"], "lease": self.job["lease"], "chunks": chunks}
        if finish:
            entry["finish"] = {"reason": "stop"}
        end = time.monotonic() + patience
        while True:
            try:
                r = self.session.post(f"{self.crew.url}/worker/v1/chunks", json={"jobs": [entry]}, timeout=(5, 10))
                if r.status_code == 200:
                    break
                assert r.status_code >= 429, f"report refused: {r.status_code} {r.text}"
            except requests.RequestException:
                pass
            assert time.monotonic() < end, f"no report got through in {patience} s"
            if self.crew.stopping.wait(0.2):
                return {"stop": True, "reason": "the test is over"}
        answer = r.json()["jobs"][0]
        self.answers.append(answer)
        self.seq = max(self.seq, answer["next_seq"])
        return answer


class Crew:
    """Worker tokens served from threads: each claims in a loop and runs every job in a thread.

    Like a real worker it rides out refused, failed and dropped calls. `handler(shift)`
    does the job; `shifts` keeps every job it got.
    """

    def __init__(self, url: str, tokens: list[str], handler: Callable[[Shift], None], slots: int = 4,
                 wait: float = 1.0) -> None:
        self.url, self.tokens, self.handler, self.slots, self.wait = url, tokens, handler, slots, wait
        self.stopping = threading.Event()
        self.shifts: list[Shift] = []
        self.errors: list[BaseException] = []
        self.threads: list[threading.Thread] = []
        self._busy = {token: 0 for token in tokens}
        self._lock = threading.Lock()

    def __enter__(self) -> "Crew":
        for token in self.tokens:
            # One claim first, so the model is live before the test's first request.
            assert self._claim(requests.Session(), token, wait=0), "the gateway refused the first claim"
            self._start(self._loop, token)
        return self

    def __exit__(self, *exc: Any) -> None:
        # Threads still waiting on a stalled node end when it goes down, right after this.
        self.stopping.set()
        end = time.monotonic() + 5
        for thread in list(self.threads):
            thread.join(timeout=max(0.01, end - time.monotonic()))

    def _start(self, target: Callable, *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        self.threads.append(thread)
        thread.start()

    def _loop(self, token: str) -> None:
        session = requests.Session()
        while not self.stopping.is_set():
            try:
                if not self._claim(session, token, self.wait):
                    time.sleep(0.2)  # refused or failed: try again, as a worker does
            except requests.RequestException:
                time.sleep(0.2)  # the node or its worker process is gone for now
            except Exception as err:  # a malformed answer: tests look at crew.errors
                self.errors.append(err)
                time.sleep(0.2)

    def _claim(self, session: requests.Session, token: str, wait: float) -> bool:
        with self._lock:
            free = self.slots - self._busy[token]
        if free <= 0:
            time.sleep(0.02)
            return True
        body = {"models": ["echo"], "max_jobs": min(free, 32), "capacity": self.slots, "wait": wait,
                "kind": "test", "version": "1"}
        r = session.post(f"{self.url}/worker/v1/claim", json=body, timeout=(5, wait + 30),
                         headers={"Authorization": f"Bearer {token}"})
        if r.status_code != 200:
            return False
        for job in r.json()["jobs"]:
            shift = Shift(self, token, job)
            with self._lock:
                self._busy[token] += 1
                self.shifts.append(shift)
            self._start(self._run, shift)
        return True

    def _run(self, shift: Shift) -> None:
        try:
            self.handler(shift)
        except BaseException as err:  # tests look at crew.errors
            self.errors.append(err)
        finally:
            with self._lock:
                self._busy[shift.token] -= 1

    def shift(self, public_id: str) -> Shift:
        """Return the shift that ran this job."""
        return next(s for s in self.shifts if s.job["id"] == public_id)


def echo(shift: Shift) -> None:
    """Answer with the prompt, word by word in two reports."""
    words = [w + " " for w in shift.prompt.split(" ")]
    words[-1] = words[-1].rstrip()
    half = len(words) // 2
    shift.send(*words[:half])
    shift.send(*words[half:], finish=True)


def ticking(shift: Shift) -> None:
    """Send "tick " every 0.1 s until the gateway says stop (or the crew stops)."""
    while not shift.crew.stopping.is_set():
        if shift.send("tick ")["stop"]:
            return
        time.sleep(0.1)


def held_until(release: threading.Event, beat: float = 0.5) -> Callable[[Shift], None]:
    """Build a handler that sends the first word, heartbeats until released, then the rest of the prompt."""
    def handler(shift: Shift) -> None:
        first, _, rest = shift.prompt.partition(" ")
        if shift.send(first + " ")["stop"]:
            return
        while not release.wait(beat):
            if shift.crew.stopping.is_set() or shift.send()["stop"]:
                return
        shift.send(rest, finish=True)
    return handler
