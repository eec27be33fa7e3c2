"""Cron scripts and their lazy twins: reap, purge past retention, repair roll-ups; locks."""
from __future__ import annotations

import datetime as dt
import fcntl
import os
import subprocess
import sys
import time

from sqlalchemy import select, text, update

from conftest import ROOT
from protocol import WorkerThread
from webapp import maintenance, settings
from webapp.db import db
from webapp.models import Chunk, Job, Usage, UsageDaily, utcnow

PROMPT = [{"role": "user", "content": "keep me a while"}]


def cron(app, script: str) -> subprocess.CompletedProcess:
    """Run a cron script the way cPanel does: the virtualenv's python, the script's path."""
    env = {**os.environ, "DATABASE_URL": app.config["DATABASE_URL"], "POLLGATE_INSTANCE_PATH": app.instance_path}
    return subprocess.run([sys.executable, os.path.join(ROOT, "cron", script)], capture_output=True, text=True,
                          timeout=120, env=env, cwd="/")


def ask(live, key, text_: str = "keep me a while"):
    import requests

    return requests.post(f"{live.url}/v1/chat/completions", timeout=30, headers={"Authorization": f"Bearer {key}"},
                         json={"model": "echo", "messages": [{"role": "user", "content": text_}]})


def test_each_cron_script_runs_once(app, account, live):
    with WorkerThread(live.url, account.token):
        assert ask(live, account.key).status_code == 200
    for script, words in (("reap.py", "requeued"), ("purge.py", "jobs 0"), ("rollup.py", "repaired 0")):
        result = cron(app, script)
        assert result.returncode == 0, result.stdout + result.stderr
        assert f"pollgate cron {script[:-3]}:" in result.stdout and words in result.stdout, result.stdout
        assert "Traceback" not in result.stderr


def test_a_cron_run_exits_at_once_while_the_last_one_holds_the_lock(app):
    with app.app_context(), maintenance.cron_lock("purge") as mine:
        assert mine
        started = time.monotonic()
        result = cron(app, "purge.py")
    assert result.returncode == 0 and "still going" in result.stdout
    assert time.monotonic() - started < 30
    with app.app_context(), maintenance.cron_lock("purge") as mine:
        assert mine  # released after the block


def test_purge_deletes_content_past_retention_and_keeps_usage(app, account, live):
    with WorkerThread(live.url, account.token):
        for word in ("old", "new"):
            assert ask(live, account.key, word).status_code == 200
    with app.app_context():
        with db.begin() as s:
            old = s.scalar(select(Job).where(Job.request_json.contains('"old"')))
            s.execute(update(Job).where(Job.id == old.id).values(finished_at=utcnow() - dt.timedelta(hours=25)))
            old_id = old.id
        assert maintenance.purge()["jobs"] == 1
        with db.read() as s:
            assert s.get(Job, old_id) is None
            assert s.scalar(select(Chunk.id).where(Chunk.job_id == old_id)) is None
            rows = list(s.scalars(select(Usage).order_by(Usage.id)))
            assert len(rows) == 2 and rows[0].job_id is None and rows[0].completion_tokens > 0
            assert rows[1].job_id is not None  # the new one is kept
        settings.save({"retention_hours": 0})
        assert maintenance.purge()["jobs"] == 1


def test_rollup_repairs_drifted_daily_rows(app, account, live):
    with WorkerThread(live.url, account.token):
        for _ in range(3):
            assert ask(live, account.key).status_code == 200
    with app.app_context():
        yesterday = utcnow() - dt.timedelta(days=1)
        with db.begin() as s:
            # Move the requests to yesterday, roll-ups included, then spoil the roll-up.
            s.execute(update(Usage).values(created_at=yesterday))
            s.execute(update(UsageDaily).values(day=yesterday.date(), requests=99, completion_tokens=0))
        assert maintenance.rollup() == {"settled": 0, "repaired": 1}
        with db.read() as s:
            daily = s.scalar(select(UsageDaily))
            rows = list(s.scalars(select(Usage)))
        assert daily.requests == 3 and daily.completion_tokens == sum(r.completion_tokens for r in rows)
        assert maintenance.rollup()["repaired"] == 0


def test_without_cron_the_request_path_purges_lazily(app, account, live, monkeypatch):
    with WorkerThread(live.url, account.token):
        assert ask(live, account.key, "old").status_code == 200
        with app.app_context(), db.begin() as s:
            s.execute(update(Job).values(finished_at=utcnow() - dt.timedelta(days=2)))
        # This process purged long ago, by its clock: the next request's housekeeping does it.
        monkeypatch.setitem(maintenance._last_lazy, "purge", time.monotonic() - 7200)
        assert ask(live, account.key, "new").status_code == 200
    with app.app_context(), db.read() as s:
        kept = [j.request_json for j in s.scalars(select(Job))]
    assert len(kept) == 1 and '"new"' in kept[0]


def test_sqlite_cron_lock_is_a_file_lock(app):
    if app.config["DATABASE_URL"].startswith("mysql"):
        with app.app_context(), db.engine.connect() as conn:
            assert conn.execute(text("SELECT GET_LOCK('pollgate_cron_reap', 0)")).scalar() == 1
            assert "still going" in cron(app, "reap.py").stdout
            conn.execute(text("SELECT RELEASE_LOCK('pollgate_cron_reap')"))
        return
    with open(os.path.join(app.instance_path, "cron_reap.lock"), "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert "still going" in cron(app, "reap.py").stdout
