"""Typed models: users, their API keys and worker tokens, jobs and their chunks."""
from __future__ import annotations

import datetime as dt
import json
from typing import Any, Optional

from flask_login import UserMixin
from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.dialects import mysql
from sqlalchemy.orm import Mapped, mapped_column, relationship

from .db import Base

# MySQL's plain DATETIME drops fractions of a second; timings need milliseconds.
Timestamp = DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql")
# TEXT stops at 64 KB on MySQL; requests with images and big chunks need MEDIUMTEXT (16 MB).
LongText = Text().with_variant(mysql.MEDIUMTEXT(), "mysql")
# SQLite only autoincrements INTEGER PRIMARY KEY, so BIGINT ids are INTEGER there.
BigId = BigInteger().with_variant(Integer(), "sqlite")


def utcnow() -> dt.datetime:
    """Return the current UTC time as a naive datetime, the way every column stores it."""
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)


class User(UserMixin, Base):
    """A person who owns API keys and workers."""

    __tablename__ = "users"

    id: Mapped[int] = mapped_column(primary_key=True)
    email: Mapped[str] = mapped_column(String(191), unique=True)
    password_hash: Mapped[str] = mapped_column(String(255))
    is_admin: Mapped[bool] = mapped_column(Boolean, default=False)
    priority: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[dt.datetime] = mapped_column(Timestamp, default=utcnow)


class ApiKey(Base):
    """A secret an API client sends as its bearer token; only its hash is kept."""

    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(100), default="")
    prefix: Mapped[str] = mapped_column(String(16))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[dt.datetime] = mapped_column(Timestamp, default=utcnow)
    last_used_at: Mapped[Optional[dt.datetime]] = mapped_column(Timestamp)
    revoked_at: Mapped[Optional[dt.datetime]] = mapped_column(Timestamp)

    user: Mapped[User] = relationship(lazy="joined")


class Worker(Base):
    """A worker identity: one token, the models it last advertised, when it was last seen."""

    __tablename__ = "workers"

    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(100), default="")
    token_prefix: Mapped[str] = mapped_column(String(16))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    shared: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[dt.datetime] = mapped_column(Timestamp, default=utcnow)
    revoked_at: Mapped[Optional[dt.datetime]] = mapped_column(Timestamp)
    last_seen_at: Mapped[Optional[dt.datetime]] = mapped_column(Timestamp, index=True)
    models_json: Mapped[str] = mapped_column(Text, default="[]")
    kind: Mapped[str] = mapped_column(String(32), default="")
    version: Mapped[str] = mapped_column(String(32), default="")
    capacity: Mapped[int] = mapped_column(Integer, default=1)
    jobs_served: Mapped[int] = mapped_column(Integer, default=0)
    jobs_failed: Mapped[int] = mapped_column(Integer, default=0)

    @property
    def models(self) -> list[str]:
        """Return the model ids this worker advertised last."""
        return json.loads(self.models_json or "[]")


class Job(Base):
    """One API request on its way through the queue."""

    __tablename__ = "jobs"
    __table_args__ = (
        # The claim scans queued jobs of one model in rank order.
        Index("ix_jobs_claim", "state", "model", "rank"),
        # The reaper scans running jobs by lease expiry.
        Index("ix_jobs_lease", "state", "lease_expires_at"),
        # ... and jobs past their deadline.
        Index("ix_jobs_deadline", "state", "deadline_at"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    public_id: Mapped[str] = mapped_column(String(64), unique=True)
    kind: Mapped[str] = mapped_column(String(16), default="chat")
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    api_key_id: Mapped[Optional[int]] = mapped_column(
        ForeignKey("api_keys.id", ondelete="SET NULL")
    )
    model: Mapped[str] = mapped_column(String(191))
    state: Mapped[str] = mapped_column(String(16), default="queued")
    priority: Mapped[int] = mapped_column(Integer, default=0)
    # created time in ms minus priority x aging: ascending rank is the dispatch order,
    # so a low-priority job overtakes newer high-priority ones once it has waited enough.
    rank: Mapped[int] = mapped_column(BigInteger)
    stream: Mapped[bool] = mapped_column(Boolean, default=False)
    request_json: Mapped[str] = mapped_column(LongText)
    worker_id: Mapped[Optional[int]] = mapped_column(
        ForeignKey("workers.id", ondelete="SET NULL"), index=True
    )
    lease_token: Mapped[Optional[str]] = mapped_column(String(64))
    lease_expires_at: Mapped[Optional[dt.datetime]] = mapped_column(Timestamp)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_seq: Mapped[int] = mapped_column(Integer, default=0)
    finish_reason: Mapped[Optional[str]] = mapped_column(String(32))
    error_code: Mapped[Optional[str]] = mapped_column(String(64))
    error_message: Mapped[Optional[str]] = mapped_column(Text)
    prompt_tokens: Mapped[Optional[int]] = mapped_column(Integer)
    completion_tokens: Mapped[Optional[int]] = mapped_column(Integer)
    usage_source: Mapped[Optional[str]] = mapped_column(String(16))
    created_at: Mapped[dt.datetime] = mapped_column(Timestamp, default=utcnow)
    claimed_at: Mapped[Optional[dt.datetime]] = mapped_column(Timestamp)
    first_chunk_at: Mapped[Optional[dt.datetime]] = mapped_column(Timestamp)
    finished_at: Mapped[Optional[dt.datetime]] = mapped_column(Timestamp, index=True)
    deadline_at: Mapped[dt.datetime] = mapped_column(Timestamp)

    @property
    def request(self) -> dict[str, Any]:
        """Return the validated request the worker receives."""
        return json.loads(self.request_json)


class Chunk(Base):
    """One delta of a job's answer, numbered by the worker."""

    __tablename__ = "chunks"
    __table_args__ = (UniqueConstraint("job_id", "seq"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    seq: Mapped[int] = mapped_column(Integer)
    delta_json: Mapped[str] = mapped_column(LongText)
    created_at: Mapped[dt.datetime] = mapped_column(Timestamp, default=utcnow)

    @property
    def delta(self) -> dict[str, Any]:
        """Return the delta as the client will see it."""
        return json.loads(self.delta_json)
