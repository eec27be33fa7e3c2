"""Sign-in throttling: attempts per (email, client address) and per client address.

Every attempt reserves a slot in both counters, in one transaction, before any password
is checked, so concurrent guesses cannot all slip under the limit; a successful sign-in
gives its slots back. The counters belong to the client's address, so an attacker uses
up their own address's allowance and never locks out the real user signing in from
elsewhere.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
from typing import Optional

from flask import current_app
from sqlalchemy import case, delete, select, update
from sqlalchemy.dialects import mysql, sqlite
from sqlalchemy.orm import Session

from . import events, migrate
from .db import db, retrying
from .models import SigninThrottle, utcnow

# Rows deleted per purge transaction, so a purge never holds sign-ins up for long.
PURGE_BATCH = 500
# The revision that made signin_throttle and users.session_gen. Between an upload and its
# upgrade an administrator must still sign in (to run it), counted the way older releases
# counted: failed-sign-in events per email.
SCHEMA = "0008"


class _Refused(Exception):
    """Raised inside the reservation only to roll its counts back."""

    def __init__(self, wait: float) -> None:
        super().__init__(wait)
        self.wait = wait


def client_network(address: Optional[str]) -> str:
    """Name the client for throttling: its IPv4 address, or the /64 its IPv6 address lies in."""
    try:
        ip = ipaddress.ip_address(address or "")
    except ValueError:
        return address or "unknown"
    if ip.version == 6 and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    if ip.version == 6:
        # One subscriber usually gets a whole /64: counting single addresses there would
        # give an attacker 2**64 fresh allowances.
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


def ready() -> bool:
    """Tell whether the database has the throttle table and session generations yet."""
    return SCHEMA not in migrate.seen_state().pending


def _keys(email: str, address: Optional[str]) -> tuple[str, str]:
    """Return the pair's key and the address's key; the table holds no email addresses."""
    network = client_network(address)
    pair = hashlib.sha256(f"pair:{email} {network}".encode()).hexdigest()
    return pair, hashlib.sha256(f"ip:{network}".encode()).hexdigest()


@retrying
def reserve(email: str, address: Optional[str], now: Optional[dt.datetime] = None) -> Optional[float]:
    """Count one attempt for the pair and the address; return None, or the seconds to wait if either is used up."""
    now = now or utcnow()
    config = current_app.config
    window = dt.timedelta(seconds=config["SIGNIN_THROTTLE_WINDOW"])
    if not ready():
        failed = events.count_recent("signin_failed", email, window)
        return window.total_seconds() if failed >= config["SIGNIN_MAX_FAILURES"] else None
    pair, own = _keys(email, address)
    limits = {pair: config["SIGNIN_MAX_FAILURES"], own: config["SIGNIN_MAX_FAILURES_PER_ADDRESS"]}
    table = SigninThrottle.__table__
    try:
        with db.begin() as s:
            # Pair first, then address: one lock order for every writer of this table.
            for key in limits:
                _count(s, key, now, now - window)
            # Our own writes, under our row locks: each count includes exactly this attempt.
            rows = s.execute(select(table.c.key_hash, table.c.failures, table.c.window_start)
                             .where(table.c.key_hash.in_(list(limits))))
            waits = [(start + window - now).total_seconds() for key, failures, start in rows if failures > limits[key]]
            if waits:
                raise _Refused(max(waits))
    except _Refused as refused:
        return max(1.0, refused.wait)
    return None


def _count(s: Session, key: str, now: dt.datetime, cutoff: dt.datetime) -> None:
    """Add one attempt to a key's counter, starting a new window if its last one is over."""
    table = SigninThrottle.__table__
    expired = table.c.window_start < cutoff
    # Both assignments test the old window_start: MySQL applies them left to right, so
    # failures must come first; SQLite evaluates them all against the old row.
    assignments = [("failures", case((expired, 1), else_=table.c.failures + 1)),
                   ("window_start", case((expired, now), else_=table.c.window_start))]
    row = {"key_hash": key, "failures": 1, "window_start": now}
    if s.get_bind().dialect.name == "mysql":
        # A new key inserted by two attempts at once: the second one updates instead.
        stmt = mysql.insert(table).values(row).on_duplicate_key_update(assignments)
    else:
        stmt = sqlite.insert(table).values(row).on_conflict_do_update(
            index_elements=["key_hash"], set_=dict(assignments))
    s.execute(stmt)


@retrying
def release(email: str, address: Optional[str]) -> None:
    """After a successful sign-in: clear the pair's counter and give the address its slot back."""
    if not ready():
        return
    pair, own = _keys(email, address)
    table = SigninThrottle.__table__
    with db.begin() as s:
        s.execute(delete(table).where(table.c.key_hash == pair))
        s.execute(update(table).where(table.c.key_hash == own, table.c.failures > 0)
                  .values(failures=table.c.failures - 1))


def purge(now: dt.datetime) -> int:
    """Delete counters whose window is over, a batch at a time; return how many."""
    if not ready():
        return 0
    cutoff = now - dt.timedelta(seconds=current_app.config["SIGNIN_THROTTLE_WINDOW"])
    gone = 0
    while True:
        batch = _purge_batch(cutoff)
        gone += batch
        if batch < PURGE_BATCH:
            return gone


@retrying
def _purge_batch(cutoff: dt.datetime) -> int:
    table = SigninThrottle.__table__
    with db.begin() as s:
        keys = list(s.scalars(select(table.c.key_hash).where(table.c.window_start < cutoff).limit(PURGE_BATCH)))
        if not keys:
            return 0
        # Checked again: a sign-in may have restarted the window since the select.
        return s.execute(delete(table).where(table.c.key_hash.in_(keys), table.c.window_start < cutoff)).rowcount
