"""Rate limits per user (its tier) and per key (its overrides), over sliding windows.

Exact across processes and nodes: each admission under a cap locks the user's row, counts
each window and records its own use in the same transaction, so N concurrent requests
against a limit of L admit exactly L. Windows are summed from per-minute buckets plus the
usage rows of the window's first, partial minute, so the cost stays flat however busy a
user is.
"""
from __future__ import annotations

import datetime as dt
import functools
from dataclasses import dataclass
from typing import Optional

from flask import current_app
from sqlalchemy import and_, bindparam, case, delete, func, or_, select
from sqlalchemy.orm import Session

from .db import db, upsert_add
from .errors import ApiError
from .models import WINDOWS, ApiKey, Job, LimitColumns, RateBucket, Tier, Usage, User, utcnow

KINDS = ("requests", "tokens")
# Buckets are kept a little past the longest window so late settlements still land in one.
BUCKET_KEEP = max(WINDOWS.values()) + 3600


@dataclass
class WindowState:
    """How much of one cap is used and when its oldest use leaves the window."""

    subject: str  # "account" (the tier's caps) or "API key" (the key's own caps)
    kind: str  # "requests" or "tokens"
    window: str  # "minute", "hour" or "day"
    limit: int
    used: int
    reset_in: float  # seconds until the oldest counted use leaves the window

    @property
    def remaining(self) -> int:
        """Return how much is left before the cap."""
        return max(0, self.limit - self.used)


def tier_of(s: Session, user: User) -> Optional[Tier]:
    """Return the user's tier, or the default tier when none is set."""
    if user.tier_id is not None:
        return s.get(Tier, user.tier_id)
    default = current_app.config["DEFAULT_TIER"]
    return s.scalar(select(Tier).where(Tier.name == default)) if default else None


def admit(s: Session, key: ApiKey, job: Job, prompt_tokens: int, now: dt.datetime) -> list[WindowState]:
    """Inside the submit transaction: check every cap and set the job's priority; the caller then counts the request (`record`)."""
    user = s.get(User, key.user_id)
    tier = tier_of(s, user)
    if capped(key, tier):
        # Counting must be exact, so the user's row lock serialises the admissions of one
        # capped user across processes (SQLite's BEGIN IMMEDIATE already serialises
        # everything). An uncapped user's requests count nothing and need no lock, so they
        # do not queue behind each other.
        user = s.scalar(select(User).where(User.id == key.user_id).with_for_update().execution_options(
            populate_existing=True))
        tier = tier_of(s, user)
    subjects = [("API key", "k", key.id, key)]
    if tier is not None:
        subjects.insert(0, ("account", "u", user.id, tier))
    states = _states(s, user.id, subjects, now)
    for state in states:
        # Tokens are known only afterwards, so a token cap refuses once it is reached.
        if state.used >= state.limit:
            raise ApiError(
                429,
                f"Rate limit reached: your {state.subject} may use {state.limit} {state.kind} per "
                f"{state.window}. Try again in {format_reset(state.reset_in)}.",
                code="rate_limit_exceeded",
                retry_after=state.reset_in,
                headers=headers(states),
            )
    if tier is not None and tier.max_concurrent:
        running = s.scalar(
            select(func.count()).select_from(Job).where(Job.user_id == user.id, Job.state.in_(("queued", "running")))
        )
        if running >= tier.max_concurrent:
            raise ApiError(
                429,
                f"Too many requests at once: your account may run {tier.max_concurrent} at a time.",
                code="concurrency_limit_exceeded",
                retry_after=1,
            )
    # Queue priority: the tier's plus the user's own adjustment.
    job.priority = user.priority + (tier.priority if tier is not None else 0)
    for state in states:
        state.used += prompt_tokens if state.kind == "tokens" else 1
    return states


def capped(key: ApiKey, tier: Optional[Tier]) -> bool:
    """Tell whether any cap applies to this key's requests: a window of its own or its tier's, or a concurrency cap."""
    limited = [key] if tier is None else [key, tier]
    return any(caps.limit(kind, window) is not None for caps in limited for kind in KINDS for window in WINDOWS) or (
        tier is not None and bool(tier.max_concurrent))


def record(s: Session, user_id: int, key_id: Optional[int], at: dt.datetime, requests: int, tokens: int) -> None:
    """Add requests and tokens used at `at` to the user's and the key's minute buckets."""
    if (requests == 0 and tokens == 0) or at < utcnow() - dt.timedelta(seconds=BUCKET_KEEP):
        return
    minute = at.replace(second=0, microsecond=0)
    rows = [{"subject": "u", "subject_id": user_id, "minute": minute, "requests": requests,
             "tokens": tokens, "first_at": at}]
    if key_id is not None:
        rows.append({**rows[0], "subject": "k", "subject_id": key_id})
    upsert_add(s, RateBucket.__table__, rows, ("subject", "subject_id", "minute"), ("requests", "tokens"))


def purge_buckets(now: dt.datetime) -> int:
    """Delete minute buckets that no window reaches any more, an hour at a time; return how many."""
    cutoff = now - dt.timedelta(seconds=BUCKET_KEEP)
    gone = 0
    while True:
        with db.begin() as s:
            oldest = s.scalar(select(func.min(RateBucket.minute)))
            if oldest is None or oldest >= cutoff:
                return gone
            upto = min(cutoff, oldest + dt.timedelta(hours=1))
            gone += s.execute(delete(RateBucket).where(RateBucket.minute < upto)).rowcount


def account_states(s: Session, user: User, now: dt.datetime) -> list[WindowState]:
    """Return how much of each of the user's tier caps is used now."""
    tier = tier_of(s, user)
    return _states(s, user.id, [("account", "u", user.id, tier)], now) if tier is not None else []


def _ceil_minute(t: dt.datetime) -> dt.datetime:
    floor = t.replace(second=0, microsecond=0)
    return floor if floor == t else floor + dt.timedelta(minutes=1)


def _states(s: Session, user_id: int, subjects: list[tuple[str, str, int, LimitColumns]],
            now: dt.datetime) -> list[WindowState]:
    """Count each subject's use in each capped window: whole minutes from the buckets, the
    window's ragged first minute from the usage rows, so the window slides exactly."""
    capped = [(label, code, sid, kind, window, caps.limit(kind, window))
              for label, code, sid, caps in subjects for kind in KINDS for window in WINDOWS
              if caps.limit(kind, window) is not None]
    if not capped:
        return []
    windows = tuple(sorted({c[4] for c in capped}, key=WINDOWS.get))
    codes = {code: sid for _, code, sid, *_ in capped}
    starts = {w: now - dt.timedelta(seconds=WINDOWS[w]) for w in windows}
    edges = {w: _ceil_minute(starts[w]) for w in windows}
    params = {"user_id": user_id, **{f"sid_{c}": sid for c, sid in codes.items()},
              **{f"start_{w}": starts[w] for w in windows}, **{f"edge_{w}": edges[w] for w in windows}}
    used = {}  # (code, window) -> [requests, tokens, oldest]
    for code, *values in s.execute(_bucket_query(tuple(codes), windows), params):
        for i, w in enumerate(windows):
            used[code, w] = list(values[3 * i: 3 * i + 3])
    ragged = tuple(w for w in windows if edges[w] > starts[w])
    if ragged:
        row = s.execute(_ragged_query(tuple(codes), ragged), params).one()
        for i, (code, w) in enumerate((c, w) for w in ragged for c in codes):
            requests, tokens, oldest = row[3 * i: 3 * i + 3]
            mine = used.setdefault((code, w), [0, 0, None])
            mine[0] += requests
            mine[1] += tokens
            # The ragged minute lies before every whole minute, so its oldest is the oldest.
            mine[2] = oldest or mine[2]
    states = []
    for label, code, _, kind, window, limit in capped:
        requests, tokens, oldest = used.get((code, window), (0, 0, None))
        reset = 0.0
        if oldest is not None:
            reset = max(0.0, (oldest + dt.timedelta(seconds=WINDOWS[window]) - now).total_seconds())
        states.append(WindowState(label, kind, window, limit, int(requests if kind == "requests" else tokens), reset))
    return states


def _counters(inside, one, tokens, at) -> list:
    return [func.coalesce(func.sum(case((inside, one), else_=0)), 0),
            func.coalesce(func.sum(case((inside, tokens), else_=0)), 0),
            func.min(case((inside, at)))]


# The two queries are built once per shape and run with bound times and ids: building
# them anew cost more Python time per admission than the database spent answering.
@functools.lru_cache(maxsize=None)
def _bucket_query(codes: tuple[str, ...], windows: tuple[str, ...]):
    """Sum whole minutes per subject: at most 1,440 bucket rows each, however busy."""
    columns = [RateBucket.subject]
    for w in windows:
        columns += _counters(RateBucket.minute >= bindparam(f"edge_{w}"), RateBucket.requests, RateBucket.tokens,
                             RateBucket.first_at)
    return (
        select(*columns)
        .where(or_(*(and_(RateBucket.subject == code, RateBucket.subject_id == bindparam(f"sid_{code}"))
                     for code in codes)),
               RateBucket.minute >= bindparam(f"edge_{windows[-1]}"))
        .group_by(RateBucket.subject)
    )


@functools.lru_cache(maxsize=None)
def _ragged_query(codes: tuple[str, ...], ragged: tuple[str, ...]):
    """Sum the usage rows in each window's first, partial minute (a key's rows are among its user's)."""
    columns = []
    tokens = Usage.prompt_tokens + Usage.completion_tokens
    spans = {w: and_(Usage.created_at >= bindparam(f"start_{w}"), Usage.created_at < bindparam(f"edge_{w}"))
             for w in ragged}
    for w in ragged:
        for code in codes:
            inside = spans[w] if code == "u" else and_(spans[w], Usage.api_key_id == bindparam("sid_k"))
            columns += _counters(inside, 1, tokens, Usage.created_at)
    return select(*columns).where(Usage.user_id == bindparam("user_id"), or_(*spans.values()))


def format_reset(seconds: float) -> str:
    """Write a duration the way OpenAI's x-ratelimit-reset headers do: 1s, 6m0s, 1h2m3s."""
    whole = max(1, int(round(seconds)))
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


def headers(states: list[WindowState]) -> dict[str, str]:
    """Build the x-ratelimit-* headers from the tightest request and token caps."""
    out = {}
    for kind in KINDS:
        mine = [s for s in states if s.kind == kind]
        if not mine:
            continue
        tightest = min(mine, key=lambda s: (s.remaining, -s.reset_in))
        out[f"x-ratelimit-limit-{kind}"] = str(tightest.limit)
        out[f"x-ratelimit-remaining-{kind}"] = str(tightest.remaining)
        out[f"x-ratelimit-reset-{kind}"] = format_reset(tightest.reset_in)
    return out
