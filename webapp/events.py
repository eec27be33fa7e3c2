"""The system log: record notable events and count recent ones."""
from __future__ import annotations

import datetime as dt
import logging
from typing import Any, Callable, Optional, TypeVar

from sqlalchemy import func, select

from .db import db, is_unavailable, retrying
from .models import Event, utcnow


log = logging.getLogger(__name__)
T = TypeVar("T")


@retrying
def record(kind: str, subject: str = "", message: str = "", user_id: Optional[int] = None) -> None:
    """Add one event to the system log."""
    with db.begin() as s:
        s.add(Event(kind=kind, subject=subject[:191], message=message, user_id=user_id))


def count_recent(kind: str, subject: str, within: dt.timedelta) -> int:
    """Count events of a kind about a subject in the last `within`."""
    with db.read() as s:
        return s.scalar(
            select(func.count()).select_from(Event).where(
                Event.kind == kind, Event.subject == subject[:191], Event.created_at >= utcnow() - within
            )
        )


def contain(task: str, subject: str, fn: Callable[..., T], *args: Any) -> Optional[T]:
    """Run one row's share of housekeeping; if it fails, log it, set it aside and return None.

    A row that cannot be processed must never stop the others, nor the request that
    happened to run housekeeping. An unreachable database is not the row's fault: that
    error goes up, and the work is simply tried again later.
    """
    try:
        return fn(*args)
    except Exception as err:
        if is_unavailable(err):
            raise
        log.exception("%s failed for %s", task, subject)
        try:
            record("housekeeping_error", subject, f"{task} failed: {err.__class__.__name__}: {str(err)[:500]}")
        except Exception:
            log.exception("cannot record the failure of %s for %s", task, subject)
        return None
