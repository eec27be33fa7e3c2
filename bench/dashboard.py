"""Seed 1,000,000 usage rows into a throwaway MariaDB, then time the overview page and the rate-limit check.

    python bench/dashboard.py [--rows 1000000] [--users 100] [--days 90] [--samples 50]

Rows are spread evenly over the users and the days; one extra "heavy" user gets 50,000 rows
in the last 24 hours (enterprise's daily cap), the worst case for the day window.
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import random
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

from sqlalchemy import insert, text, update  # noqa: E402

from mariadb import MariaDB  # noqa: E402
from webapp import accounts, create_app, limits, migrate  # noqa: E402
from webapp.db import db  # noqa: E402
from webapp.models import ApiKey, Job, Tier, Usage, User, utcnow  # noqa: E402

BATCH = 10_000


def seed(app, rows: int, users: int, days: int) -> tuple[int, int]:
    """Create users and usage rows (and their daily roll-ups); return (typical, heavy) user ids."""
    now = utcnow()
    with app.app_context():
        ids = [accounts.create_user(f"user{i}@bench.example", "bench password").id for i in range(users + 1)]
        key_ids = {}
        for uid in ids:
            accounts.create_api_key(uid, "bench")
        with db.read() as s:
            key_ids = dict((k.user_id, k.id) for k in s.query(ApiKey))
        heavy = ids[-1]
        plan = [(ids[i % users], now - dt.timedelta(seconds=random.uniform(0, days * 86400))) for i in range(rows)]
        plan += [(heavy, now - dt.timedelta(seconds=random.uniform(0, 86400))) for _ in range(50_000)]
        started = time.monotonic()
        for start in range(0, len(plan), BATCH):
            values = [
                {"request_id": f"chatcmpl-bench{start + i}", "user_id": uid, "api_key_id": key_ids[uid],
                 "model": random.choice(("echo", "llama3.1:8b", "qwen2.5:7b")), "stream": True,
                 "status": "completed" if random.random() > 0.02 else "failed", "prompt_tokens": 40,
                 "completion_tokens": random.randint(5, 400), "cost_nanos": 1000, "latency_ms": 800,
                 "ttft_ms": 120, "settled": True, "created_at": at, "finished_at": at}
                for i, (uid, at) in enumerate(plan[start:start + BATCH])
            ]
            with db.begin() as s:
                s.execute(insert(Usage), values)
        with db.begin() as s:
            # The roll-ups the settlement path would have maintained, computed in one go
            # (USAGE is a reserved word in MySQL: raw SQL must quote the table).
            s.execute(text(
                "INSERT INTO usage_daily (day, user_id, api_key_id, model, requests, errors, prompt_tokens,"
                " completion_tokens, cost_nanos, latency_ms)"
                " SELECT DATE(created_at), user_id, COALESCE(api_key_id, 0), model, COUNT(*),"
                " SUM(status <> 'completed'), SUM(prompt_tokens), SUM(completion_tokens), SUM(cost_nanos),"
                " SUM(latency_ms) FROM `usage` GROUP BY DATE(created_at), user_id, COALESCE(api_key_id, 0), model"))
            # ... and the minute buckets that admission would have kept.
            for subject, column in (("u", "user_id"), ("k", "api_key_id")):
                s.execute(text(
                    "INSERT INTO rate_buckets (subject, subject_id, minute, requests, tokens, first_at)"
                    f" SELECT '{subject}', {column}, DATE_FORMAT(created_at, '%Y-%m-%d %H:%i:00'), COUNT(*),"
                    " SUM(prompt_tokens + completion_tokens), MIN(created_at) FROM `usage`"
                    f" WHERE created_at >= :since GROUP BY {column}, DATE_FORMAT(created_at, '%Y-%m-%d %H:%i:00')"),
                    {"since": now - dt.timedelta(seconds=limits.BUCKET_KEEP)})
            s.execute(text("ANALYZE TABLE `usage`, usage_daily, rate_buckets"))
        print(f"seeded {len(plan):,} usage rows in {time.monotonic() - started:.0f} s")
        return ids[0], heavy


def time_overview(app, email: str, samples: int) -> list[float]:
    """Render /dashboard for a signed-in user, samples times; return milliseconds."""
    client = app.test_client()
    client.post("/login", data={"email": email, "password": "bench password"})
    client.get("/dashboard")  # warm caches and templates
    out = []
    for _ in range(samples):
        started = time.perf_counter()
        page = client.get("/dashboard")
        out.append((time.perf_counter() - started) * 1000)
        assert page.status_code == 200
    return out


def time_admission(app, user_id: int, samples: int, check: bool = True) -> list[float]:
    """Run the rate-limit admission (lock, count three windows, record) and roll it back.

    With check=False only the job is inserted: the difference is what the check adds.
    """
    out = []
    with app.app_context():
        with db.read() as s:
            key = s.query(ApiKey).filter(ApiKey.user_id == user_id).one()
        for _ in range(samples):
            job = Job(public_id="bench", user_id=user_id, model="echo", request_json="{}", rank=0,
                           deadline_at=utcnow(), stream=False, priority=0)
            with db.engine.connect() as conn:
                from sqlalchemy.orm import Session

                with Session(bind=conn) as s:
                    started = time.perf_counter()
                    if check:
                        limits.admit(s, key, job, 40, utcnow())
                    else:
                        s.add(job)
                    s.flush()
                    out.append((time.perf_counter() - started) * 1000)
                    s.rollback()
    return out


def describe(name: str, ms: list[float]) -> str:
    ms = sorted(ms)
    return f"{name}: p50 {statistics.median(ms):.1f} ms, p90 {ms[int(len(ms) * 0.9)]:.1f} ms, max {ms[-1]:.1f} ms"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--users", type=int, default=100)
    parser.add_argument("--days", type=int, default=90)
    parser.add_argument("--samples", type=int, default=50)
    args = parser.parse_args()
    server = MariaDB()
    server.start()
    try:
        app = create_app({"DATABASE_URL": server.new_database(), "SECRET_KEY": "bench", "WTF_CSRF_ENABLED": False,
                          "DEFAULT_TIER": "enterprise"}, instance_path=tempfile.mkdtemp(prefix="pollgate-bench-"))
        with app.app_context():
            migrate.upgrade()
        typical, heavy = seed(app, args.rows, args.users, args.days)
        with app.app_context(), db.begin() as s:
            # Caps on every window and on tokens, so every count runs.
            s.execute(update(Tier).values(tokens_per_minute=10**9, tokens_per_hour=10**9, tokens_per_day=10**9,
                                          requests_per_day=10**9, requests_per_hour=10**9,
                                          requests_per_minute=10**9))
            version = s.execute(text("SELECT VERSION()")).scalar()
        print(f"MariaDB {version}; {args.users} users over {args.days} days, plus a heavy user")
        for label, uid in (("typical user", typical), ("heavy user (50,000 rows today)", heavy)):
            with app.app_context(), db.read() as s:
                email = s.get(User, uid).email
            print(describe(f"overview, {label}", time_overview(app, email, args.samples)))
            alone = time_admission(app, uid, args.samples, check=False)
            checked = time_admission(app, uid, args.samples)
            print(describe(f"job insert alone, {label}", alone))
            print(describe(f"job insert with rate-limit admission, {label}", checked))
            print(f"rate-limit check adds, {label}: p50 {statistics.median(checked) - statistics.median(alone):.1f} ms")
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
