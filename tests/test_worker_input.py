"""A malformed worker request is refused whole, names its field, and harms nothing (SQLite and MariaDB)."""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
from sqlalchemy import func, select

from conftest import VALIDATION_ONLY, make_account
from protocol import ProtoWorker
from webapp import maintenance, usage
from webapp.db import db
from webapp.models import Chunk, Job, Usage, Worker

WAIT = 30  # seconds: the bound on every wait for a reply or a claim


@pytest.fixture
def app_config() -> dict:
    """A lease that outlasts each test's steps: these tests are about input, not timing."""
    return {"LEASE_TTL": 30.0}


def client(live, key: str) -> openai.OpenAI:
    """An OpenAI client pointed at the gateway; retries off so each call is one request."""
    return openai.OpenAI(base_url=f"{live.url}/v1", api_key=key, max_retries=0, timeout=WAIT)


def ask(live, key: str, text: str, **kw):
    """Send one chat completion and return the reply."""
    return client(live, key).chat.completions.create(
        model="echo", messages=[{"role": "user", "content": text}], **kw)


def claim_one(worker: ProtoWorker) -> dict:
    """Long-poll until the worker holds exactly one job."""
    claimed = worker.claim(wait=5)
    assert len(claimed) == 1, "no job reached the worker"
    return claimed[0]


def stored(app, public_id: str) -> tuple[str, int]:
    """Return a job's state and how many chunks it has stored."""
    with app.app_context(), db.read() as s:
        job = s.scalar(select(Job).where(Job.public_id == public_id))
        return job.state, s.scalar(select(func.count()).select_from(Chunk).where(Chunk.job_id == job.id))


def tool_calls(*calls) -> dict:
    """An entry override whose one chunk carries the given tool-call pieces."""
    return {"chunks": [{"seq": 1, "delta": {"tool_calls": list(calls)}}]}


def chunk(**fields) -> dict:
    """An entry override with one chunk made of fields."""
    return {"chunks": [fields]}


def finish(**fields) -> dict:
    """An entry override whose finish is made of fields."""
    return {"finish": fields}


ARGS = "jobs[0].chunks[0].delta.tool_calls[0]"
USAGE = "jobs[0].finish.usage"
# Each is merged into an otherwise valid entry for a running job with one chunk stored.
POISON = [
    pytest.param(tool_calls(1), ARGS, id="tool_call-int"),
    pytest.param(tool_calls(None), ARGS, id="tool_call-null"),
    pytest.param(tool_calls({"index": 0, "function": {"name": "f", "arguments": {"city": "Oslo"}}}),
                 f"{ARGS}.function.arguments", id="arguments-object"),
    pytest.param(tool_calls({"index": 0, "function": {"name": ["f"]}}), f"{ARGS}.function.name", id="name-list"),
    pytest.param(tool_calls({"index": 0, "function": "f()"}), f"{ARGS}.function", id="function-string"),
    pytest.param(tool_calls({"index": 0, "function": {"name": "f", "code": "x"}}), f"{ARGS}.function.code",
                 id="function-unknown-key"),
    pytest.param(tool_calls({"function": {"arguments": "{}"}}), f"{ARGS}.index", id="index-missing"),
    pytest.param(tool_calls({"index": 128}), f"{ARGS}.index", id="index-too-big"),
    pytest.param(tool_calls({"index": True}), f"{ARGS}.index", id="index-bool"),
    pytest.param(tool_calls({"index": 0, "id": 7}), f"{ARGS}.id", id="id-int"),
    pytest.param(tool_calls({"index": 0, "id": "c" * 192}), f"{ARGS}.id", id="id-too-long"),
    pytest.param(tool_calls({"index": 0, "type": "code"}), f"{ARGS}.type", id="type-not-function"),
    pytest.param(tool_calls({"index": 0, "extra": 1}), f"{ARGS}.extra", id="tool_call-unknown-key"),
    pytest.param(chunk(seq=1, delta={"tool_calls": {"index": 0}}), "jobs[0].chunks[0].delta.tool_calls",
                 id="tool_calls-object"),
    pytest.param(chunk(seq=1, delta={"role": "assistant"}), "jobs[0].chunks[0].delta.role", id="delta-unknown-key"),
    pytest.param(chunk(seq=1, delta={"content": None}), "jobs[0].chunks[0].delta.content", id="content-null"),
    pytest.param(chunk(seq=1, delta={}), "jobs[0].chunks[0].delta", id="delta-empty"),
    pytest.param(chunk(seq=1, delta={"images": [{"url": 5}]}), "jobs[0].chunks[0].delta.images[0].url",
                 id="image-url-int"),
    pytest.param(chunk(seq=1, delta={"images": [{"url": "a", "b64_json": "b"}]}), "jobs[0].chunks[0].delta.images[0]",
                 id="image-two-keys"),
    pytest.param(chunk(seq=True, delta={"content": "world"}), "jobs[0].chunks[0].seq", id="seq-bool"),
    pytest.param(chunk(seq=2**63, delta={"content": "world"}), "jobs[0].chunks[0].seq", id="seq-huge"),
    pytest.param(chunk(seq=1.0, delta={"content": "world"}), "jobs[0].chunks[0].seq", id="seq-float"),
    pytest.param(finish(reason="stop", usage={"prompt_tokens": 2**63, "completion_tokens": 1}),
                 f"{USAGE}.prompt_tokens", id="usage-huge"),
    pytest.param(finish(reason="stop", usage={"prompt_tokens": 1, "completion_tokens": -1}),
                 f"{USAGE}.completion_tokens", id="usage-negative"),
    pytest.param(finish(reason="stop", usage={"prompt_tokens": True, "completion_tokens": 1}),
                 f"{USAGE}.prompt_tokens", id="usage-bool"),
    pytest.param(finish(reason="stop", usage={"prompt_tokens": 1}), f"{USAGE}.completion_tokens",
                 id="usage-missing"),
    pytest.param(finish(reason="stop", usage=[1, 2]), USAGE, id="usage-list"),
    pytest.param(finish(reason="bored"), "jobs[0].finish.reason", id="finish-reason"),
    pytest.param({"finish": "stop"}, "jobs[0].finish", id="finish-string"),
    pytest.param({"error": {"code": 500, "message": "x"}}, "jobs[0].error.code", id="error-code-int"),
    pytest.param({"error": {"code": "upstream_error", "message": ["x"]}}, "jobs[0].error.message",
                 id="error-message-list"),
    pytest.param({"error": {"code": "upstream_error", "retry": "yes"}}, "jobs[0].error.retry", id="error-retry-string"),
    pytest.param({"finish": {"reason": "stop"}, "error": {"code": "upstream_error"}}, "jobs[0]",
                 id="finish-and-error"),
    pytest.param({"lease": "L" * 192}, "jobs[0].lease", id="lease-too-long"),
    pytest.param({"id": ""}, "jobs[0].id", id="id-empty"),
    pytest.param({"chunks": {"seq": 1}}, "jobs[0].chunks", id="chunks-object"),
]


def test_poison_reports_are_refused_and_harm_nothing(app, live):
    """Every poison report, one after another against one running job: each is refused with its field
    named and stores nothing; afterwards the job, another user and the reaper are unharmed.

    One test walks the whole table (a fresh gateway per case cost minutes of CI for no
    more coverage: a refused report writes nothing, so the cases cannot affect each other).
    """
    alice, bob = make_account(app, "alice@example.com"), make_account(app, "bob@example.com")
    worker = ProtoWorker(live.url, alice.token)
    worker.claim(wait=0)  # advertise echo before the client asks for it
    with ThreadPoolExecutor(max_workers=2) as pool:
        alices = pool.submit(ask, live, alice.key, "hi")
        job = claim_one(worker)
        worker.report(job, [{"content": "Hello "}])
        for case in POISON:
            (poison, param), case = case.values, case.id
            entry = {"id": job["id"], "lease": job["lease"], "chunks": [{"seq": 1, "delta": {"content": "world"}}],
                     **poison}
            r = worker.post("chunks", {"jobs": [entry]})
            assert r.status_code == 400, f"case {case} {poison}: {r.text}"
            error = r.json()["error"]
            assert (error["param"], error["type"]) == (param, "invalid_request_error"), f"case {case} {poison}"
            assert stored(app, job["id"]) == ("running", 1), f"case {case} {poison} stored something"

        # The job goes on: a valid report finishes it and its client gets the whole answer.
        assert worker.report(job, [{"content": "world"}], finish={"reason": "stop"})["reason"] == "finished"
        assert alices.result(timeout=WAIT).choices[0].message.content == "Hello world"

        # Another user's request is served as usual.
        bobs_worker = ProtoWorker(live.url, bob.token)
        bobs_worker.claim(wait=0)
        bobs = pool.submit(ask, live, bob.key, "bob asks")
        bobs_worker.say(claim_one(bobs_worker), "bob answered", finish={"reason": "stop"})
        assert bobs.result(timeout=WAIT).choices[0].message.content == "bob answered"

    with app.app_context():
        maintenance.reap()
        usage.settle_pending()
        with db.read() as s:
            rows = s.scalars(select(Usage)).all()
            assert [(u.status, u.settled) for u in rows] == [("completed", True)] * 2


def test_tool_calls_streamed_in_pieces_reach_the_client_merged(app, account, live):
    worker = ProtoWorker(live.url, account.token)
    worker.claim(wait=0)
    pieces = [
        {"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                         "function": {"name": "get_weather", "arguments": ""}}]},
        # Upstreams send null for the parts a piece does not carry: accepted, and dropped.
        {"tool_calls": [{"index": 0, "id": None, "type": None, "function": {"name": None, "arguments": '{"city": '}}]},
        {"tool_calls": [{"index": 0, "function": {"arguments": '"Oslo"}'}},
                        {"index": 1, "id": "call_2", "type": "function", "function": {"name": "get_time"}}]},
        {"tool_calls": [{"index": 1, "function": {"arguments": "{}"}}]},
    ]
    with ThreadPoolExecutor(max_workers=1) as pool:
        reply = pool.submit(ask, live, account.key, "weather and time?")
        job = claim_one(worker)
        answer = worker.report(job, pieces, finish={"reason": "tool_calls",
                                                    "usage": {"prompt_tokens": 9, "completion_tokens": 12}})
        assert answer["reason"] == "finished"
        reply = reply.result(timeout=WAIT)
    calls = [(c.id, c.type, c.function.name, c.function.arguments) for c in reply.choices[0].message.tool_calls]
    assert calls == [("call_1", "function", "get_weather", '{"city": "Oslo"}'),
                     ("call_2", "function", "get_time", "{}")]
    assert reply.choices[0].finish_reason == "tool_calls"
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (9, 12)
    with app.app_context(), db.read() as s:
        deltas = [c.delta for c in s.scalars(select(Chunk).order_by(Chunk.seq))]
    assert deltas[1] == {"tool_calls": [{"index": 0, "function": {"arguments": '{"city": '}}]}


def test_odd_error_codes_are_stored_as_upstream_error_and_messages_cut(app, account, live):
    worker = ProtoWorker(live.url, account.token)
    worker.claim(wait=0)
    with ThreadPoolExecutor(max_workers=1) as pool:
        reply = pool.submit(ask, live, account.key, "hi")
        job = claim_one(worker)
        worker.report(job, error={"code": "Rate Limited!", "message": "m" * 5000})
        with pytest.raises(openai.APIStatusError) as err:
            reply.result(timeout=WAIT)
    assert (err.value.status_code, err.value.body["code"]) == (502, "upstream_error")
    with app.app_context(), db.read() as s:
        row = s.scalar(select(Job))
        assert (row.state, row.error_code, len(row.error_message)) == ("failed", "upstream_error", 2000)


CLAIMS = [
    ({"models": "echo"}, "models"),
    ({"models": ["echo", 1]}, "models[1]"),
    ({"models": [""]}, "models[0]"),
    ({"models": ["e" * 192]}, "models[0]"),
    ({"models": ["echo\x00"]}, "models[0]"),
    ({"models": ["echo\n"]}, "models[0]"),
    ({"image_models": ["dall\x1be"]}, "image_models[0]"),
    ({"models": ["echo"], "wait": float("nan")}, "wait"),
    ({"models": ["echo"], "wait": float("inf")}, "wait"),
    ({"models": ["echo"], "wait": True}, "wait"),
    ({"models": ["echo"], "max_jobs": True}, "max_jobs"),
    ({"models": ["echo"], "max_jobs": 33}, "max_jobs"),
    ({"models": ["echo"], "capacity": 257}, "capacity"),
    ({"models": ["echo"], "site": "s" * 192}, "site"),
    ({"models": ["echo"], "kind": "k" * 33}, "kind"),
    ({"models": ["echo"], "version": 1}, "version"),
    ({"models": ["echo"], "version": "1\r\n"}, "version"),
]


@VALIDATION_ONLY
@pytest.mark.parametrize("body, param", CLAIMS)
def test_malformed_claim_names_its_field(app, account, live, body, param):
    # Sent as Python's json writes it, NaN and Infinity included (requests refuses to).
    r = ProtoWorker(live.url, account.token).session.post(
        f"{live.url}/worker/v1/claim", data=json.dumps(body), headers={"Content-Type": "application/json"}, timeout=WAIT)
    assert r.status_code == 400 and r.json()["error"]["param"] == param
    with app.app_context(), db.read() as s:
        assert s.scalar(select(Worker)).models_json in (None, "", "[]")  # nothing recorded


@pytest.mark.parametrize(
    "body, param",
    [({"status": "paused", "message": 5}, "message"), ({"status": None}, "status"), ([], "status")],
)
def test_malformed_status_names_its_field(app, account, live, body, param):
    r = ProtoWorker(live.url, account.token).post("status", body)
    assert r.status_code == 400 and r.json()["error"]["param"] == param


def test_long_status_message_is_cut(app, account, live):
    r = ProtoWorker(live.url, account.token).post("status", {"status": "needs_human", "message": "x" * 400})
    assert r.status_code == 200
    with app.app_context(), db.read() as s:
        assert s.scalar(select(Worker)).status_message == "x" * 255


@pytest.mark.parametrize(
    "jobs, param",
    [({"id": "a", "lease": "b"}, "jobs"), ([{"id": 5, "lease": "b"}], "jobs[0].id"), (["a"], "jobs[0]"),
     ([{"id": "a", "lease": ""}], "jobs[0].lease"), ([{"id": "a", "lease": "b"}] * 257, "jobs")],
)
def test_malformed_release_names_its_field(app, account, live, jobs, param):
    worker = ProtoWorker(live.url, account.token)
    r = worker.post("release", {"jobs": jobs})
    assert r.status_code == 400 and r.json()["error"]["param"] == param
