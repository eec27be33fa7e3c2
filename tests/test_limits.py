"""Rate limits, key rules and usage accounting, on SQLite and MariaDB."""
from __future__ import annotations

import datetime as dt
import threading
import time

import openai
import pytest
import requests
from sqlalchemy import func, select, update

from conftest import make_account
from protocol import WorkerThread
from webapp import limits, token_count, usage
from webapp.db import db
from webapp.errors import ApiError
from webapp.models import ApiKey, Job, ModelPrice, RateBucket, Tier, Usage, UsageDaily, User

PROMPT = [{"role": "user", "content": "count these five words"}]


def give_tier(app, user_id: int, **caps) -> None:
    """Put a user in a new tier with these caps."""
    with app.app_context(), db.begin() as s:
        tier = Tier(name=f"tier-{user_id}-{time.monotonic_ns()}", **caps)
        s.add(tier)
        s.flush()
        s.execute(update(User).where(User.id == user_id).values(tier_id=tier.id))


def set_key(app, **values) -> None:
    with app.app_context(), db.begin() as s:
        s.execute(update(ApiKey).values(**values))


def rows(app, model=Usage):
    with app.app_context(), db.read() as s:
        return list(s.scalars(select(model)))


def post(live, key, **body):
    return requests.post(f"{live.url}/v1/chat/completions", timeout=30, headers={"Authorization": f"Bearer {key}"},
                         json={"model": "echo", "messages": PROMPT, **body})


def test_concurrent_requests_against_a_limit_admit_exactly_that_many(app, account, live):
    give_tier(app, account.user_id, requests_per_minute=5)
    statuses = []
    start = threading.Barrier(20)

    def one():
        start.wait()
        statuses.append(post(live, account.key))

    with WorkerThread(live.url, account.token):
        threads = [threading.Thread(target=one) for _ in range(20)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
    codes = sorted(r.status_code for r in statuses)
    assert codes == [200] * 5 + [429] * 15
    refused = next(r for r in statuses if r.status_code == 429)
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert 1 <= int(refused.headers["Retry-After"]) <= 60
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    assert len(rows(app)) == 5


def test_responses_carry_rate_limit_headers(app, account, live):
    give_tier(app, account.user_id, requests_per_minute=10, requests_per_day=100, tokens_per_minute=10_000)
    with WorkerThread(live.url, account.token):
        first = post(live, account.key)
        second = post(live, account.key, stream=True)
    assert first.headers["x-ratelimit-limit-requests"] == "10"
    assert first.headers["x-ratelimit-remaining-requests"] == "9"
    assert second.headers["x-ratelimit-remaining-requests"] == "8"
    assert first.headers["x-ratelimit-limit-tokens"] == "10000"
    assert first.headers["x-ratelimit-reset-requests"].endswith("s")


def test_key_limits_apply_on_top_of_the_tier(app, account, live):
    set_key(app, requests_per_minute=2)
    with WorkerThread(live.url, account.token):
        codes = [post(live, account.key).status_code for _ in range(3)]
        refused = post(live, account.key)
    assert codes == [200, 200, 429]
    assert "API key may use 2 requests per minute" in refused.json()["error"]["message"]


def test_token_limit_refuses_once_reached(app, account, live):
    budget = token_count.count_prompt(PROMPT) + 3
    give_tier(app, account.user_id, tokens_per_minute=budget)
    with WorkerThread(live.url, account.token):
        assert post(live, account.key).status_code == 200
        refused = post(live, account.key)
    assert refused.status_code == 429
    assert "tokens per minute" in refused.json()["error"]["message"]


def test_concurrent_job_cap(app, account, live):
    give_tier(app, account.user_id, max_concurrent=1)
    release = threading.Event()

    def slow(worker, job):
        worker.report(job, [{"content": "wait"}])
        release.wait(10)
        worker.report(job, finish={"reason": "stop"})

    with WorkerThread(live.url, account.token, slow):
        first = requests.post(f"{live.url}/v1/chat/completions", stream=True, timeout=30,
                              headers={"Authorization": f"Bearer {account.key}"},
                              json={"model": "echo", "messages": PROMPT, "stream": True})
        second = post(live, account.key)
        release.set()
        first.close()
    assert second.status_code == 429
    assert second.json()["error"]["code"] == "concurrency_limit_exceeded"


def test_expired_key_and_model_allow_list(app, account, live):
    with WorkerThread(live.url, account.token, models=("echo", "other")):
        set_key(app, allowed_models_json='["other"]')
        refused = post(live, account.key)
        assert refused.status_code == 403 and refused.json()["error"]["param"] == "model"
        assert post(live, account.key, model="other").status_code == 200
        set_key(app, expires_at=dt.datetime(2020, 1, 1))
        expired = post(live, account.key, model="other")
    assert expired.status_code == 401 and expired.json()["error"]["code"] == "expired_api_key"


def test_each_request_has_one_settled_usage_row_and_rollup(app, account, live):
    with app.app_context(), db.begin() as s:
        s.add(ModelPrice(model="echo", prompt_micros_per_m=2_000_000, completion_micros_per_m=8_000_000))
    client = openai.OpenAI(base_url=f"{live.url}/v1", api_key=account.key, max_retries=0)
    with WorkerThread(live.url, account.token):
        replies = [client.chat.completions.create(model="echo", messages=PROMPT) for _ in range(3)]
        list(client.chat.completions.create(model="echo", messages=PROMPT, stream=True))
    found = rows(app)
    assert len(found) == 4 and all(r.settled and r.status == "completed" for r in found)
    assert [r.completion_tokens for r in found[:3]] == [r.usage.completion_tokens for r in replies]
    prompt, completion = found[0].prompt_tokens, found[0].completion_tokens
    assert found[0].cost_nanos == (prompt * 2_000_000 + completion * 8_000_000) // 1000
    assert all(r.latency_ms is not None and r.ttft_ms is not None and r.worker_id for r in found)
    daily = rows(app, UsageDaily)
    assert len(daily) == 1
    assert daily[0].requests == 4 and daily[0].errors == 0
    assert daily[0].prompt_tokens == sum(r.prompt_tokens for r in found)
    assert daily[0].completion_tokens == sum(r.completion_tokens for r in found)
    assert daily[0].cost_nanos == sum(r.cost_nanos for r in found)
    summary = requests.get(f"{live.url}/v1/usage", timeout=10, headers={"Authorization": f"Bearer {account.key}"}).json()
    assert summary["totals"]["requests"] == 4
    assert summary["by_model"]["echo"]["completion_tokens"] == daily[0].completion_tokens


def test_concurrent_requests_of_an_uncapped_user_are_each_counted_once(app, account, live):
    # No cap, so admission takes no lock on the user: the shared counters (rate buckets,
    # the daily roll-up) must still add up exactly when many requests settle at once.
    give_tier(app, account.user_id)
    statuses = []
    start = threading.Barrier(16)

    def one(i):
        start.wait()
        statuses.append(post(live, account.key, stream=bool(i % 2)).status_code)

    with WorkerThread(live.url, account.token):
        threads = [threading.Thread(target=one, args=(i,)) for i in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
    assert statuses == [200] * 16
    found = rows(app)
    assert len(found) == 16 and all(r.settled and r.status == "completed" for r in found)
    tokens = sum(r.prompt_tokens + r.completion_tokens for r in found)
    daily = rows(app, UsageDaily)
    assert [(d.requests, d.prompt_tokens + d.completion_tokens) for d in daily] == [(16, tokens)]
    with app.app_context(), db.read() as s:
        sums = s.execute(select(RateBucket.subject, func.sum(RateBucket.requests), func.sum(RateBucket.tokens))
                         .group_by(RateBucket.subject)).all()
    buckets = {subject: (int(requests), int(used)) for subject, requests, used in sums}
    assert buckets == {"u": (16, tokens), "k": (16, tokens)}


def test_abandoned_stream_is_accounted_for_what_was_produced(app, account, live):
    stopped = threading.Event()

    def talky(worker, job):
        for i in range(200):
            if worker.report(job, [{"content": "word "}])["stop"]:
                stopped.set()
                return
            time.sleep(0.02)

    with WorkerThread(live.url, account.token, talky):
        with requests.post(f"{live.url}/v1/chat/completions", stream=True, timeout=30,
                           headers={"Authorization": f"Bearer {account.key}"},
                           json={"model": "echo", "messages": PROMPT, "stream": True}) as r:
            lines = r.iter_lines()
            for _ in range(6):
                next(lines)
        assert stopped.wait(10)
    with app.app_context():
        usage.settle_pending()  # as cron would, whether or not the request got there first
        with db.read() as s:
            row = s.scalars(select(Usage)).one()
            produced = s.scalar(select(Job.next_seq))
    assert row.settled and row.status == "cancelled" and row.error_code == "client_gone"
    assert row.completion_tokens == token_count.count_completion([{"content": "word "}] * produced) > 0


# No lazy housekeeping on the request path: the only settlers are the request and the test's cron.
@pytest.mark.parametrize("app_config", [{"REAP_INTERVAL": 1e9}])
def test_the_request_and_cron_settle_an_ended_job_exactly_once(app, account, live, monkeypatch):
    """The request that relayed a job and cron's settle_pending both reach its ended, unsettled usage row.

    A gate holds each settler at the door of usage.settle until the other arrives, so both
    run it at once: the request's end_request in the server's thread, and cron here.
    """
    settle = usage.settle
    gate = threading.Barrier(2, timeout=30)
    by_request: list[bool] = []

    def gated(job_id, *args, **kwargs):
        gate.wait()
        done = settle(job_id, *args, **kwargs)
        if threading.current_thread() is not threading.main_thread():
            by_request.append(done)
        return done

    monkeypatch.setattr(usage, "settle", gated)
    rounds, replies = 4, []
    with WorkerThread(live.url, account.token):
        for i in range(rounds):
            reply: list = []
            request = threading.Thread(target=lambda: reply.append(post(live, account.key)))
            request.start()
            end = time.monotonic() + 30
            while len([j for j in rows(app, Job) if j.state == "completed"]) <= i:
                assert time.monotonic() < end, "the job never ended"
                time.sleep(0.02)
            with app.app_context():
                by_cron = usage.settle_pending()  # finds the row unsettled: the request waits at the gate
            request.join(timeout=30)
            assert reply[0].status_code == 200, reply[0].text
            assert by_cron + by_request[i] == 1, (by_cron, by_request)
            replies.append(reply[0].json())
    found = rows(app)
    assert len(found) == rounds and all(r.settled and r.status == "completed" for r in found)
    # Whoever settled it, the row says what the client was told.
    assert [r.completion_tokens for r in found] == [r["usage"]["completion_tokens"] for r in replies]
    daily = rows(app, UsageDaily)
    assert len(daily) == 1 and daily[0].requests == rounds
    assert daily[0].completion_tokens == sum(r.completion_tokens for r in found)
    # The rate buckets count each request once, and its tokens once (prompt at admission, answer at settlement).
    buckets = [b for b in rows(app, RateBucket) if b.subject == "u"]
    assert sum(b.requests for b in buckets) == rounds
    assert sum(b.tokens for b in buckets) == sum(r.prompt_tokens + r.completion_tokens for r in found)


def test_refused_request_leaves_no_job_or_usage(app, account, live):
    give_tier(app, account.user_id, requests_per_minute=1)
    with WorkerThread(live.url, account.token):
        post(live, account.key)
        assert post(live, account.key).status_code == 429
    with app.app_context(), db.read() as s:
        assert s.scalar(select(func.count()).select_from(Job)) == 1
        assert s.scalar(select(func.count()).select_from(Usage)) == 1


def test_usage_endpoint_validates_dates(app, account, live):
    get = lambda q: requests.get(f"{live.url}/v1/usage?{q}", timeout=10,  # noqa: E731
                                 headers={"Authorization": f"Bearer {account.key}"})
    assert get("start=yesterday").json()["error"]["param"] == "start"
    assert get("start=2026-02-01&end=2026-01-01").status_code == 400
    assert get("start=2020-01-01&end=2026-01-01").status_code == 400
    assert get("").status_code == 200


def test_users_see_only_their_own_usage(app, account, live):
    other = make_account(app, "bob@example.com")
    with WorkerThread(live.url, account.token):
        post(live, account.key)
    theirs = requests.get(f"{live.url}/v1/usage", timeout=10, headers={"Authorization": f"Bearer {other.key}"}).json()
    assert theirs["totals"]["requests"] == 0


@pytest.mark.parametrize("seconds, text", [(0.2, "1s"), (59, "59s"), (360, "6m0s"), (3723, "1h2m3s")])
def test_reset_durations_read_like_openais(seconds, text):
    from webapp.limits import format_reset

    assert format_reset(seconds) == text


def test_tier_priority_orders_the_queue(app, live):
    low = make_account(app, "low@example.com")
    high = make_account(app, "high@example.com")
    ops = make_account(app, "ops@example.com", shared=True)
    give_tier(app, high.user_id, priority=10)
    from protocol import ProtoWorker

    worker = ProtoWorker(live.url, ops.token)
    worker.claim()  # advertise echo so both requests are accepted
    answers = {}

    def ask(account):
        answers[account.email] = post(live, account.key)

    def queued(n: int) -> None:
        end = time.monotonic() + 30
        while len(rows(app, Job)) < n:
            assert time.monotonic() < end, f"job {n} was never queued"
            time.sleep(0.02)

    first = threading.Thread(target=ask, args=(low,))
    first.start()
    queued(1)  # the low tier's job is older
    second = threading.Thread(target=ask, args=(high,))
    second.start()
    queued(2)
    claimed = worker.claim(max_jobs=2)
    for job in claimed:
        worker.say(job, "ok", finish={"reason": "stop"})
    first.join(timeout=30)
    second.join(timeout=30)
    with app.app_context(), db.read() as s:
        owners = {j.public_id: j.user_id for j in s.scalars(select(Job))}
    assert [owners[j["id"]] for j in claimed] == [high.user_id, low.user_id]


def _admit_at(key_id: int, now: dt.datetime, prompt_tokens: int = 5):
    """Admit one request at a chosen time, straight through limits.admit and usage.open_row."""
    with db.begin() as s:
        key = s.get(ApiKey, key_id)
        job = Job(public_id=f"t-{time.monotonic_ns()}", user_id=key.user_id, api_key_id=key.id, model="echo",
                  rank=0, request_json="{}", created_at=now, deadline_at=now)
        states = limits.admit(s, key, job, prompt_tokens, now)
        usage.open_row(s, job, key.id, prompt_tokens, now)
        return states


def test_windows_slide_exactly_across_minute_edges(app, account):
    give_tier(app, account.user_id, requests_per_minute=2)
    base = usage.utcnow().replace(second=0, microsecond=0) - dt.timedelta(minutes=10)
    at = lambda seconds: base + dt.timedelta(seconds=seconds)  # noqa: E731
    with app.app_context():
        key_id = rows(app, ApiKey)[0].id
        _admit_at(key_id, at(30))
        _admit_at(key_id, at(50))
        with pytest.raises(ApiError) as refused:
            _admit_at(key_id, at(80))  # the window [20 s, 80 s) holds both
        assert refused.value.retry_after == pytest.approx(10)  # the use at 30 s leaves at 90 s
        _admit_at(key_id, at(90.001))  # the window [30.001 s, 90.001 s) holds only the one at 50 s
        with pytest.raises(ApiError):
            _admit_at(key_id, at(100))


def test_bucketed_windows_match_counting_every_row(app, account):
    """Minute buckets plus the ragged first minute give what counting the usage rows gives."""
    import random

    rng = random.Random(7)
    caps = {f"{kind}_per_{window}": 10**9 for kind in ("requests", "tokens") for window in ("minute", "hour", "day")}
    give_tier(app, account.user_id, **caps)
    set_key(app, requests_per_minute=10**9, tokens_per_hour=10**9)
    start = usage.utcnow() - dt.timedelta(hours=3)
    with app.app_context():
        key_id = rows(app, ApiKey)[0].id
        stranger = make_account(app, email="stranger@example.com")  # another user's use stays out
        with db.begin() as s:
            other_key = ApiKey(user_id=account.user_id, name="second", prefix="x", key_hash="h" * 64)
            s.add(other_key)
            s.flush()
            other_key_id = other_key.id
            stranger_key_id = s.scalar(select(ApiKey.id).where(ApiKey.user_id == stranger.user_id))
        times = sorted(start + dt.timedelta(seconds=rng.uniform(0, 3 * 3600)) for _ in range(400))
        checks = 0
        for i, t in enumerate(times):
            _admit_at(rng.choice([key_id, other_key_id]), t, prompt_tokens=rng.randint(1, 50))
            _admit_at(stranger_key_id, t)
            if i % 13:
                continue
            # Look between this use and the next, the way a real admission sees the past.
            now = t + (times[i + 1] - t) * rng.random() if i + 1 < len(times) else t
            checks += 1
            with db.read() as s:
                user = s.get(User, account.user_id)
                key = s.get(ApiKey, key_id)
                all_rows = list(s.scalars(select(Usage).where(Usage.user_id == account.user_id)))
                states = limits._states(s, user.id, [("account", "u", user.id, limits.tier_of(s, user)),
                                                     ("API key", "k", key.id, key)], now)
                assert len(states) == 6 + 2
                for state in states:
                    since = now - dt.timedelta(seconds=limits.WINDOWS[state.window])
                    mine = [r for r in all_rows if since <= r.created_at
                            and (state.subject == "account" or r.api_key_id == key.id)]
                    want = len(mine) if state.kind == "requests" else sum(r.prompt_tokens for r in mine)
                    assert state.used == want, (state, now)
                    if mine:
                        oldest = min(r.created_at for r in mine)
                        expect = (oldest + dt.timedelta(seconds=limits.WINDOWS[state.window]) - now).total_seconds()
                        assert state.reset_in == pytest.approx(expect, abs=1e-3)
        assert checks > 25


def test_purge_drops_only_buckets_no_window_reaches(app, account):
    from webapp.models import RateBucket

    now = usage.utcnow().replace(second=0, microsecond=0)
    ages = [dt.timedelta(hours=h) for h in (0, 20, 26, 30, 80)]
    with app.app_context():
        with db.begin() as s:
            for age in ages:
                s.add(RateBucket(subject="u", subject_id=account.user_id, minute=now - age, requests=1, tokens=1,
                                 first_at=now - age))
        assert limits.purge_buckets(now) == 3  # older than a day and the hour of grace
        assert sorted(now - b.minute for b in rows(app, RateBucket)) == ages[:2]
