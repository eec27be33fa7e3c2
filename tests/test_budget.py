"""The held-request budget: past its caps, long-polls and API requests are turned away at once."""
from __future__ import annotations

import threading
import time

import openai
import pytest

from conftest import make_account
from protocol import ProtoWorker
from webapp import accounts, budget, jobs, settings
from webapp.errors import ApiError
from webapp.db import db
from webapp.models import Job, Usage
from sqlalchemy import func, select


def held(app, kind: str) -> int:
    with app.app_context():
        return budget.in_use()[kind][0]


def count(app, model) -> int:
    with app.app_context(), db.read() as s:
        return s.scalar(select(func.count()).select_from(model))


def wait_for(condition, timeout: float = 10) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.05)


# Long-polls that would be held for 20 s: "at once" (under half that) cannot be a held poll
# that ended, on however slow a machine. Jobs end the held ones early.
LONG_WAIT = {"CLAIM_WAIT_MAX": 60.0}


def end_polls(app, *user_ids: int) -> None:
    """Queue one job for each of these users: their held long-polls take them and end now."""
    with app.app_context():
        for user_id in user_ids:
            jobs.submit_job(user_id, None, "echo", {"model": "echo", "messages": []}, False)


@pytest.mark.parametrize("app_config", [LONG_WAIT])
def test_a_budget_of_two_long_polls_answers_the_third_at_once(app, account, live, admin):
    client, root = admin
    with app.app_context():
        settings.save({"max_long_polls": 2})
        # Two owners: one owner's workers may hold only their fair share of the budget.
        tokens = [accounts.create_worker_token(uid, f"w{i}") for i, uid in
                  enumerate((account.user_id, root.user_id, account.user_id))]
    polls = [threading.Thread(target=ProtoWorker(live.url, t).claim, kwargs={"wait": 20}) for t in tokens[:2]]
    for poll in polls:
        poll.start()
    wait_for(lambda: held(app, "long_polls") == 2)
    assert 'data-held="long_polls"><td>worker long-polls</td><td class="used">2<' in client.get("/admin/").text
    started = time.monotonic()
    third = ProtoWorker(live.url, tokens[2]).post("claim", {"models": ["echo"], "wait": 20})
    assert third.status_code == 429 and time.monotonic() - started < 10
    assert third.headers["Retry-After"] == "10" and third.json()["error"]["code"] == "gateway_busy"
    assert "worker long-polls" in third.json()["error"]["message"]
    # A claim that does not wait holds nothing and still gets through.
    assert ProtoWorker(live.url, tokens[2]).post("claim", {"models": ["echo"], "wait": 0}).status_code == 200
    end_polls(app, account.user_id, root.user_id)
    for poll in polls:
        poll.join(timeout=30)
    assert held(app, "long_polls") == 0  # handed back as each poll ended
    assert ProtoWorker(live.url, tokens[2]).post("claim", {"models": ["echo"], "wait": 0.2}).status_code == 200


@pytest.mark.parametrize("app_config", [LONG_WAIT])
def test_concurrent_long_polls_against_a_cap_hold_exactly_that_many(app, live, monkeypatch):
    """Ten workers of ten owners long-poll at one moment against a budget of four.

    A gate lets the ten into budget.acquire together, so they count and take slots at once.
    """
    polls, cap, wait = 10, 4, 20
    owners = [make_account(app, f"owner{i}@example.com") for i in range(polls)]
    with app.app_context():
        settings.save({"max_long_polls": cap})
    acquire, gate = budget.acquire, threading.Barrier(polls, timeout=30)

    def gated(*args, **kwargs):
        gate.wait()
        return acquire(*args, **kwargs)

    monkeypatch.setattr(budget, "acquire", gated)
    answers: list[tuple[int, float]] = []

    def poll(token: str) -> None:
        started = time.monotonic()
        status = ProtoWorker(live.url, token).post("claim", {"models": ["echo"], "wait": wait},
                                                   timeout=wait + 30).status_code
        answers.append((status, time.monotonic() - started))

    threads = [threading.Thread(target=poll, args=(owner.token,)) for owner in owners]
    for thread in threads:
        thread.start()
    # The refused are answered at once, long before the held polls' wait ends.
    wait_for(lambda: len(answers) == polls - cap, timeout=wait / 2)
    assert sorted(status for status, _ in answers) == [429] * (polls - cap)
    assert all(took < wait / 2 for _, took in answers)
    assert held(app, "long_polls") == cap
    end_polls(app, *(owner.user_id for owner in owners))
    for thread in threads:
        thread.join(timeout=wait + 30)
    assert sorted(status for status, _ in answers) == [200] * cap + [429] * (polls - cap)
    assert held(app, "long_polls") == 0


# The held streams wait for a worker far longer than the test needs; the test serves them.
@pytest.mark.parametrize("app_config", [{"DISPATCH_TIMEOUT": 60.0}])
def test_a_budget_of_two_streams_answers_the_third_with_503(app, account, live):
    with app.app_context():
        settings.save({"max_streams": 3})
    worker = ProtoWorker(live.url, account.token)
    worker.claim(wait=0)  # the model is live, but nobody serves it yet
    api = openai.OpenAI(base_url=f"{live.url}/v1", api_key=account.key, max_retries=0)
    prompt = [{"role": "user", "content": "hold on"}]
    answers: list[str] = []

    def hold_one():
        stream = api.chat.completions.create(model="echo", messages=prompt, stream=True)
        answers.append("".join(c.choices[0].delta.content or "" for c in stream if c.choices))

    holders = [threading.Thread(target=hold_one) for _ in range(2)]
    for holder in holders:
        holder.start()
    wait_for(lambda: held(app, "streams") == 2 and count(app, Job) == 2)  # both holders queued their job
    jobs_before = 2
    with pytest.raises(openai.InternalServerError) as refused:
        api.chat.completions.create(model="echo", messages=prompt, stream=True)
    assert refused.value.status_code == 503 and refused.value.response.headers["retry-after"] == "3"
    assert refused.value.code == "gateway_busy" and "as many as one account may hold (2)" in refused.value.message
    with app.app_context(), db.read() as s:
        # Refused before anything was queued or counted.
        assert s.scalar(select(func.count()).select_from(Job)) == jobs_before
        assert s.scalar(select(func.count()).select_from(Usage)) == jobs_before
    for job in worker.claim(max_jobs=2):
        worker.say(job, "served", finish={"reason": "stop"})
    for holder in holders:
        holder.join(timeout=30)
    assert answers == ["served", "served"]
    # Given back as each stream's generator ends, which may be just after the client read [DONE].
    wait_for(lambda: held(app, "streams") == 0)


def test_a_slot_of_a_dead_process_lapses(app):
    with app.app_context():
        settings.save({"max_long_polls": 1})
        assert budget.acquire("long_polls", ttl=0.2)
        assert budget.acquire("long_polls", ttl=0.2) is None
        time.sleep(0.3)
        assert budget.acquire("long_polls", ttl=5)
        settings.save({"max_long_polls": 0})
        assert budget.acquire("long_polls", ttl=5) == 0  # no cap: nothing to count


def test_one_user_cannot_take_every_slot(app, account):
    other = make_account(app, "bob@example.com")
    with app.app_context():
        settings.save({"max_streams": 4})
        assert budget.user_share(4) == 3 and budget.user_share(2) == 1 and budget.user_share(1) == 1
        mine = [budget.acquire("streams", 5, account.user_id) for _ in range(4)]
        assert all(mine[:3]) and mine[3] is None  # past alice's share, while a slot is free
        theirs = [budget.acquire("streams", 5, other.user_id) for _ in range(2)]
        assert theirs[0] and theirs[1] is None  # the budget is full
        assert budget.in_use()["streams"][0] == 4


def test_a_process_holds_no_more_than_its_cap(app, account):
    app.config["MAX_HELD_PER_PROCESS"] = 2
    with app.app_context(), app.test_request_context():
        before = budget.held_here()
        holds = [budget.acquire_or_refuse("streams", 5, account.user_id) for _ in range(2)]
        with pytest.raises(ApiError) as refused:
            budget.acquire_or_refuse("streams", 5, account.user_id)
        assert refused.value.status == 503 and refused.value.code == "gateway_busy" and refused.value.retry_after
        for hold in holds:
            budget.release(hold)
        assert budget.held_here() == before
        budget.release(budget.acquire_or_refuse("long_polls", 5, account.user_id))
