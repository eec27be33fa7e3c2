"""Provider routing: which workers may serve a request, from its X-Provider, X-Target-Domain and
X-Session-Name headers, and which one did.

A worker answers to its kind (`pollclient`; `userscript` and `userscript/lmarena` for
`userscript/lmarena`) and to the site it reports (`arena.ai`, `local`). A job names one
provider ("" for `auto`: any worker) and may be pinned to one of its user's workers; the
claim (jobs.claim_jobs) checks both. docs/worker-protocol.md, "Provider matching".
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Optional, Sequence
from urllib.parse import quote

from flask import Response, current_app, request
from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError

from . import features, workers
from .db import db
from .errors import ApiError
from .models import Job, Worker

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Route:
    """Where a request may go: a provider ("" for any) and maybe one pinned worker."""

    provider: str = ""
    worker_id: Optional[int] = None
    # The live workers it may go to; None for auto, which any visible worker serves.
    workers: Optional[tuple[Worker, ...]] = None


AUTO = Route()


def provider_names(kind: str, site: str) -> list[str]:
    """Return the provider names a worker reporting this kind and site answers to, lower case."""
    kind, site = kind.strip().lower(), site.strip().lower()
    return sorted({kind, kind.split("/")[0], site} - {""})


def _asked() -> tuple[str, str]:
    """Read the provider and the worker name this request asks for ("" when it asks for none)."""
    provider = request.headers.get("X-Provider", "").strip().lower()
    domain = request.headers.get("X-Target-Domain", "").strip().lower()
    if provider in ("", "auto"):
        provider = domain  # X-Target-Domain names a site, which is a provider too
    elif domain and domain != provider:
        raise ApiError(400, f"X-Provider ('{_shown(provider)}') and X-Target-Domain ('{_shown(domain)}') name "
                       "different providers; send one of them.", code="invalid_provider", param="X-Target-Domain")
    return provider, request.headers.get("X-Session-Name", "").strip()


def from_request(user_id: int) -> Route:
    """Return the route this request's headers ask for, or raise 400 (unknown provider) / 404 (no such worker)."""
    provider, name = _asked()
    if not provider and not name:
        return AUTO  # the common case reads nothing more
    live = workers.live_workers(user_id)
    if provider:
        live = [w for w in live if provider in provider_names(w.kind, w.site)]
        if not live:
            raise unknown_provider(provider, workers.live_workers(user_id))
    if not name:
        return Route(provider, None, tuple(live))
    # Pinning is for the caller's own workers: a shared worker's name is its owner's business.
    mine = [w for w in live if w.user_id == user_id and w.name == name]
    if not mine:
        where = f" for provider '{_shown(provider)}'" if provider else ""
        raise ApiError(404, f"None of your live workers{where} is named '{_shown(name)}'.",
                       code="worker_not_found", param="X-Session-Name")
    # Names need not be unique: the one heard from last is the likeliest to be there.
    pinned = max(mine, key=lambda w: (w.last_seen_at, w.id))
    return Route(provider, pinned.id, (pinned,))


def unknown_provider(provider: str, live: Sequence[Worker]) -> ApiError:
    """Build the 400 for a provider no live worker answers to, listing those that do."""
    names = sorted({n for w in live for n in provider_names(w.kind, w.site)})
    return ApiError(400, f"Unknown provider '{_shown(provider)}'. Providers live for you now: "
                    f"{', '.join(['auto', *names])}.", code="invalid_provider", param="X-Provider")


def live_models(user_id: int, kind: str, route: Route = AUTO) -> dict[str, int]:
    """Map the models of this kind that the route's live workers advertise to when they were first seen."""
    if route.workers is None:
        return workers.live_models(user_id, kind)
    return workers.offered_models(route.workers, kind)


def require_features(user_id: int, model: str, request: dict[str, Any], route: Route = AUTO) -> None:
    """Raise a 400 unless a live worker on this route serves the model with every feature the request needs."""
    needed = features.needed(request)
    if not needed:
        return  # the common case reads nothing more
    live = workers.live_workers(user_id) if route.workers is None else route.workers
    if any(model in w.models and set(needed) <= set(w.features) for w in live):
        return
    # Name a feature no worker of the model has; with several, each may have one but none all.
    missing = next((f for f in needed if not any(model in w.models and f in w.features for w in live)), needed[0])
    raise ApiError(400, f"No live worker for model '{_shown(model)}' relays {features.KNOWN[missing]} "
                   f"({missing}); ask without {missing}, or run a worker that does (the pollclient's openai "
                   "backend does).", code="unsupported_parameter", param=missing)


# How long a process trusts what it read of a worker for these headers: a worker's name,
# kind and site change only when it is recreated or its claims say otherwise. Reading the
# row for every answer cost each request a round trip (bench: 3.7 more questions per request).
LABEL_SECONDS = 30.0


def served_headers(job: Job) -> dict[str, str]:
    """Return the x-pollgate-provider and x-pollgate-worker headers naming the worker that took the job."""
    if job.worker_id is None:
        return {}
    labels = current_app.extensions.setdefault("pollgate.worker_labels", {})
    now = time.monotonic()
    cached = labels.get(job.worker_id)
    if cached is None or now - cached[0] >= LABEL_SECONDS:
        try:
            with db.read() as s:
                found = s.execute(select(Worker.name, Worker.site, Worker.kind)
                                  .where(Worker.id == job.worker_id)).first()
        except SQLAlchemyError:
            # Only informative: a database blip must not turn an answer already made into an error.
            log.warning("job %s: could not read its worker for the x-pollgate headers", job.id, exc_info=True)
            return {}
        if found is None:
            return {}
        if len(labels) > 1000:
            labels.clear()  # workers come and go: keep the cache from growing without end
        cached = labels[job.worker_id] = (now, tuple(found))
    name, site, kind = cached[1]
    headers = {"x-pollgate-worker": _header(name)}
    if site or kind:
        headers["x-pollgate-provider"] = _header(site or kind)
    return headers


def tag(response: Response, job: Job) -> Response:
    """Put the serving worker's headers on a finished answer."""
    response.headers.update(served_headers(job))
    return response


def _header(value: str) -> str:
    # HTTP header values are Latin-1 on the wire: a name in another script goes percent-encoded.
    return value if value.isascii() and value.isprintable() else quote(value, safe="")


def _shown(value: str) -> str:
    # Echoed back in an error message: enough to recognise, never a page of it.
    return value[:100]
