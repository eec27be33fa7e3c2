"""Background completions, completions read by id, and resumable streams, on SQLite and MariaDB."""
from __future__ import annotations

import datetime as dt
import json
import threading
import time

import openai
import pytest
import requests
from openai.types.chat import ChatCompletion

from conftest import VALIDATION_ONLY, make_account
from protocol import ProtoWorker, sse_events
from support import wait_for
from webapp import jobs, maintenance, settings
from webapp.models import HeldRequest, Job, Usage, utcnow

PROMPT = [{"role": "user", "content": "tell me a story"}]


def client(live, key) -> openai.OpenAI:
    """An OpenAI client pointed at the gateway; retries off so each call is one request."""
    return openai.OpenAI(base_url=f"{live.url}/v1", api_key=key, max_retries=0)


def ready_worker(live, account) -> ProtoWorker:
    """A worker that has advertised echo (so requests for it are admitted) and claims nothing yet."""
    worker = ProtoWorker(live.url, account.token)
    worker.claim(wait=0)
    return worker


def claim_one(worker: ProtoWorker) -> dict:
    """Claim the one queued job."""
    return wait_for(lambda: worker.claim(wait=0), 30, "a job to claim")[0]


def background(live, account) -> ChatCompletion:
    """Queue a background completion through the openai package; check the 202."""
    raw = client(live, account.key).chat.completions.with_raw_response.create(
        model="echo", messages=PROMPT, extra_body={"background": True})
    assert raw.status_code == 202
    return raw.parse()


def job_row(app, public_id: str) -> Job:
    with app.app_context(), jobs.db.read() as s:
        return s.query(Job).filter_by(public_id=public_id).one()


def text_of(pairs: list[tuple[int, str]]) -> str:
    """Join the content of chunk events."""
    chunks = [json.loads(data) for _, data in pairs if data != "[DONE]"]
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c.get("choices"))


def get_stream(live, key: str, public_id: str, timeout: float = 30, **kw) -> requests.Response:
    return requests.get(f"{live.url}/v1/chat/completions/{public_id}", params={"stream": "true", **kw.pop("params", {})},
                        headers={"Authorization": f"Bearer {key}", **kw.pop("headers", {})}, timeout=timeout, **kw)


def test_a_background_request_answers_at_once_and_is_read_by_id(app, account, live):
    worker = ready_worker(live, account)
    queued = background(live, account)
    assert (queued.status, queued.choices, queued.usage) == ("queued", [], None)
    assert queued.id.startswith("chatcmpl-")
    c = client(live, account.key)
    job = claim_one(worker)
    assert c.chat.completions.retrieve(queued.id).status == "in_progress"
    worker.report(job, [{"content": "once upon "}])
    partial = c.chat.completions.retrieve(queued.id)
    assert (partial.choices[0].message.content, partial.choices[0].finish_reason) == ("once upon ", None)
    worker.report(job, [{"content": "a time"}], finish={"reason": "stop"})
    done = c.chat.completions.retrieve(queued.id)
    assert done.status == "completed"
    assert (done.choices[0].message.content, done.choices[0].finish_reason) == ("once upon a time", "stop")
    assert done.usage.completion_tokens > 0 and done.usage.prompt_tokens > 0
    # Its usage row settles like any other (the reaper settles a request nobody relayed), once.
    with app.app_context():
        maintenance.reap()
        maintenance.reap()
        with jobs.db.read() as s:
            row = s.query(Usage).one()
    assert (row.settled, row.status, row.completion_tokens) == (True, "completed", done.usage.completion_tokens)


def test_background_requests_hold_no_process(app, account, live):
    ready_worker(live, account)
    with app.app_context():
        settings.save({"max_streams": 1})
    ids = [background(live, account).id for _ in range(3)]
    assert len(set(ids)) == 3
    with app.app_context(), jobs.db.read() as s:
        assert s.query(HeldRequest).count() == 0
        assert {j.state for j in s.query(Job)} == {"queued"}
        # Nobody reads them, and nobody has to: the reaper leaves them to their workers.
        assert {j.reader_expires_at for j in s.query(Job)} == {None}


@VALIDATION_ONLY
def test_a_background_request_cannot_also_stream(app, account, live):
    ready_worker(live, account)
    with pytest.raises(openai.BadRequestError) as err:
        client(live, account.key).chat.completions.create(model="echo", messages=PROMPT, stream=True,
                                                          extra_body={"background": True})
    assert err.value.param == "background"


def test_only_the_owner_reads_or_cancels_a_completion(app, account, live):
    ready_worker(live, account)
    queued = background(live, account)
    other = make_account(app, "bob@example.com")
    for call in (lambda c: c.chat.completions.retrieve(queued.id),
                 lambda c: c.post(f"/chat/completions/{queued.id}/cancel", cast_to=ChatCompletion)):
        with pytest.raises(openai.NotFoundError) as err:
            call(client(live, other.key))
        assert err.value.code == "not_found"
    assert job_row(app, queued.id).state == "queued"
    with pytest.raises(openai.NotFoundError):
        client(live, account.key).chat.completions.retrieve("chatcmpl-nothing")


def test_cancel_tells_the_worker_and_is_idempotent(app, account, live):
    worker = ready_worker(live, account)
    queued = background(live, account)
    job = claim_one(worker)
    worker.report(job, [{"content": "once "}])
    c = client(live, account.key)
    for _ in range(2):
        cancelled = c.post(f"/chat/completions/{queued.id}/cancel", cast_to=ChatCompletion)
        assert cancelled.status == "cancelled"
        assert cancelled.choices[0].message.content == "once "
    answer = worker.report(job, [{"content": "upon"}])
    assert (answer["stop"], answer["reason"]) == (True, "cancelled")
    assert job_row(app, queued.id).error_code == "cancelled"


def test_cancelling_a_completed_completion_leaves_it_completed(app, account, live):
    worker = ready_worker(live, account)
    queued = background(live, account)
    worker.say(claim_one(worker), "the end", finish={"reason": "stop"})
    after = client(live, account.key).post(f"/chat/completions/{queued.id}/cancel", cast_to=ChatCompletion)
    assert (after.status, after.choices[0].message.content) == ("completed", "the end")


def test_a_failed_background_completion_carries_the_openai_error(app, account, live):
    worker = ready_worker(live, account)
    queued = background(live, account)
    worker.report(claim_one(worker), error={"code": "context_length_exceeded", "message": "too long"})
    r = requests.get(f"{live.url}/v1/chat/completions/{queued.id}", timeout=10,
                     headers={"Authorization": f"Bearer {account.key}"})
    body = r.json()
    assert r.status_code == 200 and body["status"] == "failed" and body["choices"] == []
    assert (body["error"]["code"], body["error"]["message"]) == ("context_length_exceeded", "too long")


def test_a_completion_streams_by_id_and_resumes_after_any_event(app, account, live):
    worker = ready_worker(live, account)
    queued = background(live, account)
    worker.report(claim_one(worker), [{"content": "a "}, {"content": "b "}, {"content": "c"}],
                  finish={"reason": "stop"}, )
    whole = sse_events(get_stream(live, account.key, queued.id, params={"include_usage": "true"}).text)
    # role, three chunks, finish, usage, [DONE] (which repeats the last id)
    assert [i for i, _ in whole] == [0, 1, 2, 3, 4, 5, 5]
    assert text_of(whole) == "a b c" and whole[-1][1] == "[DONE]"
    assert json.loads(whole[5][1])["usage"]["completion_tokens"] > 0
    for after in range(0, 6):
        by_header = sse_events(get_stream(live, account.key, queued.id, headers={"Last-Event-ID": str(after)},
                                      params={"include_usage": "true"}).text)
        assert by_header == [pair for pair in whole if pair[0] > after] + [whole[-1]] * (after == 5)
        by_query = sse_events(get_stream(live, account.key, queued.id, params={"starting_after": after,
                                                                              "include_usage": "true"}).text)
        assert by_query == by_header


@VALIDATION_ONLY
@pytest.mark.parametrize("bad", ["x", "-1", "1.5", "99999999999"])
def test_a_bad_resume_point_is_a_400(app, account, live, bad):
    ready_worker(live, account)
    queued = background(live, account)
    r = get_stream(live, account.key, queued.id, headers={"Last-Event-ID": bad})
    assert r.status_code == 400 and r.json()["error"]["param"] == "Last-Event-ID"


def test_a_stream_by_id_follows_a_running_job_live(app, account, live):
    worker = ready_worker(live, account)
    queued = background(live, account)
    job = claim_one(worker)
    seen: list[str] = []
    with get_stream(live, account.key, queued.id, stream=True) as r:
        lines = r.iter_lines(decode_unicode=True)
        worker.report(job, [{"content": "live "}])
        for line in lines:
            seen.append(line)
            if '"live "' in line:
                break
        worker.report(job, [{"content": "text"}], finish={"reason": "stop"})
        seen.extend(lines)
    assert text_of(sse_events("\n".join(seen))) == "live text"
    assert job_row(app, queued.id).state == "completed"


def hang_up_after_first_word(live, account, worker) -> tuple[str, dict, int]:
    """Stream a request, read up to the worker's first word, hang up; return its id, the job and the last event id."""
    claimed: list[dict] = []

    def first_word() -> None:
        claimed.append(claim_one(worker))
        worker.report(claimed[0], [{"content": "one "}])

    claimer = threading.Thread(target=first_word)
    claimer.start()
    # The stream starts once its job has output.
    with requests.post(f"{live.url}/v1/chat/completions", stream=True, timeout=30,
                       headers={"Authorization": f"Bearer {account.key}"},
                       json={"model": "echo", "messages": PROMPT, "stream": True}) as r:
        claimer.join()
        job = claimed[0]
        seen = []
        for line in r.iter_lines(decode_unicode=True):
            seen.append(line)
            if '"one "' in line:
                break
        public_id = r.headers["x-request-id"]
    return public_id, job, sse_events("\n".join(seen) + "\n\n")[-1][0]


# The hold lasts a minute and the grace 20 s: a reader expiry under 30 s away is the grace's.
# A minute's lease too: the worker reports only when the test says.
@pytest.mark.parametrize("app_config", [{"RESUME_GRACE": 20.0, "HOLD_TTL": 60.0, "LEASE_TTL": 60.0}])
def test_a_hung_up_stream_keeps_its_job_for_a_resume(app, account, live):
    worker = ready_worker(live, account)
    public_id, job, last = hang_up_after_first_word(live, account, worker)
    assert last == 1

    def graced() -> bool:
        row = job_row(app, public_id)
        return row.reader_expires_at is not None and row.reader_expires_at < utcnow() + dt.timedelta(seconds=30)

    wait_for(graced, 30, "the gateway to notice the hang-up and start the grace")
    assert job_row(app, public_id).state == "running"
    answer = worker.report(job, [{"content": "two "}])
    assert answer["stop"] is False  # the worker goes on while a resume may come
    with get_stream(live, account.key, public_id, stream=True, headers={"Last-Event-ID": str(last)}) as r:
        lines = r.iter_lines(decode_unicode=True)
        seen = [next(lines)]
        worker.report(job, [{"content": "three"}], finish={"reason": "stop"})
        seen.extend(lines)
    resumed = sse_events("\n".join(seen))
    assert resumed[0][0] == 2 and text_of(resumed) == "two three" and resumed[-1][1] == "[DONE]"
    assert job_row(app, public_id).state == "completed"
    with app.app_context():
        maintenance.reap()
        with jobs.db.read() as s:
            row = s.query(Usage).one()
    assert (row.settled, row.status) == (True, "completed")


@pytest.mark.parametrize("app_config", [{"RESUME_GRACE": 3.0, "HOLD_TTL": 60.0, "LEASE_TTL": 60.0}])
def test_a_hung_up_stream_nobody_resumes_is_cancelled_after_the_grace(app, account, live):
    worker = ready_worker(live, account)
    public_id, job, _ = hang_up_after_first_word(live, account, worker)
    wait_for(lambda: job_row(app, public_id).reader_expires_at < utcnow() + dt.timedelta(seconds=30), 30,
             "the grace to start")

    def reaped_and_told() -> bool:
        with app.app_context():
            maintenance.reap()  # what cron/reap.py and every waiting request run
        return worker.report(job, [{"content": "."}])["stop"]

    started = time.monotonic()
    assert not reaped_and_told()  # not at once: the grace comes first
    wait_for(reaped_and_told, 30, "the worker to be told to stop")
    assert time.monotonic() - started >= 1.0
    row = job_row(app, public_id)
    assert (row.state, row.error_code) == ("cancelled", "client_gone")
