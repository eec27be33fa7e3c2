"""Typed models, one class per table.

Accounts: tiers, users, api_keys, invites. The queue: workers, jobs, chunks,
held_requests. Accounting: usage, usage_daily, rate_buckets, model_prices. The admin's:
settings, model_aliases, events (the system log), signin_throttle.
"""
from __future__ import annotations

import datetime as dt
import json
from typing import Any, Optional

from flask_login import UserMixin
from sqlalchemy import (
    BigInteger,
    Boolean,
    Date,
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


def epoch(moment: dt.datetime) -> int:
    """Return a naive-UTC datetime as Unix seconds."""
    return int(moment.replace(tzinfo=dt.timezone.utc).timestamp())


# Job states after which nothing more happens to a job.
TERMINAL = ("completed", "failed", "cancelled", "expired")
# Worker states a worker reports when it cannot take jobs now; claiming again means ready.
NOT_READY = ("paused", "needs_human", "error")

# The sliding windows every limit is counted over, in seconds.
WINDOWS = {"minute": 60, "hour": 3600, "day": 86400}


class LimitColumns:
    """Request and token caps per sliding window; None means no cap."""

    requests_per_minute: Mapped[Optional[int]] = mapped_column(Integer)
    requests_per_hour: Mapped[Optional[int]] = mapped_column(Integer)
    requests_per_day: Mapped[Optional[int]] = mapped_column(Integer)
    tokens_per_minute: Mapped[Optional[int]] = mapped_column(Integer)
    tokens_per_hour: Mapped[Optional[int]] = mapped_column(Integer)
    tokens_per_day: Mapped[Optional[int]] = mapped_column(Integer)

    def limit(self, what: str, window: str) -> Optional[int]:
        """Return the cap on requests or tokens for one window."""
        return getattr(self, f"{what}_per_{window}")


class Tier(LimitColumns, Base):
    """A named set of limits and a queue priority that users are put in."""

    __tablename__ = "tiers"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    priority: Mapped[int] = mapped_column(Integer, default=0)
    max_concurrent: Mapped[Optional[int]] = mapped_column(Integer)


class User(UserMixin, Base):
    """A person who owns API keys and workers."""

    __tablename__ = "users"

    id: Mapped[int] = mapped_column(primary_key=True)
    email: Mapped[str] = mapped_column(String(191), unique=True)
    password_hash: Mapped[str] = mapped_column(String(255))
    is_admin: Mapped[bool] = mapped_column(Boolean, default=False)
    priority: Mapped[int] = mapped_column(Integer, default=0)
    # None: the tier named DEFAULT_TIER, so new users need no tier picked.
    tier_id: Mapped[Optional[int]] = mapped_column(ForeignKey("tiers.id", ondelete="SET NULL"))
    created_at: Mapped[dt.datetime] = mapped_column(Timestamp, default=utcnow)
    # Part of the session cookie's user id: signing out or changing the password bumps it,
    # so every cookie issued before stops working.
    session_gen: Mapped[int] = mapped_column(Integer, default=0, server_default="0")

    def get_id(self) -> str:
        """Return the id Flask-Login keeps in the session: user id and session generation."""
        return f"{self.id}:{self.session_gen}"


class ApiKey(LimitColumns, Base):
    """A secret an API client sends as its bearer token; only its hash is kept.

    Its limit columns, when set, cap this key on top of its user's tier.
    """

    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(100), default="")
    prefix: Mapped[str] = mapped_column(String(16))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[dt.datetime] = mapped_column(Timestamp, default=utcnow)
    last_used_at: Mapped[Optional[dt.datetime]] = mapped_column(Timestamp)
    revoked_at: Mapped[Optional[dt.datetime]] = mapped_column(Timestamp)
    expires_at: Mapped[Optional[dt.datetime]] = mapped_column(Timestamp)
    # A JSON list of the model ids this key may use; None allows every model.
    allowed_models_json: Mapped[Optional[str]] = mapped_column(Text)
    # Tavern mode: merge the system messages of this key's requests (see tavern.py).
    tavern: Mapped[bool] = mapped_column(Boolean, default=False, server_default="0")

    user: Mapped[User] = relationship(lazy="joined")

    @property
    def allowed_models(self) -> Optional[list[str]]:
        """Return the models this key may use, or None for all."""
        return json.loads(self.allowed_models_json) if self.allowed_models_json else None


class Worker(Base):
    """A worker identity: one token, the models it last advertised, when it was last seen."""

    __tablename__ = "workers"

    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(100), default="")
    token_prefix: Mapped[str] = mapped_column(String(16))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    shared: Mapped[bool] = mapped_column(Boolean, default=False)
    # A shared worker reads every user's prompts and reports their token counts: the
    # admin who trusted it that far is on record. No foreign key: adding one rebuilds the
    # table on SQLite, and the record outlives the admin's account.
    shared_by: Mapped[Optional[int]] = mapped_column(Integer)
    shared_at: Mapped[Optional[dt.datetime]] = mapped_column(Timestamp)
    created_at: Mapped[dt.datetime] = mapped_column(Timestamp, default=utcnow)
    revoked_at: Mapped[Optional[dt.datetime]] = mapped_column(Timestamp)
    last_seen_at: Mapped[Optional[dt.datetime]] = mapped_column(Timestamp, index=True)
    models_json: Mapped[str] = mapped_column(Text, default="[]")
    kind: Mapped[str] = mapped_column(String(32), default="")
    version: Mapped[str] = mapped_column(String(32), default="")
    capacity: Mapped[int] = mapped_column(Integer, default=1)
    jobs_served: Mapped[int] = mapped_column(Integer, default=0)
    jobs_failed: Mapped[int] = mapped_column(Integer, default=0)
    image_models_json: Mapped[Optional[str]] = mapped_column(Text)
    # What a browser worker reports of itself: the site its tab is on, and "ready",
    # "paused" or "needs_human" with a line for the person who can act on it.
    site: Mapped[str] = mapped_column(String(191), default="", server_default="")
    status: Mapped[str] = mapped_column(String(32), default="", server_default="")
    status_message: Mapped[str] = mapped_column(String(255), default="", server_default="")
    # The optional features it said it relays (webapp/features.py), e.g. ["logprobs"].
    features_json: Mapped[Optional[str]] = mapped_column(Text)

    @property
    def models(self) -> list[str]:
        """Return the chat model ids this worker advertised last."""
        return json.loads(self.models_json or "[]")

    @property
    def image_models(self) -> list[str]:
        """Return the image model ids this worker advertised last."""
        return json.loads(self.image_models_json or "[]")

    @property
    def features(self) -> list[str]:
        """Return the optional features this worker declared last."""
        return json.loads(self.features_json or "[]")


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
        # ... and jobs whose reader stopped renewing its hold.
        Index("ix_jobs_reader", "state", "reader_expires_at"),
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
    # Bytes of answer stored so far, so a worker cannot fill the host's disk quota.
    output_bytes: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
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
    # The API request relaying this job renews this while it is alive (HOLD_RENEW); once it
    # lapses nobody will read the answer (the process died), so the reaper cancels the job.
    reader_expires_at: Mapped[Optional[dt.datetime]] = mapped_column(Timestamp)
    # Which workers may claim it (webapp/routing.py): those answering to this provider, "" for
    # any; and, when set, only this one worker of the caller's. No foreign key: adding one
    # rebuilds the table on SQLite, and a pin to a deleted worker just leaves the job unclaimed.
    provider: Mapped[str] = mapped_column(String(191), default="", server_default="")
    pinned_worker_id: Mapped[Optional[int]] = mapped_column(Integer)
    # The worker features the request needs (webapp/features.py: "logprobs"), space-separated;
    # "" for none. Only a worker that declared them all may claim the job.
    needs: Mapped[str] = mapped_column(String(191), default="", server_default="")

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


class Usage(Base):
    """One row per admitted API request: who, which model and worker, tokens, cost, timings.

    It carries no content, so it outlives the job's prompt and answer.
    """

    __tablename__ = "usage"
    __table_args__ = (
        # Rate limits and the dashboard count a user's or a key's rows in a time range.
        Index("ix_usage_user_time", "user_id", "created_at"),
        Index("ix_usage_key_time", "api_key_id", "created_at"),
        # Settlement finds rows whose job ended but were not accounted yet.
        Index("ix_usage_settled", "settled", "created_at"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    job_id: Mapped[Optional[int]] = mapped_column(ForeignKey("jobs.id", ondelete="SET NULL"), unique=True)
    request_id: Mapped[str] = mapped_column(String(64))
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    api_key_id: Mapped[Optional[int]] = mapped_column(ForeignKey("api_keys.id", ondelete="SET NULL"))
    worker_id: Mapped[Optional[int]] = mapped_column(ForeignKey("workers.id", ondelete="SET NULL"))
    model: Mapped[str] = mapped_column(String(191))
    stream: Mapped[bool] = mapped_column(Boolean, default=False)
    status: Mapped[str] = mapped_column(String(16), default="queued")
    error_code: Mapped[Optional[str]] = mapped_column(String(64))
    # Counted at admission from the prompt, replaced by the final figures at settlement,
    # so token limits see a request's prompt while it runs.
    prompt_tokens: Mapped[int] = mapped_column(Integer, default=0)
    completion_tokens: Mapped[int] = mapped_column(Integer, default=0)
    usage_source: Mapped[Optional[str]] = mapped_column(String(16))
    cost_nanos: Mapped[int] = mapped_column(BigInteger, default=0)  # 1e-9 dollars: exact sums
    latency_ms: Mapped[Optional[int]] = mapped_column(Integer)
    ttft_ms: Mapped[Optional[int]] = mapped_column(Integer)
    settled: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[dt.datetime] = mapped_column(Timestamp, default=utcnow)
    finished_at: Mapped[Optional[dt.datetime]] = mapped_column(Timestamp)

    job: Mapped[Optional[Job]] = relationship()


class UsageDaily(Base):
    """Usage summed per day, user, key and model, kept up to date as requests settle."""

    __tablename__ = "usage_daily"
    __table_args__ = (UniqueConstraint("day", "user_id", "api_key_id", "model"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    day: Mapped[dt.date] = mapped_column(Date)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    # 0, not NULL, for requests whose key is gone: NULLs never collide in a unique key.
    api_key_id: Mapped[int] = mapped_column(Integer, default=0)
    model: Mapped[str] = mapped_column(String(191))
    requests: Mapped[int] = mapped_column(Integer, default=0)
    errors: Mapped[int] = mapped_column(Integer, default=0)
    prompt_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    completion_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    cost_nanos: Mapped[int] = mapped_column(BigInteger, default=0)
    latency_ms: Mapped[int] = mapped_column(BigInteger, default=0)  # sum, for averages


class RateBucket(Base):
    """Requests and tokens of one user or one key in one minute, so windows sum minutes, not rows."""

    __tablename__ = "rate_buckets"

    # The key is the primary key, so InnoDB stores a subject's minutes side by side and a
    # day window reads one contiguous range.
    subject: Mapped[str] = mapped_column(String(1), primary_key=True)  # "u" a user, "k" an API key
    subject_id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    minute: Mapped[dt.datetime] = mapped_column(DateTime, primary_key=True)
    requests: Mapped[int] = mapped_column(Integer, default=0)
    tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    # The minute's first use, so a 429's Retry-After is exact, not a minute early or late.
    first_at: Mapped[dt.datetime] = mapped_column(Timestamp)


class ModelPrice(Base):
    """What a model costs, in micro-dollars per million tokens."""

    __tablename__ = "model_prices"

    id: Mapped[int] = mapped_column(primary_key=True)
    model: Mapped[str] = mapped_column(String(191), unique=True)
    prompt_micros_per_m: Mapped[int] = mapped_column(BigInteger, default=0)
    completion_micros_per_m: Mapped[int] = mapped_column(BigInteger, default=0)


class Event(Base):
    """A notable event for the admin's system log: a sign-in failure, a lost worker, a 429."""

    __tablename__ = "events"
    __table_args__ = (Index("ix_events_kind_time", "kind", "created_at"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    kind: Mapped[str] = mapped_column(String(32))
    # What the event is about, e.g. the email a failed sign-in tried; never a secret.
    subject: Mapped[str] = mapped_column(String(191), default="")
    user_id: Mapped[Optional[int]] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"))
    message: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[dt.datetime] = mapped_column(Timestamp, default=utcnow)


class Setting(Base):
    """One admin setting (public sign-up, retention, held-request budget), stored as JSON."""

    __tablename__ = "settings"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    value_json: Mapped[str] = mapped_column(Text)


class Invite(Base):
    """A one-time sign-up link an admin made; only the token's hash is kept."""

    __tablename__ = "invites"

    id: Mapped[int] = mapped_column(primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    email: Mapped[str] = mapped_column(String(191), default="")  # empty: any address
    tier_id: Mapped[Optional[int]] = mapped_column(ForeignKey("tiers.id", ondelete="SET NULL"))
    created_by: Mapped[Optional[int]] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"))
    created_at: Mapped[dt.datetime] = mapped_column(Timestamp, default=utcnow)
    expires_at: Mapped[dt.datetime] = mapped_column(Timestamp)
    used_at: Mapped[Optional[dt.datetime]] = mapped_column(Timestamp)
    used_by: Mapped[Optional[int]] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"))


class ModelAlias(Base):
    """A public model name that API callers use for a model workers advertise."""

    __tablename__ = "model_aliases"

    id: Mapped[int] = mapped_column(primary_key=True)
    alias: Mapped[str] = mapped_column(String(191), unique=True)
    target: Mapped[str] = mapped_column(String(191))


class SigninThrottle(Base):
    """Failed sign-ins in the current window of one client address, or of one (email, address) pair."""

    __tablename__ = "signin_throttle"

    # sha256 of "ip:<address>" or "pair:<email> <address>": fixed length, and the table
    # holds no email addresses.
    key_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    failures: Mapped[int] = mapped_column(Integer, default=0)
    window_start: Mapped[dt.datetime] = mapped_column(Timestamp, index=True)


class HeldRequest(Base):
    """One open long-poll or API request, counted against the held-request budget."""

    __tablename__ = "held_requests"
    __table_args__ = (Index("ix_held_kind_expiry", "kind", "expires_at"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))  # "long_polls" or "streams"
    # Whose request it is, for the fair share; no foreign key, so taking a slot never
    # waits on a lock on the user's row.
    user_id: Mapped[Optional[int]] = mapped_column(Integer)
    # A process that dies mid-request never releases its slot; the slot lapses here instead.
    expires_at: Mapped[dt.datetime] = mapped_column(Timestamp)
    created_at: Mapped[dt.datetime] = mapped_column(Timestamp, default=utcnow)
