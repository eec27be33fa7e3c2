"""The held-request budget: caps on open long-polls and open API requests, shared by every process.

Under Passenger each held request holds a whole process, and past the account's entry
process limit the host answers 508 to everyone (see docs/deploy.md). So the app counts
its own held requests in the database and turns away the one too many with a quick
429/503 and Retry-After, which clients and workers know how to wait out.
"""
from __future__ import annotations

import datetime as dt
from typing import Optional

from sqlalchemy import delete, func, select

from . import settings
from .db import db
from .errors import ApiError
from .models import HeldRequest, Setting, utcnow

KINDS = {"long_polls": "worker long-polls", "streams": "open API requests"}
# The row every acquirer locks, so counting and taking a slot is one step across processes.
LOCK_ROW = "_held_lock"
# Seconds a turned-away caller is asked to wait: about a long-poll's natural turnover.
RETRY_AFTER = {"long_polls": 10, "streams": 3}


def acquire(kind: str, ttl: float) -> Optional[int]:
    """Take a slot for `ttl` seconds; return its id (0 when there is no cap), or None when full."""
    limit = settings.get(f"max_{kind}")
    if not limit:
        return 0
    now = utcnow()
    with db.begin() as s:
        # SQLite's BEGIN IMMEDIATE already serialises; on MySQL this row lock does.
        s.execute(select(Setting.name).where(Setting.name == LOCK_ROW).with_for_update())
        live = s.scalar(select(func.count()).select_from(HeldRequest)
                        .where(HeldRequest.kind == kind, HeldRequest.expires_at > now))
        if live >= limit:
            return None
        hold = HeldRequest(kind=kind, expires_at=now + dt.timedelta(seconds=ttl), created_at=now)
        s.add(hold)
        s.flush()
        return hold.id


def acquire_or_refuse(kind: str, ttl: float) -> int:
    """Take a slot or raise the quick refusal the caller knows how to wait out."""
    hold = acquire(kind, ttl)
    if hold is None:
        limit = settings.get(f"max_{kind}")
        raise ApiError(
            503 if kind == "streams" else 429,
            f"The gateway is holding as many {KINDS[kind]} as its hosting allows ({limit}). "
            f"Try again in {RETRY_AFTER[kind]} seconds.",
            code="gateway_busy",
            retry_after=RETRY_AFTER[kind],
        )
    return hold


def release(hold: int) -> None:
    """Give a slot back (a crashed process's slot lapses at its expiry instead)."""
    if hold:
        with db.begin() as s:
            s.execute(delete(HeldRequest).where(HeldRequest.id == hold))


def in_use() -> dict[str, tuple[int, int]]:
    """Return each kind's (slots held now, cap; 0 for none)."""
    now = utcnow()
    with db.read() as s:
        held = dict(s.execute(select(HeldRequest.kind, func.count()).where(HeldRequest.expires_at > now)
                              .group_by(HeldRequest.kind)).all())
    return {kind: (held.get(kind, 0), settings.get(f"max_{kind}")) for kind in KINDS}


def purge(now: dt.datetime) -> int:
    """Delete lapsed slots; return how many."""
    with db.begin() as s:
        return s.execute(delete(HeldRequest).where(HeldRequest.expires_at < now)).rowcount
