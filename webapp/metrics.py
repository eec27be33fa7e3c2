"""GET /metrics for Prometheus: figures read from the database at each scrape, and the token scrapers send.

Every figure comes from the database, never from counters kept in a process: under
Passenger each request may reach a different process, and several nodes share one
database, so only the database gives the same answer to every scrape. A scrape costs a
handful of aggregate queries (jobs, workers, held requests, usage timings, the roll-up)
and loads no rows.
"""
from __future__ import annotations

import hmac
from typing import Any, Iterator, Optional

from flask import Blueprint, Response, abort, current_app, request
from flask_login import current_user
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString
from sqlalchemy import case, func, select

from . import accounts, budget, settings
from .db import db
from .models import NOT_READY, Job, Usage, UsageDaily, Worker, utcnow
from .workers import live_since

bp = Blueprint("metrics", __name__)

TOKEN_PREFIX = "pgm_"
# Histogram bounds in seconds, from a quick first token to JOB_TIMEOUT's 600 s.
BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
UNAUTHORIZED = ("Send the metrics token as 'Authorization: Bearer pgm_...'. An administrator makes one under "
                "Admin > Settings, or with: flask --app webapp metrics-token\n")


@bp.record_once
def _make_registry(state) -> None:
    # One registry per app, never prometheus_client's global one: tests and the bench
    # run several apps in one process, each on its own database.
    registry = CollectorRegistry()
    registry.register(DatabaseCollector())
    state.app.extensions["pollgate.metrics"] = registry


@bp.get("/metrics")
def scrape():
    """Serve the figures to a scraper with the metrics token or to a signed-in administrator; 404 until a token exists."""
    stored = settings.get("metrics_token")
    if not stored:
        abort(404)  # off until an administrator makes a token
    if not (token_matches(stored, request.headers.get("Authorization")) or _signed_in_admin()):
        # Plain text: whoever reads it is setting up a scraper, not a browser.
        return Response(UNAUTHORIZED, 401, mimetype="text/plain",
                        headers={"WWW-Authenticate": 'Bearer realm="pollgate metrics"'})
    # Prometheus asks for OpenMetrics in its Accept header; curl gets the classic text format.
    encode, content_type = choose_encoder(request.headers.get("Accept", ""))
    body = encode(current_app.extensions["pollgate.metrics"])
    return Response(body, 200, content_type=content_type, headers={"Cache-Control": "no-store"})


def _signed_in_admin() -> bool:
    return bool(current_user.is_authenticated and current_user.is_admin)


def token_matches(stored: dict[str, Any], header: Optional[str]) -> bool:
    """Tell whether an Authorization header carries the metrics token whose hash is stored."""
    secret = accounts.bearer_secret(header)
    return secret is not None and hmac.compare_digest(accounts.hash_secret(secret), stored.get("sha256", ""))


def create_token() -> str:
    """Make a new metrics token, replacing any other, and return it: only its SHA-256 is stored."""
    secret = accounts.new_secret(TOKEN_PREFIX)
    settings.save({"metrics_token": {"sha256": accounts.hash_secret(secret), "prefix": secret[:12],
                                     "created_at": utcnow().isoformat(timespec="seconds")}})
    return secret


def revoke_token() -> None:
    """Forget the metrics token, which turns /metrics off (other processes within settings.CACHE_SECONDS)."""
    settings.save({"metrics_token": {}})


class DatabaseCollector(Collector):
    """Read every figure from the database when Prometheus scrapes."""

    def collect(self) -> Iterator[Metric]:
        """Yield the metric families, a few aggregate queries' worth."""
        yield from _jobs()
        yield from _workers()
        yield from _held()
        yield from _timings()
        yield from _usage_counters()


def _jobs() -> list[Metric]:
    """Jobs still in the table by model and state, and each model's queue: depth and oldest job's age."""
    now = utcnow()
    with db.read() as s:
        rows = s.execute(select(Job.model, Job.state, func.count(), func.min(Job.created_at))
                         .group_by(Job.model, Job.state)).all()
    jobs = GaugeMetricFamily("pollgate_jobs", "Jobs in the jobs table (ended ones until purged), by model and state.",
                             labels=["model", "state"])
    depth = GaugeMetricFamily("pollgate_queue_depth", "Jobs waiting for a worker.", labels=["model"])
    age = GaugeMetricFamily("pollgate_queue_oldest_age_seconds", "How long the oldest queued job has waited; "
                            "0 when none waits.", labels=["model"])
    waiting: dict[str, tuple[int, float]] = {}
    for model, state, count, oldest in rows:
        jobs.add_metric([model, state], count)
        if state == "queued":
            waiting[model] = (count, max(0.0, (now - oldest).total_seconds()))
        else:
            # Every model with jobs gets a figure, 0 when none waits, so alerts compare numbers.
            waiting.setdefault(model, (0, 0.0))
    for model, (count, seconds) in sorted(waiting.items()):
        depth.add_metric([model], count)
        age.add_metric([model], seconds)
    return [jobs, depth, age]


def _workers() -> list[Metric]:
    """Workers by the kind and site they last reported: online (live and claiming), and live but not ready."""
    # The rule workers.live_models applies: not revoked, seen lately, not in a NOT_READY state.
    live = func.sum(case((Worker.last_seen_at > live_since(), 1), else_=0))
    with db.read() as s:
        rows = s.execute(select(Worker.kind, Worker.site, Worker.status, live)
                         .where(Worker.revoked_at.is_(None))
                         .group_by(Worker.kind, Worker.site, Worker.status)).all()
    online = GaugeMetricFamily("pollgate_workers_online", "Workers seen within MODEL_LIVE_WINDOW and claiming "
                               "(0 for a kind and site no live worker has now).", labels=["kind", "site"])
    waiting = GaugeMetricFamily("pollgate_workers_not_ready", "Live workers that said they cannot claim now "
                                "(paused, needs_human, error).", labels=["kind", "site", "status"])
    counts: dict[tuple[str, str], int] = {}
    for kind, site, status, live_count in rows:
        live_count = int(live_count or 0)
        if status in NOT_READY:
            if live_count:
                waiting.add_metric([kind, site, status], live_count)
            live_count = 0
        counts[(kind, site)] = counts.get((kind, site), 0) + live_count
    for (kind, site), count in sorted(counts.items()):
        online.add_metric([kind, site], count)
    return [online, waiting]


def _held() -> list[Metric]:
    """Held requests (worker long-polls, open API requests) against their caps, across every process."""
    held = GaugeMetricFamily("pollgate_held_requests", "Held requests now, across every process and node.",
                             labels=["kind"])
    cap = GaugeMetricFamily("pollgate_held_requests_limit", "The admin's cap on held requests (0: no cap).",
                            labels=["kind"])
    for kind, (used, limit) in budget.in_use().items():
        held.add_metric([kind], used)
        cap.add_metric([kind], limit)
    return [held, cap]


def _histogram_sums(column) -> list:
    """Build the count, the sum and one cumulative count per bucket of a milliseconds column, summed in SQL."""
    return [func.count(column), func.coalesce(func.sum(column), 0),
            *(func.sum(case((column <= round(bound * 1000), 1), else_=0)) for bound in BUCKETS)]


def _timings() -> list[Metric]:
    """Histograms of settled requests' time to first token and duration, per model, from the usage rows."""
    width = 2 + len(BUCKETS)
    with db.read() as s:
        rows = s.execute(select(Usage.model, *_histogram_sums(Usage.ttft_ms), *_histogram_sums(Usage.latency_ms))
                         .where(Usage.settled.is_(True)).group_by(Usage.model)).all()
    ttft = HistogramMetricFamily("pollgate_time_to_first_token_seconds", "From admission to the first chunk, "
                                 "for settled requests that got one.", labels=["model"])
    duration = HistogramMetricFamily("pollgate_request_duration_seconds", "From admission to the end, for every "
                                     "settled request.", labels=["model"])
    for model, *figures in rows:
        for family, (count, total, *cumulative) in ((ttft, figures[:width]), (duration, figures[width:])):
            buckets = [(floatToGoString(b), int(n or 0)) for b, n in zip(BUCKETS, cumulative)]
            family.add_metric([model], buckets + [("+Inf", int(count))], float(total) / 1000)
    return [ttft, duration]


def _usage_counters() -> list[Metric]:
    """Requests, tokens and cost per model, from the daily roll-up."""
    # The roll-up, not the usage rows: settlement adds each request to its day's roll-up
    # row in the transaction that marks the usage row settled, so the roll-up already holds
    # every settled request, and it grows per day, user, key and model, not per request.
    # Settled figures never change afterwards, so the sums only grow, as a counter must;
    # unsettled rows carry admission's estimate, which settlement may lower, so they are
    # left out. Purging ends jobs and chunks, never usage. Only deleting a user, or the
    # nightly roll-up repairing a day that had drifted, can lower a sum: Prometheus reads
    # that as a counter reset.
    with db.read() as s:
        rows = s.execute(select(UsageDaily.model, func.sum(UsageDaily.requests), func.sum(UsageDaily.errors),
                                func.sum(UsageDaily.prompt_tokens), func.sum(UsageDaily.completion_tokens),
                                func.sum(UsageDaily.cost_nanos))
                         .group_by(UsageDaily.model)).all()
    requests = CounterMetricFamily("pollgate_requests", "Settled API requests.", labels=["model"])
    errors = CounterMetricFamily("pollgate_request_errors", "Settled API requests that did not complete.",
                                 labels=["model"])
    tokens = CounterMetricFamily("pollgate_tokens", "Tokens of settled requests, as billed.", labels=["model", "type"])
    cost = CounterMetricFamily("pollgate_cost_dollars", "Cost of settled requests at the admin's prices.",
                               labels=["model"])
    for model, count, failed, prompt, completion, nanos in rows:
        requests.add_metric([model], int(count or 0))
        errors.add_metric([model], int(failed or 0))
        tokens.add_metric([model, "prompt"], int(prompt or 0))
        tokens.add_metric([model, "completion"], int(completion or 0))
        cost.add_metric([model], int(nanos or 0) / 1e9)
    return [requests, errors, tokens, cost]
