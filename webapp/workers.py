"""Worker liveness and status: what each worker advertises, whether it is live, and how it reads on a page.

One rule decides whether a worker serves requests: not revoked, seen within
MODEL_LIVE_WINDOW, and not in a NOT_READY state. `live_models` applies it in SQL for the
API, metrics.py for its worker counts; `worker_state` applies it in Python for the pages.
"""
from __future__ import annotations

import datetime as dt
import json
import logging
from typing import Any, Sequence

from flask import current_app, request, url_for
from sqlalchemy import select, update

from . import settings
from .db import db
from .models import NOT_READY, Worker, epoch, utcnow

log = logging.getLogger(__name__)

# A busy worker reports instead of polling; recording each report's time would be a write
# per report, so last_seen_at moves in steps of this much.
SEEN_GRANULARITY = dt.timedelta(seconds=10)
TOUCH_GRANULARITY = dt.timedelta(seconds=1)


def gateway_url() -> str:
    """Return the URL workers reach this gateway at: the configured SITE_URL, else this request's."""
    site = current_app.config.get("SITE_URL")
    if site:
        return site
    if not current_app.testing and not current_app.extensions.get("pollgate.warned_site_url"):
        current_app.extensions["pollgate.warned_site_url"] = True
        log.warning("SITE_URL is not set, so links follow the request's Host header; set SITE_URL")
    return request.url_root.rstrip("/")


def public_url(endpoint: str, **values: Any) -> str:
    """Return an absolute link to one of the app's pages, under the configured site URL."""
    path = url_for(endpoint, **values)
    # url_for includes the mount point (Passenger's /api), which SITE_URL already ends with.
    return gateway_url() + path[len(request.script_root):]


def live_since() -> dt.datetime:
    """Return the moment a worker must have been seen after to count as live."""
    return utcnow() - dt.timedelta(seconds=current_app.config["MODEL_LIVE_WINDOW"])


def touch_worker(worker: Worker, models: Sequence[str], capacity: int, kind: str, version: str,
                 image_models: Sequence[str] = (), site: str = "", features: Sequence[str] = ()) -> None:
    """Record what a worker advertises and that it is alive and ready (it is claiming)."""
    now = utcnow()
    values = {
        "models_json": json.dumps(list(models)),
        "image_models_json": json.dumps(list(image_models)),
        "capacity": capacity,
        "kind": kind,
        "version": version,
        "site": site,
        "features_json": json.dumps(list(features)),
        "status": "ready",
        "status_message": "",
    }
    # A busy worker claims again the moment it finishes a job: the row it was read from
    # already says all this, and the liveness window (MODEL_LIVE_WINDOW) is far longer.
    fresh = worker.last_seen_at is not None and now - worker.last_seen_at < TOUCH_GRANULARITY
    if fresh and all(getattr(worker, name) == value for name, value in values.items()):
        return
    with db.begin() as s:
        s.execute(update(Worker).where(Worker.id == worker.id).values(last_seen_at=now, **values))


def set_worker_status(worker_id: int, status: str, message: str) -> None:
    """Record a worker that is not claiming and why: paused, or waiting for a person."""
    with db.begin() as s:
        s.execute(update(Worker).where(Worker.id == worker_id)
                  .values(last_seen_at=utcnow(), status=status, status_message=message[:255]))


def mark_seen(worker: Worker) -> None:
    """Keep a busy worker's models listed while it reports instead of polling."""
    now = utcnow()
    if worker.last_seen_at is None or now - worker.last_seen_at > SEEN_GRANULARITY:
        with db.begin() as s:
            s.execute(update(Worker).where(Worker.id == worker.id).values(last_seen_at=now))


def live_workers(user_id: int) -> list[Worker]:
    """Return the live, ready workers this user's requests may go to: their own and the shared ones."""
    with db.read() as s:
        return list(s.scalars(
            select(Worker).where(
                Worker.revoked_at.is_(None),
                Worker.last_seen_at > live_since(),
                Worker.status.notin_(NOT_READY),
                (Worker.user_id == user_id) | Worker.shared,
            )
        ).all())


def live_models(user_id: int, kind: str = "chat") -> dict[str, int]:
    """Map each model of this kind ("chat", "image" or "any") that a live, ready worker visible
    to this user advertises to when it was first seen."""
    return offered_models(live_workers(user_id), kind)


def offered_models(workers: Sequence[Worker], kind: str = "chat") -> dict[str, int]:
    """Map each model of this kind that these workers advertise, and each alias of one, to when it was first seen."""
    models: dict[str, int] = {}
    for worker in workers:
        offered = {"chat": worker.models, "image": worker.image_models}.get(kind, worker.models + worker.image_models)
        for model in offered:
            models[model] = min(models.get(model, epoch(worker.created_at)), epoch(worker.created_at))
    # An alias is live while the model it names is.
    for alias, target in settings.aliases().items():
        if target in models:
            models.setdefault(alias, models[target])
    return models


def worker_state(worker: Worker, running: int) -> str:
    """Describe a worker in a few words: revoked, offline, paused or needing a human (and why), busy (n), online."""
    if worker.revoked_at is not None:
        return "revoked"
    if worker.last_seen_at is None or worker.last_seen_at <= live_since():
        return "offline"
    if worker.status in NOT_READY:
        # A browser worker said why it is not claiming; the person who can act should read it.
        label = worker.status.replace("needs_human", "needs a human")
        return f"{label}: {worker.status_message}" if worker.status_message else label
    return f"busy ({running} running)" if running else "online"
