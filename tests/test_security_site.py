"""Security issue 13, the site-wide findings, each written as the attack: the session key,
links that trusted the Host header, forwarded addresses, the SQLite file's mode, caps per
account, and who shared a worker."""
from __future__ import annotations

import os
import stat
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import requests
from flask import Flask
from flask.sessions import SecureCookieSessionInterface
from sqlalchemy import func, select

from conftest import PASSWORD, csrf, make_account, make_app, serving, sign_in
from protocol import ProtoWorker
from webapp import accounts, create_app, settings
from webapp.db import db
from webapp.install_views import SiteSwitch
from webapp.models import ApiKey, Chunk, Event, Job, User, Worker

WAIT = 30  # seconds: the bound on every wait for a reply or a claim


def forged_session(secret_key: str, user_id: str) -> str:
    """Sign a Flask session cookie that says user_id is signed in, with the given key."""
    forger = Flask("forger")
    forger.secret_key = secret_key
    serializer = SecureCookieSessionInterface().get_signing_serializer(forger)
    return serializer.dumps({"_user_id": user_id, "_fresh": True})


# --- 5. SECRET_KEY never falls back to a public value ------------------------------------

@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_forged_dev_session_is_refused_and_the_key_is_made_once(db_url, tmp_path):
    instance = str(tmp_path / "instance")
    app = make_app(db_url, instance, SECRET_KEY=None)
    root = make_account(app, "root@example.com")
    with app.app_context(), db.begin() as s:
        s.get(User, root.user_id).is_admin = True
    key = app.config["SECRET_KEY"]
    assert key not in (None, "", "dev") and len(key) == 64
    path = os.path.join(instance, "secret-key")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    # Another process (a second app on the same instance) uses the same key, so sign-ins hold.
    other = create_app({"DATABASE_URL": db_url, "TESTING": True}, instance_path=instance)
    assert other.config["SECRET_KEY"] == key
    other.extensions["pollgate.engine"].dispose()

    client = app.test_client()
    for guess in ("dev", "secret", "change-me"):
        client.set_cookie("session", forged_session(guess, f"{root.user_id}:0"))
        r = client.get("/admin/")
        assert r.status_code == 302 and "/login" in r.headers["Location"], f"key {guess!r} forged a session"
    # The same cookie signed with the real key is honoured: the refusal above was the key's doing.
    client.set_cookie("session", forged_session(key, f"{root.user_id}:0"))
    assert client.get("/admin/").status_code == 200
    app.extensions["pollgate.engine"].dispose()


# --- 9. Links use the configured site URL, never the Host header --------------------------

# Plain http, so the test client's cookies flow; the https case has its own test.
SITE = "http://gw.example/api"


@pytest.fixture
def app_config(request) -> dict:
    """Per-test overrides: these tests set the site URL, proxies and small caps."""
    return dict(getattr(request, "param", {}))


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize("app_config", [{"SITE_URL": SITE + "/"}], indirect=True)
def test_links_follow_the_site_url_not_the_host_header(app, live, admin):
    evil = {"Host": "evil.example"}
    script = requests.get(live.url + "/userscript/pollgate.user.js", headers=evil, timeout=WAIT).text
    assert "// @connect      gw.example" in script and f"// @updateURL    {SITE}/userscript/" in script
    assert "evil.example" not in script

    # A signed-in admin's own pages, asked for with a forged Host over real HTTP.
    browser = requests.Session()
    token = browser.get(live.url + "/login", timeout=WAIT).text.split('name="csrf_token" value="')[1].split('"')[0]
    r = browser.post(live.url + "/login", data={"email": admin[1].email, "password": PASSWORD, "csrf_token": token},
                     timeout=WAIT, allow_redirects=False)
    assert r.status_code == 302, r.text
    # requests matches cookies against a Host header set by hand, so send the cookie as is.
    evil["Cookie"] = f"session={browser.cookies['session']}"
    token = browser.get(live.url + "/workers", timeout=WAIT).text.split('name="csrf_token" value="')[1].split('"')[0]
    page = browser.post(live.url + "/workers", headers=evil, data={"csrf_token": token, "name": "w"}, timeout=WAIT).text
    assert f"--api-url {SITE}" in page and "evil.example" not in page
    token = browser.get(live.url + "/admin/users", timeout=WAIT).text.split('name="csrf_token" value="')[1].split('"')[0]
    page = browser.post(live.url + "/admin/invites", headers=evil, data={"csrf_token": token}, timeout=WAIT).text
    assert f"{SITE}/signup?invite=pgi_" in page and "evil.example" not in page


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize("app_config", [{"SITE_URL": "https://gw.example/api"}], indirect=True)
def test_an_https_site_url_marks_the_session_cookie_secure(app, account):
    client = app.test_client()
    https = "https://localhost"
    token = csrf(client.get("/login", base_url=https))
    # Flask-WTF checks the Referer on https, as a browser would send it.
    r = client.post("/login", base_url=https, headers={"Referer": https + "/login"},
                    data={"email": account.email, "password": PASSWORD, "csrf_token": token})
    assert r.status_code == 302
    cookie = r.headers["Set-Cookie"]
    assert "Secure" in cookie and "HttpOnly" in cookie and "SameSite=Lax" in cookie


def cookie_flags(set_cookie: str) -> set[str]:
    """The attributes of one Set-Cookie header, values dropped but SameSite's kept."""
    return {part.strip() if part.strip().startswith("SameSite") else part.strip().split("=")[0]
            for part in set_cookie.split(";")[1:]}


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_on_plain_http_the_session_cookie_is_httponly_and_lax_but_not_secure(app, live, account, tmp_path,
                                                                              monkeypatch):
    # On the wire of a real server. Secure there would lose the session: browsers drop Secure
    # cookies from http pages. (The https case is the test above.)
    browser = requests.Session()
    token = browser.get(live.url + "/login", timeout=WAIT).text.split('name="csrf_token" value="')[1].split('"')[0]
    r = browser.post(live.url + "/login", data={"email": account.email, "password": PASSWORD, "csrf_token": token},
                     timeout=WAIT, allow_redirects=False)
    assert r.status_code == 302
    assert cookie_flags(r.headers["Set-Cookie"]) == {"HttpOnly", "Path", "SameSite=Lax"}, r.headers["Set-Cookie"]
    # The installer's session (its CSRF token) follows the same rule before the site exists.
    monkeypatch.delenv("DATABASE_URL", raising=False)
    with serving(SiteSwitch(str(tmp_path / "fresh"))) as url:
        installer = requests.get(url + "/install", timeout=WAIT)
    assert installer.status_code == 200
    assert cookie_flags(installer.headers["Set-Cookie"]) == {"HttpOnly", "Path", "SameSite=Lax"}


def failed_signin_address(live, email: str, forwarded: str) -> str:
    """Fail one sign-in with an X-Forwarded-For header and return the address the log recorded."""
    session = requests.Session()
    page = session.get(live.url + "/login", timeout=WAIT)
    token = page.text.split('name="csrf_token" value="')[1].split('"')[0]
    session.post(live.url + "/login", data={"email": email, "password": "wrong password", "csrf_token": token},
                 headers={"X-Forwarded-For": forwarded}, timeout=WAIT)
    with live.app.app_context(), db.read() as s:
        return s.scalars(select(Event.message).where(Event.kind == "signin_failed").order_by(Event.id.desc())).first()


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_forwarded_address_is_ignored_unless_proxies_are_configured(app, live, account):
    message = failed_signin_address(live, account.email, "203.0.113.9")
    assert "203.0.113.9" not in message and "127.0.0.1" in message


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize("app_config", [{"TRUSTED_PROXIES": 1}], indirect=True)
def test_one_trusted_proxy_takes_the_address_it_forwards(app, live, account):
    # The client claims 198.51.100.7; the proxy appends the address it saw. Only the latter counts.
    message = failed_signin_address(live, account.email, "198.51.100.7, 203.0.113.9")
    assert "203.0.113.9" in message and "198.51.100.7" not in message


# --- 10. The SQLite database is readable by its owner only --------------------------------

def test_the_sqlite_files_are_private(tmp_path):
    instance = tmp_path / "instance"
    instance.mkdir()
    older = instance / "pollgate.db"
    older.touch(mode=0o644)
    os.chmod(older, 0o644)  # an install from before this fix, under a umask of 022
    app = make_app(f"sqlite:///{older}", str(instance))
    make_account(app)  # writes, so the WAL and shared-memory files exist
    with app.app_context(), db.read() as s:
        assert s.scalar(select(func.count()).select_from(User)) == 1
        names = [p for p in instance.iterdir() if p.name.startswith("pollgate.db")]
        assert {p.name for p in names} >= {"pollgate.db", "pollgate.db-wal", "pollgate.db-shm"}
        for path in names:
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, f"{path.name} is {oct(path.stat().st_mode)}"
    app.extensions["pollgate.engine"].dispose()

    fresh = tmp_path / "fresh"
    fresh.mkdir()
    app = make_app(f"sqlite:///{fresh}/pollgate.db", str(fresh))
    assert stat.S_IMODE((fresh / "pollgate.db").stat().st_mode) == 0o600
    app.extensions["pollgate.engine"].dispose()


# --- 8. Caps per account ----------------------------------------------------------------

def test_keys_and_worker_tokens_stop_at_the_cap_even_when_created_at_once(app, account):
    """Twelve concurrent creations against a cap of 5 (the account holds one of each already)."""
    with app.app_context():
        settings.save({"max_api_keys_per_user": 5, "max_worker_tokens_per_user": 5})

    def create(kind: str):
        with app.app_context():
            try:
                (accounts.create_api_key if kind == "key" else accounts.create_worker_token)(account.user_id, "x")
                return "made"
            except accounts.TooMany as err:
                return str(err)

    with ThreadPoolExecutor(max_workers=6) as pool:
        outcomes = list(pool.map(create, ["key"] * 12 + ["token"] * 12))
    assert outcomes.count("made") == 8, outcomes
    assert all("the most this site allows" in o for o in outcomes if o != "made")
    with app.app_context(), db.read() as s:
        assert s.scalar(select(func.count()).select_from(ApiKey).where(ApiKey.user_id == account.user_id)) == 5
        assert s.scalar(select(func.count()).select_from(Worker).where(Worker.user_id == account.user_id)) == 5


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_the_dashboard_refuses_a_key_past_the_cap_with_a_message(app, account):
    with app.app_context():
        settings.save({"max_api_keys_per_user": 1, "max_worker_tokens_per_user": 1})
    client = app.test_client()
    sign_in(client, account.email)
    r = client.post("/keys", data={"csrf_token": csrf(client.get("/keys")), "name": "one more"})
    assert r.status_code == 409 and "the most this site allows" in r.get_data(as_text=True)
    r = client.post("/workers", data={"csrf_token": csrf(client.get("/workers")), "name": "one more"})
    assert r.status_code == 409 and "revoke one you no longer use" in r.get_data(as_text=True)


def test_an_answer_past_the_size_cap_fails_and_stores_no_more(app, account, live):
    with app.app_context():
        settings.save({"max_answer_mb": 1})
    worker = ProtoWorker(live.url, account.token)
    worker.claim(wait=0)
    client = openai.OpenAI(base_url=f"{live.url}/v1", api_key=account.key, max_retries=0, timeout=WAIT)
    with ThreadPoolExecutor(max_workers=1) as pool:
        asked = pool.submit(client.chat.completions.create, model="echo",
                            messages=[{"role": "user", "content": "fill the disk"}])
        job = worker.claim(wait=5)[0]
        piece = {"content": "x" * 200_000}
        answers = [worker.report(job, [piece] * 2) for _ in range(4)]  # 1.6 MB in 400 kB reports
        assert [a["ok"] for a in answers[:2]] == [True, True]
        # The fifth 200 kB piece would pass 1 MB: the four before it stay, it and the rest do not.
        assert answers[2] == {"id": job["id"], "ok": False, "next_seq": 4, "stop": True, "reason": "too_large"}
        assert answers[3]["stop"] is True and answers[3]["ok"] is True  # finished: nothing more is taken
        with pytest.raises(openai.APIStatusError) as err:
            asked.result(timeout=WAIT)
    assert err.value.status_code == 502 and "cap of 1 MB" in err.value.message
    with app.app_context(), db.read() as s:
        stored = s.scalar(select(func.sum(func.length(Chunk.delta_json))))
        found = s.scalar(select(Job))
        assert stored <= 1_000_000 and found.output_bytes == stored
        assert (found.state, found.error_code) == ("failed", "answer_too_large")


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_worker_advertising_128_models_is_refused_whole(app, account, live):
    worker = ProtoWorker(live.url, account.token, models=[f"model-{i}" for i in range(128)])
    r = worker.post("claim", {"models": worker.models, "max_jobs": 1, "wait": 0})
    assert r.status_code == 400 and "at most 64 items" in r.json()["error"]["message"]
    with app.app_context(), db.read() as s:
        assert s.scalar(select(Worker.models_json)) in (None, "", "[]")  # nothing advertised
    assert openai.OpenAI(base_url=f"{live.url}/v1", api_key=account.key).models.list().data == []


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_admin_lists_come_a_page_at_a_time(app, admin):
    client, root = admin
    with app.app_context():
        settings.save({"max_worker_tokens_per_user": 0})
        for i in range(60):
            accounts.create_worker_token(root.user_id, f"w{i}")
        with db.begin() as s:  # rows, not sign-ups: sixty password hashes would only cost time
            s.add_all(User(email=f"user{i}@example.com", password_hash="x") for i in range(60))
    first = client.get("/admin/").get_data(as_text=True)
    assert first.count("data-worker-id=") == 50 and "Page 1 of 2 (61 in all)" in first
    second = client.get("/admin/?page=2").get_data(as_text=True)
    assert second.count("data-worker-id=") == 11
    users = client.get("/admin/users?page=2").get_data(as_text=True)
    assert users.count("data-user-id=") == 11 and "Page 2 of 2 (61 in all)" in users
    assert client.get("/admin/?page=-3").status_code == 200  # a silly page number is page 1


# --- 12. Sharing a worker is on record ----------------------------------------------------

@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_sharing_a_worker_says_what_it_means_and_records_who(app, admin):
    client, root = admin
    owner = make_account(app, "owner@example.com")
    with app.app_context(), db.read() as s:
        worker_id = s.scalar(select(Worker.id).where(Worker.user_id == owner.user_id))
    page = client.get("/admin/").get_data(as_text=True)
    assert "reads every user's prompts and answers" in page
    r = client.post(f"/admin/workers/{worker_id}/shared", data={"csrf_token": csrf(client.get("/admin/")),
                                                                "shared": "1"}, follow_redirects=True)
    text = r.get_data(as_text=True)
    assert "the token counts it reports are billed to them" in text and "shared by root@example.com" in text
    with app.app_context(), db.read() as s:
        worker = s.get(Worker, worker_id)
        assert worker.shared and worker.shared_by == root.user_id and worker.shared_at is not None
        assert s.scalar(select(Event.message).where(Event.kind == "worker_shared")) == "shared by root@example.com"
    client.post(f"/admin/workers/{worker_id}/shared", data={"csrf_token": csrf(client.get("/admin/")), "shared": "0"})
    with app.app_context(), db.read() as s:
        worker = s.get(Worker, worker_id)
        assert not worker.shared and worker.shared_by is None
