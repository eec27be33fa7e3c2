"""The held-request budget: caps on open long-polls and open API requests, per process and shared.

Two caps guard the same thing from two sides. Under Passenger each held request holds a
whole process, and past the account's entry process limit the host answers 508 to
everyone (see docs/deploy.md); so the app counts its held requests in the database and
turns away the one too many with a quick 429/503 and Retry-After, which clients and
workers know how to wait out. Under threaded gunicorn a held request holds a thread; if
held requests took every thread, the chunk reports their own answers wait for could not
get in; so each process also caps what it holds itself (MAX_HELD_PER_PROCESS).

Held API requests renew their slot every HOLD_RENEW seconds (see `tailer.renew`); a slot not
renewed within HOLD_TTL belongs to a dead process and lapses.
"""
from __future__ import annotations

import datetime as dt
import math
import threading
from typing import Optional

from flask import current_app
from sqlalchemy import bindparam, case, delete, func, insert, select
from sqlalchemy.orm import Session

from . import settings
from .db import db, retrying
from .errors import ApiError
from .models import HeldRequest, Setting, utcnow

KINDS = {"long_polls": "worker long-polls", "streams": "open API requests"}
# The row every acquirer locks, so counting and taking a slot is one step across processes.
LOCK_ROW = "_held_lock"
# Seconds a turned-away caller is asked to wait: about a long-poll's natural turnover.
RETRY_AFTER = {"long_polls": 10, "streams": 3}

_here = {"held": 0}
_here_lock = threading.Lock()


def user_share(limit: int) -> int:
    """Return how many of `limit` slots one user may hold: FAIR_SHARE of them, leaving one for others."""
    share = math.floor(limit * current_app.config["FAIR_SHARE"])
    return max(1, min(share, limit - 1)) if limit > 1 else limit


@retrying
def acquire(kind: str, ttl: float, user_id: Optional[int] = None) -> Optional[int]:
    """Take a slot for `ttl` seconds; return its id (0 when there is no cap), or None when full."""
    limit = settings.get(f"max_{kind}")
    if not limit:
        return 0
    now = utcnow()
    share = user_share(limit) if user_id is not None else limit
    with db.begin() as s:
        # SQLite's BEGIN IMMEDIATE already serialises; on MySQL this row lock does.
        s.execute(select(Setting.name).where(Setting.name == LOCK_ROW).with_for_update())
        # Count and take in one statement: under the lock every earlier taker has committed,
        # so the statement's own read sees every live slot, and the lock that every held
        # request of the node queues on lasts one round trip to the commit, not two.
        result = s.execute(_TAKE, {"kind": kind, "user_id": user_id, "now": now, "limit": limit, "share": share,
                                   "expires_at": now + dt.timedelta(seconds=ttl)})
        return result.lastrowid if result.rowcount == 1 else None


def _take_statement():
    """Build the statement that takes a slot only while fewer than :limit are live, and fewer than :share are the user's."""
    live = (
        select(func.count().label("total"),
               func.coalesce(func.sum(case((HeldRequest.user_id == bindparam("user_id"), 1), else_=0)), 0).label("own"))
        .where(HeldRequest.kind == bindparam("kind"), HeldRequest.expires_at > bindparam("now"))
        .subquery("live")
    )
    values = select(
        bindparam("kind", type_=HeldRequest.kind.type), bindparam("user_id", type_=HeldRequest.user_id.type),
        bindparam("expires_at", type_=HeldRequest.expires_at.type), bindparam("now", type_=HeldRequest.created_at.type),
    ).select_from(live).where(live.c.total < bindparam("limit"), live.c.own < bindparam("share"))
    table = HeldRequest.__table__
    return insert(table).from_select([table.c.kind, table.c.user_id, table.c.expires_at, table.c.created_at], values)


_TAKE = _take_statement()


def acquire_or_refuse(kind: str, ttl: float, user_id: Optional[int] = None) -> int:
    """Take a slot in this process and in the shared budget, or raise the quick refusal."""
    take_local(kind)
    try:
        hold = acquire(kind, ttl, user_id)
    except BaseException:
        release_local()
        raise
    if hold is None:
        release_local()
        limit = settings.get(f"max_{kind}")
        raise busy(kind, f"The gateway is holding as many {KINDS[kind]} as its hosting allows ({limit}), "
                         f"or as many as one account may hold ({user_share(limit)}).")
    return hold


def take_local(kind: str) -> None:
    """Count one more held request in this process, or refuse it at once past MAX_HELD_PER_PROCESS."""
    cap = current_app.config["MAX_HELD_PER_PROCESS"]
    with _here_lock:
        if cap and _here["held"] >= cap:
            full = True
        else:
            full = False
            _here["held"] += 1
    if full:
        raise busy(kind, f"This gateway process is holding as many requests as it may ({cap}).")


def release_local() -> None:
    """Count one held request fewer in this process."""
    with _here_lock:
        _here["held"] = max(0, _here["held"] - 1)


def busy(kind: str, why: str) -> ApiError:
    """Build the quick refusal a caller knows how to wait out."""
    return ApiError(
        503 if kind == "streams" else 429,
        f"{why} Try again in {RETRY_AFTER[kind]} seconds.",
        code="gateway_busy",
        retry_after=RETRY_AFTER[kind],
    )


@retrying
def release(hold: Optional[int]) -> None:
    """Give a slot back, here and in the shared budget (a dead process's slot lapses instead)."""
    if hold is None:
        return
    release_local()
    if hold:
        _delete(hold)


@retrying
def _delete(hold: int) -> None:
    with db.begin() as s:
        drop(s, hold)


def drop(s: Session, hold: Optional[int]) -> None:
    """Give a slot back in the shared budget inside the caller's transaction (held_requests come last in the lock order)."""
    if hold:
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


def held_here() -> int:
    """Return how many held requests this process counts now."""
    return _here["held"]
