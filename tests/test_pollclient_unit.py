"""The pollclient without the real gateway: backends against a fake upstream, the CLI as a
subprocess, and the worker loop against a small in-test fake of the worker protocol."""
from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from flask import Flask

from pollclient import lease
from pollclient.backends import (
    BackendConfig,
    BackendError,
    StopSignal,
    clean_logprobs,
    clean_tool_calls,
    list_upstream_models,
    run_echo,
    run_openai,
    split_words,
    upstream_http_error,
)
from pollclient.outbound import UnsafeRequest, check_image_url, outbound_request, resolve_host
from pollclient.retry import Backoff, polite_delay
from tests.fake_upstream import (ANSWER, LOGPROB, LONG_ID_TOOL_CALLS, REASONING, TOOL_ARGUMENTS, FakeUpstream,
                                 start_fake_upstream, words)
from tests.support import wait_for_hangup
from webapp import config as gateway_config
from webapp.errors import ApiError
from webapp.worker_input import parse_reports

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "pgw_test_secret_token_123"
# The gateway's own report validation needs an app for its settings, nothing more.
STRICT = Flask("strict-reports")
STRICT.config["MAX_CHUNKS_PER_REPORT"] = 1_000_000  # FakeGateway.max_chunks decides the 413s


@pytest.fixture
def upstream() -> Iterator[FakeUpstream]:
    with start_fake_upstream() as server:
        yield server


@pytest.fixture
def config(upstream: FakeUpstream) -> Iterator[BackendConfig]:
    cfg = BackendConfig(upstream_url=upstream.url, upstream_key="sk-upstream")
    yield cfg
    cfg.session.close()


def chat(model: str, text: str = "Hello", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": text}], **extra}


def joined(events: list[dict[str, Any]], field: str = "content") -> str:
    return "".join(e["delta"].get(field, "") for e in events if "delta" in e)


# -- echo ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "Hello world",
        "  leading and trailing  ",
        "multi\n\nline\twith  tabs\r\n",
        "one",
        "   ",
        "héllo wörld ✓ 日本語",
    ],
)
def test_echo_streams_word_by_word_exactly(text: str) -> None:
    events = list(run_echo(chat("echo", text), BackendConfig(), StopSignal()))
    deltas = [e["delta"]["content"] for e in events if "delta" in e]
    assert "".join(deltas) == text
    assert all(len(d.split()) <= 1 for d in deltas)  # one word per delta, whitespace kept
    assert len(deltas) == max(1, len(text.split()))
    assert events[-1] == {"finish": {"reason": "stop"}}


def test_echo_joins_text_parts_and_uses_the_last_user_message() -> None:
    request = {
        "model": "echo",
        "messages": [
            {"role": "system", "content": "be nice"},
            {"role": "user", "content": "first question"},
            {"role": "assistant", "content": "an answer"},
            {"role": "user", "content": [
                {"type": "text", "text": "look at"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                {"type": "text", "text": "this  picture"},
            ]},
            {"role": "assistant", "content": "a prefill that is not echoed"},
        ],
    }
    assert joined(list(run_echo(request, BackendConfig(), StopSignal()))) == "look at this  picture"


@pytest.mark.parametrize("messages", [[], [{"role": "user", "content": ""}], [{"role": "system", "content": "x"}]])
def test_echo_answers_an_empty_message_with_empty_content(messages: list[dict[str, Any]]) -> None:
    events = list(run_echo({"model": "echo", "messages": messages}, BackendConfig(), StopSignal()))
    assert events == [{"delta": {"content": ""}}, {"finish": {"reason": "stop"}}]


def test_split_words_keeps_every_character() -> None:
    assert split_words(" a  b\n") == [" a  ", "b\n"]
    assert split_words("") == []


def test_echo_delay_is_honoured_and_stop_interrupts_it() -> None:
    config = BackendConfig(echo_delay=0.1)
    started = time.monotonic()
    assert joined(list(run_echo(chat("echo", "a b c"), config, StopSignal()))) == "a b c"
    assert 0.18 < time.monotonic() - started < 1.0

    stop = StopSignal()
    events = run_echo(chat("echo", "a b c d e f"), BackendConfig(echo_delay=5), stop)
    assert next(events) == {"delta": {"content": "a "}}
    threading.Timer(0.1, stop.set).start()
    started = time.monotonic()
    assert list(events) == []  # no finish once stopped
    assert time.monotonic() - started < 1.0


# -- openai --------------------------------------------------------------------------


def test_openai_streams_content_and_usage(upstream: FakeUpstream, config: BackendConfig) -> None:
    events = list(run_openai(chat("fake-chat", temperature=0.2, max_tokens=20), config, StopSignal()))
    assert joined(events) == ANSWER
    assert len([e for e in events if "delta" in e]) > 3  # streamed in pieces, not in one go
    assert events[-1] == {"finish": {"reason": "stop", "usage": {"prompt_tokens": 7, "completion_tokens": 7}}}
    sent = upstream.requests[-1]
    assert sent["path"] == "/v1/chat/completions"
    assert sent["headers"]["Authorization"] == "Bearer sk-upstream"
    assert sent["body"]["stream"] is True
    assert sent["body"]["stream_options"] == {"include_usage": True}
    assert sent["body"]["temperature"] == 0.2 and sent["body"]["max_tokens"] == 20
    assert all(set(e["delta"]) <= {"content"} for e in events if "delta" in e)  # no role, no empty fields


def test_openai_streams_reasoning_before_content(config: BackendConfig) -> None:
    events = list(run_openai(chat("fake-reasoning"), config, StopSignal()))
    deltas = [e["delta"] for e in events if "delta" in e]
    assert joined(events, "reasoning_content") == REASONING
    assert joined(events) == ANSWER
    first_content = next(i for i, d in enumerate(deltas) if "content" in d)
    assert all("reasoning_content" in d for d in deltas[:first_content])


def test_openai_streams_tool_calls(config: BackendConfig) -> None:
    tools = [{"type": "function", "function": {"name": "get_weather"}}]
    events = list(run_openai(chat("fake-tools", tools=tools), config, StopSignal()))
    calls = [c for e in events if "delta" in e for c in e["delta"]["tool_calls"]]
    assert calls[0]["id"] == "call_1" and calls[0]["function"]["name"] == "get_weather"
    assert "".join(c["function"]["arguments"] for c in calls) == "".join(TOOL_ARGUMENTS)
    assert all(c["index"] == 0 for c in calls)
    assert events[-1]["finish"]["reason"] == "tool_calls"


# What the gateway's client gets once the fake-tools-loose pieces are joined by index.
LOOSE_CALLS_MERGED = {
    0: {"id": "call_a", "name": "get_weather", "arguments": '{"city":"Paris"}'},
    1: {"id": "call_b", "name": "get_time", "arguments": '{"zone": "CET"}'},
}


def merge_tool_calls(deltas: list[dict[str, Any]]) -> dict[int, dict[str, str]]:
    """Join streamed tool-call pieces by index, as an OpenAI client does."""
    calls: dict[int, dict[str, str]] = {}
    for delta in deltas:
        for piece in delta.get("tool_calls", []):
            call = calls.setdefault(piece["index"], {"id": "", "name": "", "arguments": ""})
            call["id"] += piece.get("id", "")
            call["name"] += piece.get("function", {}).get("name", "")
            call["arguments"] += piece.get("function", {}).get("arguments", "")
    return calls


def validate_report(body: dict[str, Any]) -> None:
    """Check a chunk report with the real gateway's rules: ApiError (a 400) where it would refuse it."""
    with STRICT.app_context():
        parse_reports(body)


def gateway_accepts(deltas: list[dict[str, Any]]) -> None:
    """Check that the gateway would take these deltas as one job's chunks."""
    validate_report({"jobs": [{"id": "job-1", "lease": "lease-1",
                               "chunks": [{"seq": i, "delta": d} for i, d in enumerate(deltas)]}]})


def test_openai_rebuilds_tool_calls_the_upstream_left_loose(config: BackendConfig) -> None:
    events = list(run_openai(chat("fake-tools-loose"), config, StopSignal()))
    deltas = [e["delta"] for e in events if "delta" in e]
    assert [d["tool_calls"] for d in deltas] == [
        [{"index": 0, "id": "call_a", "type": "function",
          "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}],
        [{"index": 1, "id": "call_b", "type": "function", "function": {"name": "get_time", "arguments": '{"zone": '}}],
        [{"index": 1, "function": {"arguments": '"CET"}'}}],
    ]
    assert merge_tool_calls(deltas) == LOOSE_CALLS_MERGED
    gateway_accepts(deltas)
    assert events[-1]["finish"]["reason"] == "tool_calls"


@pytest.mark.parametrize(
    "items, expected",
    [
        # An upstream's own index is kept, 0 included, wherever the piece sits in the list.
        ([{"index": 1, "id": "b"}, {"index": 0, "function": {"arguments": "{}"}}],
         [{"index": 1, "id": "b", "type": "function"}, {"index": 0, "function": {"arguments": "{}"}}]),
        # No index, no id: the place in the list.
        ([{"function": {"name": "f"}}, {"function": {"name": "g"}}],
         [{"index": 0, "function": {"name": "f"}}, {"index": 1, "function": {"name": "g"}}]),
        # An index that is no index (a bool, out of range, text) counts as absent.
        ([{"index": True, "id": "x"}, {"index": 128, "id": "y"}, {"index": "2", "id": "x"}],
         [{"index": 0, "id": "x", "type": "function"}, {"index": 1, "id": "y", "type": "function"},
          {"index": 0, "id": "x", "type": "function"}]),
        # Arguments sent as a JSON value become its text; a text of any shape is kept as sent.
        ([{"index": 0, "function": {"arguments": ["a", 1, None]}}, {"index": 1, "function": {"arguments": 3}},
          {"index": 2, "function": {"arguments": {"q": "é"}}}, {"index": 3, "function": {"arguments": ""}}],
         [{"index": 0, "function": {"arguments": '["a",1,null]'}}, {"index": 1, "function": {"arguments": "3"}},
          {"index": 2, "function": {"arguments": '{"q":"é"}'}}, {"index": 3, "function": {"arguments": ""}}]),
        # Nulls, empty names, unknown keys, a function that is no object, pieces that say nothing.
        ([{"index": 0, "id": None, "type": None, "function": None, "logprobs": []},
          {"index": 0, "id": "", "type": "", "function": {"name": "", "arguments": None, "strict": True}},
          {"index": 0, "function": "f(x)"}, None, 7, "call", ["index", 0]],
         []),
    ],
)
def test_clean_tool_calls_table(items: list[Any], expected: list[dict[str, Any]]) -> None:
    calls = clean_tool_calls(items, {})
    assert calls == expected
    if calls:
        gateway_accepts([{"tool_calls": calls}])


@pytest.mark.parametrize("model", ["fake-chat", "fake-json"])
def test_openai_relays_the_upstreams_logprobs(config: BackendConfig, upstream: FakeUpstream, model: str) -> None:
    events = list(run_openai(chat(model, logprobs=True, top_logprobs=2), config, StopSignal()))
    deltas = [e["delta"] for e in events if "delta" in e]
    tokens = [t for d in deltas for t in d.get("logprobs", {}).get("content", [])]
    assert [t["token"] for t in tokens] == words(ANSWER)
    # llama.cpp's extra id is gone: the gateway takes nothing a token does not have.
    assert tokens[0] == {"token": "Hello,", "logprob": LOGPROB, "bytes": list(b"Hello,"), "top_logprobs": [
        {"token": "alt0", "logprob": LOGPROB - 1, "bytes": list(b"alt0")},
        {"token": "alt1", "logprob": LOGPROB - 2, "bytes": list(b"alt1")}]}
    gateway_accepts(deltas)
    sent = next(r["body"] for r in upstream.requests if r["method"] == "POST")
    assert (sent["logprobs"], sent["top_logprobs"]) == (True, 2)


def test_openai_sends_no_logprobs_unasked(config: BackendConfig) -> None:
    events = list(run_openai(chat("fake-chat"), config, StopSignal()))
    assert not any("logprobs" in e["delta"] for e in events if "delta" in e)


def test_clean_logprobs_keeps_the_protocols_shape() -> None:
    raw = {"content": [
        {"token": "a", "logprob": float("-inf"), "bytes": [97], "top_logprobs": [
            {"token": f"t{k}", "logprob": -1.0, "bytes": [300], "id": k} for k in range(25)]},
        {"token": None, "logprob": -1.0}, {"token": "b", "logprob": True}, "c", None,
        {"token": "d", "logprob": -2, "bytes": None},
    ], "refusal": None, "text_offset": [0]}
    clean = clean_logprobs(raw)
    assert list(clean) == ["content"]
    first, second = clean["content"]
    assert first["logprob"] == -9999.0 and first["bytes"] == [97] and len(first["top_logprobs"]) == 20
    assert first["top_logprobs"][0] == {"token": "t0", "logprob": -1.0, "bytes": None}
    assert second == {"token": "d", "logprob": -2, "bytes": None, "top_logprobs": []}
    gateway_accepts([{"logprobs": clean}])
    assert clean_logprobs(None) == clean_logprobs({"content": None}) == clean_logprobs([1]) == {}


def test_clean_tool_calls_numbers_unindexed_calls_by_id_across_chunks() -> None:
    call_ids: dict[str, int] = {}
    chunks = [
        [{"id": "a", "function": {"name": "f", "arguments": "{"}}],
        [{"function": {"arguments": "}"}}],  # continues a
        [{"id": "b", "function": {"name": "g", "arguments": "{}"}}, {"id": "c", "function": {"name": "h"}}],
        [{"id": "a"}],  # a again keeps its index
    ]
    assert [[c["index"] for c in clean_tool_calls(items, call_ids)] for items in chunks] == [[0], [0], [1, 2], [0]]


def test_openai_retries_without_stream_options_when_refused(upstream: FakeUpstream, config: BackendConfig) -> None:
    events = list(run_openai(chat("fake-old"), config, StopSignal()))
    assert joined(events) == ANSWER
    assert events[-1] == {"finish": {"reason": "stop"}}  # no usage: the gateway counts
    bodies = [r["body"] for r in upstream.requests]
    assert "stream_options" in bodies[0] and "stream_options" not in bodies[1]


def test_openai_accepts_an_upstream_that_ignores_stream(config: BackendConfig) -> None:
    events = list(run_openai(chat("fake-json"), config, StopSignal()))
    assert events == [
        {"delta": {"content": ANSWER}},
        {"finish": {"reason": "stop", "usage": {"prompt_tokens": 7, "completion_tokens": 8}}},
    ]


def test_openai_reads_a_close_delimited_stream_as_it_arrives() -> None:
    with start_fake_upstream(delay=0.2) as server:
        config = BackendConfig(upstream_url=server.url)
        started = time.monotonic()
        events = run_openai(chat("fake-close"), config, StopSignal())
        assert next(events) == {"delta": {"content": "Hello,"}}
        assert time.monotonic() - started < 0.6  # not after the whole 1.8 s body
        assert joined(list(events)) == ANSWER[len("Hello,"):]
        config.session.close()


@pytest.mark.parametrize(
    "model, code, retry",
    [
        ("fake-400", "invalid_request", False),
        ("fake-context", "context_length_exceeded", False),
        ("no-such-model", "model_not_found", False),
        ("fake-429", "rate_limited", False),
        ("fake-500", "upstream_error", True),
        ("fake-401", "upstream_error", True),
    ],
)
def test_openai_maps_upstream_http_errors(config: BackendConfig, model: str, code: str, retry: bool) -> None:
    with pytest.raises(BackendError) as caught:
        list(run_openai(chat(model), config, StopSignal()))
    assert caught.value.code == code
    assert caught.value.retry is retry
    report = caught.value.as_report()
    assert report["code"] == code and report["message"].startswith("upstream HTTP ")


@pytest.mark.parametrize(
    "status, message, code",
    [
        (400, "prompt is too long: 9000 tokens > 8192", "context_length_exceeded"),
        (400, "bad temperature", "invalid_request"),
        (422, "field required", "invalid_request"),
        (503, "overloaded", "upstream_error"),
    ],
)
def test_upstream_http_error_table(status: int, message: str, code: str) -> None:
    assert upstream_http_error(status, message).code == code


def test_openai_unreachable_upstream_is_retryable() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    config = BackendConfig(upstream_url=f"http://127.0.0.1:{port}/v1")
    with pytest.raises(BackendError) as caught:
        list(run_openai(chat("fake-chat"), config, StopSignal()))
    assert (caught.value.code, caught.value.retry) == ("upstream_unavailable", True)
    assert "connection refused" in str(caught.value)
    config.session.close()


@pytest.mark.parametrize("model", ["fake-drop", "fake-error-event"])
def test_openai_failure_after_output_is_not_retried(config: BackendConfig, model: str) -> None:
    events = run_openai(chat(model), config, StopSignal())
    assert "content" in next(events)["delta"]
    with pytest.raises(BackendError) as caught:
        list(events)
    assert (caught.value.code, caught.value.retry) == ("upstream_error", False)


def test_openai_stop_closes_the_upstream_stream(upstream: FakeUpstream, config: BackendConfig) -> None:
    stop = StopSignal()
    events = run_openai(chat("fake-slow"), config, stop)
    assert next(events) == {"delta": {"content": "w0 "}}
    stop.set()
    assert list(events) == []
    assert upstream.wait_closed_early("fake-slow")
    assert "fake-slow" not in upstream.finished


def test_openai_stop_interrupts_a_silent_upstream(config: BackendConfig) -> None:
    stop = StopSignal()
    events = run_openai(chat("fake-hang"), config, stop)
    threading.Timer(0.2, stop.set).start()
    started = time.monotonic()
    assert list(events) == []  # the read blocked in the 5 s silence returns at once
    assert time.monotonic() - started < 1.5


def test_list_upstream_models(upstream: FakeUpstream) -> None:
    config = BackendConfig(upstream_url=upstream.url)
    assert "fake-chat" in list_upstream_models(config)
    config.session.close()
    with start_fake_upstream(api_key="right") as guarded:
        wrong = BackendConfig(upstream_url=guarded.url, upstream_key="wrong")
        with pytest.raises(BackendError, match="401"):
            list_upstream_models(wrong)
        wrong.session.close()


# -- what reaches the upstream ----------------------------------------------------------

FAKE_DNS = {
    "cdn.example": ["93.184.216.34", "2606:2800:220:1::1"],
    "half-internal.example": ["93.184.216.34", "10.1.2.3"],  # every address counts, not the first
    "metadata.example": ["169.254.169.254"],
    "nas.example": ["fd00::12"],
}


def fake_resolve(host: str) -> list[str]:
    if host not in FAKE_DNS:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    return FAKE_DNS[host]


@pytest.mark.parametrize("url", [
    "http://127.0.0.1/cat.png", "http://127.1.2.3:8080/cat.png", "http://169.254.169.254/latest/meta-data/",
    "http://10.0.0.5/", "http://172.16.0.1/", "http://192.168.1.1/", "http://100.64.0.1/", "http://0.0.0.0/",
    "http://224.0.0.1/", "http://240.0.0.1/", "http://255.255.255.255/",
    "http://[::1]/", "http://[::]/", "http://[fd00::1]/", "http://[fe80::1%25eth0]/", "http://[ff02::1]/",
    "http://[::ffff:127.0.0.1]/", "http://[::ffff:a9fe:a9fe]/", "http://[2002:7f00:1::]/", "http://[64:ff9b::a9fe:a9fe]/",
    "http://metadata.example/", "https://nas.example/x.png", "http://half-internal.example/cat.png",
    "http://nowhere.example/cat.png",  # a host this worker cannot vet is not sent on
    "file:///etc/passwd", "ftp://93.184.216.34/cat.png", "gopher://93.184.216.34/", "//93.184.216.34/cat.png",
    "http://169.254.169.254\\@cdn.example/", "http://user:pw@cdn.example/cat.png", "http://cdn.example /x", "http://[::1/x.png", 42,
])
def test_image_urls_on_private_networks_are_refused(url: Any) -> None:
    with pytest.raises(UnsafeRequest, match=r"^messages\[0\]\.content\[1\]\.image_url\.url"):
        check_image_url(url, "messages[0].content[1].image_url.url", fake_resolve)


@pytest.mark.parametrize("url", [
    "http://93.184.216.34/cat.png", "https://[2606:4700:4700::1111]/cat.png", "https://cdn.example:8443/cat.png",
    "data:image/png;base64,iVBORw0KGgo=", "DATA:image/png;base64,iVBORw0KGgo=",
])
def test_public_and_inline_image_urls_pass(url: str) -> None:
    check_image_url(url, "url", fake_resolve)


@pytest.mark.parametrize("host", ["localhost", "2852039166", "0x7f.1"])  # 2852039166 is 169.254.169.254
def test_names_are_resolved_here_and_loopback_ones_refused(host: str) -> None:
    assert resolve_host(host)  # the machine's own resolver, as the upstream's would read them
    with pytest.raises(UnsafeRequest, match=f"the image host {host} is a private"):
        check_image_url(f"http://{host}:8080/cat.png", "url", resolve_host)


def test_the_refusal_names_the_host_and_the_flag_turns_the_check_off() -> None:
    request = chat("fake-chat")
    request["messages"][0]["content"] = [{"type": "image_url", "image_url": {"url": "http://169.254.169.254/x"}}]
    with pytest.raises(UnsafeRequest, match="169.254.169.254 is a private, loopback, link-local or reserved"):
        outbound_request(request, resolve=fake_resolve)
    assert outbound_request(request, allow_private_image_urls=True, resolve=fake_resolve) == request


def test_only_the_keys_an_openai_message_may_carry_are_sent() -> None:
    call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}", "x": 1}, "x": 2}
    request = {"model": "m", "temperature": 0.5, "messages": [
        {"role": "system", "content": "be brief", "x_vendor": {"callback": "http://169.254.169.254/"}},
        {"role": "user", "name": "ann", "metadata": {"a": 1}, "content": [
            {"type": "text", "text": "look", "cache_control": {"type": "ephemeral"}},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA", "detail": "low", "x": 1}},
            {"type": "image_url", "image_url": "https://cdn.example/cat.png"},
            {"type": "input_audio", "input_audio": {"data": "UklG", "format": "wav", "x": 1}},
            {"type": "file", "file": {"file_url": "http://169.254.169.254/"}}, {"type": "text"}, "not a part",
        ]},
        {"role": "assistant", "content": None, "tool_calls": [call], "audio": {"id": "a"}},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny", "x": 3},
    ]}
    assert outbound_request(request, resolve=fake_resolve) == {"model": "m", "temperature": 0.5, "messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "name": "ann", "content": [
            {"type": "text", "text": "look"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA", "detail": "low"}},
            {"type": "image_url", "image_url": {"url": "https://cdn.example/cat.png"}},
            {"type": "input_audio", "input_audio": {"data": "UklG", "format": "wav"}},
        ]},
        {"role": "assistant", "content": None,
         "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "content": "sunny", "tool_call_id": "call_1"},
    ]}


def test_openai_refuses_a_private_image_url_before_calling_the_upstream(upstream: FakeUpstream,
                                                                        config: BackendConfig) -> None:
    request = chat("fake-chat")
    request["messages"][0]["content"] = [{"type": "image_url", "image_url": {"url": "http://[::1]:8080/x.png"}}]
    with pytest.raises(BackendError) as refused:
        list(run_openai(request, config, StopSignal()))
    assert refused.value.as_report() == {"code": "invalid_request", "retry": False, "message": (
        "messages[0].content[0].image_url.url: the image host ::1 is a private, loopback, link-local or reserved "
        "address; this worker does not fetch images from its own network.")}
    assert upstream.requests == []
    config.allow_private_image_urls = True
    assert joined(list(run_openai(request, config, StopSignal()))) == ANSWER
    assert upstream.requests[-1]["body"]["messages"] == request["messages"]


# -- the CLI as a subprocess -----------------------------------------------------------


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("POLLCLIENT_")}
    env["PYTHONWARNINGS"] = "error"  # pollclient itself must not warn either
    return {**env, **extra}


def run_cli(*args: str, timeout: float = 30, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "pollclient", *args], cwd=ROOT, env=clean_env(**env),
        capture_output=True, text=True, timeout=timeout,
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(
    "args, env, words",
    [
        (["--api-url", "http://127.0.0.1:5000"], {}, "token"),
        ([], {"POLLCLIENT_TOKEN": TOKEN}, "--api-url"),
        (["--token", TOKEN, "--api-url", "127.0.0.1:5000"], {}, "http"),
        (["--api-url", "ftp://example.com"], {"POLLCLIENT_TOKEN": TOKEN}, "http"),
        (["--token", TOKEN, "--api-url", "http://x", "--max-concurrent", "0"], {}, "--max-concurrent"),
        (["--token", TOKEN, "--api-url", "http://x", "--poll-wait", "60"], {}, "--poll-wait"),
        (["--token", TOKEN, "--api-url", "http://x", "--backend", "openai"], {}, "--upstream-url"),
        (["--token", TOKEN, "--api-url", "http://x"], {"POLLCLIENT_BACKEND": "nope"}, "POLLCLIENT_BACKEND"),
    ],
)
def test_cli_bad_settings_give_one_readable_line(args: list[str], env: dict[str, str], words: str) -> None:
    result = run_cli(*args, **env)
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pollclient: error: ") and words in lines[0]
    assert TOKEN not in result.stderr


def test_cli_unreachable_upstream_exits_non_zero() -> None:
    url = f"http://127.0.0.1:{free_port()}/v1"
    result = run_cli("--api-url", "http://127.0.0.1:5000", "--backend", "openai", "--upstream-url", url,
                     POLLCLIENT_TOKEN=TOKEN)
    assert result.returncode == 1
    expected = f"pollclient: error: cannot reach the upstream at {url}: connection refused"
    assert result.stderr.strip().splitlines() == [expected]


def test_cli_help_names_the_environment_variables() -> None:
    result = run_cli("--help", POLLCLIENT_TOKEN=TOKEN, POLLCLIENT_UPSTREAM_KEY="sk-secret")
    assert result.returncode == 0
    for name in ("API_URL", "TOKEN", "BACKEND", "MODELS", "UPSTREAM_URL", "UPSTREAM_KEY", "MAX_CONCURRENT",
                 "ECHO_DELAY", "FLUSH_INTERVAL", "POLL_WAIT", "DRAIN_TIMEOUT", "LOG_LEVEL", "ALLOW_PRIVATE_IMAGE_URLS"):
        assert f"POLLCLIENT_{name}" in result.stdout
    assert TOKEN not in result.stdout and "sk-secret" not in result.stdout


def test_cli_runs_as_a_module_too() -> None:
    result = subprocess.run([sys.executable, "-m", "pollclient", "--version"], cwd=ROOT, env=clean_env(),
                            capture_output=True, text=True, timeout=30)
    assert (result.returncode, result.stdout.strip()) == (0, "pollclient 0.1.0")


# -- the worker loop against a fake of the worker protocol -----------------------------


class FakeGateway:
    """Just enough of /worker/v1 to drive the worker: validates reports with the real gateway's
    rules and stores chunks by seq like the real one."""

    def __init__(self, port: int = 0, lease_ttl: float = 30.0) -> None:
        self.lease_ttl = lease_ttl
        self.cond = threading.Condition()
        self.queue: list[dict[str, Any]] = []
        self.claims: list[dict[str, Any]] = []
        self.claim_times: list[float] = []
        self.claimed_at: list[float] = []  # when each job-bearing claim was answered
        self.reports: list[tuple[float, dict[str, Any]]] = []
        self.releases: list[dict[str, Any]] = []
        self.stored: dict[str, list[dict[str, Any]]] = {}
        self.ended: dict[str, dict[str, Any]] = {}
        self.leases: dict[str, str] = {}
        self.claim_status = 200
        self.busy_claims = 0  # answer this many claims with 503 and Retry-After: 1
        self.hold = 0.3  # longest an empty claim is held, whatever its wait
        self.fail_reports = 0  # answer this many chunk reports with a 500
        self.max_chunks = 2000  # a report with more chunks gets a 413, like the real MAX_CHUNKS_PER_REPORT
        self.gap_once: set[str] = set()  # jobs whose first report gets a seq_gap back
        self.cancel: set[str] = set()  # jobs answered stop/cancelled
        # Canned answers, (status, headers, body bytes), given to the next calls of a path first.
        self.canned: dict[str, list[tuple[int, dict[str, str], bytes]]] = {}
        self.hang_reports: set[int] = set()  # the n-th chunk reports (from 0) that never get an answer
        self.hung: list[tuple[float, float]] = []  # (received, abandoned by the worker) of each one
        self.report_count = 0
        self.refused: list[dict[str, Any]] = []  # the 400 answers to reports the real gateway would refuse
        self.enforce_leases = False  # a report past its lease gets lease_lost, like the real gateway
        self.renewed: dict[str, float] = {}  # when each lease was last renewed
        handler = type("Handler", (_GatewayHandler,), {"gateway": self})
        self.server = ThreadingHTTPServer(("127.0.0.1", port), handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def add_job(self, job_id: str, text: str, model: str = "echo") -> None:
        with self.cond:
            self.queue.append({"id": job_id, "text": text, "model": model})
            self.cond.notify_all()

    def text(self, job_id: str) -> str:
        with self.cond:
            return "".join(c.get("content", "") for c in self.stored.get(job_id, []))

    def wait(self, predicate: Any, timeout: float = 10.0) -> bool:
        with self.cond:
            return self.cond.wait_for(predicate, timeout)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def take_hang(self, path: str) -> bool:
        """Count a chunk report; tell whether to leave it unanswered."""
        with self.cond:
            if path != "/worker/v1/chunks":
                return False
            self.report_count += 1
            return self.report_count - 1 in self.hang_reports

    def hang(self, connection: socket.socket) -> None:
        """Answer nothing until the worker gives up on the request and closes the connection."""
        received = time.monotonic()
        closed = wait_for_hangup(connection)
        with self.cond:
            self.hung.append((received, closed))
            self.cond.notify_all()

    def answer(self, path: str, body: dict[str, Any]) -> tuple[int, dict[str, str], bytes]:
        """Return a canned answer for the path if one is left, else the protocol's answer."""
        with self.cond:
            canned = self.canned.get(path)
            if canned:
                if path == "/worker/v1/claim":
                    self.claims.append(body)
                    self.claim_times.append(time.monotonic())
                else:
                    self.reports.append((time.monotonic(), body))
                self.cond.notify_all()
                return canned.pop(0)
        status, answer = self.handle(path, body)
        return status, {"Retry-After": "1"} if status == 503 else {}, json.dumps(answer).encode()

    def handle(self, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        with self.cond:
            try:
                if path == "/worker/v1/claim":
                    return self._claim(body)
                if path == "/worker/v1/chunks":
                    return self._chunks(body)
                if path == "/worker/v1/release":
                    self.releases.append(body)
                    return 200, {"jobs": [{"id": j["id"], "ok": True, "state": "queued"} for j in body["jobs"]]}
                return 404, {"error": {"message": "no such path"}}
            finally:
                self.cond.notify_all()

    def _claim(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        self.claims.append(body)
        self.claim_times.append(time.monotonic())
        self.cond.notify_all()  # wake a test waiting for this claim, before holding it
        if self.busy_claims:
            self.busy_claims -= 1
            return 503, {"error": {"message": "Too many held requests.", "type": "server_error"}}
        if self.claim_status != 200:
            return self.claim_status, {"error": {"message": "Invalid worker token.", "type": "invalid_request_error"}}
        self.cond.wait_for(lambda: self.queue, min(body["wait"], self.hold))
        jobs, self.queue = self.queue[: body["max_jobs"]], self.queue[body["max_jobs"]:]
        answer = []
        for job in jobs:
            self.leases[job["id"]] = f"lease-{job['id']}"
            self.renewed[job["id"]] = time.monotonic()
            self.stored.setdefault(job["id"], [])
            answer.append({
                "id": job["id"], "lease": self.leases[job["id"]], "lease_ttl": self.lease_ttl, "deadline_in": 300,
                "attempt": 1, "model": job["model"],
                "request": {"model": job["model"], "messages": [{"role": "user", "content": job["text"]}]},
            })
        if answer:
            self.claimed_at.append(time.monotonic())
        return 200, {"worker": {"id": 7, "name": "test-worker"}, "jobs": answer}

    def _chunks(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        self.reports.append((time.monotonic(), body))
        if self.fail_reports:
            self.fail_reports -= 1
            return 500, {"error": {"message": "database is locked"}}
        if sum(len(entry.get("chunks") or []) for entry in body["jobs"]) > self.max_chunks:
            return 413, {"error": {"message": "Too many chunks in one report; send smaller batches."}}
        try:
            validate_report(body)
        except ApiError as exc:
            self.refused.append(exc.body())
            return exc.status, exc.body()
        return 200, {"jobs": [self._apply(entry) for entry in body["jobs"]]}

    def _apply(self, entry: dict[str, Any]) -> dict[str, Any]:
        job_id = entry["id"]
        stored = self.stored[job_id]
        lapsed = self.enforce_leases and time.monotonic() - self.renewed.get(job_id, -math.inf) > self.lease_ttl
        if self.leases.get(job_id) != entry["lease"] or (lapsed and job_id not in self.ended):
            return {"id": job_id, "ok": False, "next_seq": 0, "stop": True, "reason": "lease_lost"}
        self.renewed[job_id] = time.monotonic()
        if job_id in self.ended:
            return {"id": job_id, "ok": True, "next_seq": len(stored), "stop": True, "reason": "finished"}
        if job_id in self.cancel:
            return {"id": job_id, "ok": False, "next_seq": len(stored), "stop": True, "reason": "cancelled"}
        chunks = entry.get("chunks") or []  # optional, as on the real gateway
        if job_id in self.gap_once and chunks:
            self.gap_once.discard(job_id)  # store nothing, as if an earlier chunk had been lost
            return {"id": job_id, "ok": False, "next_seq": len(stored), "stop": False, "reason": "seq_gap"}
        for chunk in chunks:
            if chunk["seq"] == len(stored):
                stored.append(chunk["delta"])
            elif chunk["seq"] > len(stored):
                return {"id": job_id, "ok": False, "next_seq": len(stored), "stop": False, "reason": "seq_gap"}
        if "finish" in entry or "error" in entry:
            self.ended[job_id] = entry.get("finish") or {"error": entry["error"]}
            return {"id": job_id, "ok": True, "next_seq": len(stored), "stop": True, "reason": "finished"}
        return {"id": job_id, "ok": True, "next_seq": len(stored), "stop": False}


class _GatewayHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # The body goes out in a second write: without this, Nagle holds it until the worker's
    # delayed ACK (40 ms), and every report takes that long.
    disable_nagle_algorithm = True
    gateway: FakeGateway

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        assert self.headers["Authorization"] == f"Bearer {TOKEN}"
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.gateway.take_hang(self.path):
            self.gateway.hang(self.connection)
            self.close_connection = True
            return
        status, headers, data = self.gateway.answer(self.path, body)
        self.send_response(status)
        for name, value in {"Content-Type": "application/json", **headers}.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def gateway() -> Iterator[FakeGateway]:
    server = FakeGateway()
    yield server
    server.stop()


def start_worker(gateway_url: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "pollclient", "--api-url", gateway_url, "--poll-wait", "1", *args],
        cwd=ROOT, env=clean_env(POLLCLIENT_TOKEN=TOKEN), stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )


def finish(worker: subprocess.Popen[str], timeout: float = 20) -> tuple[int, str]:
    try:
        _, stderr = worker.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        worker.kill()
        _, stderr = worker.communicate()
        pytest.fail(f"the worker did not exit:\n{stderr}")
    assert "Traceback" not in stderr and TOKEN not in stderr
    return worker.returncode, stderr


def test_worker_serves_an_echo_job(gateway: FakeGateway) -> None:
    text = "The quick  brown fox\njumps."
    gateway.add_job("job-1", text)
    code, log = finish(start_worker(gateway.url, "--once"))
    assert code == 0, log
    assert gateway.text("job-1") == text
    assert gateway.ended["job-1"] == {"reason": "stop"}
    seqs = [c["seq"] for _, r in gateway.reports for e in r["jobs"] for c in e["chunks"]]
    assert seqs == list(range(len(text.split())))  # each chunk sent once, in order
    claim = gateway.claims[0]
    assert claim["models"] == ["echo"] and claim["max_jobs"] == 1 and claim["kind"] == "pollclient"
    assert "connected to" in log and "test-worker" in log
    assert "job job-1 finished: model echo, 5 chunks" in log


def test_worker_serves_an_openai_job_with_discovered_models(gateway: FakeGateway, upstream: FakeUpstream) -> None:
    gateway.add_job("job-1", "hi", model="fake-reasoning")
    code, log = finish(start_worker(gateway.url, "--once", "--backend", "openai", "--upstream-url", upstream.url))
    assert code == 0, log
    assert gateway.claims[0]["models"][:3] == ["fake-chat", "fake-reasoning", "fake-tools"]
    assert gateway.text("job-1") == ANSWER
    reasoning = "".join(c.get("reasoning_content", "") for c in gateway.stored["job-1"])
    assert reasoning == REASONING
    assert gateway.ended["job-1"] == {"reason": "stop", "usage": {"prompt_tokens": 7, "completion_tokens": 14}}


def test_worker_reports_loose_upstream_tool_calls_as_the_gateway_wants(gateway: FakeGateway,
                                                                         upstream: FakeUpstream) -> None:
    gateway.add_job("job-1", "weather and time?", model="fake-tools-loose")
    code, log = finish(start_worker(gateway.url, "--once", "--backend", "openai", "--upstream-url", upstream.url,
                                    "--models", "fake-tools-loose"))
    assert code == 0, log
    assert gateway.refused == []
    assert merge_tool_calls(gateway.stored["job-1"]) == LOOSE_CALLS_MERGED
    assert gateway.ended["job-1"]["reason"] == "tool_calls"


def test_the_fake_gateway_refuses_what_the_real_one_refuses(gateway: FakeGateway) -> None:
    report = {"jobs": [{"id": "job-1", "lease": "lease-job-1",
                        "chunks": [{"seq": 0, "delta": {"tool_calls": [{"id": "call_a"}]}}]}]}
    status, answer = gateway.handle("/worker/v1/chunks", report)
    assert status == 400 and answer["error"]["param"] == "jobs[0].chunks[0].delta.tool_calls[0].index"
    assert gateway.refused == [answer]


def test_worker_resends_after_a_failed_report_and_a_seq_gap(gateway: FakeGateway) -> None:
    gateway.fail_reports = 2
    gateway.gap_once.add("job-1")
    gateway.add_job("job-1", "one two three four")
    code, log = finish(start_worker(gateway.url, "--once", "--echo-delay", "0.05"))
    assert code == 0, log
    assert gateway.text("job-1") == "one two three four"
    assert gateway.ended["job-1"] == {"reason": "stop"}
    first_seqs = [[c["seq"] for c in r["jobs"][0]["chunks"]] for _, r in gateway.reports[:3]]
    assert first_seqs[0][0] == 0 and first_seqs[1][0] == 0 and first_seqs[2][0] == 0  # resent from seq 0
    assert "cannot send output to the gateway" in log


def test_worker_sends_smaller_reports_after_a_413(gateway: FakeGateway) -> None:
    gateway.max_chunks = 10
    text = " ".join(f"w{i}" for i in range(60))
    gateway.add_job("job-1", text)
    code, log = finish(start_worker(gateway.url, "--once", "--flush-interval", "0.2"))
    assert code == 0, log
    assert gateway.text("job-1") == text
    assert "report too large" in log


LONG_ID_FIELD = "jobs[0].chunks[0].delta.tool_calls[0].id"


def test_worker_fails_a_job_whose_report_the_gateway_refuses(gateway: FakeGateway, upstream: FakeUpstream,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("tests.fake_upstream.LOOSE_TOOL_CALLS", LONG_ID_TOOL_CALLS)
    gateway.add_job("job-1", "weather?", model="fake-tools-loose")
    code, log = finish(start_worker(gateway.url, "--once", "--backend", "openai", "--upstream-url", upstream.url,
                                    "--models", "fake-tools-loose"))
    assert code == 0, log
    [refused] = gateway.refused
    assert refused["error"]["param"] == LONG_ID_FIELD
    message = f"The worker's output was refused by the gateway: {refused['error']['message']}"
    error = {"code": "invalid_output", "message": message, "retry": False}
    # One error-only report follows the refused one, and nothing more: no resending, no loop.
    (refused_at, _), (failed_at, failure) = gateway.reports
    assert failure == {"jobs": [{"id": "job-1", "lease": "lease-job-1", "error": error}]}
    assert LONG_ID_FIELD in message
    assert failed_at - refused_at < 2  # at once, not at the next heartbeat (10 s) or the lapsed lease (30 s)
    assert gateway.ended["job-1"] == {"error": error}
    assert "job job-1 failed after" in log and f"invalid_output: {message}" in log


@pytest.mark.parametrize("status", [400, 500])
def test_worker_gives_a_refused_job_up_when_its_error_report_fails_too(gateway: FakeGateway, status: int) -> None:
    refusal = json.dumps({"error": {"message": "jobs[0].chunks[0].delta.content must be a string.",
                                    "param": "jobs[0].chunks[0].delta.content", "code": "invalid_type"}}).encode()
    failure = refusal if status == 400 else b'{"error": {"message": "database is locked"}}'
    gateway.canned["/worker/v1/chunks"] = [(400, {}, refusal), (status, {}, failure)]
    gateway.add_job("job-1", "one two three")
    code, log = finish(start_worker(gateway.url, "--once"))
    assert code == 0, log
    codes = [entry.get("error", {}).get("code") for _, body in gateway.reports for entry in body["jobs"]]
    assert codes == [None, "invalid_output"]  # the error report went once, and was not sent again
    assert "could not fail the refused job(s) at the gateway either" in log and "job job-1 dropped" in log


def test_worker_stops_a_cancelled_job(gateway: FakeGateway) -> None:
    gateway.cancel.add("job-1")
    gateway.add_job("job-1", "a b c d e f g h i j")
    started = time.monotonic()
    code, log = finish(start_worker(gateway.url, "--once", "--echo-delay", "1"))
    assert code == 0, log
    assert time.monotonic() - started < 6  # not the whole 9 s of echo
    assert "job-1" not in gateway.ended
    assert "stopped by the gateway (cancelled)" in log


def test_worker_runs_jobs_concurrently_and_batches_their_reports(gateway: FakeGateway) -> None:
    for i in range(3):
        gateway.add_job(f"job-{i}", "alpha beta gamma delta epsilon")
    # Each job types a word every 0.2 s for a second; a 0.6 s flush window is sure to find
    # words of both waiting even on a loaded machine (the default 0.05 s window may not).
    code, log = finish(start_worker(gateway.url, "--max-jobs", "3", "--max-concurrent", "2", "--echo-delay", "0.2",
                                    "--flush-interval", "0.6"))
    assert code == 0, log
    assert all(gateway.text(f"job-{i}") == "alpha beta gamma delta epsilon" for i in range(3))
    assert gateway.claims[0]["max_jobs"] == 2 and gateway.claims[0]["capacity"] == 2
    assert max(len(r["jobs"]) for _, r in gateway.reports) == 2  # one POST carries both running jobs
    assert all(len(r["jobs"]) <= 2 for _, r in gateway.reports)


def seq_times(gateway: FakeGateway) -> dict[int, float]:
    """Return when the gateway first received each seq."""
    times: dict[int, float] = {}
    for at, report in gateway.reports:
        for chunk in report["jobs"][0]["chunks"]:
            times.setdefault(chunk["seq"], at)
    return times


def test_worker_sends_the_first_delta_after_a_pause_at_once_and_heartbeats() -> None:
    gateway = FakeGateway(lease_ttl=0.9)
    try:
        gateway.add_job("job-1", "first second")
        code, log = finish(start_worker(gateway.url, "--once", "--echo-delay", "1.2", "--flush-interval", "1"))
        assert code == 0, log
        assert gateway.text("job-1") == "first second"
        times = seq_times(gateway)
        assert times[0] - gateway.claimed_at[0] < 0.3
        # Heartbeats went out meanwhile, yet the second word was not held back for batching.
        assert 1.1 < times[1] - times[0] < 1.5
        heartbeats = [t for t, r in gateway.reports if r["jobs"][0]["chunks"] == [] and "finish" not in r["jobs"][0]]
        assert len(heartbeats) >= 2  # every lease_ttl/3 = 0.3 s while the echo sleeps
        assert all(b - a < 0.5 for a, b in zip([times[0], *heartbeats], heartbeats))
    finally:
        gateway.stop()


def test_worker_batches_a_fast_stream(gateway: FakeGateway) -> None:
    text = " ".join(f"word{i}" for i in range(200))
    gateway.add_job("job-1", text)
    code, log = finish(start_worker(gateway.url, "--once", "--flush-interval", "0.5", "--echo-delay", "0.005"))
    assert code == 0, log
    assert gateway.text("job-1") == text
    # About 1 s of output: the leading delta at once, then one report per half second.
    assert len(gateway.reports[0][1]["jobs"][0]["chunks"]) < 20
    assert 2 <= len(gateway.reports) <= 5


def test_worker_exits_on_a_rejected_token(gateway: FakeGateway) -> None:
    gateway.claim_status = 401
    code, log = finish(start_worker(gateway.url))
    assert code == 1
    assert "the gateway refused the worker token: Invalid worker token." in log


def test_worker_waits_retry_after_when_the_gateway_is_busy(gateway: FakeGateway) -> None:
    gateway.busy_claims = 2
    gateway.add_job("job-1", "patience")
    code, log = finish(start_worker(gateway.url, "--once"))
    assert code == 0, log
    assert gateway.text("job-1") == "patience"
    assert log.count("the gateway is busy (Too many held requests.); waiting 1 s") == 1
    times = gateway.claim_times
    assert len(times) == 3 and all(0.9 < b - a < 2 for a, b in zip(times, times[1:]))


def test_worker_drains_then_releases_on_sigint(gateway: FakeGateway) -> None:
    gateway.add_job("job-1", "a b c d e f g h")
    worker = start_worker(gateway.url, "--echo-delay", "1", "--drain-timeout", "0.5")
    assert gateway.wait(lambda: gateway.text("job-1"))
    worker.send_signal(signal.SIGINT)
    code, log = finish(worker, timeout=10)
    assert code == 0, log
    assert gateway.releases == [{"jobs": [{"id": "job-1", "lease": "lease-job-1"}]}]
    assert "released 1 job(s): job-1 (queued)" in log


def test_worker_lets_a_short_job_finish_on_sigterm(gateway: FakeGateway) -> None:
    gateway.add_job("job-1", "a b c")
    worker = start_worker(gateway.url, "--echo-delay", "0.3", "--drain-timeout", "10")
    assert gateway.wait(lambda: gateway.text("job-1"))
    worker.send_signal(signal.SIGTERM)
    code, log = finish(worker, timeout=10)
    assert code == 0, log
    assert gateway.text("job-1") == "a b c" and gateway.releases == []


def test_worker_second_ctrl_c_releases_at_once(gateway: FakeGateway) -> None:
    gateway.add_job("job-1", "a b c d e f g h")
    worker = start_worker(gateway.url, "--echo-delay", "1", "--drain-timeout", "60")
    assert gateway.wait(lambda: gateway.text("job-1"))
    worker.send_signal(signal.SIGINT)
    time.sleep(0.3)
    started = time.monotonic()
    worker.send_signal(signal.SIGINT)
    code, log = finish(worker, timeout=10)
    assert code == 0 and time.monotonic() - started < 3, log
    assert len(gateway.releases) == 1


def test_worker_releases_a_job_claimed_after_shutdown_began(gateway: FakeGateway) -> None:
    gateway.hold = 10
    worker = start_worker(gateway.url, "--drain-timeout", "10", "--poll-wait", "20")
    assert gateway.wait(lambda: len(gateway.claims) >= 2)  # connected, now in a long-poll
    worker.send_signal(signal.SIGINT)
    time.sleep(0.5)
    gateway.add_job("job-1", "too late")
    code, log = finish(worker, timeout=10)
    assert code == 0, log
    assert gateway.releases == [{"jobs": [{"id": "job-1", "lease": "lease-job-1"}]}]
    assert "waiting for the open claim to return" in log and "releasing 1 job(s) claimed meanwhile" in log
    assert gateway.text("job-1") == ""


def test_worker_waits_for_the_gateway_to_come_back() -> None:
    port = free_port()
    worker = start_worker(f"http://127.0.0.1:{port}", "--once")
    time.sleep(1.5)  # a few refused claims
    gateway = FakeGateway(port=port)
    try:
        gateway.add_job("job-1", "back again")
        code, log = finish(worker, timeout=40)
        assert code == 0, log
        assert gateway.text("job-1") == "back again"
        assert log.count("cannot reach the gateway") == 1  # once per state change, not per try
        assert "connected to" in log
    finally:
        gateway.stop()


# -- timings derived from the lease --------------------------------------------------------


def test_the_default_lease_is_the_gateways() -> None:
    assert lease.DEFAULT_LEASE_TTL == gateway_config.LEASE_TTL
    assert lease.lease_ttl({}, {}) == gateway_config.LEASE_TTL


@pytest.mark.parametrize(
    "answer, job, expected",
    [
        ({"lease_ttl": 6}, {"lease_ttl": 9}, 6.0),  # the claim answer's own lease speaks for its jobs
        ({}, {"lease_ttl": 9}, 9.0),
        ({"lease_ttl": 0}, {"lease_ttl": 2.5}, 2.5),
        ({"lease_ttl": "6"}, {"lease_ttl": True}, lease.DEFAULT_LEASE_TTL),
        ({"lease_ttl": -1}, {"lease_ttl": float("nan")}, lease.DEFAULT_LEASE_TTL),
        ({"lease_ttl": None}, {"lease_ttl": float("inf")}, lease.DEFAULT_LEASE_TTL),
    ],
)
def test_the_lease_comes_from_the_claim_answer_then_the_job(answer: Any, job: Any, expected: float) -> None:
    assert lease.lease_ttl(answer, job) == expected


@pytest.mark.parametrize("ttl", [1.5, 2, 3, 5, 15, 30, 60, 600])
def test_a_hung_report_is_given_up_and_resent_inside_the_lease(ttl: float) -> None:
    connect, read = lease.report_timeout(ttl)
    assert connect + read <= ttl / 3 + 1e-9  # the whole report, a new connection included
    assert read >= connect > 0
    heartbeat = lease.heartbeat_interval(ttl)
    assert heartbeat <= ttl / 3 + 1e-9
    cap = lease.retry_cap(ttl)
    backoff = Backoff(first=0.5, cap=5.0)
    assert all(backoff.next(cap=cap) <= cap for _ in range(50))
    assert all(polite_delay(3600, cap=cap) <= cap for _ in range(50))  # an upgrade's long Retry-After too
    # A heartbeat that hangs for its whole timeout is sent again with a quarter of the lease left.
    assert heartbeat + connect + read + cap <= ttl * 3 / 4 + 1e-9


def test_tiny_and_long_leases_keep_sane_timeouts() -> None:
    assert sum(lease.report_timeout(0.1)) == pytest.approx(lease.REPORT_TIMEOUT_FLOOR)
    assert lease.heartbeat_interval(0.01) == lease.HEARTBEAT_FLOOR
    assert sum(lease.report_timeout(3600)) == pytest.approx(lease.REPORT_TIMEOUT_CEILING)


def test_retry_after_is_waited_out_with_jitter_and_bounded() -> None:
    delays = [polite_delay(10) for _ in range(200)]
    assert all(10 <= d <= 12 for d in delays) and len(set(delays)) > 100  # never early, spread out
    assert all(0.5 <= polite_delay(0) <= 0.6 for _ in range(50))  # a Retry-After of 0 is no busy loop
    assert all(96 <= polite_delay(3600) <= 120 for _ in range(50))  # bounded, still spread out


@pytest.fixture
def short_lease() -> Iterator[FakeGateway]:
    """A fake gateway with a 3 s lease that it enforces: a report past it gets lease_lost."""
    server = FakeGateway(lease_ttl=3.0)
    server.enforce_leases = True
    yield server
    server.stop()


@pytest.mark.parametrize("hang, echo_delay", [(0, "0"), (1, "2.5")], ids=["output", "heartbeat"])
def test_worker_resends_a_hung_report_before_the_lease_lapses(short_lease: FakeGateway, hang: int, echo_delay: str):
    gateway = short_lease
    gateway.hang_reports = {hang}
    gateway.add_job("job-1", "first second")
    code, log = finish(start_worker(gateway.url, "--once", "--echo-delay", echo_delay))
    assert code == 0, log
    assert gateway.text("job-1") == "first second" and gateway.ended["job-1"] == {"reason": "stop"}
    [(received, abandoned)] = gateway.hung
    assert abandoned - received < 3 / 3 + 0.3  # given up within a third of the lease (and scheduling slack)
    answered = [t for t, _ in gateway.reports]
    renewed = max([gateway.claimed_at[0], *(t for t in answered if t < received)])
    resent = min(t for t in answered if t > received)
    assert resent - renewed < 3 * 3 / 4 + 0.3  # with time to spare before the lease lapsed
    assert "cannot send output to the gateway: timed out; retrying" in log


def error_answer(status: int, code: str, message: str, retry_after: str = "1") -> tuple[int, dict[str, str], bytes]:
    body = {"error": {"message": message, "type": "server_error", "param": None, "code": code}}
    return status, {"Retry-After": retry_after}, json.dumps(body).encode()


@pytest.mark.parametrize(
    "status, code, words",
    [
        (503, "upgrade_pending", "the gateway is being upgraded"),
        (503, "database_unavailable", "the gateway's database is unavailable"),
        (429, "gateway_busy", "the gateway is busy"),
    ],
)
def test_worker_waits_out_retry_after_and_says_why(gateway: FakeGateway, status: int, code: str, words: str):
    gateway.canned["/worker/v1/claim"] = [error_answer(status, code, "Try again shortly.")] * 2
    gateway.add_job("job-1", "patience")
    exit_code, log = finish(start_worker(gateway.url, "--once"))
    assert exit_code == 0, log
    assert gateway.text("job-1") == "patience"
    assert log.count(f"{words} (Try again shortly.); waiting 1 s between tries, as it asks") == 1
    times = gateway.claim_times
    assert len(times) == 3 and all(0.99 < b - a < 2 for a, b in zip(times, times[1:]))


def test_a_busy_answer_to_a_report_is_retried_within_the_lease(short_lease: FakeGateway) -> None:
    gateway = short_lease
    gateway.canned["/worker/v1/chunks"] = [error_answer(503, "upgrade_pending", "Upgrading.", retry_after="30")]
    gateway.add_job("job-1", "still here")
    code, log = finish(start_worker(gateway.url, "--once"))
    assert code == 0, log
    assert gateway.text("job-1") == "still here"
    (refused, _), (resent, _) = gateway.reports[:2]
    assert resent - refused < lease.retry_cap(3) + 0.3  # not the 30 s it asked for: the lease is 3 s
    assert "the gateway is being upgraded (Upgrading.); it asks for 30 s, but reports are retried every" in log


def test_non_json_and_5xx_answers_do_not_stop_the_worker(gateway: FakeGateway) -> None:
    html = (200, {"Content-Type": "text/html"}, b"<html><body>Welcome to your new site!</body></html>")
    bad_gateway = (502, {"Content-Type": "text/html"}, b"<html><body>502 Bad Gateway</body></html>")
    gateway.canned["/worker/v1/claim"] = [html, bad_gateway]
    gateway.canned["/worker/v1/chunks"] = [html, bad_gateway, (200, {}, b"[1, 2]"), (200, {}, b'{"jobs": "no"}')]
    gateway.add_job("job-1", "one two three")
    code, log = finish(start_worker(gateway.url, "--once"))
    assert code == 0, log
    assert gateway.text("job-1") == "one two three" and gateway.ended["job-1"] == {"reason": "stop"}
    assert "failed: /worker/v1/claim did not answer JSON (is the gateway URL right?); retrying" in log
    assert "cannot send output to the gateway: /worker/v1/chunks did not answer JSON" in log
    assert len(gateway.claims) == 3 and len(gateway.reports) >= 5
