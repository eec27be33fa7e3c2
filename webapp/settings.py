"""Admin settings kept in the database, so every process and node sees the same values."""
from __future__ import annotations

import json
import threading
import time
from typing import Any

from flask import current_app
from sqlalchemy import select

from .db import db
from .models import ModelAlias, Setting

# Each setting's default, 0 meaning no cap: a fresh install lets nobody sign up, keeps
# prompts and answers for a day, and holds at most 4 + 10 requests open, which leaves 6
# of a typical shared-hosting account's 20 entry processes (CloudLinux's EP default) for
# pages, cron and SSH; see docs/deploy.md.
DEFAULTS: dict[str, Any] = {
    "public_signup": False,
    "retention_hours": 24,
    "max_long_polls": 4,
    "max_streams": 10,
    # Caps that keep one account from flooding the admin's pages and the host's disk
    # quota: 100 worker tokens made /admin/ 2.5 MB, and one job stored 57 MB of answer
    # in under a second. A base64 1024x1024 PNG is about 2 MB.
    "max_api_keys_per_user": 25,
    "max_worker_tokens_per_user": 25,
    "max_answer_mb": 16,
    # The most choices (`n`) one chat request may ask for: each is a job and a request
    # against the rate limits, all held by one process until the last is relayed.
    "max_choices": 8,
    # Web pages whose scripts may call /v1/* (see cors.py); none until an administrator says.
    "cors_origins": [],
    # The token Prometheus scrapes /metrics with: its SHA-256, a prefix to recognise it by,
    # and when it was made; empty, /metrics is off (see metrics.py).
    "metrics_token": {},
}
# Other processes pick up a change within this many seconds; the changing one at once.
CACHE_SECONDS = 5.0

_lock = threading.Lock()


def _cache() -> dict[str, tuple[float, Any]]:
    # Per app, not per module: tests and the bench run several apps in one process.
    return current_app.extensions.setdefault("pollgate.settings", {})


def _cached(name: str, load):
    now = time.monotonic()
    cache = _cache()
    with _lock:
        hit = cache.get(name)
    if hit and now - hit[0] < CACHE_SECONDS:
        return hit[1]
    value = load()
    with _lock:
        cache[name] = (now, value)
    return value


def all_settings() -> dict[str, Any]:
    """Return every setting, stored values over defaults."""
    def load():
        with db.read() as s:
            stored = {row.name: json.loads(row.value_json) for row in s.scalars(select(Setting))}
        return {name: stored.get(name, default) for name, default in DEFAULTS.items()}
    return _cached("settings", load)


def get(name: str) -> Any:
    """Return one setting."""
    return all_settings()[name]


def save(values: dict[str, Any]) -> None:
    """Store settings (names must be known) and forget this process's cached copy."""
    unknown = set(values) - set(DEFAULTS)
    if unknown:
        raise KeyError(", ".join(sorted(unknown)))
    with db.begin() as s:
        for name, value in values.items():
            row = s.get(Setting, name) or Setting(name=name)
            row.value_json = json.dumps(value)
            s.add(row)
    forget()


def aliases() -> dict[str, str]:
    """Map each public model alias to the model workers advertise."""
    def load():
        with db.read() as s:
            return dict(s.execute(select(ModelAlias.alias, ModelAlias.target)).all())
    return _cached("aliases", load)


def forget() -> None:
    """Drop the cached settings and aliases, after a change or between tests."""
    with _lock:
        _cache().clear()
