"""The dashboard through its pages: sign-in, throttling, CSRF, keys, the overview's figures."""
from __future__ import annotations

import datetime as dt
import re

import pytest
import requests
from sqlalchemy import func, select, update

from conftest import PASSWORD, csrf, make_account, sign_in
from protocol import WorkerThread
from webapp import settings, usage
from webapp.db import db
from webapp.models import ApiKey, Event, Job, Usage, Worker



@pytest.fixture
def browser(app, account):
    """A signed-in test client for the default account."""
    client = app.test_client()
    assert sign_in(client, account.email).status_code == 302
    return client


def test_pages_need_a_signed_in_user(app):
    client = app.test_client()
    for path in ("/dashboard", "/keys", "/account/password"):
        r = client.get(path)
        assert r.status_code == 302 and "/login" in r.location


def test_wrong_password_is_refused_and_logged_without_the_password(app, account):
    client = app.test_client()
    r = sign_in(client, account.email, "not my password")
    assert r.status_code == 401 and "Wrong email or password" in r.text
    with app.app_context(), db.read() as s:
        event = s.scalars(select(Event)).one()
    assert event.kind == "signin_failed" and event.subject == account.email
    assert "not my password" not in event.message


def test_repeated_failures_lock_that_address_out_of_the_account_for_a_while(app, account):
    client = app.test_client()
    for _ in range(5):
        assert sign_in(client, account.email, "guess").status_code == 401
    r = sign_in(client, account.email)  # even the right password waits now, from this address
    assert r.status_code == 429 and "Too many failed sign-ins" in r.text
    elsewhere = app.test_client()
    elsewhere.environ_base["REMOTE_ADDR"] = "198.51.100.7"
    assert sign_in(elsewhere, account.email).status_code == 302  # the real user is not locked out


def test_forms_need_a_csrf_token(app, account, browser):
    r = browser.post("/keys", data={"name": "no token"})
    assert r.status_code == 400
    with app.app_context(), db.read() as s:
        assert s.scalar(select(func.count()).select_from(ApiKey)) == 1  # make_account's only


def test_next_never_leads_off_site(app, account):
    client = app.test_client()
    token = csrf(client.get("/login"))
    r = client.post("/login?next=//evil.example/", data={"email": account.email, "password": PASSWORD,
                                                           "csrf_token": token})
    assert r.location == "/dashboard"


def test_new_key_is_shown_once_and_works(app, account, browser, live):
    page = browser.get("/keys")
    r = browser.post("/keys", data={"name": "laptop", "expires_days": "30", "models": "echo",
                                    "csrf_token": csrf(page)})
    secret = re.search(r'<code id="new-key">(pgk_[^<]+)</code>', r.text).group(1)
    assert secret not in browser.get("/keys").text
    with app.app_context(), db.read() as s:
        key = s.scalar(select(ApiKey).where(ApiKey.name == "laptop"))
    assert key.allowed_models == ["echo"] and key.expires_at is not None
    with WorkerThread(live.url, account.token):
        ok = requests.post(f"{live.url}/v1/chat/completions", timeout=30, headers={"Authorization": f"Bearer {secret}"},
                           json={"model": "echo", "messages": [{"role": "user", "content": "hi"}]})
    assert ok.status_code == 200


def test_revoked_key_is_refused(app, account, browser, live):
    with app.app_context(), db.read() as s:
        key_id = s.scalar(select(ApiKey.id))
    r = browser.post(f"/keys/{key_id}/revoke", data={"csrf_token": csrf(browser.get("/keys"))})
    assert r.status_code == 302
    refused = requests.get(f"{live.url}/v1/models", timeout=10, headers={"Authorization": f"Bearer {account.key}"})
    assert refused.status_code == 401


def test_users_cannot_touch_each_others_keys(app, account):
    other = make_account(app, "eve@example.com")
    client = app.test_client()
    sign_in(client, other.email)
    with app.app_context(), db.read() as s:
        alice_key = s.scalar(select(ApiKey.id).where(ApiKey.user_id == account.user_id))
    r = client.post(f"/keys/{alice_key}/revoke", data={"csrf_token": csrf(client.get("/keys"))})
    assert r.status_code == 404
    assert account.key[:12] not in client.get("/keys").text


def test_overview_figures_match_the_usage_rows(app, account, browser, live):
    with WorkerThread(live.url, account.token):
        for text in ("one", "two words", "three words here"):
            requests.post(f"{live.url}/v1/chat/completions", timeout=30,
                          headers={"Authorization": f"Bearer {account.key}"},
                          json={"model": "echo", "messages": [{"role": "user", "content": text}]})
    with app.app_context(), db.read() as s:
        rows = list(s.scalars(select(Usage)))
    tokens = sum(r.prompt_tokens + r.completion_tokens for r in rows)
    page = browser.get("/dashboard").text
    for period in ("Last 24 hours", "Last 30 days"):
        card = page[page.index(f'data-period="{period}"'):]
        assert re.search(r'class="requests">(\d+)<', card).group(1) == "3"
        assert re.search(r'class="tokens">(\d+)<', card).group(1) == str(tokens)
    assert '<td>echo</td><td>3</td><td>0</td>' in page
    today = rows[0].created_at.date().isoformat()
    # Today's band for echo, in the requests chart and in the tokens chart.
    assert f'data-day="{today}" data-model="echo" data-value="3"' in page
    assert f'data-day="{today}" data-model="echo" data-value="{tokens}"' in page


def test_charts_band_each_model_and_group_the_rest():
    from webapp.dashboard import chart

    day = "2026-11-24"
    figures = {f"m{i}": {"requests": 10 - i, "prompt_tokens": 1, "completion_tokens": 2} for i in range(9)}
    laid = chart(["2026-11-23", day], {day: figures}, ("requests",))
    assert laid["legend"] == ["m0", "m1", "m2", "m3", "m4", "m5", "other models"]
    assert laid["bars"][0] == ("2026-11-23", [(name, 0) for name in laid["legend"]])
    assert dict(laid["bars"][1][1])["other models"] == 4 + 3 + 2
    assert laid["top"] == sum(10 - i for i in range(9))
    few = chart([day], {day: {k: figures[k] for k in list(figures)[:7]}}, ("prompt_tokens", "completion_tokens"))
    assert len(few["legend"]) == 7 and "other models" not in few["legend"] and few["top"] == 21


def test_pages_carry_a_content_security_policy(app):
    r = app.test_client().get("/login")
    assert "script-src 'self'" in r.headers["Content-Security-Policy"]
    assert r.headers["X-Frame-Options"] == "DENY"


def test_change_password(app, account, browser):
    page = browser.get("/account/password")
    r = browser.post("/account/password", data={"current": PASSWORD, "new": "a new passphrase",
                                                 "confirm": "a new passphrase", "csrf_token": csrf(page)})
    assert r.status_code == 302
    client = app.test_client()
    assert sign_in(client, account.email).status_code == 401
    assert sign_in(client, account.email, "a new passphrase").status_code == 302


def test_worker_token_from_the_page_serves_and_shows_its_state(app, account, browser, live):
    from protocol import ProtoWorker

    r = browser.post("/workers", data={"name": "home-gpu", "csrf_token": csrf(browser.get("/workers"))})
    token = re.search(r'<code id="new-token">(pgw_[^<]+)</code>', r.text).group(1)
    assert f"POLLCLIENT_TOKEN={token} python pollclient --api-url http://localhost" in r.text
    assert token not in browser.get("/workers").text
    ProtoWorker(live.url, token, models=("llama3",)).claim()
    page = browser.get("/workers").text
    row = page[page.index("home-gpu"):]
    assert re.search(r'class="state">online<', row) and "llama3" in row


def test_revoked_worker_token_is_refused(app, account, browser, live):
    from protocol import ProtoWorker

    with app.app_context(), db.read() as s:
        worker_id = s.scalar(select(Worker.id))
    r = browser.post(f"/workers/{worker_id}/revoke", data={"csrf_token": csrf(browser.get("/workers"))})
    assert r.status_code == 302
    refused = ProtoWorker(live.url, account.token).post("claim", {"models": ["echo"]})
    assert refused.status_code == 401


def test_users_cannot_revoke_each_others_workers(app, account):
    other = make_account(app, "mallory@example.com")
    client = app.test_client()
    sign_in(client, other.email)
    with app.app_context(), db.read() as s:
        alice_worker = s.scalar(select(Worker.id).where(Worker.user_id == account.user_id))
    r = client.post(f"/workers/{alice_worker}/revoke", data={"csrf_token": csrf(client.get("/workers"))})
    assert r.status_code == 404


def test_request_history_filters_and_detail(app, account, browser, live):
    def failing_on_fail(worker, job):
        text = job["request"]["messages"][-1]["content"]
        if text == "fail":
            worker.report(job, error={"code": "upstream_error", "message": "model crashed"})
        else:
            worker.say(job, text, finish={"reason": "stop"})

    with WorkerThread(live.url, account.token, failing_on_fail):
        for text in ("first question", "fail"):
            requests.post(f"{live.url}/v1/chat/completions", timeout=30,
                          headers={"Authorization": f"Bearer {account.key}"},
                          json={"model": "echo", "messages": [{"role": "user", "content": text}]})
    listing = browser.get("/requests").text
    assert listing.count("data-usage-id=") == 2
    failed = browser.get("/requests?status=failed").text
    assert failed.count("data-usage-id=") == 1 and "upstream_error" in failed
    with app.app_context(), db.read() as s:
        ok_id = s.scalar(select(Usage.id).where(Usage.status == "completed"))
    detail = browser.get(f"/requests/{ok_id}").text
    assert "first question" in detail and '<pre class="answer">first question</pre>' in detail
    other = make_account(app, "snoop@example.com")
    client = app.test_client()
    sign_in(client, other.email)
    assert client.get(f"/requests/{ok_id}").status_code == 404
    assert "first question" not in client.get("/requests").text
    # Past the retention setting the content is hidden; the figures stay.
    with app.app_context():
        settings.save({"retention_hours": 0})
        with db.begin() as s:
            s.execute(update(Job).values(finished_at=usage.utcnow() - dt.timedelta(seconds=1)))
    detail = browser.get(f"/requests/{ok_id}").text
    assert "first question" not in detail and "no longer kept" in detail
