"""The cPanel path on the real stack: Apache + mod_passenger under /api, the web installer in
Chromium, a throwaway MariaDB, a pollclient, a streamed completion, and each cron script."""
from __future__ import annotations

import os
import sqlite3
import subprocess
import threading
import time

import openai
import pytest
import requests
from sqlalchemy.engine import make_url

from conftest import expect
from passenger import USER, app_python
from protocol import ProtoWorker
from test_pollclient_e2e import pollclient, wait_for_models

ADMIN_EMAIL, ADMIN_PASSWORD = "owner@example.com", "a long admin password"


@pytest.fixture(scope="module")
def site(passenger_site, mariadb):
    """A fresh upload behind Apache: no config, no database yet, so the installer answers."""
    return passenger_site({}, migrate=False)


def test_install_in_chromium_then_stream_through_passenger(site, mariadb, chromium):
    db = make_url(mariadb.new_database())
    context = chromium.new_context()
    page = context.new_page()
    page.goto(site.url + "/")
    assert page.url == site.url + "/install"  # redirected, under the sub-path
    expect(page.locator('tr[data-check="Instance folder"]')).to_contain_text("OK")
    # The owner proves the site is theirs with the token the installer wrote at its first start.
    token_file = os.path.join(site.instance_path, "setup-token")
    with open(token_file) as handle:
        page.fill("input[name=setup_token]", handle.read().strip())
    page.fill("input[name=db_host]", db.host)
    page.fill("input[name=db_port]", str(db.port))
    page.fill("input[name=db_name]", db.database)
    page.fill("input[name=db_user]", db.username)
    page.fill("input[name=db_password]", db.password)
    page.click("text=Test connection")
    expect(page.locator('#db-checks tr[data-check="Database"]')).to_contain_text("MariaDB")
    expect(page.locator('#db-checks tr[data-check="Claim path"]')).to_contain_text("SKIP LOCKED")
    page.fill("input[name=site_url]", site.url)
    page.fill("input[name=admin_email]", ADMIN_EMAIL)
    page.fill("input[name=admin_password]", ADMIN_PASSWORD)
    page.fill("input[name=admin_password2]", ADMIN_PASSWORD)
    page.click("button:text-is('Install')")
    expect(page.locator("h1")).to_have_text("Pollgate is installed")
    expect(page.locator("code.cron").first).to_contain_text("cron/reap.py")
    config = os.path.join(site.instance_path, "pollgate.cfg")
    assert oct(os.stat(config).st_mode & 0o777) == "0o600"
    assert not os.path.exists(token_file)

    # The installer is gone for good, even in a fresh process after a restart.
    site.restart()
    assert requests.get(site.url + "/install", timeout=30).status_code == 404

    # Sign in, make a worker token and a key in the dashboard, all under /api.
    page.click("#signin")
    page.fill("input[name=email]", ADMIN_EMAIL)
    page.fill("input[name=password]", ADMIN_PASSWORD)
    page.click("button[type=submit]")
    page.goto(site.url + "/workers")
    page.fill("input[name=name]", "home box")
    page.click("text=Create worker token")
    token = page.locator("#new-token").inner_text()
    page.goto(site.url + "/keys")
    page.fill("input[name=name]", "passenger test")
    page.click("text=Create key")
    key = page.locator("#new-key").inner_text()
    context.close()

    api = openai.OpenAI(base_url=f"{site.url}/v1", api_key=key, max_retries=0)
    with pollclient(site.url, token, "--backend", "echo", "--echo-delay", "0.05") as (_, log):
        wait_for_models(api, "echo")
        stream = api.chat.completions.create(
            model="echo", stream=True, stream_options={"include_usage": True},
            messages=[{"role": "user", "content": "through apache and passenger"}])
        chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "through apache and passenger", "".join(log) + site.logs()
    # In several deltas; test_passenger_smoke checks that they reach the client as they are sent.
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1
    assert chunks[-1].usage.completion_tokens > 0

    # Each cron script once, as cPanel runs it: the app's venv python, as the app's user.
    for script in ("reap.py", "purge.py", "rollup.py"):
        done = subprocess.run([app_python(), os.path.join(site.app_root, "cron", script)], user=USER, group=USER,
                              extra_groups=[], capture_output=True, text=True, timeout=120, cwd="/",
                              env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"})
        assert done.returncode == 0 and f"pollgate cron {script[:-3]}:" in done.stdout, done.stdout + done.stderr


def test_the_held_request_budget_answers_before_the_host_would(passenger_site):
    """Budget 2 under Passenger (one request per process): the third long-poll gets a quick 429."""
    site = passenger_site({"SECRET_KEY": "budget"}, sqlite=True)
    # Two owners: one owner's workers may hold only their fair share of the budget.
    for owner in ("w@example.com", "v@example.com"):
        site.flask("create-user", owner, "--password", "long enough pw")
    tokens = [site.flask("create-worker-token", owner).strip().splitlines()[-1]
              for owner in ("w@example.com", "v@example.com", "w@example.com")]
    site.flask("setting", "max_long_polls", "2")
    # Long holds, so that on a loaded machine both are still held when the third arrives, and
    # "quick" (under half the hold) cannot be mistaken for a held request.
    hold = 20
    polls = [threading.Thread(target=ProtoWorker(site.url, t).claim, kwargs={"wait": hold}) for t in tokens[:2]]
    for poll in polls:
        poll.start()
    # Wait until both long-polls are held, each in its own Passenger process.
    database = sqlite3.connect(os.path.join(site.instance_path, "pollgate.db"))
    end = time.monotonic() + hold * 0.75
    while database.execute("SELECT COUNT(*) FROM held_requests").fetchone()[0] < 2:
        assert time.monotonic() < end, site.logs()
        time.sleep(0.05)
    database.close()
    started = time.monotonic()
    third = ProtoWorker(site.url, tokens[2]).post("claim", {"models": ["echo"], "wait": hold})
    elapsed = time.monotonic() - started
    for poll in polls:
        poll.join()
    assert third.status_code == 429, site.logs()
    assert third.json()["error"]["code"] == "gateway_busy" and third.headers["Retry-After"] == "10"
    assert elapsed < hold / 2
