"""The user's dashboard: overview with charts, and API keys."""
from __future__ import annotations

import datetime as dt
import json

from flask import Blueprint, abort, flash, redirect, render_template, request, url_for
from flask_login import current_user, login_required
from sqlalchemy import case, func, select, update

from . import accounts, limits, usage
from .db import db
from .models import ApiKey, Job, Usage, Worker, utcnow
from .workers import gateway_url, worker_state

bp = Blueprint("dashboard", __name__)

PERIODS = (("Last 24 hours", 1), ("Last 7 days", 7), ("Last 30 days", 30))  # label, days
CHART_MODELS = 6


@bp.get("/")
def index():
    """Send visitors to their dashboard, or to sign in."""
    return redirect(url_for("dashboard.overview" if current_user.is_authenticated else "auth.login"))


@bp.get("/dashboard")
@login_required
def overview():
    """Show requests, tokens, cost and success rate, charts per day, and rate-limit use."""
    now = utcnow()
    today = now.date()
    month = usage.summary(current_user.id, today - dt.timedelta(days=29), today)
    week = usage.summary(current_user.id, today - dt.timedelta(days=6), today)
    periods = [(PERIODS[0][0], last_hours(current_user.id, now)), (PERIODS[1][0], week["totals"]),
               (PERIODS[2][0], month["totals"])]
    days = [(today - dt.timedelta(days=29 - i)).isoformat() for i in range(30)]
    with db.read() as s:
        states = limits.account_states(s, current_user, now)
    return render_template("overview.html", periods=periods, by_model=month["by_model"], states=states,
                           requests=chart(days, month["daily_by_model"], ("requests",)),
                           tokens=chart(days, month["daily_by_model"], ("prompt_tokens", "completion_tokens")))


def chart(days: list[str], daily_by_model: dict, counters: tuple[str, ...]) -> dict:
    """Lay out one stacked bar chart: a bar per day, a band per model, the busiest models first."""
    totals: dict[str, int] = {}
    for figures in daily_by_model.values():
        for model, f in figures.items():
            totals[model] = totals.get(model, 0) + sum(f[c] for c in counters)
    ranked = sorted(totals, key=lambda m: (-totals[m], m))
    # Past a handful of colours a legend stops being readable: the rest share one grey band.
    shown = ranked if len(ranked) <= CHART_MODELS + 1 else ranked[:CHART_MODELS]
    legend = shown + (["other models"] if len(shown) < len(ranked) else [])
    bars = []
    for day in days:
        values = dict.fromkeys(legend, 0)
        for model, f in daily_by_model.get(day, {}).items():
            values[model if model in shown else "other models"] += sum(f[c] for c in counters)
        bars.append((day, [(name, values[name]) for name in legend]))
    top = max([sum(v for _, v in bands) for _, bands in bars] + [1])
    return {"bars": bars, "legend": legend, "top": top}


def last_hours(user_id: int, now: dt.datetime) -> dict[str, int]:
    """Sum the settled usage rows of the last 24 hours (roll-ups are per calendar day)."""
    with db.read() as s:
        row = s.execute(
            select(
                func.count(), func.coalesce(func.sum(Usage.prompt_tokens), 0),
                func.coalesce(func.sum(Usage.completion_tokens), 0), func.coalesce(func.sum(Usage.cost_nanos), 0),
                func.coalesce(func.sum(case((Usage.status != "completed", 1), else_=0)), 0),
            ).where(Usage.user_id == user_id, Usage.settled.is_(True), Usage.created_at >= now - dt.timedelta(days=1))
        ).one()
    requests_, prompt, completion, cost, errors = (int(v) for v in row)
    return {"requests": requests_, "errors": errors, "prompt_tokens": prompt, "completion_tokens": completion,
            "cost_nanos": cost, "latency_ms": 0}


@bp.get("/keys")
@login_required
def keys():
    """List the user's API keys with a form to create one."""
    return render_template("keys.html", keys=user_keys(), secret=None)


def user_keys() -> list[ApiKey]:
    with db.read() as s:
        return list(s.scalars(select(ApiKey).where(ApiKey.user_id == current_user.id).order_by(ApiKey.id.desc())))


@bp.post("/keys")
@login_required
def create_key():
    """Create a key and show its secret this once."""
    name = request.form.get("name", "").strip()[:100]
    days = request.form.get("expires_days", "").strip()
    models = [m.strip() for m in request.form.get("models", "").split(",") if m.strip()]
    if days and (not days.isdigit() or not 1 <= int(days) <= 3650):
        flash("Expiry must be a number of days from 1 to 3650, or empty for never.", "error")
        return render_template("keys.html", keys=user_keys(), secret=None), 400
    try:
        secret = accounts.create_api_key(current_user.id, name, request.form.get("tavern") == "on")
    except accounts.TooMany as err:
        flash(f"No new key: {err}.", "error")
        return render_template("keys.html", keys=user_keys(), secret=None), 409
    with db.begin() as s:
        s.execute(
            update(ApiKey).where(ApiKey.key_hash == accounts.hash_secret(secret)).values(
                expires_at=utcnow() + dt.timedelta(days=int(days)) if days else None,
                allowed_models_json=json.dumps(models) if models else None,
            )
        )
    return render_template("keys.html", keys=user_keys(), secret=secret, secret_name=name)


@bp.post("/keys/<int:key_id>/tavern")
@login_required
def set_tavern(key_id: int):
    """Turn a key's tavern mode on or off; another user's key is not found."""
    on = request.form.get("tavern") == "on"
    with db.begin() as s:
        found = s.execute(update(ApiKey).where(ApiKey.id == key_id, ApiKey.user_id == current_user.id)
                          .values(tavern=on)).rowcount
    if not found:
        abort(404)
    flash(f"Tavern mode is {'on' if on else 'off'} for that key.", "info")
    return redirect(url_for("dashboard.keys"))


@bp.post("/keys/<int:key_id>/revoke")
@login_required
def revoke_key(key_id: int):
    """Revoke one of the user's keys; another user's key is not found."""
    with db.begin() as s:
        done = s.execute(
            update(ApiKey)
            .where(ApiKey.id == key_id, ApiKey.user_id == current_user.id, ApiKey.revoked_at.is_(None))
            .values(revoked_at=utcnow())
        ).rowcount
    if not done:
        abort(404)
    flash("The key is revoked: requests with it are refused from now on.", "info")
    return redirect(url_for("dashboard.keys"))


@bp.get("/workers")
@login_required
def workers():
    """List the user's workers and their state, with a form to add one."""
    return render_template("workers.html", **worker_page())


def worker_page(**extra) -> dict:
    """Gather the user's workers and their live states for the page."""
    with db.read() as s:
        found = list(s.scalars(select(Worker).where(Worker.user_id == current_user.id).order_by(Worker.id.desc())))
        busy = dict(s.execute(
            select(Job.worker_id, func.count()).where(Job.state == "running", Job.worker_id.in_([w.id for w in found]))
            .group_by(Job.worker_id)
        ).all())
    return {"workers": found, "states": {w.id: worker_state(w, busy.get(w.id, 0)) for w in found},
            "secret": None, "gateway_url": gateway_url(), **extra}


@bp.post("/workers")
@login_required
def create_worker():
    """Create a worker token and show it, with the command to start a worker, this once."""
    name = request.form.get("name", "").strip()[:100]
    try:
        secret = accounts.create_worker_token(current_user.id, name)
    except accounts.TooMany as err:
        flash(f"No new worker token: {err}.", "error")
        return render_template("workers.html", **worker_page()), 409
    return render_template("workers.html", **worker_page(secret=secret, secret_name=name))


@bp.post("/workers/<int:worker_id>/revoke")
@login_required
def revoke_worker(worker_id: int):
    """Revoke one of the user's worker tokens; its next call is refused."""
    with db.begin() as s:
        done = s.execute(
            update(Worker)
            .where(Worker.id == worker_id, Worker.user_id == current_user.id, Worker.revoked_at.is_(None))
            .values(revoked_at=utcnow())
        ).rowcount
    if not done:
        abort(404)
    flash("The worker token is revoked.", "info")
    return redirect(url_for("dashboard.workers"))
