"""Rate limits per user (its tier) and per key (its overrides), over sliding windows.

Exact across processes and nodes: each admission locks the user's row, counts the usage
rows in each window and inserts its own usage row in the same transaction, so N
concurrent requests against a limit of L admit exactly L.
"""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Optional

from flask import current_app
from sqlalchemy import case, func, select
from sqlalchemy.orm import Session

from .errors import ApiError
from .models import WINDOWS, ApiKey, Job, LimitColumns, Tier, Usage, User

KINDS = ("requests", "tokens")


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
    """Inside the submit transaction: check every cap, then record the request's usage row."""
    # The row lock serialises admissions of one user across processes (SQLite's
    # BEGIN IMMEDIATE already serialises everything).
    user = s.scalar(select(User).where(User.id == key.user_id).with_for_update())
    tier = tier_of(s, user)
    states = []
    if tier is not None:
        states += _states(s, "account", Usage.user_id == user.id, tier, now)
    states += _states(s, "API key", Usage.api_key_id == key.id, key, now)
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
    s.add(Usage(
        job=job, request_id=job.public_id, user_id=user.id, api_key_id=key.id, model=job.model,
        stream=job.stream, status="queued", prompt_tokens=prompt_tokens, created_at=now,
    ))
    for state in states:
        state.used += prompt_tokens if state.kind == "tokens" else 1
    return states


def account_states(s: Session, user: User, now: dt.datetime) -> list[WindowState]:
    """Return how much of each of the user's tier caps is used now."""
    tier = tier_of(s, user)
    return _states(s, "account", Usage.user_id == user.id, tier, now) if tier is not None else []


def _states(s: Session, label: str, subject, caps: LimitColumns, now: dt.datetime) -> list[WindowState]:
    """Count one subject's usage in each window that has a cap, in one query."""
    capped = [(kind, window) for kind in KINDS for window in WINDOWS if caps.limit(kind, window) is not None]
    if not capped:
        return []
    windows = sorted({window for _, window in capped}, key=WINDOWS.get)
    columns = []
    for window in windows:
        since = now - dt.timedelta(seconds=WINDOWS[window])
        inside = Usage.created_at >= since
        columns += [
            func.coalesce(func.sum(case((inside, 1), else_=0)), 0),
            func.coalesce(func.sum(case((inside, Usage.prompt_tokens + Usage.completion_tokens), else_=0)), 0),
            func.min(case((inside, Usage.created_at))),
        ]
    horizon = now - dt.timedelta(seconds=WINDOWS[windows[-1]])
    row = s.execute(select(*columns).where(subject, Usage.created_at >= horizon)).one()
    found = {window: row[3 * i: 3 * i + 3] for i, window in enumerate(windows)}
    states = []
    for kind, window in capped:
        requests, tokens, oldest = found[window]
        reset = 0.0
        if oldest is not None:
            reset = max(0.0, (oldest + dt.timedelta(seconds=WINDOWS[window]) - now).total_seconds())
        used = int(requests if kind == "requests" else tokens)
        states.append(WindowState(label, kind, window, caps.limit(kind, window), used, reset))
    return states


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
