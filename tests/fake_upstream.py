"""A scriptable OpenAI-compatible server for tests: real HTTP, real SSE, on 127.0.0.1.

The model name picks the behaviour:

    fake-chat         streams ANSWER in small pieces, with usage when asked
    fake-reasoning    streams reasoning_content, then content
    fake-tools        streams one tool call in pieces, finish_reason tool_calls
    fake-tools-loose  streams two tool calls as LOOSE_TOOL_CALLS: no index (or a null one),
                      an object as arguments, vendor keys, a piece that is not an object
    fake-slow         streams SLOW_PIECES pieces, SLOW_DELAY seconds apart (stop tests)
    fake-hang         sends its first chunk, then stays silent HANG seconds (a long prefill)
    fake-drop         streams two pieces, then drops the connection
    fake-error-event  streams one piece, then a `data: {"error": ...}` event
    fake-500, fake-429, fake-400, fake-context, fake-401
                      answer that HTTP error before streaming
    fake-old          refuses stream_options with a 400, like older servers
    fake-json         ignores stream=true and answers one JSON completion
    fake-close        streams without chunked encoding; the body ends when the connection closes
    anything else     404 model_not_found

With `"logprobs": true`, fake-chat and fake-json give each content piece its log probability
(LOGPROB), with `top_logprobs` alternatives, and an `id` per token as llama.cpp does.

Every request is recorded in `.requests`; a stream the client closed before its end is
recorded in `.closed_early` (by model name).
"""
from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

ANSWER = "Hello, world! This is the fake upstream."
REASONING = "The user greets me. I greet back."
TOOL_ARGUMENTS = ['{"city": ', '"Paris"', "}"]
# Each chunk's tool_calls as Gemini's compatibility API and some servers stream them: calls
# told apart by id only, each in its own chunk, arguments once an object and once in pieces.
LOOSE_TOOL_CALLS = [
    [{"id": "call_a", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}},
      "extra_content": {"google": {"thought_signature": "c2ln"}}}],
    [{"index": None, "id": "call_b", "type": "function", "function": {"name": "get_time", "arguments": '{"zone": '}}],
    [{"index": None, "id": None, "type": None, "function": {"name": None, "arguments": '"CET"}'}}, "not a call"],
]
# A tool call whose id is longer than the gateway takes (191 characters): a worker relays it
# as the upstream sent it, and the gateway refuses the report that carries it. Tests put it
# in place of LOOSE_TOOL_CALLS to make the gateway refuse a report.
LONG_ID_TOOL_CALLS = [[{"index": 0, "id": "call_" + "x" * 200, "type": "function",
                        "function": {"name": "get_weather", "arguments": "{}"}}]]
LOGPROB = -0.25  # every piece's; its alternatives' are lower
SLOW_PIECES = 100
SLOW_DELAY = 0.1
HANG = 5.0
BAD_KEY = {"message": "Incorrect API key provided", "type": "invalid_request_error", "code": "invalid_api_key"}
HTTP_ERRORS = {
    "fake-400": (400, {"message": "temperature must be at most 2", "type": "invalid_request_error", "code": None}),
    "fake-context": (400, {
        "message": "This model's maximum context length is 8192 tokens; your messages have 9000.",
        "type": "invalid_request_error", "code": "context_length_exceeded",
    }),
    "fake-401": (401, BAD_KEY),
    "fake-429": (429, {"message": "Rate limit reached", "type": "requests", "code": "rate_limit_exceeded"}),
    "fake-500": (500, {"message": "The server had an error", "type": "server_error", "code": None}),
}
MODELS = [
    "fake-chat", "fake-reasoning", "fake-tools", "fake-slow", "fake-hang", "fake-drop", "fake-error-event",
    *HTTP_ERRORS, "fake-old", "fake-json", "fake-close", "fake-tools-loose",
]


def words(text: str) -> list[str]:
    """Split text into pieces that keep their leading space, as tokenizers do."""
    out = []
    for i, word in enumerate(text.split(" ")):
        out.append(word if i == 0 else " " + word)
    return out


class FakeUpstream:
    """A running fake server: `.url` ends in /v1; stop it with `.stop()` or a with-block."""

    def __init__(self, delay: float = 0.005, api_key: str | None = None) -> None:
        self.delay = delay  # seconds between two streamed chunks
        self.api_key = api_key  # when set, requests must carry it as a Bearer token
        self.requests: list[dict[str, Any]] = []
        self.closed_early: list[str] = []
        self.finished: list[str] = []
        self.lock = threading.Lock()
        handler = type("Handler", (_Handler,), {"upstream": self})
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_port}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        """Stop serving and close the listening socket."""
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)

    def wait_closed_early(self, model: str, timeout: float = 5.0) -> bool:
        """Wait until the server noticed the client closing model's stream early."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            with self.lock:
                if model in self.closed_early:
                    return True
            time.sleep(0.01)
        return False

    def __enter__(self) -> FakeUpstream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_fake_upstream(delay: float = 0.005, api_key: str | None = None) -> FakeUpstream:
    """Start a fake OpenAI-compatible server on a free port of 127.0.0.1."""
    return FakeUpstream(delay=delay, api_key=api_key)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive and chunked encoding, like real servers
    upstream: FakeUpstream

    def log_message(self, format: str, *args: Any) -> None:
        pass  # keep test output clean

    def do_GET(self) -> None:
        self._record(None)
        if not self._authorized():
            return
        if self.path.rstrip("/") != "/v1/models":
            return self._error(404, {"message": f"no route {self.path}", "type": "invalid_request_error", "code": None})
        data = [{"id": m, "object": "model", "created": 0, "owned_by": "fake"} for m in MODELS]
        self._json(200, {"object": "list", "data": data})

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        try:
            body = json.loads(self.rfile.read(length) or b"{}")
        except ValueError:
            body = None
        self._record(body)
        if not self._authorized():
            return
        if self.path != "/v1/chat/completions" or not isinstance(body, dict):
            return self._error(400, {"message": "bad request", "type": "invalid_request_error", "code": None})
        model = body.get("model")
        if model in HTTP_ERRORS:
            return self._error(*HTTP_ERRORS[model])
        if model == "fake-old" and "stream_options" in body:
            message = "Unrecognized request argument supplied: stream_options"
            return self._error(400, {"message": message, "type": "invalid_request_error", "code": None})
        if model not in MODELS:
            message = f"The model `{model}` does not exist"
            return self._error(404, {"message": message, "type": "invalid_request_error", "code": "model_not_found"})
        top = (body.get("top_logprobs") or 0) if body.get("logprobs") is True else None
        if not body.get("stream") or model == "fake-json":
            return self._json(200, _completion(model, top))
        self._stream(model, bool((body.get("stream_options") or {}).get("include_usage")), top)

    # -- helpers -----------------------------------------------------------------

    def _record(self, body: Any) -> None:
        with self.upstream.lock:
            self.upstream.requests.append(
                {"method": self.command, "path": self.path, "headers": dict(self.headers), "body": body}
            )

    def _authorized(self) -> bool:
        key = self.upstream.api_key
        if key and self.headers.get("Authorization") != f"Bearer {key}":
            self._error(401, BAD_KEY)
            return False
        return True

    def _json(self, status: int, body: Any) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, error: dict[str, Any]) -> None:
        self._json(status, {"error": {"param": None, **error}})

    def _stream(self, model: str, include_usage: bool, top: int | None = None) -> None:
        chunked = model != "fake-close"
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        if chunked:
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        try:
            for i, event in enumerate(_events(model, include_usage, top)):
                if event is None:  # fake-drop: vanish mid-stream
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self._write(f"data: {event}\n\n".encode(), chunked)
                if model == "fake-hang" and i == 0:
                    time.sleep(HANG)
                time.sleep(SLOW_DELAY if model == "fake-slow" else self.upstream.delay)
            if chunked:
                self.wfile.write(b"0\r\n\r\n")
                self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
            with self.upstream.lock:
                self.upstream.closed_early.append(model)
            return
        with self.upstream.lock:
            self.upstream.finished.append(model)

    def _write(self, data: bytes, chunked: bool) -> None:
        if chunked:
            data = b"%x\r\n%s\r\n" % (len(data), data)
        self.wfile.write(data)
        self.wfile.flush()


def _chunk(model: str, delta: dict[str, Any], finish_reason: str | None = None, top: int | None = None) -> str:
    choice = {"index": 0, "delta": delta, "finish_reason": finish_reason}
    if top is not None:
        choice["logprobs"] = token_logprobs([delta["content"]], top) if delta.get("content") else None
    return json.dumps({
        "id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 0, "model": model,
        "choices": [choice],
    })


def token_logprobs(pieces: list[str], top: int) -> dict[str, Any]:
    """Return OpenAI's choice.logprobs for these pieces, with llama.cpp's extra `id` on each token."""
    def token(text: str, logprob: float) -> dict[str, Any]:
        return {"id": 7, "token": text, "logprob": logprob, "bytes": list(text.encode())}

    return {"content": [{**token(p, LOGPROB), "top_logprobs": [token(f"alt{k}", LOGPROB - 1 - k) for k in range(top)]}
                        for p in pieces], "refusal": None}


def _events(model: str, include_usage: bool, top: int | None = None) -> list[str | None]:
    """Return the data of each SSE event for model; None marks a dropped connection."""
    events: list[str | None] = [_chunk(model, {"role": "assistant", "content": ""})]
    finish = "stop"
    if model == "fake-reasoning":
        events += [_chunk(model, {"reasoning_content": w}) for w in words(REASONING)]
    if model == "fake-tools":
        finish = "tool_calls"
        call = {"index": 0, "id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": ""}}
        events.append(_chunk(model, {"tool_calls": [call]}))
        events += [_chunk(model, {"tool_calls": [{"index": 0, "function": {"arguments": a}}]}) for a in TOOL_ARGUMENTS]
    elif model == "fake-tools-loose":
        finish = "tool_calls"
        events += [_chunk(model, {"tool_calls": calls}) for calls in LOOSE_TOOL_CALLS]
    elif model == "fake-slow":
        events += [_chunk(model, {"content": f"w{i} "}) for i in range(SLOW_PIECES)]
    else:
        events += [_chunk(model, {"content": w}, top=top) for w in words(ANSWER)]
    if model == "fake-drop":
        return events[:3] + [None]
    if model == "fake-error-event":
        return events[:2] + [json.dumps({"error": {"message": "the model crashed", "type": "server_error"}})]
    events.append(_chunk(model, {}, finish))
    if include_usage:
        usage = {"prompt_tokens": 7, "completion_tokens": len(events) - 2, "total_tokens": len(events) + 5}
        last = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "choices": [], "usage": usage}
        events.append(json.dumps(last))
    events.append("[DONE]")
    return events


def _completion(model: str, top: int | None = None) -> dict[str, Any]:
    choice = {"index": 0, "message": {"role": "assistant", "content": ANSWER}, "finish_reason": "stop"}
    if top is not None:
        choice["logprobs"] = token_logprobs(words(ANSWER), top)
    return {
        "id": "chatcmpl-fake", "object": "chat.completion", "created": 0, "model": model,
        "choices": [choice],
        "usage": {"prompt_tokens": 7, "completion_tokens": 8, "total_tokens": 15},
    }
