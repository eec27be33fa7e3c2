"""The OpenAI API through the official `openai` client, on SQLite and MariaDB."""
from __future__ import annotations

import json
import threading
import time
import typing

import openai
import pytest
import requests
import sqlalchemy as sa

from conftest import VALIDATION_ONLY, read_until_error
from protocol import ProtoWorker, StreamReader, WorkerThread
from webapp import jobs, token_count, validation
from webapp.models import Job, Usage

PROMPT = [{"role": "user", "content": "the quick brown fox jumps over the lazy dog"}]


def client(live, key, **kw) -> openai.OpenAI:
    """An OpenAI client pointed at the gateway; retries off so each call is one request."""
    return openai.OpenAI(base_url=f"{live.url}/v1", api_key=key, max_retries=0, **kw)


def only_job(app) -> Job:
    with app.app_context(), jobs.db.read() as s:
        return s.query(Job).one()


def only_usage(app) -> Usage:
    with app.app_context(), jobs.db.read() as s:
        return s.query(Usage).one()


def test_models_lists_what_live_workers_advertise(app, account, live):
    api = client(live, account.key)
    assert [m.id for m in api.models.list()] == []
    with WorkerThread(live.url, account.token, models=("echo", "llama3.1:8b")):
        assert sorted(m.id for m in api.models.list()) == ["echo", "llama3.1:8b"]
        assert api.models.retrieve("llama3.1:8b").owned_by == "pollgate"
        with pytest.raises(openai.NotFoundError) as err:
            api.models.retrieve("gpt-nope")
        assert err.value.code == "model_not_found"


def test_completion_returns_the_answer_with_exact_usage(app, account, live):
    with WorkerThread(live.url, account.token):
        reply = client(live, account.key).chat.completions.create(model="echo", messages=PROMPT)
    assert reply.object == "chat.completion" and reply.id.startswith("chatcmpl-")
    assert reply._request_id == reply.id  # the openai package reads it from x-request-id
    assert reply.choices[0].message.content == PROMPT[0]["content"]
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage.prompt_tokens == token_count.count_prompt(PROMPT)
    assert reply.usage.completion_tokens == token_count.count_text(PROMPT[0]["content"])
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    row = only_usage(app)
    assert (row.status, row.usage_source, row.settled) == ("completed", "tiktoken", True)
    assert (row.prompt_tokens, row.completion_tokens) == (reply.usage.prompt_tokens, reply.usage.completion_tokens)


def test_stream_speaks_openais_event_format(app, account, live):
    with WorkerThread(live.url, account.token):
        stream = client(live, account.key).chat.completions.create(
            model="echo", messages=PROMPT, stream=True, stream_options={"include_usage": True}
        )
        chunks = list(stream)
    assert stream.response.headers["x-request-id"] == chunks[0].id
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == PROMPT[0]["content"]
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 9
    assert len({c.id for c in chunks}) == 1


def test_stream_raw_wire_format(app, account, live):
    with WorkerThread(live.url, account.token):
        r = requests.post(f"{live.url}/v1/chat/completions", stream=True, timeout=30,
                          headers={"Authorization": f"Bearer {account.key}"},
                          json={"model": "echo", "messages": PROMPT, "stream": True})
        body = r.text
    assert r.headers["Content-Type"].startswith("text/event-stream")
    assert r.headers["Cache-Control"] == "no-cache, no-store"
    assert r.headers["X-Accel-Buffering"] == "no"
    events = [e.split("\n") for e in body.split("\n\n") if e]
    assert events[-1][1] == "data: [DONE]"
    # Every event names its place in the stream, so a client that lost it can resume after it.
    assert all(len(e) == 2 and e[0].startswith("id: ") and e[1].startswith("data: ") for e in events)
    ids = [int(e[0][4:]) for e in events]
    assert ids == [*range(len(ids) - 1), len(ids) - 2]
    assert "usage" not in json.loads(events[-2][1][6:])  # no usage chunk unless asked for


def claim_one(worker: ProtoWorker, timeout: float = 30) -> dict:
    """Claim the next job without a long-poll (no bell involved): ask until one is there."""
    end = time.monotonic() + timeout
    while not (claimed := worker.claim(wait=0)):
        assert time.monotonic() < end, "no job to claim"
        time.sleep(0.05)
    return claimed[0]


# The tailer re-checks the database only every WAKE_RECHECK (30 s here), and the stream starts
# on its first output: each delta reaching the client within seconds is the job bell's doing.
@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize("app_config", [{"WAKE_RECHECK": 30.0, "HOLD_RENEW": 30.0, "HOLD_TTL": 90.0,
                                         "HEARTBEAT_INTERVAL": 60.0, "LEASE_TTL": 60.0}])
def test_a_stream_wakes_on_the_job_bell_at_each_chunk(app, account, live):
    worker = ProtoWorker(live.url, account.token)
    worker.claim(wait=0)  # the model is live
    stream = StreamReader(live.url, account.key, "ring ring")
    job = claim_one(worker)
    for n, word in enumerate(("ring ", "ring"), 1):
        sent = time.monotonic()
        worker.report(job, [{"content": word}])
        arrived = stream.wait_until(lambda s: len(s.contents()) >= n and s.contents()[n - 1][0], 40, f"delta {n}")
        assert arrived - sent < 5, f"{word!r} took {arrived - sent:.1f} s: the reader was not woken"
    worker.report(job, finish={"reason": "stop"})
    assert stream.join().text == "ring ring" and stream.status == 200


# Idle streams cost their process one look per WAKE_RECHECK and one renewal per HOLD_RENEW
# (the tailer), not a read and a renewal each: before the tailer, these 20 streams sent
# about 400 statements in the window.
@pytest.mark.parametrize("app_config", [{"WAKE_RECHECK": 0.2, "HOLD_RENEW": 0.4, "HOLD_TTL": 30.0,
                                         "HEARTBEAT_INTERVAL": 60.0, "LEASE_TTL": 60.0, "REAP_INTERVAL": 60.0}])
def test_idle_streams_cost_their_process_not_each_stream(app, account, live):
    worker = ProtoWorker(live.url, account.token)
    worker.claim(wait=0)  # the model is live
    streams = [StreamReader(live.url, account.key, f"idle stream {i}") for i in range(20)]
    claimed = []
    while len(claimed) < len(streams):
        claimed.append(claim_one(worker))
    for job in claimed:
        worker.report(job, [{"content": "first"}])
    for stream in streams:
        stream.wait_until(lambda s: s.text, 30, "the first word")
    sent: list[str] = []
    engine = app.extensions["pollgate.engine"]
    listener = lambda conn, cursor, statement, *rest: sent.append(statement)  # noqa: E731
    sa.event.listen(engine, "before_cursor_execute", listener)
    try:
        time.sleep(2.0)
    finally:
        sa.event.remove(engine, "before_cursor_execute", listener)
    # At most 10 looks and 5 renewals of 2 statements, each with a pre-ping on SQLite.
    assert len(sent) <= 45, f"{len(sent)} statements in 2 s, e.g. {sent[:5]}"
    assert any("reader_expires_at" in statement for statement in sent), "the holds were not renewed"
    for job in claimed:
        worker.report(job, [{"content": " last"}], finish={"reason": "stop"})
    assert all(stream.join().text == "first last" for stream in streams)


# The stream starts after HEARTBEAT_INTERVAL without output, and says it is alive as often.
@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize("app_config", [{"HEARTBEAT_INTERVAL": 0.3, "LEASE_TTL": 60.0}])
def test_a_silent_worker_leaves_keep_alive_comments_on_the_wire(app, account, live):
    worker = ProtoWorker(live.url, account.token)
    worker.claim(wait=0)
    stream = StreamReader(live.url, account.key, "anyone there")
    job = claim_one(worker)  # ... and says nothing for a while
    stream.wait_until(lambda s: [line for _, line in s.lines if line.startswith(":")][2:], 30,
                      "three keep-alive comments")
    worker.report(job, [{"content": "yes"}], finish={"reason": "stop"})
    lines = [line for _, line in stream.join().lines]
    assert stream.status == 200 and stream.text == "yes"
    comments = [i for i, line in enumerate(lines) if line.startswith(":")]
    # SSE comments (a colon first) that every client skips, between the role chunk and the answer.
    assert all(lines[i] == ": keep-alive" for i in comments)
    assert 0 < comments[0] and comments[-1] < next(i for i, line in enumerate(lines) if '"content":"yes"' in line)
    assert lines[-1] == "data: [DONE]"


def test_worker_usage_is_preferred_over_counting(app, account, live):
    def handler(worker, job):
        worker.say(job, "hi", finish={"reason": "stop", "usage": {"prompt_tokens": 40, "completion_tokens": 2}})

    with WorkerThread(live.url, account.token, handler):
        reply = client(live, account.key).chat.completions.create(model="echo", messages=PROMPT)
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (40, 2)
    row = only_usage(app)
    assert (row.usage_source, row.prompt_tokens, row.completion_tokens) == ("worker", 40, 2)


def test_request_reaches_the_worker_validated(app, account, live):
    seen = {}

    def handler(worker, job):
        seen.update(job["request"])
        worker.report(job, [{"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                                             "function": {"name": "get_weather", "arguments": ""}}]},
                            {"tool_calls": [{"index": 0, "function": {"arguments": '{"city": "Oslo"}'}}]}],
                      finish={"reason": "tool_calls"})

    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    messages = [{"role": "user", "content": [
        {"type": "text", "text": "weather?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}]}]
    with WorkerThread(live.url, account.token, handler):
        reply = client(live, account.key).chat.completions.create(
            model="echo", messages=messages, tools=tools, temperature=0.3, top_p=0.9, max_tokens=50,
            stop=["\n\n"], seed=7, user="u-1", stream=False,
        )
    assert seen == {"model": "echo", "messages": messages, "tools": tools, "temperature": 0.3, "top_p": 0.9,
                    "max_tokens": 50, "stop": ["\n\n"], "seed": 7, "user": "u-1"}
    call = reply.choices[0].message.tool_calls[0]
    assert (call.id, call.function.name, call.function.arguments) == ("call_1", "get_weather", '{"city": "Oslo"}')
    assert reply.choices[0].finish_reason == "tool_calls"


def test_every_parameter_the_openai_package_sends_is_known():
    # Taken from the installed package's own request types: a release that adds a parameter
    # fails here, instead of as users' 400s the day their SDK starts sending it.
    from openai.types.chat import completion_create_params as params
    sent = set(typing.get_type_hints(params.CompletionCreateParamsStreaming))
    sent |= set(typing.get_type_hints(params.CompletionCreateParamsNonStreaming))
    assert "messages" in sent and "stream" in sent
    assert sorted(sent - validation.KNOWN) == []


def test_newer_openai_parameters_reach_the_worker(app, account, live):
    seen = {}

    def handler(worker, job):
        seen.update(job["request"])
        worker.report(job, [{"content": "ok"}], finish={"reason": "stop"})

    newer = {"verbosity": "low", "prompt_cache_key": "conversation-7", "prompt_cache_retention": "24h",
             "prompt_cache_options": {"mode": "implicit", "ttl": "30m"}, "safety_identifier": "user-hash-1",
             "moderation": {"model": "omni-moderation-latest"}}
    with WorkerThread(live.url, account.token, handler):
        reply = client(live, account.key).chat.completions.create(model="echo", messages=PROMPT, **newer)
    assert reply.choices[0].message.content == "ok"
    assert {name: seen.get(name) for name in newer} == newer


def test_reasoning_content_is_relayed(app, account, live):
    def handler(worker, job):
        worker.report(job, [{"reasoning_content": "thinking"}, {"content": "answer"}], finish={"reason": "stop"})

    with WorkerThread(live.url, account.token, handler):
        r = requests.post(f"{live.url}/v1/chat/completions", timeout=30,
                          headers={"Authorization": f"Bearer {account.key}"},
                          json={"model": "echo", "messages": PROMPT})
    message = r.json()["choices"][0]["message"]
    assert (message["reasoning_content"], message["content"]) == ("thinking", "answer")


@pytest.mark.parametrize("key", ["", "pgk_wrong", "sk-something-else"])
def test_bad_key_is_401(app, account, live, key):
    with pytest.raises(openai.AuthenticationError) as err:
        openai.OpenAI(base_url=f"{live.url}/v1", api_key=key or "x", max_retries=0,
                      default_headers={"Authorization": key and f"Bearer {key}"}).models.list()
    assert err.value.status_code == 401
    assert err.value.body["code"] in ("invalid_api_key", "missing_api_key")
    assert key not in json.dumps(err.value.body) or not key


def test_unknown_model_is_404(app, account, live):
    with WorkerThread(live.url, account.token):
        with pytest.raises(openai.NotFoundError) as err:
            client(live, account.key).chat.completions.create(model="gpt-4o", messages=PROMPT)
    assert err.value.code == "model_not_found" and err.value.param == "model"


BAD_BODIES = [
    ({"messages": PROMPT}, "model"),
    ({"model": "echo"}, "messages"),
    ({"model": "echo", "messages": []}, "messages"),
    ({"model": "echo", "messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
    ({"model": "echo", "messages": [{"role": "user"}]}, "messages[0].content"),
    ({"model": "echo", "messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"model": "echo", "messages": [{"role": "user", "content": [{"type": "audio"}]}]}, "messages[0].content[0].type"),
    ({"model": "echo", "messages": PROMPT, "temperature": 3}, "temperature"),
    ({"model": "echo", "messages": PROMPT, "temperature": "hot"}, "temperature"),
    ({"model": "echo", "messages": PROMPT, "top_p": -0.1}, "top_p"),
    ({"model": "echo", "messages": PROMPT, "max_tokens": 0}, "max_tokens"),
    ({"model": "echo", "messages": PROMPT, "n": 0}, "n"),
    ({"model": "echo", "messages": PROMPT, "n": 9}, "n"),
    ({"model": "echo", "messages": PROMPT, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"model": "echo", "messages": PROMPT, "stream": "yes"}, "stream"),
    ({"model": "echo", "messages": PROMPT, "stream_options": {"include_usage": True}}, "stream_options"),
    ({"model": "echo", "messages": PROMPT, "top_logprobs": 2}, "top_logprobs"),
    ({"model": "echo", "messages": PROMPT, "tools": "all"}, "tools"),
    ({"model": "echo", "messages": PROMPT, "frobnicate": 1}, "frobnicate"),
    ({"model": "echo", "messages": PROMPT, "verbosity": "loud"}, "verbosity"),
    ({"model": "echo", "messages": PROMPT, "safety_identifier": 7}, "safety_identifier"),
]


@VALIDATION_ONLY
@pytest.mark.parametrize("body, param", BAD_BODIES)
def test_invalid_request_is_400_naming_the_param(app, account, live, body, param):
    with pytest.raises(openai.BadRequestError) as err:
        # The low-level post sends the body as given, even without the required fields.
        client(live, account.key).post("/chat/completions", body=body, cast_to=object)
    assert err.value.status_code == 400
    assert err.value.param == param
    assert err.value.body["type"] == "invalid_request_error"
    with app.app_context(), jobs.db.read() as s:
        assert s.query(Job).count() == 0


@VALIDATION_ONLY
@pytest.mark.parametrize("raw", [b"{not json", b"", b"[1, 2]", b'"text"'])
def test_unparseable_body_is_400(app, account, live, raw):
    r = requests.post(f"{live.url}/v1/chat/completions", data=raw, timeout=10,
                      headers={"Authorization": f"Bearer {account.key}", "Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"


@pytest.mark.parametrize("app_config", [{"MAX_CONTENT_LENGTH": 10_000}])
def test_oversized_body_is_413(app, account, live):
    big = [{"role": "user", "content": "x" * 20_000}]
    with pytest.raises(openai.APIStatusError) as err:
        client(live, account.key).chat.completions.create(model="echo", messages=big)
    assert err.value.status_code == 413 and err.value.body["code"] == "request_too_large"


def test_unknown_path_and_method_are_json_errors(app, account, live):
    r = requests.get(f"{live.url}/v1/nothing-here", timeout=10)
    assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_url"
    r = requests.get(f"{live.url}/v1/chat/completions", timeout=10)
    assert r.status_code == 405 and "error" in r.json()


def test_no_worker_picking_up_is_503_with_retry_after(app, account, live):
    ProtoWorker(live.url, account.token).claim()  # advertises echo, then never claims again
    with pytest.raises(openai.APIStatusError) as err:
        client(live, account.key).chat.completions.create(model="echo", messages=PROMPT)
    assert err.value.status_code == 503
    assert err.value.body["code"] == "no_worker_available"
    assert int(err.value.response.headers["Retry-After"]) >= 1
    assert only_job(app).state == "expired"


# The deadline falls before a stream would start (HEARTBEAT_INTERVAL), so both get a status.
@pytest.mark.parametrize("app_config", [{"JOB_TIMEOUT": 2.0, "HEARTBEAT_INTERVAL": 5.0}])
@pytest.mark.parametrize("stream", [False, True])
def test_job_past_its_deadline_is_504(app, account, live, stream):
    def silent(worker, job):
        for _ in range(6):  # heartbeats keep the lease but produce nothing
            time.sleep(0.5)
            if worker.report(job)["stop"]:
                return

    with WorkerThread(live.url, account.token, silent):
        with pytest.raises(openai.APIStatusError) as err:
            client(live, account.key).chat.completions.create(model="echo", messages=PROMPT, stream=stream)
    assert err.value.status_code == 504
    assert only_job(app).state == "expired"


@pytest.mark.parametrize(
    "code, status, client_code",
    [("rate_limited", 429, "rate_limit_exceeded"), ("needs_human", 503, "worker_needs_human"),
     ("model_not_found", 404, "model_not_found"), ("context_length_exceeded", 400, "context_length_exceeded"),
     ("upstream_error", 502, "upstream_error"), ("weird_new_code", 502, "upstream_error")],
)
@pytest.mark.parametrize("stream", [False, True])
def test_worker_failure_before_output_is_a_real_status(app, account, live, code, status, client_code, stream):
    def failing(worker, job):
        worker.report(job, error={"code": code, "message": "upstream said no"})

    with WorkerThread(live.url, account.token, failing):
        with pytest.raises(openai.APIStatusError) as err:
            client(live, account.key).chat.completions.create(model="echo", messages=PROMPT, stream=stream)
    assert err.value.status_code == status
    assert err.value.body["code"] == client_code
    assert "upstream said no" in err.value.message


def test_failure_after_output_arrives_in_the_stream(app, account, live):
    def half(worker, job):
        worker.report(job, [{"content": "Hello "}, {"content": "wor"}])
        worker.report(job, error={"code": "upstream_error", "message": "connection reset"})

    with WorkerThread(live.url, account.token, half):
        stream = client(live, account.key).chat.completions.create(model="echo", messages=PROMPT, stream=True)
        text, err = read_until_error(stream)
    assert text == "Hello wor"
    assert "connection reset" in str(err)


@pytest.mark.parametrize("app_config", [{"JOB_TIMEOUT": 3.0, "HEARTBEAT_INTERVAL": 0.5}])
def test_stream_past_its_deadline_ends_with_an_error_event(app, account, live):
    def slow(worker, job):
        worker.report(job, [{"content": "thinking "}])
        for _ in range(12):
            time.sleep(0.5)
            if worker.report(job)["stop"]:
                return

    with WorkerThread(live.url, account.token, slow):
        stream = client(live, account.key).chat.completions.create(model="echo", messages=PROMPT, stream=True)
        text, err = read_until_error(stream)
    assert text == "thinking " and "deadline" in str(err)


def test_worker_killed_mid_stream_ends_the_stream_with_an_error(app, account, live):
    def dies(worker, job):
        worker.report(job, [{"content": "partial "}])  # then silence: the lease (2 s) lapses

    with WorkerThread(live.url, account.token, dies):
        stream = client(live, account.key).chat.completions.create(model="echo", messages=PROMPT, stream=True)
        text, err = read_until_error(stream)
    assert text == "partial "
    assert "stopped answering" in str(err)
    job = only_job(app)
    assert (job.state, job.error_code, job.attempts) == ("failed", "worker_lost", 1)


def test_silent_worker_is_replaced_before_output(app, account, live):
    attempts = []

    def flaky(worker, job):
        attempts.append(job["attempt"])
        if job["attempt"] == 1:
            return  # claims, then vanishes: the job goes back to the queue
        worker.say(job, "second time lucky", finish={"reason": "stop"})

    with WorkerThread(live.url, account.token, flaky):
        reply = client(live, account.key).chat.completions.create(model="echo", messages=PROMPT)
    assert reply.choices[0].message.content == "second time lucky"
    assert attempts == [1, 2]


# A minute's hold, so only the request noticing its client can cancel the job in time.
@pytest.mark.parametrize("app_config", [{"HOLD_TTL": 60.0}])
def test_client_disconnect_cancels_the_job_and_stops_the_worker(app, account, live):
    told = threading.Event()
    answers = []

    def slow(worker, job):
        for i in range(100):
            answer = worker.report(job, [{"content": f"{i} "}])
            if answer["stop"]:
                answers.append(answer)
                told.set()
                return
            time.sleep(0.05)

    with WorkerThread(live.url, account.token, slow):
        with requests.post(f"{live.url}/v1/chat/completions", stream=True, timeout=30,
                           headers={"Authorization": f"Bearer {account.key}"},
                           json={"model": "echo", "messages": PROMPT, "stream": True}) as r:
            lines = r.iter_lines()
            for _ in range(3):
                next(lines)
        # The response is closed here: the gateway notices at its next write.
        assert told.wait(10), "the worker was never told to stop"
    assert answers[0]["reason"] == "cancelled"
    job = only_job(app)
    assert (job.state, job.error_code, job.error_message) == ("cancelled", "client_gone", "The client went away.")


CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}
ASKED = {"role": "user", "content": "weather in Oslo?"}


def with_call(**changes) -> list[dict]:
    """A conversation whose assistant turn (messages[1]) carries CALL with changes."""
    call = {**CALL, **changes}
    return [ASKED, {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "call_1", "content": "12 C"}]


BAD_MESSAGES = [
    ([ASKED, {"role": "assistant", "content": None, "tool_calls": [1]}], "messages[1].tool_calls[0]"),
    ([ASKED, {"role": "assistant", "content": "x", "tool_calls": {"0": CALL}}], "messages[1].tool_calls"),
    (with_call(id=7), "messages[1].tool_calls[0].id"),
    (with_call(type="code"), "messages[1].tool_calls[0].type"),
    (with_call(function=None), "messages[1].tool_calls[0].function"),
    (with_call(function={"name": 5, "arguments": "{}"}), "messages[1].tool_calls[0].function.name"),
    (with_call(function={"name": "get_weather", "arguments": {"city": "Oslo"}}),
     "messages[1].tool_calls[0].function.arguments"),
    ([ASKED, {"role": "assistant", "content": None, "tool_calls": [CALL]}, {"role": "tool", "content": "12 C"}],
     "messages[2].tool_call_id"),
    ([ASKED, {"role": "assistant", "content": None, "tool_calls": [CALL]},
      {"role": "tool", "tool_call_id": 1, "content": "12 C"}], "messages[2].tool_call_id"),
    ([{**ASKED, "name": ["bob"]}], "messages[0].name"),
]


@VALIDATION_ONLY
@pytest.mark.parametrize("messages, param", BAD_MESSAGES)
def test_malformed_tool_calls_and_names_are_400_naming_the_field(app, account, live, messages, param):
    with pytest.raises(openai.BadRequestError) as err:
        client(live, account.key).post("/chat/completions", body={"model": "echo", "messages": messages},
                                       cast_to=object)
    assert err.value.param == param and err.value.body["type"] == "invalid_request_error"
    with app.app_context(), jobs.db.read() as s:
        assert s.query(Job).count() == 0


def test_a_tool_call_round_trip_reaches_the_worker_as_sent(app, account, live):
    seen = []

    def handler(worker, job):
        seen.append(job["request"]["messages"])
        worker.say(job, "It is 12 C in Oslo.", finish={"reason": "stop"})

    messages = [{**ASKED, "name": "ann"}, *with_call()[1:]]
    with WorkerThread(live.url, account.token, handler):
        reply = client(live, account.key).chat.completions.create(model="echo", messages=messages)
    assert seen == [messages]
    assert reply.choices[0].message.content == "It is 12 C in Oslo."
    assert reply.usage.prompt_tokens == token_count.count_prompt(messages)
