"""The web installer and install.py: check, install, lock, resume, upgrade; on SQLite and MariaDB."""
from __future__ import annotations

import os
import stat
import subprocess
import sys
import threading

import pytest
import requests
from sqlalchemy import select, text
from sqlalchemy.engine import make_url
from werkzeug.test import Client

from conftest import ROOT, TEST_CONFIG, csrf, make_app, serving, sign_in
from webapp import accounts, create_app, installer, migrate
from webapp.db import db
from webapp.install_views import SiteSwitch, create_installer_app
from webapp.models import User, utcnow

ADMIN = {"admin_email": "Boss@Example.com", "admin_password": "a long password", "admin_password2": "a long password"}


@pytest.fixture
def site(tmp_path, monkeypatch):
    """A fresh upload: no config, no DATABASE_URL, served through the Passenger entry point."""
    monkeypatch.delenv("DATABASE_URL", raising=False)
    instance = str(tmp_path / "instance")
    switch = SiteSwitch(instance, make_app=lambda: create_app({**TEST_CONFIG}, instance_path=instance))
    return switch, Client(switch), instance


def owner(instance: str) -> dict:
    """The setup token field, read from the instance folder as the site's owner would."""
    with open(installer.setup_token_path(instance)) as handle:
        return {"setup_token": handle.read().strip()}


def db_fields(db_url: str) -> dict:
    """The installer form's database fields for a test database URL."""
    if db_url.startswith("sqlite"):
        return {"engine": "sqlite"}
    url = make_url(db_url)
    return {"engine": "mysql", "db_host": url.host, "db_port": str(url.port), "db_name": url.database,
            "db_user": url.username, "db_password": url.password}


def test_web_installer_installs_then_locks_itself(site, db_url):
    switch, client, instance = site
    assert client.get("/").headers["Location"].endswith("/install")
    page = client.get("/install")
    text = page.get_data(as_text=True)
    assert page.status_code == 200 and 'data-check="Python"' in text and "is writable" in text
    fields = {**db_fields(db_url), "site_url": "https://example.com/api", "csrf_token": csrf(page), **owner(instance)}
    tested = client.post("/install/test", data=fields).get_data(as_text=True)
    assert 'data-check="Claim path"' in tested
    if "mysql" in db_url:
        assert "MariaDB" in tested and 'data-check="max_allowed_packet"' in tested and 'data-check="wait_timeout"' in tested
    done = client.post("/install", data={**fields, **ADMIN})
    assert done.status_code == 200, done.get_data(as_text=True)
    text = done.get_data(as_text=True)
    assert "Pollgate is installed" in text and "cron/reap.py" in text and "cron/purge.py" in text
    config = installer.config_path(instance)
    assert stat.S_IMODE(os.stat(config).st_mode) == 0o600
    assert "SESSION_COOKIE_SECURE = True" in open(config).read()
    assert not os.path.exists(installer.setup_token_path(instance))  # its job is done
    # Locked: the installer's pages are gone and a second run changes nothing.
    assert client.get("/install").status_code == 404
    before = open(config).read()
    again = client.post("/install", data={**fields, **ADMIN, "admin_email": "thief@example.com"})
    assert again.status_code in (400, 404) and open(config).read() == before
    assert create_installer_app(instance).test_client().get("/install").status_code == 404
    # The real app now answers, on the installed database, with the admin able to sign in.
    assert client.get("/login").status_code == 200
    login = client.post("/login", data={"email": "boss@example.com", "password": "a long password",
                                        "csrf_token": csrf(client.get("/login"))})
    assert login.status_code == 302
    assert client.get("/admin/").status_code == 200


def test_bad_database_answers_are_explained_and_nothing_is_saved(site, mariadb):
    _, client, instance = site
    token = csrf(client.get("/install"))
    fields = {**db_fields(mariadb.new_database()), "site_url": "https://example.com", **ADMIN, **owner(instance)}
    wrong = client.post("/install", data={**fields, "db_password": "wrong", "csrf_token": token})
    assert wrong.status_code == 400 and "refused the user name or password" in wrong.get_data(as_text=True)
    nowhere = client.post("/install/test", data={**fields, "db_port": "1", "csrf_token": token})
    assert "no database server answers" in nowhere.get_data(as_text=True)
    mismatch = client.post("/install", data={**fields, "admin_password2": "something else", "csrf_token": token})
    assert mismatch.status_code == 400 and "passwords differ" in mismatch.get_data(as_text=True)
    assert client.post("/install", data={**fields}).status_code == 400  # no CSRF token
    assert not installer.installed(instance)


def test_a_half_finished_install_resumes(site, db_url):
    _, client, instance = site
    # What a run that died after migrating and creating the admin leaves behind.
    app = make_app(db_url, instance + "-old")
    with app.app_context():
        accounts.create_user("boss@example.com", "the old password")
    assert not installer.installed(instance)
    token = csrf(client.get("/install"))
    done = client.post("/install", data={**db_fields(db_url), "site_url": "https://example.com/api", "csrf_token": token, **ADMIN,
                                         **owner(instance)})
    assert done.status_code == 200, done.get_data(as_text=True)
    with create_app({**TEST_CONFIG}, instance_path=instance).app_context():
        user = accounts.find_user("boss@example.com")
        assert user.is_admin and migrate.pending() == []


def test_two_installs_at_once_one_runs_and_the_other_is_told_why(site, db_url):
    """Two owners (two tabs, or a double click) post the form at the same moment over real HTTP."""
    switch, client, instance = site
    client.get("/install")  # the installer's first start writes the setup token
    fields = {**db_fields(db_url), "site_url": "https://example.com/api", **ADMIN, **owner(instance)}
    go = threading.Barrier(2, timeout=30)
    answers: list[requests.Response] = []

    def install(email: str) -> None:
        browser = requests.Session()
        token = browser.get(f"{url}/install", timeout=60).text.split('name="csrf_token" value="')[1].split('"')[0]
        go.wait()
        answers.append(browser.post(f"{url}/install", data={**fields, "admin_email": email, "csrf_token": token},
                                    timeout=120))

    with serving(switch) as url:
        tabs = [threading.Thread(target=install, args=(email,)) for email in ("one@example.com", "two@example.com")]
        for tab in tabs:
            tab.start()
        for tab in tabs:
            tab.join(timeout=150)
    assert sorted(a.status_code for a in answers) == [200, 400], [a.text[-2000:] for a in answers]
    done, refused = sorted(answers, key=lambda a: a.status_code)
    assert "Pollgate is installed" in done.text
    assert "Another installation is running" in refused.text or "already installed" in refused.text, refused.text
    assert installer.installed(instance)
    app = create_app({**TEST_CONFIG}, instance_path=instance)
    with app.app_context(), db.read() as s:
        users = s.scalars(select(User)).all()
    app.extensions["pollgate.engine"].dispose()
    assert len(users) == 1 and users[0].is_admin  # one installer's admin, not both


def run_install(instance: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("POLLGATE_") and k != "DATABASE_URL"}
    return subprocess.run([sys.executable, os.path.join(ROOT, "install.py"), *args, "--instance", instance],
                          capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
                          env={**clean, **env})


def test_install_py_non_interactive(tmp_path, db_url):
    instance = str(tmp_path / "instance")
    fields = db_fields(db_url)
    flags = ["--sqlite"] if fields["engine"] == "sqlite" else [
        "--db-host", fields["db_host"], "--db-port", fields["db_port"], "--db-name", fields["db_name"],
        "--db-user", fields["db_user"]]
    missing = run_install(instance, "-y", *flags, "--site-url", "https://example.com")
    assert missing.returncode == 1 and "is missing" in missing.stderr and "Traceback" not in missing.stderr
    if fields["engine"] == "mysql":
        wrong = run_install(instance, "-y", *flags, POLLGATE_DB_PASSWORD="nope")
        assert wrong.returncode == 1 and "refused the user name or password" in wrong.stdout + wrong.stderr
    env = {"POLLGATE_ADMIN_PASSWORD": "a long password", "POLLGATE_DB_PASSWORD": fields.get("db_password", "")}
    done = run_install(instance, "-y", *flags, "--site-url", "https://example.com/api",
                       "--admin-email", "ops@example.com", **env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "cron/reap.py" in done.stdout and installer.installed(instance)
    assert "a long password" not in done.stdout + done.stderr
    again = run_install(instance, "-y", *flags, **env)
    assert again.returncode == 0 and "already installed" in again.stdout
    upgrade = run_install(instance, "upgrade")
    assert upgrade.returncode == 0 and "up to date" in upgrade.stdout


def test_install_py_explains_an_unwritable_instance(tmp_path):
    if os.geteuid() == 0:
        # root writes anywhere; a file where the folder should be fails for everyone.
        blocker = tmp_path / "instance"
        blocker.write_text("not a folder")
    else:
        blocker = tmp_path / "ro"
        blocker.mkdir(mode=0o500)
        blocker = blocker / "instance"
    result = run_install(str(blocker), "check", "--sqlite")
    assert result.returncode == 1 and "FAIL" in result.stdout and "Instance folder" in result.stdout
    assert "Traceback" not in result.stderr


def test_admin_is_led_to_apply_new_migrations(tmp_path, db_url):
    app = create_app({**TEST_CONFIG, "DATABASE_URL": db_url}, instance_path=str(tmp_path / "i"))
    with app.app_context():
        migrate.upgrade("0004")  # the previous release's schema
        # Rows as that release wrote them: today's model has columns that schema lacks.
        with db.begin() as s:
            for email, is_admin in (("root@example.com", True), ("user@example.com", False)):
                s.execute(text("INSERT INTO users (email, password_hash, is_admin, priority, created_at) "
                               "VALUES (:e, :h, :a, 0, :t)"),
                          {"e": email, "h": accounts.hash_password("correct horse battery"), "a": is_admin,
                           "t": utcnow()})
    admin = app.test_client()
    sign_in(admin, "root@example.com")
    page = admin.get("/dashboard")
    assert page.status_code == 302 and page.headers["Location"].endswith("/admin/upgrade")
    upgrade = admin.get("/admin/upgrade")
    assert "0005" in upgrade.get_data(as_text=True)
    user = app.test_client()
    sign_in(user, "user@example.com")
    assert user.get("/admin/upgrade").status_code == 403
    applied = admin.post("/admin/upgrade", data={"csrf_token": csrf(upgrade)}, follow_redirects=True)
    assert "up to date" in applied.get_data(as_text=True)
    with app.app_context():
        assert migrate.pending() == []
    assert admin.get("/dashboard").status_code == 200
