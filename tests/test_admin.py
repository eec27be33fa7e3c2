"""Admin pages: only admins get in; the queue, workers, users, tiers, prices and the log work."""
from __future__ import annotations

import re

import pytest
import requests
from sqlalchemy import select

from conftest import csrf, make_account, sign_in
from protocol import ProtoWorker, WorkerThread
from webapp import jobs
from webapp.db import db
from webapp.models import Job, Tier, Usage, User

PROMPT = [{"role": "user", "content": "hello admin"}]
ADMIN_PAGES = ["/admin/", "/admin/users", "/admin/prices", "/admin/events", "/admin/settings"]


def ask(live, key):
    return requests.post(f"{live.url}/v1/chat/completions", timeout=30, headers={"Authorization": f"Bearer {key}"},
                         json={"model": "echo", "messages": PROMPT})


def test_non_admins_get_403_everywhere(app, account):
    client = app.test_client()
    sign_in(client, account.email)
    token = csrf(client.get("/dashboard"))
    for path in ADMIN_PAGES:
        assert client.get(path).status_code == 403
    for path in ("/admin/jobs/1/cancel", "/admin/workers/1/shared", "/admin/users", "/admin/users/1",
                 "/admin/tiers/1", "/admin/prices", "/admin/aliases", "/admin/settings", "/admin/settings/metrics-token",
                 "/admin/invites"):
        assert client.post(path, data={"csrf_token": token}).status_code == 403
    assert "Admin</a>" not in client.get("/dashboard").text


def test_admin_sees_the_queue_and_cancels_a_job(app, admin):
    client, account = admin
    with app.app_context():
        job, _ = jobs.submit_job(account.user_id, None, "echo", {"model": "echo", "messages": PROMPT}, False)
    page = client.get("/admin/").text
    assert re.search(r'data-model="echo"><td>echo</td><td class="queued">1<', page)
    assert 'href="/healthz"' in page and 'href="/readyz"' in page  # the probes, linked from the queue
    r = client.post(f"/admin/jobs/{job.id}/cancel", data={"csrf_token": csrf(client.get("/admin/"))})
    assert r.status_code == 302
    with app.app_context(), db.read() as s:
        assert s.get(Job, job.id).state == "cancelled"
    assert "job_cancelled" in client.get("/admin/events").text


def test_admin_tier_edits_apply_to_the_next_request(app, admin, live):
    client, root = admin
    user = make_account(app, "user@example.com")
    with app.app_context(), db.read() as s:
        free = s.scalar(select(Tier).where(Tier.name == "free"))
    token = csrf(client.get("/admin/users"))
    client.post(f"/admin/users/{user.user_id}", data={"csrf_token": token, "tier_id": free.id, "priority": "0"})
    form = {"csrf_token": token, "priority": "0", "requests_per_minute": "1"}
    assert client.post(f"/admin/tiers/{free.id}", data=form).status_code == 302
    with WorkerThread(live.url, user.token):
        assert ask(live, user.key).status_code == 200
        assert ask(live, user.key).status_code == 429
    log = client.get("/admin/events?kind=rate_limited").text
    assert "user@example.com" in log and "1 requests per minute" in log


def test_bad_tier_values_are_refused(app, admin):
    client, _ = admin
    token = csrf(client.get("/admin/users"))
    r = client.post("/admin/tiers/1", data={"csrf_token": token, "priority": "0", "requests_per_minute": "-3"},
                    follow_redirects=True)
    assert "must be a positive whole number" in r.text
    with app.app_context(), db.read() as s:
        assert s.get(Tier, 1).requests_per_minute == 10


def test_admin_shares_a_worker_with_everyone(app, admin, live):
    client, root = admin
    alice = make_account(app, "alice@example.com")
    bob = make_account(app, "bob@example.com")
    with app.app_context():
        jobs.submit_job(alice.user_id, None, "echo", {"model": "echo", "messages": PROMPT}, False)
    bobs = ProtoWorker(live.url, bob.token)
    assert bobs.claim() == []
    with app.app_context(), db.read() as s:
        from webapp.models import Worker

        bob_worker = s.scalar(select(Worker.id).where(Worker.user_id == bob.user_id))
    client.post(f"/admin/workers/{bob_worker}/shared", data={"csrf_token": csrf(client.get("/admin/")), "shared": "1"})
    assert len(bobs.claim()) == 1


def test_admin_sets_a_price_and_requests_cost_it(app, admin, live):
    client, root = admin
    r = client.post("/admin/prices", data={"csrf_token": csrf(client.get("/admin/prices")), "model": "echo",
                                           "prompt": "2.5", "completion": "10"})
    assert r.status_code == 302
    with WorkerThread(live.url, root.token):
        assert ask(live, root.key).status_code == 200
    with app.app_context(), db.read() as s:
        row = s.scalars(select(Usage)).one()
    assert row.cost_nanos == (row.prompt_tokens * 2_500_000 + row.completion_tokens * 10_000_000) // 1000 > 0
    assert "2.5000" in client.get("/admin/prices").text


def test_admin_creates_users_but_cannot_drop_own_rights(app, admin):
    client, root = admin
    token = csrf(client.get("/admin/users"))
    client.post("/admin/users", data={"csrf_token": token, "email": "new@example.com", "password": "long enough",
                                      "tier": "premium"})
    r = client.post(f"/admin/users/{root.user_id}", data={"csrf_token": token, "priority": "0"}, follow_redirects=True)
    assert "cannot take away your own admin rights" in r.text
    with app.app_context(), db.read() as s:
        new = s.scalar(select(User).where(User.email == "new@example.com"))
        assert s.get(Tier, new.tier_id).name == "premium"
        assert s.get(User, root.user_id).is_admin


def test_sign_up_is_closed_until_the_admin_opens_it(app, admin):
    client, _ = admin
    stranger = app.test_client()
    page = stranger.get("/signup")
    assert page.status_code == 403 and "by invitation only" in page.text
    assert stranger.post("/signup", data={"email": "x@example.com", "password": "long enough pw",
                                          "confirm": "long enough pw", "csrf_token": "nope"}).status_code in (400, 403)
    assert "Create an account" not in stranger.get("/login").text
    r = client.post("/admin/settings", data={"csrf_token": csrf(client.get("/admin/settings")),
                                             "public_signup": "1", "retention_hours": "48",
                                             "max_long_polls": "4", "max_streams": "10"})
    assert r.status_code == 302
    assert "Create an account" in stranger.get("/login").text
    form = stranger.get("/signup")
    assert form.status_code == 200
    r = stranger.post("/signup", data={"email": "New@Example.com", "password": "long enough pw",
                                       "confirm": "long enough pw", "csrf_token": csrf(form)})
    assert r.status_code == 302 and r.headers["Location"].endswith("/dashboard")
    again = app.test_client()
    r = again.post("/signup", data={"email": "new@example.com", "password": "long enough pw",
                                    "confirm": "long enough pw", "csrf_token": csrf(again.get("/signup"))})
    assert r.status_code == 400 and "already exists" in r.text
    assert 'value="48"' in client.get("/admin/settings").text
    bad = client.post("/admin/settings", data={"csrf_token": csrf(client.get("/admin/settings")),
                                               "retention_hours": "-3"}, follow_redirects=True)
    assert "whole number of hours" in bad.text
    capped = client.post("/admin/settings", data={"csrf_token": csrf(client.get("/admin/settings")),
                                                  "retention_hours": "24", "max_long_polls": "2", "max_streams": "x"},
                         follow_redirects=True)
    assert "Open API requests must be a whole number" in capped.text
    assert 'value="48"' in client.get("/admin/settings").text  # nothing half-saved


def test_an_invite_makes_one_account_in_its_tier(app, admin):
    client, _ = admin
    with app.app_context(), db.read() as s:
        premium = s.scalar(select(Tier).where(Tier.name == "premium"))
    page = client.post("/admin/invites", data={"csrf_token": csrf(client.get("/admin/users")),
                                               "email": "guest@example.com", "tier_id": str(premium.id)})
    assert page.status_code == 200
    link = re.search(r'<code id="new-invite">([^<]+)</code>', page.text).group(1)
    assert "/signup?invite=pgi_" in link
    path = link[link.index("/signup"):]
    guest = app.test_client()
    form = guest.get(path)
    assert form.status_code == 200 and 'value="guest@example.com"' in form.text
    secret = path.split("invite=")[1]
    wrong = guest.post("/signup", data={"invite": secret, "email": "other@example.com", "password": "long enough pw",
                                        "confirm": "long enough pw", "csrf_token": csrf(form)})
    assert wrong.status_code == 400 and "this invite is for guest@example.com" in wrong.text
    r = guest.post("/signup", data={"invite": secret, "email": "guest@example.com", "password": "long enough pw",
                                    "confirm": "long enough pw", "csrf_token": csrf(form)})
    assert r.status_code == 302
    with app.app_context(), db.read() as s:
        user = s.scalar(select(User).where(User.email == "guest@example.com"))
        assert user.tier_id == premium.id and not user.is_admin
    used = app.test_client().get(path)
    assert used.status_code == 403 and "used up or expired" in used.text
    with app.app_context(), db.read() as s:
        # Only the hash is stored.
        from webapp.models import Invite
        assert secret not in str([i.token_hash for i in s.scalars(select(Invite))])


def test_an_alias_serves_the_model_it_stands_for(app, admin, live):
    import openai

    client, account = admin
    token = csrf(client.get("/admin/prices"))
    assert client.post("/admin/aliases", data={"csrf_token": token, "alias": "gpt-4o-mini", "target": "echo"}).status_code == 302
    bad = client.post("/admin/aliases", data={"csrf_token": token, "alias": "x", "target": "gpt-4o-mini"},
                      follow_redirects=True)
    assert "is itself an alias" in bad.text
    api = openai.OpenAI(base_url=f"{live.url}/v1", api_key=account.key, max_retries=0)
    with WorkerThread(live.url, account.token):
        ids = [m.id for m in api.models.list().data]
        assert "gpt-4o-mini" in ids and "echo" in ids
        reply = api.chat.completions.create(model="gpt-4o-mini", messages=PROMPT)
    assert reply.model == "echo" and reply.choices[0].message.content
    client.post("/admin/aliases", data={"csrf_token": token, "alias": "gpt-4o-mini", "target": ""})
    with pytest.raises(openai.NotFoundError):
        api.chat.completions.create(model="gpt-4o-mini", messages=PROMPT)


def test_every_admin_page_renders_with_a_plain_title(app, admin):
    client, _ = admin
    for path in ADMIN_PAGES:
        page = client.get(path)
        title = re.search(r"<title>(.*?)</title>", page.text, re.S).group(1)
        assert page.status_code == 200 and "<" not in title and title.endswith("Pollgate"), (path, title)
        assert page.text.count("<h1>") == 1, path
