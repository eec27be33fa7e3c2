"""GET /metrics: the figures match the database on SQLite and MariaDB; only the token or an admin reads them."""
from __future__ import annotations

import datetime as dt
import logging
import re

import openai
import requests
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import event, select, update

from conftest import VALIDATION_ONLY, csrf, sign_in
from protocol import ProtoWorker, WorkerThread
from webapp import accounts, jobs, maintenance, metrics, settings
from webapp.db import db
from webapp.models import Event, Job, ModelPrice, Setting, Usage, utcnow

PROMPT = [{"role": "user", "content": "count every word of this prompt for the metrics"}]


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def figures(text: str) -> dict[tuple, float]:
    """Map each sample of a scrape, as (name, label=value, ...), to its value."""
    return {(s.name, *sorted(f"{k}={v}" for k, v in s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def scrape(live, token: str) -> dict[tuple, float]:
    r = requests.get(f"{live.url}/metrics", headers=bearer(token), timeout=30)
    assert r.status_code == 200, r.text
    return figures(r.text)


def settled_rows(app) -> list[Usage]:
    with app.app_context(), db.read() as s:
        return list(s.scalars(select(Usage).where(Usage.settled.is_(True))))


def histogram(found: dict, name: str, values: list[int]) -> None:
    """Check one model's histogram against the millisecond values it was made from."""
    assert found[(f"{name}_count", "model=echo")] == len(values)
    assert abs(found[(f"{name}_sum", "model=echo")] - sum(values) / 1000) < 1e-6
    for bound in metrics.BUCKETS:
        le = repr(float(bound))
        assert found[(f"{name}_bucket", f"le={le}", "model=echo")] == sum(v <= round(bound * 1000) for v in values)
    assert found[(f"{name}_bucket", "le=+Inf", "model=echo")] == len(values)


def test_the_figures_are_the_databases(app, account, live):
    with app.app_context():
        token = metrics.create_token()
        browser_token = accounts.create_worker_token(account.user_id, "tab")
        waiting_token = accounts.create_worker_token(account.user_id, "tab needing a person")
        settings.save({"max_streams": 7})
        with db.begin() as s:
            s.add(ModelPrice(model="echo", prompt_micros_per_m=2_000_000, completion_micros_per_m=8_000_000))
    api = openai.OpenAI(base_url=f"{live.url}/v1", api_key=account.key, max_retries=0)
    with WorkerThread(live.url, account.token):
        api.chat.completions.create(model="echo", messages=PROMPT)
        list(api.chat.completions.create(model="echo", messages=PROMPT, stream=True))
    # Two browser workers on one site: one claiming, one waiting for a person.
    for secret in (browser_token, waiting_token):
        tab = ProtoWorker(live.url, secret, models=("arena-model",))
        tab.post("claim", {"models": ["arena-model"], "wait": 0, "kind": "browser", "site": "arena.ai"}).raise_for_status()
    tab.post("status", {"status": "needs_human", "message": "the site asks for a sign-in"}).raise_for_status()
    # A job no worker claims (the test worker has stopped), queued a minute ago.
    with app.app_context():
        job, _ = jobs.submit_job(account.user_id, None, "echo", {"model": "echo", "messages": PROMPT}, False)
        with db.begin() as s:
            s.execute(update(Job).where(Job.id == job.id).values(created_at=utcnow() - dt.timedelta(seconds=60)))

    found = scrape(live, token)
    assert found[("pollgate_jobs", "model=echo", "state=completed")] == 2
    assert found[("pollgate_jobs", "model=echo", "state=queued")] == 1
    assert found[("pollgate_queue_depth", "model=echo")] == 1
    assert 60 <= found[("pollgate_queue_oldest_age_seconds", "model=echo")] < 120
    assert found[("pollgate_workers_online", "kind=test", "site=")] == 1
    assert found[("pollgate_workers_online", "kind=browser", "site=arena.ai")] == 1
    assert found[("pollgate_workers_not_ready", "kind=browser", "site=arena.ai", "status=needs_human")] == 1
    assert found[("pollgate_held_requests", "kind=streams")] == 0
    assert found[("pollgate_held_requests_limit", "kind=streams")] == 7
    assert found[("pollgate_held_requests_limit", "kind=long_polls")] == 0

    rows = settled_rows(app)
    assert len(rows) == 2
    histogram(found, "pollgate_request_duration_seconds", [r.latency_ms for r in rows])
    histogram(found, "pollgate_time_to_first_token_seconds", [r.ttft_ms for r in rows])
    assert found[("pollgate_requests_total", "model=echo")] == 2
    assert found[("pollgate_request_errors_total", "model=echo")] == 0
    assert found[("pollgate_tokens_total", "model=echo", "type=prompt")] == sum(r.prompt_tokens for r in rows)
    assert found[("pollgate_tokens_total", "model=echo", "type=completion")] == sum(r.completion_tokens for r in rows)
    cost = sum(r.cost_nanos for r in rows) / 1e9
    assert cost > 0 and abs(found[("pollgate_cost_dollars_total", "model=echo")] - cost) < 1e-12

    # Purging ended jobs lowers the job gauge; counters and histograms, read from what
    # purging keeps, only ever grow.
    with app.app_context():
        settings.save({"retention_hours": 0})
        assert maintenance.purge(now=utcnow() + dt.timedelta(hours=1))["jobs"] == 2
    after = scrape(live, token)
    assert ("pollgate_jobs", "model=echo", "state=completed") not in after
    assert after[("pollgate_jobs", "model=echo", "state=queued")] == 1
    kept = {k: v for k, v in found.items() if k[0].startswith(("pollgate_tokens", "pollgate_cost", "pollgate_requests",
                                                               "pollgate_request_", "pollgate_time_to"))}
    assert kept and all(after[k] == v for k, v in kept.items())


def test_a_scrape_is_a_handful_of_aggregate_queries(app, account, live):
    with app.app_context():
        token = metrics.create_token()
    with WorkerThread(live.url, account.token):
        for _ in range(3):
            requests.post(f"{live.url}/v1/chat/completions", headers=bearer(account.key), timeout=30,
                          json={"model": "echo", "messages": PROMPT}).raise_for_status()
    client = app.test_client()
    client.get("/metrics", headers=bearer(token))  # settings are read once per CACHE_SECONDS
    selects: list[str] = []

    def count(conn, cursor, statement, *args):
        if statement.lstrip().upper().startswith("SELECT"):
            selects.append(statement)

    engine = app.extensions["pollgate.engine"]
    event.listen(engine, "before_cursor_execute", count)
    try:
        assert client.get("/metrics", headers=bearer(token)).status_code == 200
    finally:
        event.remove(engine, "before_cursor_execute", count)
    # Jobs, workers, held requests, usage timings, the roll-up; one more if the settings expired.
    assert 5 <= len(selects) <= 6, selects
    # Each aggregates in the database: a scrape loads no rows, however many there are.
    assert all("GROUP BY" in q.upper() for q in selects if "FROM settings" not in q), selects


@VALIDATION_ONLY
def test_an_admin_makes_the_token_it_is_shown_once_and_kept_hashed(app, admin, account, caplog):
    caplog.set_level(logging.DEBUG)
    client, root = admin
    anonymous = app.test_client()
    assert anonymous.get("/metrics").status_code == 404
    assert client.get("/metrics").status_code == 404  # off is off, for administrators too
    page = client.get("/admin/settings")
    assert "answers 404 until you make a token" in page.text

    made = client.post("/admin/settings/metrics-token", data={"csrf_token": csrf(page)})
    assert made.status_code == 200 and "only this once" in made.text
    token = re.search(r'id="new-metrics-token">(pgm_[^<]+)<', made.text).group(1)
    with app.app_context(), db.read() as s:
        stored = s.get(Setting, "metrics_token").value_json
        logged = " ".join(s.scalars(select(Event.message)))
    assert token not in stored and accounts.hash_secret(token) in stored
    assert token not in logged and token[:12] in logged
    later = client.get("/admin/settings").text
    assert token not in later and f"{token[:12]}…" in later

    missing = anonymous.get("/metrics")
    assert missing.status_code == 401 and missing.mimetype == "text/plain"
    assert "Authorization: Bearer pgm_" in missing.text and missing.headers["WWW-Authenticate"].startswith("Bearer")
    wrong = anonymous.get("/metrics", headers=bearer("pgm_not-the-token"))
    assert wrong.status_code == 401 and "not-the-token" not in wrong.text
    ok = anonymous.get("/metrics", headers=bearer(token))
    assert ok.status_code == 200 and ok.headers["Cache-Control"] == "no-store"
    assert "pollgate_queue_depth" in {f.name for f in text_string_to_metric_families(ok.text)}
    openmetrics = anonymous.get("/metrics", headers={**bearer(token), "Accept": "application/openmetrics-text"})
    assert openmetrics.mimetype == "application/openmetrics-text" and openmetrics.text.endswith("# EOF\n")
    assert client.get("/metrics").status_code == 200  # an administrator's session
    user = app.test_client()
    sign_in(user, account.email)
    assert user.get("/metrics").status_code == 401  # anyone else's is not enough

    replaced = client.post("/admin/settings/metrics-token", data={"csrf_token": csrf(page)})
    new = re.search(r'id="new-metrics-token">(pgm_[^<]+)<', replaced.text).group(1)
    assert anonymous.get("/metrics", headers=bearer(token)).status_code == 401
    assert anonymous.get("/metrics", headers=bearer(new)).status_code == 200
    revoked = client.post("/admin/settings/metrics-token", data={"csrf_token": csrf(page), "revoke": "1"},
                          follow_redirects=True)
    assert "revoked" in revoked.text and "answers 404 until you make a token" in revoked.text
    assert anonymous.get("/metrics", headers=bearer(new)).status_code == 404
    assert token not in caplog.text and new not in caplog.text


@VALIDATION_ONLY
def test_the_form_needs_its_csrf_token(app, admin):
    client, _ = admin
    assert client.post("/admin/settings/metrics-token").status_code == 400
    with app.app_context():
        assert settings.get("metrics_token") == {}


@VALIDATION_ONLY
def test_the_command_line_makes_and_revokes_the_token(app):
    runner = app.test_cli_runner()
    made = runner.invoke(args=["metrics-token"])
    assert made.exit_code == 0, made.output
    token = made.output.strip().splitlines()[-1]
    assert token.startswith(metrics.TOKEN_PREFIX)
    client = app.test_client()
    assert client.get("/metrics", headers=bearer(token)).status_code == 200
    with app.app_context():
        assert accounts.hash_secret(token) == settings.get("metrics_token")["sha256"]
    revoked = runner.invoke(args=["metrics-token", "--revoke"])
    assert revoked.exit_code == 0 and token not in revoked.output
    assert client.get("/metrics", headers=bearer(token)).status_code == 404
