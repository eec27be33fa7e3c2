"""logprobs and top_logprobs through the official `openai` package: only workers that declared
the feature get such jobs, and their log probabilities reach the client where OpenAI puts
them (SQLite and MariaDB, both claim paths for the claim itself)."""
from __future__ import annotations

import json
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import openai
import pytest

from conftest import BACKENDS, VALIDATION_ONLY, make_account
from protocol import ProtoWorker
from webapp import accounts, jobs, token_count
from webapp.models import Chunk, Job, Worker

PROMPT = [{"role": "user", "content": "weigh every word"}]
WORDS = ["weigh", " every", " word"]
BOTH_CLAIM_PATHS = pytest.mark.parametrize("db_url", [*BACKENDS, "mariadb-cas"], indirect=True)


@pytest.fixture
def app_config() -> dict:
    """A lease that outlasts each test's steps: these tests are about routing and shapes, not timing."""
    return {"LEASE_TTL": 30.0}


def client(live, key: str) -> openai.OpenAI:
    """An OpenAI client pointed at the gateway; retries off so each call is one request."""
    return openai.OpenAI(base_url=f"{live.url}/v1", api_key=key, max_retries=0, timeout=30)


def new_worker(app, live, user_id: int, name: str, features=None, models=("echo",)) -> ProtoWorker:
    """Make a worker token and bring its worker live (one claim that takes nothing)."""
    with app.app_context():
        token = accounts.create_worker_token(user_id, name)
    worker = ProtoWorker(live.url, token, models, features=features)
    worker.claim(wait=0)
    return worker


def in_background(call, *args, **kw) -> Future:
    """Run a call in a thread; the future holds its result."""
    pool = ThreadPoolExecutor(1)
    future = pool.submit(call, *args, **kw)
    pool.shutdown(wait=False)
    return future


def token(text: str, logprob: float, top: int = 0) -> dict[str, Any]:
    """One token's log probability as a worker reports it, with `top` alternatives."""
    alternatives = [{"token": f"alt{k}", "logprob": logprob - 1 - k, "bytes": None} for k in range(top)]
    return {"token": text, "logprob": logprob, "bytes": list(text.encode()), "top_logprobs": alternatives}


def deltas_with_logprobs(top: int = 2) -> list[dict[str, Any]]:
    """The prompt's words as deltas, each with its log probability."""
    return [{"content": w, "logprobs": {"content": [token(w, -0.5 * i, top)]}} for i, w in enumerate(WORDS)]


def serve(worker: ProtoWorker, deltas: list[dict[str, Any]], finish: bool = True, timeout: float = 10) -> dict:
    """Claim the queued job with this worker and answer it with these deltas (and a finish)."""
    end = time.monotonic() + timeout
    while not (claimed := worker.claim(wait=0)):
        assert time.monotonic() < end, "the worker got no job"
        time.sleep(0.05)
    worker.report(claimed[0], deltas, finish={"reason": "stop"} if finish else None)
    return claimed[0]


def job_rows(app) -> list[Job]:
    with app.app_context(), jobs.db.read() as s:
        return list(s.query(Job).order_by(Job.id))


def test_logprobs_need_a_live_worker_of_the_model_that_relays_them(app, account, live):
    new_worker(app, live, account.user_id, "plain")
    new_worker(app, live, account.user_id, "other-model", ["logprobs"], models=("llama",))
    bob = make_account(app, "bob@example.com")
    new_worker(app, live, bob.user_id, "bobs", ["logprobs"])  # not shared: none of Alice's
    api = client(live, account.key)
    for extra in ({"logprobs": True}, {"logprobs": True, "top_logprobs": 3}):
        with pytest.raises(openai.BadRequestError) as err:
            api.chat.completions.create(model="echo", messages=PROMPT, **extra)
        assert err.value.code == "unsupported_parameter"
        assert err.value.param == "logprobs"
        assert "No live worker for model 'echo' relays log probabilities" in err.value.message
    assert job_rows(app) == []


@VALIDATION_ONLY
@pytest.mark.parametrize("extra, param", [
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"logprobs": False, "top_logprobs": 0}, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": -1}, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": "2"}, "top_logprobs"),
    ({"logprobs": "yes"}, "logprobs"),
])
def test_bad_logprobs_parameters_are_a_400(app, account, live, extra, param):
    new_worker(app, live, account.user_id, "able", ["logprobs"])
    with pytest.raises(openai.BadRequestError) as err:
        client(live, account.key).post("/chat/completions", body={"model": "echo", "messages": PROMPT, **extra},
                                       cast_to=object)
    assert err.value.param == param
    assert job_rows(app) == []


@VALIDATION_ONLY
def test_logprobs_false_is_accepted_and_dropped(app, account, live):
    worker = new_worker(app, live, account.user_id, "plain")
    answer = in_background(client(live, account.key).chat.completions.create, model="echo", messages=PROMPT,
                           logprobs=False)
    # The worker sends log probabilities nobody asked for: the client does not get them.
    serve(worker, deltas_with_logprobs())
    reply = answer.result(timeout=30)
    assert reply.choices[0].message.content == "weigh every word"
    assert reply.choices[0].logprobs is None
    job, = job_rows(app)
    assert job.needs == "" and "logprobs" not in job.request


@BOTH_CLAIM_PATHS
def test_a_logprobs_job_goes_only_to_a_worker_that_relays_them(app, account, live):
    plain = new_worker(app, live, account.user_id, "plain")
    able = new_worker(app, live, account.user_id, "able", ["logprobs"])
    # The plain worker is already in its long-poll when the job arrives: the bell wakes
    # it, and it must still come back empty.
    waiting = in_background(plain.claim, 1, 2)
    time.sleep(0.3)
    stream = in_background(lambda: list(client(live, account.key).chat.completions.create(
        model="echo", messages=PROMPT, stream=True, logprobs=True, top_logprobs=2)))
    end = time.monotonic() + 10
    while not job_rows(app):
        assert time.monotonic() < end, "the request queued no job"
        time.sleep(0.05)
    job, = job_rows(app)
    assert job.needs == "logprobs"
    assert job.request["logprobs"] is True and job.request["top_logprobs"] == 2
    assert waiting.result(timeout=30) == []
    claimed = serve(able, deltas_with_logprobs())
    assert claimed["request"]["logprobs"] is True and claimed["request"]["top_logprobs"] == 2
    chunks = [c for c in stream.result(timeout=30) if c.choices]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "weigh every word"
    carrying = [c for c in chunks if c.choices[0].logprobs is not None]
    assert [c.choices[0].logprobs.content[0].token for c in carrying] == WORDS
    assert [t.token for t in carrying[1].choices[0].logprobs.content[0].top_logprobs] == ["alt0", "alt1"]
    assert carrying[1].choices[0].logprobs.content[0].logprob == -0.5
    # OpenAI's place: beside the delta, not in it; the role and finish chunks carry none.
    assert all("logprobs" not in (c.choices[0].delta.model_extra or {}) for c in chunks)
    assert chunks[0].choices[0].logprobs is None and chunks[-1].choices[0].logprobs is None
    assert plain.claim(wait=0) == []


def test_a_plain_answer_joins_the_logprobs_and_counts_no_tokens_for_them(app, account, live):
    able = new_worker(app, live, account.user_id, "able", ["logprobs"])
    api = client(live, account.key)
    answer = in_background(api.chat.completions.create, model="echo", messages=PROMPT, logprobs=True)
    serve(able, deltas_with_logprobs(top=0) + [{"content": "!"}])
    reply = answer.result(timeout=30)
    assert reply.choices[0].message.content == "weigh every word!"
    content = reply.choices[0].logprobs.content
    assert [t.token for t in content] == WORDS
    assert [t.logprob for t in content] == [0.0, -0.5, -1.0]
    assert content[1].bytes == list(b" every") and content[1].top_logprobs == []
    assert reply.choices[0].logprobs.refusal is None
    with app.app_context():
        assert reply.usage.completion_tokens == token_count.count_completion([{"content": "weigh every word!"}])
    # The stored answer keeps them, for a background request's retrieval too.
    with app.app_context(), jobs.db.read() as s:
        stored = [json.loads(c.delta_json) for c in s.query(Chunk).order_by(Chunk.seq)]
    assert stored[0]["logprobs"]["content"][0]["token"] == "weigh"


def test_a_worker_declares_features_in_its_claim(app, account, live):
    able = new_worker(app, live, account.user_id, "able", ["logprobs", "telepathy"])
    with app.app_context(), jobs.db.read() as s:
        assert s.query(Worker).filter_by(name="able").one().features == ["logprobs"]  # unknown names are ignored
    able.features = None  # a claim without the list declares none from then on
    able.claim(wait=0)
    with app.app_context(), jobs.db.read() as s:
        assert s.query(Worker).filter_by(name="able").one().features == []


@VALIDATION_ONLY
@pytest.mark.parametrize("features, param", [
    ("logprobs", "features"),
    ([""], "features[0]"),
    (["logprobs", 7], "features[1]"),
    (["Log Probs"], "features[0]"),
    (["f"] * 17, "features"),
])
def test_a_malformed_features_list_is_a_400(app, account, live, features, param):
    worker = ProtoWorker(live.url, account.token)
    r = worker.post("claim", {"models": ["echo"], "wait": 0, "features": features})
    assert r.status_code == 400 and r.json()["error"]["param"] == param


GOOD = token("weigh", -0.5, 1)
BAD_LOGPROBS = [
    ({"content": [{**GOOD, "logprob": "high"}]}, "content[0].logprob"),
    ({"content": [{**GOOD, "logprob": True}]}, "content[0].logprob"),
    ({"content": [{**GOOD, "token": None}]}, "content[0].token"),
    ({"content": [{**GOOD, "id": 7}]}, "content[0].id"),
    ({"content": [{**GOOD, "bytes": [256]}]}, "content[0].bytes[0]"),
    ({"content": [{**GOOD, "bytes": "abc"}]}, "content[0].bytes"),
    ({"content": [{**GOOD, "top_logprobs": [GOOD]}]}, "content[0].top_logprobs[0].top_logprobs"),
    ({"content": [{**GOOD, "top_logprobs": [{"token": "a", "logprob": -1}] * 21}]}, "content[0].top_logprobs"),
    ({"content": [GOOD] * 4097}, "content"),
    ({"content": {"token": "a"}}, "content"),
    ({"content": [GOOD], "text_offset": [0]}, "text_offset"),
    ("weigh", ""),
]


@VALIDATION_ONLY
@pytest.mark.parametrize("logprobs, field", BAD_LOGPROBS)
def test_malformed_logprobs_in_a_report_are_refused_and_nothing_is_stored(app, account, live, logprobs, field):
    able = new_worker(app, live, account.user_id, "able", ["logprobs"])
    answer = in_background(client(live, account.key).chat.completions.create, model="echo", messages=PROMPT,
                           logprobs=True)
    end = time.monotonic() + 10
    while not (claimed := able.claim(wait=0)):
        assert time.monotonic() < end, "the worker got no job"
        time.sleep(0.05)
    job = claimed[0]
    entry = {"id": job["id"], "lease": job["lease"],
             "chunks": [{"seq": 0, "delta": {"content": "ok"}},
                        {"seq": 1, "delta": {"content": "weigh", "logprobs": logprobs}}]}
    r = able.post("chunks", {"jobs": [entry]})
    assert r.status_code == 400
    param = "jobs[0].chunks[1].delta.logprobs" + (f".{field}" if field else "")
    assert r.json()["error"]["param"] == param
    with app.app_context(), jobs.db.read() as s:
        assert s.query(Chunk).count() == 0
        assert s.query(Job).one().next_seq == 0
    able.report(job, [{"content": "fine"}], finish={"reason": "stop"})  # the job goes on
    assert answer.result(timeout=30).choices[0].message.content == "fine"


@VALIDATION_ONLY
def test_a_logprob_that_is_not_finite_is_refused(app, account, live):
    able = new_worker(app, live, account.user_id, "able", ["logprobs"])
    in_background(client(live, account.key).chat.completions.create, model="echo", messages=PROMPT, logprobs=True)
    end = time.monotonic() + 10
    while not (claimed := able.claim(wait=0)):
        assert time.monotonic() < end, "the worker got no job"
        time.sleep(0.05)
    job = claimed[0]
    delta = {"content": "x", "logprobs": {"content": [{"token": "x", "logprob": float("-inf")}]}}
    body = json.dumps({"jobs": [{"id": job["id"], "lease": job["lease"], "chunks": [{"seq": 0, "delta": delta}]}]})
    assert "-Infinity" in body  # what Python's JSON writes, and reads back
    r = able.session.post(f"{live.url}/worker/v1/chunks", data=body, headers={"Content-Type": "application/json"},
                          timeout=30)
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "jobs[0].chunks[0].delta.logprobs.content[0].logprob"
    able.report(job, [], error={"code": "invalid_output", "message": "refused"})


def test_a_route_narrows_the_workers_that_count(app, account, live):
    new_worker(app, live, account.user_id, "plain")
    able = new_worker(app, live, account.user_id, "able", ["logprobs"])
    api = client(live, account.key)
    # Pinned to the worker without the feature: another that has it does not help.
    with pytest.raises(openai.BadRequestError) as err:
        api.chat.completions.create(model="echo", messages=PROMPT, logprobs=True,
                                    extra_headers={"X-Session-Name": "plain"})
    assert (err.value.code, err.value.param) == ("unsupported_parameter", "logprobs")
    answer = in_background(api.chat.completions.with_raw_response.create, model="echo", messages=PROMPT,
                           logprobs=True, extra_headers={"X-Session-Name": "able"})
    serve(able, deltas_with_logprobs())
    raw = answer.result(timeout=30)
    assert raw.headers["x-pollgate-worker"] == "able"
    assert [t.token for t in raw.parse().choices[0].logprobs.content] == WORDS


@VALIDATION_ONLY
def test_a_background_answer_read_by_id_carries_its_logprobs(app, account, live):
    able = new_worker(app, live, account.user_id, "able", ["logprobs"])
    api = client(live, account.key)
    queued = api.chat.completions.create(model="echo", messages=PROMPT, logprobs=True,
                                         extra_body={"background": True})
    job = serve(able, deltas_with_logprobs()[:2], finish=False)
    partial = api.chat.completions.retrieve(queued.id)
    assert [t.token for t in partial.choices[0].logprobs.content] == WORDS[:2]
    able.report(job, deltas_with_logprobs()[2:], finish={"reason": "stop"})
    done = api.chat.completions.retrieve(queued.id)
    assert [t.token for t in done.choices[0].logprobs.content] == WORDS
