"""The system log: record notable events and count recent ones."""
from __future__ import annotations

import datetime as dt
from typing import Optional

from sqlalchemy import func, select

from .db import db
from .models import Event, utcnow


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
