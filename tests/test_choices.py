"""Chat requests for n choices through the official `openai` package, on SQLite and MariaDB."""
from __future__ import annotations

import json
import socket
import time
from urllib.parse import urlsplit

import openai
import pytest
import requests
from sqlalchemy import func, select

from conftest import VALIDATION_ONLY, csrf, read_until_error
from protocol import ProtoWorker, WorkerThread, sse_events
from support import wait_for
from test_limits import give_tier
from webapp import budget, settings, token_count
from webapp.db import db
from webapp.models import Job, RateBucket, Usage, UsageDaily

PROMPT = [{"role": "user", "content": "pick a colour"}]


def client(live, key) -> openai.OpenAI:
    """An OpenAI client pointed at the gateway; retries off so each call is one request."""
    return openai.OpenAI(base_url=f"{live.url}/v1", api_key=key, max_retries=0)


def all_rows(app, model) -> list:
    with app.app_context(), db.read() as s:
        return list(s.scalars(select(model).order_by(model.id)))


def answer_of(public_id: str) -> str:
    """What the test worker says for a job: each choice's own answer."""
    return f"the answer of {public_id}"


def own_answer(worker: ProtoWorker, job: dict) -> None:
    worker.say(job, answer_of(job["id"]), finish={"reason": "stop"})


def test_each_choice_is_a_job_answered_by_its_worker_with_usage_summed(app, account, live):
    with WorkerThread(live.url, account.token, own_answer):
        reply = client(live, account.key).chat.completions.create(model="echo", messages=PROMPT, n=3)
    jobs = all_rows(app, Job)
    assert len(jobs) == 3
    assert reply.id == reply._request_id == jobs[0].public_id
    assert [c.index for c in reply.choices] == [0, 1, 2]
    assert [c.message.content for c in reply.choices] == [answer_of(j.public_id) for j in jobs]
    assert all(c.finish_reason == "stop" for c in reply.choices)
    completions = [token_count.count_text(answer_of(j.public_id)) for j in jobs]
    assert reply.usage.prompt_tokens == 3 * token_count.count_prompt(PROMPT)
    assert reply.usage.completion_tokens == sum(completions)
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    # Three requests, each settled once: its own row, the day's roll-up and the rate buckets count it once.
    rows = all_rows(app, Usage)
    assert [(r.job_id, r.settled, r.status) for r in rows] == [(j.id, True, "completed") for j in jobs]
    assert [r.completion_tokens for r in rows] == completions
    daily = all_rows(app, UsageDaily)
    assert len(daily) == 1 and daily[0].requests == 3 and daily[0].completion_tokens == sum(completions)
    with app.app_context(), db.read() as s:
        assert s.scalar(select(func.sum(RateBucket.requests)).where(RateBucket.subject == "u")) == 3


def test_a_stream_relays_each_choice_at_its_index_then_the_summed_usage(app, account, live):
    body = {"model": "echo", "messages": PROMPT, "n": 3, "stream": True, "stream_options": {"include_usage": True}}
    with WorkerThread(live.url, account.token, own_answer):
        chunks = list(client(live, account.key).chat.completions.create(**body))
        raw = requests.post(f"{live.url}/v1/chat/completions", json=body, timeout=30,
                            headers={"Authorization": f"Bearer {account.key}"})
    jobs = all_rows(app, Job)
    assert len(jobs) == 6
    texts: dict[int, str] = {}
    finishes = []
    for chunk in chunks[:-1]:
        assert chunk.id == jobs[0].public_id and len(chunk.choices) == 1
        choice = chunk.choices[0]
        texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
        if choice.finish_reason:
            finishes.append(choice.index)
    assert texts == {i: answer_of(jobs[i].public_id) for i in range(3)}
    assert finishes == [0, 1, 2]
    # One after the other: every chunk of choice 0 before any of choice 1, and so on.
    order = [c.choices[0].index for c in chunks[:-1]]
    assert order == sorted(order)
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage.prompt_tokens == 3 * token_count.count_prompt(PROMPT)
    assert usage.completion_tokens == sum(token_count.count_text(texts[i]) for i in range(3))
    # The raw stream: every event has an id, strictly increasing to [DONE].
    assert raw.status_code == 200 and raw.headers["x-request-id"] == jobs[3].public_id
    pairs = sse_events(raw.text)
    ids = [event_id for event_id, _ in pairs]
    assert ids == sorted(set(ids)) and ids[0] == 0
    assert pairs[-1][1] == "[DONE]"
    assert json.loads(pairs[-2][1])["usage"]["completion_tokens"] == sum(
        token_count.count_text(answer_of(j.public_id)) for j in jobs[3:])


@VALIDATION_ONLY
def test_n_past_the_sites_cap_or_with_background_is_a_400_naming_n(app, account, live):
    api = client(live, account.key)
    for body in ({"n": 9}, {"n": 0}, {"n": True}, {"n": "2"}, {"n": 2, "background": True}):
        with pytest.raises(openai.BadRequestError) as err:
            api.post("/chat/completions", body={"model": "echo", "messages": PROMPT, **body}, cast_to=object)
        assert err.value.param == "n", body
        if body == {"n": 9}:
            assert "n must be an integer from 1 to 8" in err.value.message
    with app.app_context():
        settings.save({"max_choices": 2})
    with pytest.raises(openai.BadRequestError) as err:
        api.chat.completions.create(model="echo", messages=PROMPT, n=3)
    assert err.value.param == "n" and "from 1 to 2" in err.value.message
    assert all_rows(app, Job) == []


def test_a_rate_limit_with_room_for_fewer_than_n_refuses_them_all(app, account, live):
    give_tier(app, account.user_id, requests_per_minute=2)
    api = client(live, account.key)
    with WorkerThread(live.url, account.token, own_answer):
        with pytest.raises(openai.RateLimitError) as err:
            api.chat.completions.create(model="echo", messages=PROMPT, n=3)
        assert err.value.code == "rate_limit_exceeded"
        assert all_rows(app, Job) == [] and all_rows(app, Usage) == []  # nothing queued, nothing counted
        assert len(api.chat.completions.create(model="echo", messages=PROMPT, n=2).choices) == 2
    assert len(all_rows(app, Usage)) == 2


def index_of(app, job: dict) -> int:
    """Which choice a claimed job is: jobs are queued in choice order."""
    return [j.public_id for j in all_rows(app, Job)].index(job["id"])


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_a_failing_choice_answers_its_error_and_stops_the_others(app, account, live, stream):
    def handler(worker, job):
        index = index_of(app, job)
        if index == 0:
            own_answer(worker, job)
        elif index == 1:
            worker.report(job, error={"code": "content_filter", "message": "Not this one."})
        else:
            # Goes on until told to stop: the failure of choice 1 must cancel it.
            end = time.monotonic() + 20
            while not worker.report(job, [{"content": "."}])["stop"] and time.monotonic() < end:
                time.sleep(0.05)

    with WorkerThread(live.url, account.token, handler):
        api = client(live, account.key)
        if stream:
            text, err = read_until_error(api.chat.completions.create(model="echo", messages=PROMPT, n=3, stream=True))
        else:
            with pytest.raises(openai.BadRequestError) as raised:
                api.chat.completions.create(model="echo", messages=PROMPT, n=3)
            err = raised.value
    assert err.code == "content_filter" and "Not this one." in err.message
    jobs = all_rows(app, Job)
    if stream:
        assert text == answer_of(jobs[0].public_id)
    assert [j.state for j in jobs] == ["completed", "failed", "cancelled"]
    wait_for(lambda: all(r.settled for r in all_rows(app, Usage)), 10, "every choice settled")


def raw_stream(live, key: str, body: dict) -> socket.socket:
    """Send a streamed chat request over a bare socket, so the test can hang up like a client would."""
    url = urlsplit(live.url)
    sock = socket.create_connection((url.hostname, url.port), timeout=10)
    payload = json.dumps(body).encode()
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: {url.netloc}\r\nAuthorization: Bearer {key}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n")
    sock.sendall(head.encode() + payload)
    return sock


# A minute's hold: the reaper's fallback for readers that stopped renewing cannot be what
# cancels the jobs here, only the stream noticing its client (RESUME_GRACE is 0 in tests).
@pytest.mark.parametrize("app_config", [{"HOLD_TTL": 60.0}])
def test_a_hung_up_stream_cancels_every_choice(app, account, live):
    worker = ProtoWorker(live.url, account.token)
    worker.claim(wait=0)
    sock = raw_stream(live, account.key, {"model": "echo", "messages": PROMPT, "n": 3, "stream": True})
    claimed: list[dict] = []
    wait_for(lambda: claimed.extend(worker.claim(max_jobs=3, wait=1)) or len(claimed) == 3, 30, "three claims")
    for job in claimed:
        assert worker.report(job, [{"content": "thinking "}])["stop"] is False
    sock.close()
    told: dict[str, str] = {}

    def all_stopped() -> bool:
        for job in claimed:
            if job["id"] not in told:
                answer = worker.report(job, [{"content": "."}])
                if answer["stop"]:
                    told[job["id"]] = answer["reason"]
        return len(told) == 3

    wait_for(all_stopped, 30, "every worker to be told to stop")
    assert set(told.values()) == {"cancelled"}
    jobs = all_rows(app, Job)
    assert [(j.state, j.error_code) for j in jobs] == [("cancelled", "client_gone")] * 3
    wait_for(lambda: all(r.settled for r in all_rows(app, Usage)), 10, "every choice settled")


def held(app) -> int:
    with app.app_context():
        return budget.in_use()["streams"][0]


def test_the_request_holds_one_slot_and_gives_it_back_once(app, account, live):
    with app.app_context():
        settings.save({"max_streams": 1})
        # One held here by somebody else: a slot given back twice would take this one too.
        budget.take_local("streams")
    try:
        before = budget.held_here()
        api = client(live, account.key)
        with WorkerThread(live.url, account.token, own_answer):
            assert len(api.chat.completions.create(model="echo", messages=PROMPT, n=3).choices) == 3
            wait_for(lambda: held(app) == 0, 10, "the slot back")
            chunks = list(api.chat.completions.create(model="echo", messages=PROMPT, n=3, stream=True))
            assert {c.choices[0].index for c in chunks} == {0, 1, 2}
            wait_for(lambda: held(app) == 0, 10, "the slot back")
            # The budget of one slot admits the next request.
            assert api.chat.completions.create(model="echo", messages=PROMPT).choices[0].message.content
        # Counted here too (the live server is this process): once each, the worker's long-polls included.
        wait_for(lambda: budget.held_here() == before, 10, "this process's count back where it was")
        with app.app_context(), db.read() as s:
            assert s.scalar(select(func.count()).select_from(Usage).where(Usage.settled.is_(True))) == 7
    finally:
        budget.release_local()


@VALIDATION_ONLY
def test_the_admin_sets_the_cap_on_choices(app, admin, account, live):
    client_, _ = admin
    page = client_.get("/admin/settings")
    assert 'name="max_choices" value="8"' in page.text
    r = client_.post("/admin/settings", data={"csrf_token": csrf(page), "max_choices": "2"})
    assert r.status_code == 302
    refused = client_.post("/admin/settings", data={"csrf_token": csrf(client_.get("/admin/settings")),
                                                    "max_choices": "0"}, follow_redirects=True)
    assert "Choices per chat request must be a whole number from 1 to 128" in refused.text
    with app.app_context():
        settings.forget()
        assert settings.get("max_choices") == 2
    with pytest.raises(openai.BadRequestError) as err:
        client(live, account.key).chat.completions.create(model="echo", messages=PROMPT, n=3)
    assert err.value.param == "n"
