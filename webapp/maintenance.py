"""Housekeeping that cron runs, and that the request path runs lazily where there is no cron."""
from __future__ import annotations

import datetime as dt
import os
import time
import logging

from flask import current_app
from sqlalchemy import case, delete, func, select
from sqlalchemy.orm import Session

from . import budget, jobs, limits, settings, signin, usage
from .db import db, upsert_add
from .models import TERMINAL, Chunk, Event, Job, Usage, UsageDaily, utcnow

log = logging.getLogger(__name__)

# Old events are noise after this long; failed sign-ins only count for 15 minutes.
EVENT_KEEP_DAYS = 90
# Rows deleted per transaction: short transactions never hold the queue up for long.
BATCH = 200


def reap() -> dict[str, int]:
    """Re-queue or fail jobs whose worker went silent, expire stale ones, settle their usage."""
    found = jobs.reap_expired()
    found["settled"] = usage.settle_pending()
    return found


def purge(now: dt.datetime | None = None, max_batches: int | None = None) -> dict[str, int]:
    """Delete ended jobs (prompt, answer, chunks) past retention, then old counters and events.

    Usage rows keep every figure and lose only their link to the job. `max_batches`
    bounds the work for the lazy path; cron runs until nothing is left.
    """
    now = now or utcnow()
    cutoff = now - dt.timedelta(hours=settings.get("retention_hours"))
    done = {"jobs": 0, "buckets": 0, "events": 0}
    batches = 0
    while max_batches is None or batches < max_batches:
        batches += 1
        with db.begin() as s:
            ids = _purgeable(s, cutoff)
            if not ids:
                break
            s.execute(delete(Chunk).where(Chunk.job_id.in_(ids)))
            done["jobs"] += s.execute(delete(Job).where(Job.id.in_(ids))).rowcount
    done["buckets"] = limits.purge_buckets(now)
    done["held"] = budget.purge(now)
    done["signin"] = signin.purge(now)
    with db.begin() as s:
        done["events"] = s.execute(
            delete(Event).where(Event.created_at < now - dt.timedelta(days=EVENT_KEEP_DAYS))).rowcount
    return done


def _purgeable(s: Session, cutoff: dt.datetime) -> list[int]:
    # Only settled jobs: settlement reads the prompt and the chunks to count tokens.
    return list(s.scalars(
        select(Job.id)
        .outerjoin(Usage, Usage.job_id == Job.id)
        .where(Job.state.in_(TERMINAL), Job.finished_at < cutoff,
               (Usage.id.is_(None)) | (Usage.settled.is_(True)))
        .order_by(Job.finished_at)
        .limit(BATCH)
    ))


def rollup(days: int = 2, now: dt.datetime | None = None) -> dict[str, int]:
    """Settle stragglers, then rebuild the daily roll-ups of the last full days from the usage rows.

    Settlement keeps the roll-ups current; this repairs any that drifted (a restored
    backup, a hand edit) and returns how many roll-up rows it had to change.
    """
    now = now or utcnow()
    settled = 0
    while True:
        batch = usage.settle_pending(limit=500)
        settled += batch
        if batch < 500:
            break
    repaired = 0
    for back in range(1, days + 1):
        repaired += _rebuild_day(now.date() - dt.timedelta(days=back))
    return {"settled": settled, "repaired": repaired}


def _rebuild_day(day: dt.date) -> int:
    start = dt.datetime.combine(day, dt.time())
    end = start + dt.timedelta(days=1)
    key = func.coalesce(Usage.api_key_id, 0)
    with db.begin() as s:
        truth = {
            (uid, kid, model): dict(zip(usage.COUNTERS, (int(v or 0) for v in values)))
            for uid, kid, model, *values in s.execute(
                select(Usage.user_id, key, Usage.model, func.count(),
                       func.sum(case((Usage.status != "completed", 1), else_=0)),
                       func.sum(Usage.prompt_tokens), func.sum(Usage.completion_tokens),
                       func.sum(Usage.cost_nanos), func.sum(func.coalesce(Usage.latency_ms, 0)))
                .where(Usage.settled.is_(True), Usage.created_at >= start, Usage.created_at < end)
                .group_by(Usage.user_id, key, Usage.model))
        }
        stored = {(r.user_id, r.api_key_id, r.model): r for r in s.scalars(select(UsageDaily).where(UsageDaily.day == day))}
        changed = 0
        for ident, row in stored.items():
            want = truth.pop(ident, None)
            if want is None:
                s.delete(row)
                changed += 1
            elif any(getattr(row, c) != want[c] for c in usage.COUNTERS):
                for c in usage.COUNTERS:
                    setattr(row, c, want[c])
                changed += 1
        for (uid, kid, model), want in truth.items():
            upsert_add(s, UsageDaily.__table__, [{"day": day, "user_id": uid, "api_key_id": kid, "model": model, **want}],
                       ("day", "user_id", "api_key_id", "model"), usage.COUNTERS)
            changed += 1
    return changed


TASKS = {"reap": reap, "purge": purge, "rollup": rollup}
# How often each task runs lazily in a process that serves requests (cron runs them too);
# reaping every REAP_INTERVAL.
LAZY_EVERY = {"purge": 3600.0, "rollup": 86400.0}
_last_lazy: dict[str, float] = {}


def housekeep() -> None:
    """From the request path: reap every REAP_INTERVAL, purge hourly and check roll-ups daily, per process.

    Never raises: housekeeping rides on other people's requests, and a failure here (the
    database gone for a moment, a row that cannot be processed) must not end them.
    """
    try:
        _housekeep()
    except Exception:
        log.warning("lazy housekeeping failed; it runs again later", exc_info=True)


def _housekeep() -> None:
    now = time.monotonic()
    if now - _last_lazy.get("reap", 0.0) >= current_app.config["REAP_INTERVAL"]:
        _last_lazy["reap"] = now
        reap()
    for name, every in LAZY_EVERY.items():
        last = _last_lazy.get(name)
        if last is None:
            # A process's first request is not the moment: start the clock, spread the work.
            _last_lazy[name] = now - every * (os.getpid() % 10) / 10
            continue
        if now - last >= every:
            _last_lazy[name] = now
            with cron_lock(name) as mine:
                if mine and name == "purge":
                    purge(max_batches=2)
                elif mine:
                    rollup(days=1)


def cron_lock(name: str):
    """Hold the lock of one housekeeping task; yields False if another run has it."""
    return db.named_lock(f"cron_{name}")
