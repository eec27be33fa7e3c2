"""Between an upload and its upgrade: 503 `upgrade_pending`, never a 500; then the upgrade keeps every row.

Also: a database newer than the code says so, the schema check stops once it has seen the
schema current, and passenger_wsgi builds the app while the process starts.
"""
from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
from dataclasses import dataclass

import pytest
import requests
import sqlalchemy as sa
from werkzeug.security import generate_password_hash

from conftest import PASSWORD, ROOT, TEST_CONFIG, csrf, make_app, sign_in
from protocol import WorkerThread
from support import free_port
from webapp import accounts, create_app, installer, migrate
from webapp.db import db

# The first release with the web installer and the one-click upgrade page.
FIRST_INSTALLER_RELEASE = "0005"
PROMPT = [{"role": "user", "content": "still here after the upgrade"}]

# The tables as the older releases wrote them (0002 to 0005 alike), not as the models say now.
USERS = sa.table("users", sa.column("id", sa.Integer), sa.column("email", sa.String),
                 sa.column("password_hash", sa.String), sa.column("is_admin", sa.Boolean),
                 sa.column("priority", sa.Integer), sa.column("created_at", sa.DateTime))
API_KEYS = sa.table("api_keys", sa.column("id", sa.Integer), sa.column("user_id", sa.Integer),
                    sa.column("name", sa.String), sa.column("prefix", sa.String), sa.column("key_hash", sa.String),
                    sa.column("created_at", sa.DateTime), sa.column("last_used_at", sa.DateTime))
WORKERS = sa.table("workers", sa.column("id", sa.Integer), sa.column("user_id", sa.Integer),
                   sa.column("name", sa.String), sa.column("token_prefix", sa.String),
                   sa.column("token_hash", sa.String), sa.column("shared", sa.Boolean),
                   sa.column("created_at", sa.DateTime), sa.column("models_json", sa.Text),
                   sa.column("kind", sa.String), sa.column("version", sa.String), sa.column("capacity", sa.Integer),
                   sa.column("jobs_served", sa.Integer), sa.column("jobs_failed", sa.Integer))
JOBS = sa.table("jobs", sa.column("id", sa.Integer), sa.column("public_id", sa.String), sa.column("kind", sa.String),
                sa.column("user_id", sa.Integer), sa.column("api_key_id", sa.Integer), sa.column("model", sa.String),
                sa.column("state", sa.String), sa.column("priority", sa.Integer), sa.column("rank", sa.BigInteger),
                sa.column("stream", sa.Boolean), sa.column("request_json", sa.Text),
                sa.column("worker_id", sa.Integer), sa.column("attempts", sa.Integer),
                sa.column("next_seq", sa.Integer), sa.column("finish_reason", sa.String),
                sa.column("created_at", sa.DateTime), sa.column("finished_at", sa.DateTime),
                sa.column("deadline_at", sa.DateTime))
USAGE = sa.table("usage", sa.column("id", sa.Integer), sa.column("job_id", sa.Integer),
                 sa.column("request_id", sa.String), sa.column("user_id", sa.Integer),
                 sa.column("api_key_id", sa.Integer), sa.column("worker_id", sa.Integer),
                 sa.column("model", sa.String), sa.column("stream", sa.Boolean), sa.column("status", sa.String),
                 sa.column("prompt_tokens", sa.Integer), sa.column("completion_tokens", sa.Integer),
                 sa.column("usage_source", sa.String), sa.column("cost_nanos", sa.BigInteger),
                 sa.column("latency_ms", sa.Integer), sa.column("settled", sa.Boolean),
                 sa.column("created_at", sa.DateTime), sa.column("finished_at", sa.DateTime))
# What an upgrade must keep as it was: all of each row but the fields later use moves on
# (a key's last use, a worker's self-description and counters).
KEPT = {t.name: [c for c in t.c if c.name not in ("last_used_at", "models_json", "kind", "version", "capacity",
                                                  "jobs_served", "jobs_failed")]
        for t in (USERS, API_KEYS, WORKERS, USAGE)}


@dataclass
class OldRows:
    """Secrets of the accounts an older release stored; the rows themselves are in the database."""

    admin_email: str
    user_email: str
    key: str
    token: str


@pytest.fixture
def old_revision() -> str:
    """The revision the site's database was left at; tests parametrize it."""
    return FIRST_INSTALLER_RELEASE


@pytest.fixture
def app(db_url, tmp_path, old_revision):
    """The current code, freshly started on a database an older release migrated (and `rows` filled)."""
    app = create_app({**TEST_CONFIG, "DATABASE_URL": db_url}, instance_path=str(tmp_path / "instance"))
    with app.app_context():
        migrate.upgrade(old_revision)
    yield app
    app.extensions["pollgate.engine"].dispose()


@pytest.fixture
def rows(app) -> OldRows:
    """Write an admin, a user with an API key and a worker, a finished job and its usage, with the old schema."""
    now = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
    key, token = accounts.new_secret(accounts.API_KEY_PREFIX), accounts.new_secret(accounts.WORKER_TOKEN_PREFIX)
    with app.app_context(), db.engine.begin() as conn:
        for uid, email, admin in ((1, "root@example.com", True), (2, "user@example.com", False)):
            conn.execute(sa.insert(USERS).values(id=uid, email=email, password_hash=generate_password_hash(PASSWORD),
                                                 is_admin=admin, priority=0, created_at=now))
        conn.execute(sa.insert(API_KEYS).values(id=1, user_id=2, name="old key", prefix=key[:12],
                                                key_hash=accounts.hash_secret(key), created_at=now, last_used_at=now))
        conn.execute(sa.insert(WORKERS).values(id=1, user_id=2, name="old worker", token_prefix=token[:12],
                                               token_hash=accounts.hash_secret(token), shared=False, created_at=now,
                                               models_json='["echo"]', kind="pollclient", version="0.9", capacity=1,
                                               jobs_served=1, jobs_failed=0))
        conn.execute(sa.insert(JOBS).values(id=1, public_id="chatcmpl-old", kind="chat", user_id=2, api_key_id=1,
                                            model="echo", state="completed", priority=0, rank=0, stream=False,
                                            request_json=json.dumps({"model": "echo", "messages": PROMPT}),
                                            worker_id=1, attempts=1, next_seq=3, finish_reason="stop",
                                            created_at=now, finished_at=now, deadline_at=now))
        conn.execute(sa.insert(USAGE).values(id=1, job_id=1, request_id="chatcmpl-old", user_id=2, api_key_id=1,
                                             worker_id=1, model="echo", stream=False, status="completed",
                                             prompt_tokens=17, completion_tokens=5, usage_source="tiktoken",
                                             cost_nanos=1234, latency_ms=80, settled=True, created_at=now,
                                             finished_at=now))
    return OldRows("root@example.com", "user@example.com", key, token)


def snapshot(app) -> dict:
    """Read every kept table's old columns, row by row."""
    with app.app_context(), db.engine.connect() as conn:
        return {name: [tuple(r) for r in conn.execute(sa.select(*cols).order_by(cols[0]))] for name, cols in KEPT.items()}


def api_calls(client, rows: OldRows) -> dict:
    """Make the three calls that answered 500 in the issue; return their answers by path."""
    key = {"Authorization": f"Bearer {rows.key}"}
    worker = {"Authorization": f"Bearer {rows.token}"}
    return {
        "/v1/chat/completions": client.post("/v1/chat/completions", headers=key, json={"model": "echo", "messages": PROMPT}),
        "/v1/models": client.get("/v1/models", headers=key),
        "/worker/v1/claim": client.post("/worker/v1/claim", headers=worker,
                                        json={"models": ["echo"], "max_jobs": 1, "wait": 0, "kind": "test", "version": "1"}),
    }


def assert_held(answers: dict, code: str = "upgrade_pending") -> None:
    for path, r in answers.items():
        assert r.status_code == 503, (path, r.status_code, r.get_data(as_text=True))
        assert r.get_json()["error"]["code"] == code and r.get_json()["error"]["type"] == "service_unavailable", path
        assert int(r.headers["Retry-After"]) > 0, path


def newer_than(revision: str) -> list[str]:
    """The migrations this code has after `revision`, oldest first."""
    script = migrate.scripts()
    return [r.revision for r in reversed(list(script.iterate_revisions(script.get_heads(), revision)))]


@pytest.fixture
def clock(monkeypatch):
    """Drive the schema re-check's clock by hand."""
    now = [1000.0]
    monkeypatch.setattr(migrate, "monotonic", lambda: now[0])
    return now


def test_a_new_upload_holds_the_api_then_the_admin_upgrade_keeps_everything(app, rows, live):
    before = snapshot(app)
    client = app.test_client()
    assert_held(api_calls(client, rows))
    health = client.get("/healthz")
    assert health.status_code == 503 and health.get_json()["schema"] == "behind"
    assert health.get_json()["pending"] == newer_than(FIRST_INSTALLER_RELEASE) != []
    ready = client.get("/readyz")
    assert ready.status_code == 503 and ready.headers["Retry-After"]
    assert ready.get_json() == {"ok": False, "database": "ok", "schema": "behind", "revisions": [FIRST_INSTALLER_RELEASE],
                                "pending": newer_than(FIRST_INSTALLER_RELEASE), "unknown": []}

    # Everyone else is told plainly; nobody gets a traceback.
    assert "being upgraded" in client.get("/").get_data(as_text=True)
    user = app.test_client()
    assert sign_in(user, rows.user_email).status_code == 302
    page = user.get("/dashboard")
    assert page.status_code == 503 and page.headers["Retry-After"] and "being upgraded" in page.get_data(as_text=True)
    assert user.get("/admin/upgrade").status_code == 403

    # An administrator is led to the one-click upgrade, which lists what it will run.
    admin = app.test_client()
    assert sign_in(admin, rows.admin_email).status_code == 302
    for path in ("/dashboard", "/keys", "/admin/"):
        led = admin.get(path)
        assert led.status_code == 302 and led.headers["Location"].endswith("/admin/upgrade"), path
    upgrade = admin.get("/admin/upgrade")
    assert all(f"<code>{rev}</code>" in upgrade.get_data(as_text=True) for rev in newer_than(FIRST_INSTALLER_RELEASE))
    done = admin.post("/admin/upgrade", data={"csrf_token": csrf(upgrade)}, follow_redirects=True)
    assert "The database is up to date." in done.get_data(as_text=True)

    # The same calls now work, with the key and the worker token the old release stored.
    assert client.get("/healthz").get_json() == {"ok": True}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.get_json()["ok"] is True and ready.get_json()["schema"] == "current"
    with WorkerThread(live.url, rows.token) as worker:  # its first claim, at once, answers 200
        models = client.get("/v1/models", headers={"Authorization": f"Bearer {rows.key}"})
        assert [m["id"] for m in models.get_json()["data"]] == ["echo"]
        r = requests.post(f"{live.url}/v1/chat/completions", headers={"Authorization": f"Bearer {rows.key}"},
                          json={"model": "echo", "messages": PROMPT}, timeout=30)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == PROMPT[0]["content"]
    assert worker.errors == []
    after = snapshot(app)
    assert {table: rows[:len(before[table])] for table, rows in after.items()} == before
    assert len(after["usage"]) == 2  # the old row and this request's


@pytest.mark.parametrize("old_revision", ["0002", "0003", "0004"])
def test_older_databases_are_held_until_another_process_upgrades_them(app, rows, clock, old_revision):
    before = snapshot(app)
    client = app.test_client()
    assert_held(api_calls(client, rows))
    # Sign-in needs the tables of 0004: before those, the page says to upgrade from a terminal.
    login = client.get("/login")
    if old_revision < migrate.SIGN_IN_NEEDS:
        assert login.status_code == 503 and "python install.py upgrade" in login.get_data(as_text=True)
    else:
        assert login.status_code == 200
    # `python install.py upgrade` in a terminal: another process, with its own app.
    other = create_app({**TEST_CONFIG, "DATABASE_URL": app.config["DATABASE_URL"]},
                       instance_path=app.instance_path + "-cli")
    with other.app_context():
        assert migrate.pending() == newer_than(old_revision)
        migrate.upgrade()
    other.extensions["pollgate.engine"].dispose()
    # This process looked a moment ago: it keeps its answer until RECHECK has passed.
    assert_held(api_calls(client, rows))
    clock[0] += migrate.RECHECK
    answers = api_calls(client, rows)
    assert {path: r.status_code for path, r in answers.items()} == {
        "/v1/chat/completions": 404, "/v1/models": 200, "/worker/v1/claim": 200}
    # The chat request reached the API: no worker had claimed since the upgrade, so no one serves echo yet.
    assert answers["/v1/chat/completions"].get_json()["error"]["code"] == "model_not_found"
    assert [m["id"] for m in client.get("/v1/models", headers={"Authorization": f"Bearer {rows.key}"})
            .get_json()["data"]] == ["echo"]
    assert snapshot(app) == before


def count_schema_reads(app) -> list[str]:
    """Collect every statement that reads alembic_version from now on."""
    reads: list[str] = []

    @sa.event.listens_for(app.extensions["pollgate.engine"], "before_cursor_execute")
    def seen(conn, cursor, statement, *args):
        if "alembic_version" in statement:
            reads.append(statement)

    return reads


def test_a_process_that_saw_the_schema_current_stops_checking(db_url, tmp_path, clock):
    app = make_app(db_url, str(tmp_path / "instance"))
    reads = count_schema_reads(app)
    client = app.test_client()
    assert client.get("/healthz").get_json() == {"ok": True}
    assert reads, "the first request must look at the schema"
    looked = len(reads)
    clock[0] += 3600
    for _ in range(5):
        assert client.get("/healthz").status_code == 200
        assert client.get("/v1/models").status_code == 401  # on to the view: no key
    assert len(reads) == looked
    app.extensions["pollgate.engine"].dispose()


def test_while_behind_the_schema_is_read_at_most_every_recheck(app, clock):
    reads = count_schema_reads(app)
    client = app.test_client()
    for _ in range(5):
        assert client.get("/v1/models").status_code == 503
    looked = len(reads)
    assert looked > 0
    clock[0] += migrate.RECHECK - 0.1
    assert client.get("/v1/models").status_code == 503 and len(reads) == looked
    clock[0] += 0.1
    assert client.get("/v1/models").status_code == 503 and len(reads) > looked


def test_a_database_newer_than_the_code_says_so(db_url, tmp_path):
    instance = str(tmp_path / "instance")
    app = make_app(db_url, instance)
    with app.app_context():
        admin = accounts.create_user("root@example.com", PASSWORD, is_admin=True)
        user = accounts.create_user("user@example.com", PASSWORD)
        key = accounts.create_api_key(user.id)
        token = accounts.create_worker_token(user.id)
        with db.engine.begin() as conn:  # what a newer release's migration leaves behind
            conn.execute(sa.text("UPDATE alembic_version SET version_num = '9999'"))
    app.extensions["pollgate.engine"].dispose()
    app = create_app({**TEST_CONFIG, "DATABASE_URL": db_url}, instance_path=instance)  # the older code restarts
    client = app.test_client()
    assert_held(api_calls(client, OldRows(admin.email, user.email, key, token)), code="schema_ahead")
    message = client.get("/v1/models", headers={"Authorization": f"Bearer {key}"}).get_json()["error"]["message"]
    assert "9999" in message and "newer release" in message
    health = client.get("/healthz")
    assert health.status_code == 503 and health.get_json()["schema"] == "ahead" and health.get_json()["unknown"] == ["9999"]
    ready = client.get("/readyz")
    assert ready.status_code == 503 and ready.get_json()["schema"] == "ahead" and ready.get_json()["unknown"] == ["9999"]
    assert "older than its database" in client.get("/").get_data(as_text=True)
    boss = app.test_client()
    sign_in(boss, admin.email)
    assert boss.get("/dashboard").headers["Location"].endswith("/admin/upgrade")
    page = boss.get("/admin/upgrade")
    assert page.status_code == 200 and 'data-schema="ahead"' in page.get_data(as_text=True)
    refused = boss.post("/admin/upgrade", data={"csrf_token": csrf(page)}, follow_redirects=True)
    assert refused.status_code == 200 and "The migrations did not run" in refused.get_data(as_text=True)
    with app.app_context():
        with pytest.raises(RuntimeError, match="newer than this release"):
            migrate.pending()
    app.extensions["pollgate.engine"].dispose()


def import_passenger_wsgi(instance: str) -> dict:
    """Import passenger_wsgi in a fresh process, as Passenger's loader does, and report what it built."""
    script = (
        "import json, passenger_wsgi\n"
        "from webapp import token_count\n"
        "site = passenger_wsgi.application\n"
        "print(json.dumps({'app': site.app is not None, 'installer': site.installer is not None,\n"
        "                  'encodings': token_count.encoding.cache_info().currsize,\n"
        "                  'scripts': __import__('webapp.migrate').migrate.scripts.cache_info().currsize}))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("POLLGATE_") and k != "DATABASE_URL"}
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**env, "POLLGATE_INSTANCE_PATH": instance})
    assert done.returncode == 0, done.stderr
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "stderr": done.stderr}


def test_readyz_says_a_database_that_does_not_answer_without_naming_it(tmp_path, caplog):
    # A MySQL server that is not there (a closed port) and an SQLite file that cannot be opened.
    closed = f"mysql+pymysql://pollgate:secret-password@127.0.0.1:{free_port()}/pollgate"
    for url in (closed, f"sqlite:///{tmp_path}/no/such/folder/pollgate.db"):
        app = create_app({**TEST_CONFIG, "DATABASE_URL": url}, instance_path=str(tmp_path / "instance"))
        ready = app.test_client().get("/readyz")
        assert ready.status_code == 503 and ready.headers["Retry-After"] and ready.headers["Cache-Control"] == "no-store"
        assert ready.get_json() == {"ok": False, "database": "unreachable", "error": "OperationalError"}
        app.extensions["pollgate.engine"].dispose()
        assert "secret-password" not in ready.get_data(as_text=True) + caplog.text
    assert "readiness: the database did not answer" in caplog.text


def test_readyz_answers_200_once_the_schema_is_current(db_url, tmp_path):
    app = make_app(db_url, str(tmp_path / "instance"))
    ready = app.test_client().get("/readyz")
    assert ready.status_code == 200 and "Retry-After" not in ready.headers
    body = ready.get_json()
    assert body["ok"] is True and body["database"] == "ok" and body["schema"] == "current" and body["pending"] == []
    with app.app_context():
        assert body["revisions"] == list(migrate.scripts().get_heads())
    app.extensions["pollgate.engine"].dispose()


def test_passenger_wsgi_builds_the_app_and_loads_tiktoken_at_import(tmp_path):
    instance = str(tmp_path / "instance")
    os.makedirs(instance)
    installer.write_config(instance, installer.sqlite_url(instance), "s3cret", "https://example.com")
    built = import_passenger_wsgi(instance)
    assert (built["app"], built["installer"], built["encodings"], built["scripts"]) == (True, False, 1, 1)


def test_before_install_passenger_wsgi_builds_the_installer(tmp_path):
    built = import_passenger_wsgi(str(tmp_path / "fresh"))
    assert (built["app"], built["installer"], built["encodings"]) == (False, True, 0)


def test_a_broken_config_does_not_break_the_import(tmp_path):
    instance = str(tmp_path / "instance")
    os.makedirs(instance)
    with open(installer.config_path(instance), "w") as handle:
        handle.write("DATABASE_URL = \n")  # a half-edited file
    built = import_passenger_wsgi(instance)
    assert not built["app"] and "could not build the app at start-up" in built["stderr"]
