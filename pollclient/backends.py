"""Backends turn one job's chat request into a stream of events.

A backend is a plain generator function `run(request, config, stop)`:

- `request` is the job's chat request as the gateway sent it (no `stream` field);
- `config` is the worker-wide `BackendConfig`;
- `stop` is a `StopSignal` the worker sets when the gateway says to stop the job.

It yields `{"delta": {...}}` for each piece of output (any of `content`,
`reasoning_content`, `refusal`, `tool_calls`, and `logprobs` from a backend that declares
that feature in FEATURES) and ends with one
`{"finish": {"reason": ..., "usage": {...}}}` (usage optional). It raises `BackendError`
when the job fails, and simply returns, yielding nothing more, once `stop` is set.
"""
from __future__ import annotations

import contextlib
import json
import math
import re
import socket
import threading
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from typing import Any

import requests
import urllib3

from .outbound import UnsafeRequest, outbound_request
from .retry import describe_error

Event = dict[str, Any]
Events = Generator[Event, None, None]
FINISH_REASONS = ("stop", "length", "tool_calls", "content_filter")
TEXT_FIELDS = ("content", "reasoning_content", "refusal")
MAX_TOOL_INDEX = 127  # the gateway refuses a tool call's index above this
MAX_TOP_LOGPROBS = 20  # ... and more alternatives per token than this
MIN_LOGPROB = -9999.0  # what vLLM sends for a probability of zero; JSON has no -Infinity
_CONTEXT_WORDS = re.compile(r"context[ _-]?(length|window)|maximum context|too many tokens|prompt is too long", re.I)


class BackendError(Exception):
    """The backend could not answer the job."""

    def __init__(self, code: str = "upstream_error", message: str | None = None, retry: bool = False) -> None:
        super().__init__(message or self.__doc__)
        self.code = code
        self.retry = retry

    def as_report(self) -> dict[str, Any]:
        """Describe the failure as the protocol's `error` object."""
        return {"code": self.code, "message": str(self)[:2000], "retry": self.retry}


class StopSignal:
    """A flag the worker raises to stop a job, which also runs callbacks to unblock reads."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self._lock = threading.Lock()
        self._callbacks: list[Callable[[], None]] = []

    def set(self) -> None:
        """Raise the flag and run the registered callbacks once."""
        with self._lock:
            if self._event.is_set():
                return
            self._event.set()
            callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            callback()

    def is_set(self) -> bool:
        """Tell whether the job should stop."""
        return self._event.is_set()

    def wait(self, timeout: float) -> bool:
        """Sleep up to timeout seconds; return True as soon as the flag is raised."""
        return self._event.wait(timeout)

    def on_set(self, callback: Callable[[], None]) -> None:
        """Run callback when the flag is raised (at once if it already is)."""
        with self._lock:
            if not self._event.is_set():
                self._callbacks.append(callback)
                return
        callback()


@dataclass
class BackendConfig:
    """Settings shared by every job of one worker."""

    upstream_url: str = ""
    upstream_key: str = ""
    echo_delay: float = 0.0
    # Off by default: an upstream that fetches image URLs would reach this machine's network.
    allow_private_image_urls: bool = False
    # Long: a big prompt can take minutes before the first token; the gateway's own
    # deadline stops a job that truly hangs.
    read_timeout: float = 600.0
    session: requests.Session = field(default_factory=requests.Session)

    def headers(self) -> dict[str, str]:
        """Return the upstream's auth header, if a key is set."""
        return {"Authorization": f"Bearer {self.upstream_key}"} if self.upstream_key else {}


# -- echo ---------------------------------------------------------------------------


def last_user_text(messages: list[Any]) -> str:
    """Return the text of the last user message; list content is its text parts joined by spaces."""
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, str):
                return content
            if isinstance(content, list):
                texts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
                return " ".join(t for t in texts if isinstance(t, str))
            return ""
    return ""


def split_words(text: str) -> list[str]:
    """Split text into words that keep their whitespace, so joining them gives the text back."""
    # The first piece also takes any leading whitespace; later pieces start at a word
    # because the previous piece swallowed the whitespace before it.
    pieces = re.findall(r"\s*\S+\s*", text)
    return pieces or ([text] if text else [])


def run_echo(request: dict[str, Any], config: BackendConfig, stop: StopSignal) -> Events:
    """Stream back the last user message word by word."""
    words = split_words(last_user_text(request.get("messages") or []))
    if not words:
        yield {"delta": {"content": ""}}
    for i, word in enumerate(words):
        if i and config.echo_delay > 0 and stop.wait(config.echo_delay):
            return
        if stop.is_set():
            return
        yield {"delta": {"content": word}}
    yield {"finish": {"reason": "stop"}}


# -- OpenAI-compatible upstream -----------------------------------------------------


def list_upstream_models(config: BackendConfig) -> list[str]:
    """Ask the upstream's GET /models for the model ids it serves."""
    url = config.upstream_url.rstrip("/") + "/models"
    try:
        response = config.session.get(url, headers=config.headers(), timeout=(10, 30))
    except requests.RequestException as exc:
        message = f"cannot reach the upstream at {config.upstream_url}: {describe_error(exc)}"
        raise BackendError("upstream_unavailable", message, retry=True) from None
    with response:
        if response.status_code >= 400:
            message, _ = _upstream_error(response)
            raise BackendError("upstream_error", f"GET {url} answered HTTP {response.status_code}: {message}")
        try:
            data = response.json().get("data")
            return [m["id"] for m in data if isinstance(m, dict) and isinstance(m.get("id"), str)]
        except (ValueError, AttributeError, TypeError):
            raise BackendError("upstream_error", f"GET {url} did not answer an OpenAI model list") from None


def run_openai(request: dict[str, Any], config: BackendConfig, stop: StopSignal) -> Events:
    """Stream the job through an OpenAI-compatible /chat/completions upstream."""
    if stop.is_set():
        return
    try:
        request = outbound_request(request, config.allow_private_image_urls)
    except UnsafeRequest as exc:
        raise BackendError("invalid_request", str(exc)) from None
    body = {**request, "stream": True, "stream_options": {"include_usage": True}}
    response = _open_stream(config, body)
    reading = True

    def interrupt() -> None:
        # Closing the response from another thread waits for the blocked read; shutting the
        # socket down wakes it at once, even in the middle of a long prefill. Once this job
        # is done the connection may serve another job: leave it alone then.
        if reading:
            _shut_down(response)

    stop.on_set(interrupt)
    try:
        if stop.is_set():
            return
        if response.headers.get("Content-Type", "").startswith("application/json"):
            yield from _relay_whole(response)  # an upstream that ignored stream=true
        else:
            yield from _relay_stream(response, stop)
    finally:
        reading = False
        response.close()


def _open_stream(config: BackendConfig, body: dict[str, Any]) -> requests.Response:
    url = config.upstream_url.rstrip("/") + "/chat/completions"
    while True:
        try:
            response = config.session.post(
                url, json=body, headers=config.headers(), stream=True, timeout=(10, config.read_timeout)
            )
        except requests.RequestException as exc:
            raise BackendError("upstream_unavailable", f"upstream: {describe_error(exc)}", retry=True) from None
        if response.status_code < 400:
            return response
        with response:
            message, code = _upstream_error(response)
        # Older servers reject stream_options; usage then comes from the gateway's count.
        if response.status_code == 400 and "stream_options" in body and "stream_options" in message:
            body = {k: v for k, v in body.items() if k != "stream_options"}
            continue
        raise upstream_http_error(response.status_code, message, code)


def upstream_http_error(status: int, message: str, code: str = "") -> BackendError:
    """Map an upstream HTTP error to the protocol's error code."""
    text = f"upstream HTTP {status}: {message}"
    if status in (400, 413, 422):
        if code == "context_length_exceeded" or _CONTEXT_WORDS.search(message):
            return BackendError("context_length_exceeded", text)
        return BackendError("invalid_request", text)
    if status == 404:
        return BackendError("model_not_found", text)
    if status == 429:
        return BackendError("rate_limited", text)
    # A bad upstream key (401/403) or a failing server is this worker's problem: another may succeed.
    return BackendError("upstream_error", text, retry=status >= 500 or status in (401, 403))


def _upstream_error(response: requests.Response) -> tuple[str, str]:
    """Return an upstream error's message and code from any of the usual error shapes."""
    try:
        body = response.json()
    except ValueError:
        return " ".join(response.text.split())[:500], ""
    return _error_text(body.get("error", body) if isinstance(body, dict) else body)


def _shut_down(response: requests.Response) -> None:
    """Shut the response's socket down so a read blocked in another thread returns."""
    sock = getattr(getattr(response.raw, "_connection", None), "sock", None)
    if sock is not None:
        with contextlib.suppress(OSError):  # already closed
            sock.shutdown(socket.SHUT_RDWR)


def _sse_lines(response: requests.Response) -> Iterator[str]:
    """Yield an event stream's lines as soon as each arrives."""
    raw = response.raw
    if getattr(raw, "chunked", True) or not hasattr(raw, "read1"):
        pieces = response.iter_content(chunk_size=8192)  # chunked: one piece per HTTP chunk
    else:
        # A plain read of a close-delimited body waits for the whole 8 KiB; read1 does not.
        pieces = iter(lambda: raw.read1(8192), b"")
    buffer = b""
    for piece in pieces:
        buffer += piece
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            yield line.rstrip(b"\r").decode("utf-8", "replace")
    if buffer:
        yield buffer.decode("utf-8", "replace")


def _relay_stream(response: requests.Response, stop: StopSignal) -> Events:
    streamed, done = False, False
    finish_reason, usage = None, None
    call_ids: dict[str, int] = {}  # the index given to each tool-call id the upstream left unindexed
    try:
        for line in _sse_lines(response):
            if stop.is_set():
                return
            if not line.startswith("data:"):
                continue  # blank separators, comments, event: and id: lines
            data = line[5:].strip()
            if data == "[DONE]":
                done = True
                break
            try:
                chunk = json.loads(data)
            except ValueError:
                continue
            if not isinstance(chunk, dict):
                continue
            if chunk.get("error"):
                message, _ = _error_text(chunk["error"])
                raise BackendError("upstream_error", f"upstream: {message}", retry=not streamed)
            usage = _usage(chunk.get("usage")) or usage
            for choice in chunk.get("choices") or []:
                if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                    continue  # one answer per job
                delta = _clean_delta(choice.get("delta"), call_ids)
                logprobs = clean_logprobs(choice.get("logprobs"))
                if logprobs:
                    delta["logprobs"] = logprobs
                if delta:
                    streamed = True
                    yield {"delta": delta}
                finish_reason = choice.get("finish_reason") or finish_reason
    except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as exc:
        if stop.is_set():
            return
        message = f"upstream stream broke: {describe_error(exc)}"
        raise BackendError("upstream_error", message, retry=not streamed) from None
    if stop.is_set():
        return
    if not done and finish_reason is None:
        raise BackendError("upstream_error", "the upstream closed the stream before it finished", retry=not streamed)
    yield _finish(finish_reason, usage)


def _relay_whole(response: requests.Response) -> Events:
    try:
        body = response.json()
        choice = body["choices"][0]
        message = dict(choice.get("message") or {})
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        raise BackendError("upstream_error", "the upstream answered JSON that is not a chat completion") from None
    delta = _clean_delta(message, {})
    logprobs = clean_logprobs(choice.get("logprobs"))
    if logprobs:
        delta["logprobs"] = logprobs
    if delta:
        yield {"delta": delta}
    yield _finish(choice.get("finish_reason"), _usage(body.get("usage")))


def _error_text(error: Any) -> tuple[str, str]:
    if isinstance(error, dict):
        message = error.get("message") or error.get("detail") or json.dumps(error)
        return str(message)[:500], str(error.get("code") or "")
    return str(error)[:500], ""


def _clean_delta(delta: Any, call_ids: dict[str, int]) -> dict[str, Any]:
    """Keep the delta fields the protocol relays, dropping empty ones and the role."""
    if not isinstance(delta, dict):
        return {}
    if "reasoning_content" not in delta and isinstance(delta.get("reasoning"), str):
        delta = {**delta, "reasoning_content": delta["reasoning"]}  # Ollama and OpenRouter spell it so
    clean: dict[str, Any] = {}
    for name in TEXT_FIELDS:
        if delta.get(name) and isinstance(delta[name], str):
            clean[name] = delta[name]
    if isinstance(delta.get("tool_calls"), list):
        calls = clean_tool_calls(delta["tool_calls"], call_ids)
        if calls:
            clean["tool_calls"] = calls
    return clean


def clean_tool_calls(items: list[Any], call_ids: dict[str, int]) -> list[dict[str, Any]]:
    """Rebuild an upstream's tool-call pieces in the protocol's strict shape, without unknown keys or nulls."""
    calls = []
    for position, item in enumerate(items):
        if not isinstance(item, dict):
            continue
        call_id = item.get("id") if isinstance(item.get("id"), str) else ""
        index = item.get("index")
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index <= MAX_TOOL_INDEX:
            # Gemini's compatibility API leaves the index out, and streams parallel calls in
            # separate chunks: number calls by id; a piece without one continues the latest.
            index = call_ids.setdefault(call_id, len(call_ids)) if call_id else max(len(call_ids) - 1, position)
        call: dict[str, Any] = {"index": index, "id": call_id, "type": "function"} if call_id else {"index": index}
        source = item["function"] if isinstance(item.get("function"), dict) else {}
        function = {"name": source["name"]} if isinstance(source.get("name"), str) and source["name"] else {}
        arguments = source.get("arguments")
        if arguments is not None:  # some servers send a JSON value; OpenAI streams its text
            function["arguments"] = arguments if isinstance(arguments, str) else _json_text(arguments)
        if function:
            call["function"] = function
        if len(call) > 1:  # a piece with nothing but its index tells the client nothing
            calls.append(call)
    return calls


def clean_logprobs(logprobs: Any) -> dict[str, Any]:
    """Rebuild a choice's log probabilities in the protocol's strict shape; {} when it has none."""
    if not isinstance(logprobs, dict):
        return {}
    clean = {}
    for name in ("content", "refusal"):
        if isinstance(logprobs.get(name), list):
            tokens = [t for t in map(_token_logprob, logprobs[name]) if t]
            if tokens:
                clean[name] = tokens
    return clean


def _token_logprob(item: Any, top: bool = False) -> dict[str, Any] | None:
    """Keep a token's token, logprob, bytes and (but in an alternative) top_logprobs; drop the rest (llama.cpp's id)."""
    if not isinstance(item, dict) or not isinstance(item.get("token"), str):
        return None
    logprob = item.get("logprob")
    if isinstance(logprob, bool) or not isinstance(logprob, (int, float)):
        return None
    raw = item.get("bytes")
    valid = isinstance(raw, list) and all(isinstance(b, int) and not isinstance(b, bool) and 0 <= b <= 255 for b in raw)
    token = {"token": item["token"], "logprob": logprob if math.isfinite(logprob) else MIN_LOGPROB,
             "bytes": raw if valid else None}
    if not top:
        alternatives = item.get("top_logprobs") if isinstance(item.get("top_logprobs"), list) else []
        token["top_logprobs"] = [t for t in (_token_logprob(a, top=True) for a in alternatives) if t][:MAX_TOP_LOGPROBS]
    return token


def _json_text(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _usage(usage: Any) -> dict[str, int] | None:
    if not isinstance(usage, dict):
        return None
    counts = {name: usage.get(name) for name in ("prompt_tokens", "completion_tokens")}
    if all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in counts.values()):
        return counts  # type: ignore[return-value]
    return None


def _finish(reason: Any, usage: dict[str, int] | None) -> Event:
    if reason == "function_call":
        reason = "tool_calls"
    finish: dict[str, Any] = {"reason": reason if reason in FINISH_REASONS else "stop"}
    if usage:
        finish["usage"] = usage
    return {"finish": finish}


BACKENDS: dict[str, Callable[[dict[str, Any], BackendConfig, StopSignal], Events]] = {
    "echo": run_echo,
    "openai": run_openai,
}
# What each backend declares in its claims (docs/worker-protocol.md): the gateway gives a job
# that asks for a feature (logprobs: true) only to a worker that declared it.
FEATURES: dict[str, list[str]] = {
    "echo": [],
    "openai": ["logprobs"],  # the upstream answers it; the request's logprobs go to it as they came
}
