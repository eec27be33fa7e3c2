"""Fixtures: an app on SQLite and on a throwaway MariaDB, a live HTTP server, accounts."""
from __future__ import annotations

import atexit
import contextlib
import functools
import os
import re
import shutil
import sys
import tempfile
import threading
from dataclasses import dataclass
from typing import Iterator

import openai
import pytest
from sqlalchemy import update
from sqlalchemy.engine import make_url
from werkzeug.serving import make_server

from support import ROOT, RUN_MARK, leftovers, missing

sys.path.insert(0, ROOT)

from mariadb import MariaDB, database_name  # noqa: E402
from passenger import passenger_site  # noqa: E402,F401  (a fixture for every module)
from webapp import accounts, create_app, migrate, settings  # noqa: E402
from webapp.db import db  # noqa: E402
from webapp.models import User  # noqa: E402

PASSWORD = "correct horse battery"  # every test account's

# werkzeug's scrypt costs 0.13 s of CPU for each hash and each check: about 900 of them, a
# sixth of the suite's CPU on 2 cores. In this process the app hashes with one round of
# PBKDF2 instead; the code path is the same (hash, store, check by the method named in the
# hash), and servers the tests start as processes (gunicorn, Passenger, the CLIs) keep
# scrypt. Set before webapp.auth makes its dummy hash, so the two stay alike.
accounts.generate_password_hash = functools.partial(accounts.generate_password_hash, method="pbkdf2:sha256:1")

# Short timings keep fault tests quick; production defaults are in webapp/config.py.
TEST_CONFIG = {
    "TESTING": True,
    "SECRET_KEY": "test-secret",
    "DISPATCH_TIMEOUT": 3.0,
    "LEASE_TTL": 2.0,
    "REAP_INTERVAL": 0.2,
    "WAKE_RECHECK": 0.5,
    "CLAIM_WAIT_MAX": 5.0,
    "HEARTBEAT_INTERVAL": 2.0,
    # Readers renew often, so a lapse in a test means a dead reader, not a slow machine.
    "HOLD_RENEW": 0.5,
    "HOLD_TTL": 5.0,
    "DB_POOL_SIZE": 20,
    # No tier by default, so tests that send many requests are not rate limited; the
    # limit tests give their users tiers.
    "DEFAULT_TIER": None,
    # A hung-up stream's job is cancelled at once, as most tests expect; test_resume gives it a grace.
    "RESUME_GRACE": 0.0,
}


# -- the run as a whole ------------------------------------------------------------------


def pytest_configure(config) -> None:
    """Mark this pytest process's environment, so every process it starts can be told apart as ours."""
    # Per process: an xdist worker replaces the mark it inherited from the controller.
    os.environ[RUN_MARK] = f"{os.getpid()}-{os.urandom(4).hex()}"


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the groups
def pytest_collection_modifyitems(items) -> None:
    """Keep each module that starts module-wide servers (Chromium, Apache) on one xdist worker.

    Under --dist loadgroup the other tests spread one by one; these would otherwise start
    their module's servers once on every worker that got one of them.
    """
    for item in items:
        fixtures = getattr(item, "_fixtureinfo", None)
        if fixtures and any(defs[-1].scope == "module" for defs in fixtures.name2fixturedefs.values()):
            item.add_marker(pytest.mark.xdist_group(item.module.__name__))


@pytest.fixture(scope="session", autouse=True)
def nothing_outlives_the_run() -> Iterator[None]:
    """Fail the run if any process it started is still there after every other fixture's teardown."""
    # Autouse and session-wide, so set up first and torn down last, after every server's fixture.
    yield
    left = leftovers(os.environ[RUN_MARK])
    if left:
        pytest.fail("processes outlived their fixtures (now killed):\n"
                    + "\n".join(f"  {pid}: {cmd}" for pid, cmd in left.items()), pytrace=False)


# -- databases ---------------------------------------------------------------------------


def throwaway_mariadb() -> Iterator[MariaDB]:
    """Start a MariaDB server on loopback for as long as the caller holds it, or report the missing part."""
    server = MariaDB()
    if not server.available:
        missing("MariaDB server not installed (apt-get install mariadb-server)")
    try:
        server.start()
        yield server
    finally:
        server.stop()  # also after a failed start: nothing it started is left running


@pytest.fixture(scope="session")
def mariadb() -> Iterator[MariaDB]:
    """Start one MariaDB server for the whole run (for each xdist worker, its own)."""
    yield from throwaway_mariadb()


# Modules whose tests run on MariaDB twice: on the SKIP LOCKED claim path and on the
# compare-and-swap one most shared hosts get (MariaDB < 10.6, MySQL 5.7).
BOTH_CLAIM_PATHS = {"test_api", "test_queue", "test_routing"}
BACKENDS = ["sqlite", "mariadb"]
# For tests of input that is refused before it reaches the queue: the refusal is the same
# code on every backend, so one backend tells as much as three.
VALIDATION_ONLY = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)


@pytest.hookimpl(tryfirst=True)
def pytest_generate_tests(metafunc) -> None:
    """Add the "mariadb-cas" backend to the db_url of tests in BOTH_CLAIM_PATHS modules."""
    if "db_url" not in metafunc.fixturenames or metafunc.module.__name__ not in BOTH_CLAIM_PATHS:
        return
    for mark in metafunc.definition.iter_markers("parametrize"):
        names = mark.args[0] if mark.args else mark.kwargs.get("argnames", ())
        if "db_url" in ([n.strip() for n in names.split(",")] if isinstance(names, str) else names):
            return  # the test picks its own backends
    # As a marker, so pytest's own parametrizing of the fixture steps aside for it.
    metafunc.definition.add_marker(pytest.mark.parametrize("db_url", [*BACKENDS, "mariadb-cas"], indirect=True))


@pytest.fixture(params=BACKENDS)
def db_url(request, tmp_path) -> Iterator[str]:
    """Yield an empty database on each backend the product supports."""
    if request.param == "sqlite":
        path = str(tmp_path / "pollgate.db")
        FRESH_SQLITE.add(path)
        yield f"sqlite:///{path}"
        FRESH_SQLITE.discard(path)
        return
    server = request.getfixturevalue("mariadb")
    url = server.new_database()
    yield url
    server.drop_database(url)


@pytest.fixture
def claim_path(request) -> str:
    """Return the CLAIM_PATH the parametrised backend asks for ("auto" but on "mariadb-cas")."""
    callspec = getattr(request.node, "callspec", None)
    return "cas" if callspec and callspec.params.get("db_url") == "mariadb-cas" else "auto"


# SQLite files that db_url named and nothing has created yet: make_app copies the template there.
FRESH_SQLITE: set[str] = set()


def make_app(db_url: str, instance: str, **overrides):
    """Create an app on a migrated database.

    A fresh test database (from db_url or MariaDB.new_database) gets a copy of one migrated
    once per run instead of every migration again; migrate.upgrade() then finds nothing to do.
    """
    copy_template(db_url)
    app = create_app({**TEST_CONFIG, "DATABASE_URL": db_url, **overrides}, instance_path=instance)
    with app.app_context():
        migrate.upgrade()
        # No held-request budget unless a test sets one: many tests hold many requests.
        settings.save({"max_long_polls": 0, "max_streams": 0})
    return app


def copy_template(db_url: str) -> None:
    """Fill a fresh, empty test database with a copy of the run's migrated template of its backend."""
    if db_url.startswith("sqlite"):
        path = make_url(db_url).database
        if path in FRESH_SQLITE and not os.path.exists(path):
            # Created 0600, as the app creates its own file.
            with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as target, \
                    open(sqlite_template(), "rb") as source:
                shutil.copyfileobj(source, target)
        return
    server = next((s for s in MariaDB.started if db_url in s.fresh), None)
    if server is None:
        return
    server.fresh.discard(db_url)
    name = database_name(db_url)
    if server.is_empty(name):
        if server.template is None:
            template = server.new_database()
            server.fresh.discard(template)
            server.template = database_name(migrated(template))
        server.copy_database(server.template, name)


@functools.lru_cache(maxsize=None)
def sqlite_template() -> str:
    """Migrate one SQLite database for the run and return its path."""
    return make_url(migrated(f"sqlite:///{scratch()}/pollgate.db")).database


def migrated(db_url: str) -> str:
    """Run every migration on an empty database and return its URL."""
    app = create_app({**TEST_CONFIG, "DATABASE_URL": db_url}, instance_path=tempfile.mkdtemp(dir=scratch()))
    with app.app_context():
        migrate.upgrade()
    app.extensions["pollgate.engine"].dispose()  # SQLite folds its WAL back into the file here
    return db_url


@functools.lru_cache(maxsize=None)
def scratch() -> str:
    """Return a folder for the run's templates, removed when the run ends."""
    folder = tempfile.mkdtemp(prefix="pollgate-templates-")
    atexit.register(shutil.rmtree, folder, True)
    return folder


@pytest.fixture
def app_config() -> dict:
    """Per-test config overrides; tests override this fixture or mutate it."""
    return {}


@pytest.fixture
def app(db_url, tmp_path, app_config, claim_path):
    """A migrated app on the parametrised database."""
    app = make_app(db_url, str(tmp_path / "instance"), **{"CLAIM_PATH": claim_path, **app_config})
    yield app
    app.extensions["pollgate.engine"].dispose()


@dataclass
class Account:
    """A user with an API key and a worker token."""

    email: str
    user_id: int
    key: str
    token: str


def make_account(app, email: str = "alice@example.com", shared: bool = False) -> Account:
    """Create a user with a key and a worker token."""
    with app.app_context():
        user = accounts.create_user(email, PASSWORD)
        key = accounts.create_api_key(user.id, "test")
        token = accounts.create_worker_token(user.id, f"worker-of-{email}", shared=shared)
    return Account(email, user.id, key, token)


def csrf(page) -> str:
    """Read the CSRF token out of a page."""
    return re.search(r'name="csrf_token" value="([^"]+)"', page.get_data(as_text=True)).group(1)


def sign_in(client, email, password=PASSWORD):
    """Sign a test client in through the real form."""
    token = csrf(client.get("/login"))
    return client.post("/login", data={"email": email, "password": password, "csrf_token": token})


@pytest.fixture
def admin(app):
    """A signed-in administrator's test client and account."""
    account = make_account(app, "root@example.com")
    with app.app_context(), db.begin() as s:
        s.execute(update(User).where(User.id == account.user_id).values(is_admin=True))
    client = app.test_client()
    assert sign_in(client, account.email).status_code == 302
    return client, account


@pytest.fixture
def account(app) -> Account:
    """The default test user."""
    return make_account(app)


@dataclass
class LiveServer:
    """The app served over real HTTP on loopback."""

    url: str
    app: object


@contextlib.contextmanager
def serving(wsgi_app) -> Iterator[str]:
    """Serve a WSGI app on a free loopback port in a thread; yield its base URL."""
    server = make_server("127.0.0.1", 0, wsgi_app, threaded=True)
    # shutdown() waits for serve_forever's next poll: 0.5 s per test at the default interval.
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        thread.join(timeout=30)
        server.server_close()


@pytest.fixture
def live(app) -> Iterator[LiveServer]:
    """Serve the app on a free loopback port in a thread."""
    with serving(app) as url:
        yield LiveServer(url, app)


@pytest.fixture
def ctx(app):
    """Run the test body inside the app context."""
    with app.app_context():
        yield


@pytest.fixture
def dbh(ctx):
    """The database handle, inside the app context."""
    return db


def read_until_error(stream, act_at: int = 0, action=None) -> tuple[str, openai.APIError]:
    """Read an openai stream that must end in an error event; optionally act after act_at chunks."""
    received = []
    with pytest.raises(openai.APIError) as err:
        for chunk in stream:
            received.append(chunk.choices[0].delta.content or "" if chunk.choices else "")
            if action is not None and len(received) == act_at:
                action()
    return "".join(received), err.value


# Chromium on a machine with no outside network: keep it from trying to phone home.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]


def expect(locator):
    """Playwright's waiting assertions (imported late: the package may be missing)."""
    from playwright.sync_api import expect as playwright_expect

    return playwright_expect(locator)


def launch_chromium(*extra_args: str) -> Iterator:
    """Start Debian's Chromium under Playwright, or report the missing part."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing("the playwright package is not installed (pip install -r requirements-dev.txt)")
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        missing("Chromium is not installed (apt-get install chromium)")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=path, headless=True, args=CHROMIUM_ARGS + list(extra_args))
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture(scope="module")
def chromium():
    """Start Debian's Chromium once for these tests."""
    yield from launch_chromium()
