"""Attacks on sign-in and sessions over real HTTP: guessing, timing, captured cookies, open redirects."""
from __future__ import annotations

import datetime as dt
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator
from urllib.parse import urlsplit

import pytest
import requests

from conftest import PASSWORD, LiveServer, serving
from webapp import accounts, maintenance, signin
from webapp.models import utcnow

ADDRESS_HEADER = "X-Test-Client-Address"
ATTACKER = "203.0.113.66"
VICTIM = "198.51.100.7"
PER_ADDRESS = 12  # below the default 50, so the per-address test stays short


@pytest.fixture
def app_config() -> dict:
    """A small per-address limit; the per-pair limit keeps its default of 5."""
    return {"SIGNIN_MAX_FAILURES_PER_ADDRESS": PER_ADDRESS}


@pytest.fixture
def site(app) -> Iterator[LiveServer]:
    """Serve the app over loopback, letting each request claim a client address in a test-only header."""

    def claim_address(environ, start_response):
        # What a trusted proxy would do; the app itself only ever reads REMOTE_ADDR.
        claimed = environ.get("HTTP_" + ADDRESS_HEADER.upper().replace("-", "_"))
        if claimed:
            environ["REMOTE_ADDR"] = claimed
        return app(environ, start_response)

    with serving(claim_address) as url:
        yield LiveServer(url, app)


@pytest.fixture
def checks(monkeypatch) -> list[str]:
    """Record the stored hash of every password check the app makes (the server runs in this process)."""
    seen: list[str] = []
    real = accounts.password_matches
    lock = threading.Lock()

    def spy(password_hash: str, password: str) -> bool:
        with lock:
            seen.append(password_hash)
        return real(password_hash, password)

    monkeypatch.setattr(accounts, "password_matches", spy)
    return seen


def browser(address: str) -> requests.Session:
    """A client that says it comes from `address`."""
    session = requests.Session()
    session.headers[ADDRESS_HEADER] = address
    return session


def form_token(session: requests.Session, url: str) -> str:
    """Load a page and read its CSRF token."""
    page = session.get(url, timeout=30)
    return re.search(r'name="csrf_token" value="([^"]+)"', page.text).group(1)


def attempt(session: requests.Session, base: str, email: str, password: str, query: str = "") -> requests.Response:
    """Submit the sign-in form the way a browser does, without following the redirect."""
    token = form_token(session, f"{base}/login")
    return session.post(f"{base}/login{query}", data={"email": email, "password": password, "csrf_token": token},
                        allow_redirects=False, timeout=60)


def test_forty_concurrent_guesses_check_five_passwords_and_spare_the_victim(site, account, checks):
    attacker = browser(ATTACKER)
    token = form_token(attacker, f"{site.url}/login")
    start = threading.Barrier(40)

    def guess(i: int) -> int:
        start.wait(timeout=30)
        return requests.post(f"{site.url}/login", cookies=attacker.cookies.get_dict(), allow_redirects=False,
                             headers={ADDRESS_HEADER: ATTACKER}, timeout=120,
                             data={"email": account.email, "password": f"guess {i}", "csrf_token": token}).status_code

    with ThreadPoolExecutor(40) as pool:
        statuses = list(pool.map(guess, range(40)))
    assert sorted(set(statuses)) == [401, 429] and statuses.count(401) == 5
    assert len(checks) == 5
    # The real user, from home, is not locked out by the attacker's guesses.
    assert attempt(browser(VICTIM), site.url, account.email, PASSWORD).status_code == 302
    # The attacker stays throttled, even holding the right password, and no password is checked.
    refused = attempt(attacker, site.url, account.email, PASSWORD)
    assert refused.status_code == 429 and len(checks) == 6
    assert "Too many failed sign-ins" in refused.text and re.search(r"Try again in 1[45] minutes", refused.text)
    assert 0 < int(refused.headers["Retry-After"]) <= 900


def test_one_address_guessing_many_emails_is_throttled_alone(site, account, checks):
    attacker = browser(ATTACKER)
    for i in range(PER_ADDRESS):
        assert attempt(attacker, site.url, f"user{i}@example.com", "guess").status_code == 401
    assert attempt(attacker, site.url, "fresh@example.com", "guess").status_code == 429
    assert attempt(attacker, site.url, account.email, PASSWORD).status_code == 429
    assert len(checks) == PER_ADDRESS
    assert attempt(browser(VICTIM), site.url, account.email, PASSWORD).status_code == 302


def test_a_success_clears_the_pair_and_gives_the_address_its_slot_back(site, account):
    user = browser(VICTIM)
    for _ in range(4):
        assert attempt(user, site.url, account.email, "typo").status_code == 401
    assert attempt(user, site.url, account.email, PASSWORD).status_code == 302
    again = browser(VICTIM)
    for _ in range(5):
        assert attempt(again, site.url, account.email, "typo").status_code == 401
    assert attempt(again, site.url, account.email, "typo").status_code == 429


def test_the_window_restarts_and_purge_removes_old_counters(app, account):
    now = utcnow()
    with app.app_context():
        assert all(signin.reserve(account.email, ATTACKER, now) is None for _ in range(5))
        wait = signin.reserve(account.email, ATTACKER, now)
        assert wait is not None and 899 <= wait <= 900
        later = now + dt.timedelta(seconds=901)
        assert signin.reserve(account.email, ATTACKER, later) is None
        assert maintenance.purge(later + dt.timedelta(seconds=901))["signin"] == 2  # the pair's and the address's


def test_an_unknown_email_costs_the_same_hash_check_as_a_wrong_password(site, account, checks):
    known = attempt(browser(VICTIM), site.url, account.email, "wrong password")
    unknown = attempt(browser(VICTIM), site.url, "nobody@example.com", "wrong password")
    assert known.status_code == unknown.status_code == 401
    assert known.text.count("Wrong email or password") == unknown.text.count("Wrong email or password") == 1
    # One check each, against hashes of the same method and cost ("scrypt:32768:8:1$salt$hash").
    assert len(checks) == 2 and checks[0] != checks[1]
    assert checks[0].split("$")[0] == checks[1].split("$")[0]


def test_a_cookie_captured_before_sign_out_is_refused_after(site, account):
    user = browser(VICTIM)
    assert attempt(user, site.url, account.email, PASSWORD).status_code == 302
    captured = user.cookies.get_dict()
    token = form_token(user, f"{site.url}/dashboard")
    assert user.post(f"{site.url}/logout", data={"csrf_token": token}, allow_redirects=False, timeout=30).status_code == 302
    replay = requests.get(f"{site.url}/dashboard", cookies=captured, allow_redirects=False, timeout=30)
    assert replay.status_code == 302 and "/login" in replay.headers["Location"]


def test_a_password_change_ends_other_sessions_but_not_its_own(site, account):
    mine, other = browser(VICTIM), browser(ATTACKER)
    for session in (mine, other):
        assert attempt(session, site.url, account.email, PASSWORD).status_code == 302
    token = form_token(mine, f"{site.url}/account/password")
    changed = mine.post(f"{site.url}/account/password", allow_redirects=False, timeout=60, data={
        "current": PASSWORD, "new": "a brand new secret", "confirm": "a brand new secret", "csrf_token": token})
    assert changed.status_code == 302
    assert mine.get(f"{site.url}/dashboard", allow_redirects=False, timeout=30).status_code == 200
    ended = other.get(f"{site.url}/dashboard", allow_redirects=False, timeout=30)
    assert ended.status_code == 302 and "/login" in ended.headers["Location"]
    assert attempt(browser(VICTIM), site.url, account.email, PASSWORD).status_code == 401
    assert attempt(browser(VICTIM), site.url, account.email, "a brand new secret").status_code == 302


# ?next= as sent on the wire, and where the app may send the browser.
NEXT_PAYLOADS = [
    ("/%09/evil.example", "/dashboard"),  # a browser drops the tab: //evil.example
    ("/%0d/x", "/dashboard"),  # a CR in the Location header was a 500
    ("/%0a/evil.example", "/dashboard"),
    ("//x", "/dashboard"),
    ("/%5Cx", "/dashboard"),  # /\x: browsers read the backslash as a slash
    ("/%5C/evil.example", "/dashboard"),
    ("https://x", "/dashboard"),
    ("https:/x", "/dashboard"),
    ("/%2F%2Fx", "/dashboard"),  # decodes to ///x
    ("/%252F%252Fx", "/%2F%2Fx"),  # decodes to /%2F%2Fx: a path on this site
    ("/%E2%80%8B/evil.example", "/dashboard"),  # a zero-width space
    ("/%00", "/dashboard"),
    ("javascript:alert(1)", "/dashboard"),
    ("/keys?tab=new", "/keys?tab=new"),
]


def test_next_never_leads_off_site_nor_fails(site, account):
    for payload, expected in NEXT_PAYLOADS:
        r = attempt(browser(VICTIM), site.url, account.email, PASSWORD, query=f"?next={payload}")
        assert r.status_code == 302, payload
        location = r.headers["Location"]
        assert location == expected, payload
        assert urlsplit(location).netloc == "" and not location.startswith("//"), payload
