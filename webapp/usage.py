"""Usage accounting: each request's usage row from its admission to its settlement, and the daily roll-ups."""
from __future__ import annotations

import datetime as dt
from typing import Any, Iterable, Optional

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from . import budget, events, limits, token_count
from .db import db, retrying, upsert_add
from .models import TERMINAL, Chunk, Job, ModelPrice, Usage, UsageDaily, utcnow

COUNTERS = ("requests", "errors", "prompt_tokens", "completion_tokens", "cost_nanos", "latency_ms")


def job_tokens(job: Job, deltas: Iterable[dict[str, Any]]) -> tuple[int, int, str]:
    """Return (prompt, completion, source): the worker's own counts, else tiktoken's."""
    if job.usage_source == "worker" and job.prompt_tokens is not None and job.completion_tokens is not None:
        return job.prompt_tokens, job.completion_tokens, "worker"
    if job.kind == "image":
        return token_count.count_text(job.request["prompt"]), 0, "tiktoken"
    return token_count.count_prompt(job.request["messages"]), token_count.count_completion(deltas), "tiktoken"


def cost_nanos(price: Optional[ModelPrice], prompt: int, completion: int) -> int:
    """Price a request in 1e-9 dollars (prices are micro-dollars per million tokens)."""
    if price is None:
        return 0
    return (prompt * price.prompt_micros_per_m + completion * price.completion_micros_per_m) // 1000


def _ms(start: Optional[dt.datetime], end: Optional[dt.datetime]) -> Optional[int]:
    return int((end - start).total_seconds() * 1000) if start and end else None


def open_row(s: Session, job: Job, api_key_id: Optional[int], prompt_tokens: int, now: dt.datetime) -> None:
    """Inside the submit transaction, after the job: add the request's usage row and count it in the rate windows."""
    s.add(Usage(
        job=job, request_id=job.public_id, user_id=job.user_id, api_key_id=api_key_id, model=job.model,
        stream=job.stream, status="queued", prompt_tokens=prompt_tokens, created_at=now,
    ))
    limits.record(s, job.user_id, api_key_id, now, 1, prompt_tokens)


@retrying
def settle(job_id: int, deltas: Optional[list[dict[str, Any]]] = None, counted: bool = True,
           hold: Optional[int] = None) -> bool:
    """Account a finished job once: final tokens, cost and timings, and the daily roll-up.

    Pass `deltas` when the caller relayed every chunk of the ended job, to skip reading
    them back. With `counted=False` the answer is not counted at all, only what admission
    counted: the way to set aside a job whose answer cannot be read. `hold`, the request's
    held-request slot, is given back in the same transaction, saving the request one more.
    """
    with db.begin() as s:
        settled = _settle(s, job_id, deltas, counted)
        budget.drop(s, hold)
    return settled


def _settle(s: Session, job_id: int, deltas: Optional[list[dict[str, Any]]], counted: bool) -> bool:
    """Settle one job's usage row inside the caller's transaction; return False when there was nothing to do."""
    job = s.get(Job, job_id)
    if job is None or job.state not in TERMINAL:
        return False
    # The row lock (and `settled`) make a second settler, in any process, a no-op.
    usage = s.scalar(select(Usage).where(Usage.job_id == job_id).with_for_update())
    if usage is None or usage.settled:
        return False
    if not counted:
        prompt, completion, source = usage.prompt_tokens, 0, "admission"
    else:
        if deltas is None or len(deltas) != job.next_seq:
            deltas = [c.delta for c in s.scalars(select(Chunk).where(Chunk.job_id == job_id).order_by(Chunk.seq))]
        prompt, completion, source = job_tokens(job, deltas)
    # Token windows counted the prompt at admission; what changed since is added last.
    tokens_since = prompt + completion - usage.prompt_tokens - usage.completion_tokens
    price = s.scalar(select(ModelPrice).where(ModelPrice.model == usage.model))
    usage.status = job.state
    usage.error_code = job.error_code
    usage.worker_id = job.worker_id
    usage.prompt_tokens, usage.completion_tokens, usage.usage_source = prompt, completion, source
    usage.cost_nanos = cost_nanos(price, prompt, completion)
    usage.finished_at = job.finished_at or utcnow()
    usage.latency_ms = _ms(job.created_at, usage.finished_at)
    usage.ttft_ms = _ms(job.created_at, job.first_chunk_at)
    usage.settled = True
    # The roll-up row, then the rate buckets: the rows every request of the user shares
    # come last, in admission's order, so their locks are held until a commit that is one
    # round trip away. The roll-up row's foreign key takes a shared lock on the user (a
    # new row only), before any bucket, so this never waits on a capped admission while
    # holding a bucket it wants.
    _add_to_daily(s, usage)
    limits.record(s, usage.user_id, usage.api_key_id, usage.created_at, 0, tokens_since)
    return True


def settle_pending(limit: int = 200) -> int:
    """Settle usage rows whose job ended but whose request never did (cron, lazily), each on its own."""
    with db.read() as s:
        ids = s.scalars(
            select(Usage.job_id)
            .join(Job, Job.id == Usage.job_id)
            .where(Usage.settled.is_(False), Job.state.in_(TERMINAL))
            .order_by(Usage.job_id)
            .limit(limit)
        ).all()
    done = 0
    for job_id in ids:
        settled = events.contain("settle", f"job {job_id}", settle, job_id)
        if settled is None:
            # Its answer cannot be counted: settle it on what admission counted, so it
            # stops coming back here and its job can be purged.
            settled = events.contain("settle aside", f"job {job_id}", settle, job_id, None, False)
        done += bool(settled)
    return done


def _add_to_daily(s: Session, usage: Usage) -> None:
    """Add one settled request to its day's roll-up row, creating the row if needed."""
    row = {
        "day": usage.created_at.date(),
        "user_id": usage.user_id,
        "api_key_id": usage.api_key_id or 0,
        "model": usage.model,
        "requests": 1,
        "errors": int(usage.status != "completed"),
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "cost_nanos": usage.cost_nanos,
        "latency_ms": usage.latency_ms or 0,
    }
    upsert_add(s, UsageDaily.__table__, [row], ("day", "user_id", "api_key_id", "model"), COUNTERS)


def summary(user_id: int, start: dt.date, end: dt.date) -> dict[str, Any]:
    """Sum a user's settled usage per day and per model over [start, end]."""
    with db.read() as s:
        rows = s.execute(
            select(
                UsageDaily.day, UsageDaily.model,
                *(func.sum(getattr(UsageDaily, c)) for c in COUNTERS),
            )
            .where(UsageDaily.user_id == user_id, UsageDaily.day >= start, UsageDaily.day <= end)
            .group_by(UsageDaily.day, UsageDaily.model)
            .order_by(UsageDaily.day, UsageDaily.model)
        ).all()
    totals = dict.fromkeys(COUNTERS, 0)
    by_model: dict[str, dict[str, int]] = {}
    daily: dict[str, dict[str, int]] = {}
    daily_by_model: dict[str, dict[str, dict[str, int]]] = {}
    for day, model, *values in rows:
        figures = dict(zip(COUNTERS, (int(v or 0) for v in values)))
        daily_by_model.setdefault(day.isoformat(), {})[model] = figures
        for bucket in (totals, by_model.setdefault(model, dict.fromkeys(COUNTERS, 0)),
                       daily.setdefault(day.isoformat(), dict.fromkeys(COUNTERS, 0))):
            for name, value in figures.items():
                bucket[name] += value
    return {"totals": totals, "by_model": by_model, "daily": daily, "daily_by_model": daily_by_model}
