"""The user's request history: filterable list and one request's detail."""
from __future__ import annotations

import datetime as dt

from flask import Blueprint, abort, flash, jsonify, redirect, render_template, request, url_for
from flask_login import current_user, login_required
from sqlalchemy import select

from . import jobs, settings
from .completions import merge_deltas
from .db import db
from .models import TERMINAL, ApiKey, Chunk, Job, Usage, Worker, utcnow

bp = Blueprint("history", __name__)

PAGE = 50
STATUSES = ("queued", "completed", "failed", "cancelled", "expired")


@bp.get("/requests")
@login_required
def requests_list():
    """List the user's requests, newest first, filtered by key, model and status."""
    query = select(Usage).where(Usage.user_id == current_user.id)
    key_id = request.args.get("key", type=int)
    model = request.args.get("model", "").strip()
    status = request.args.get("status", "")
    before = request.args.get("before", type=int)
    if key_id:
        query = query.where(Usage.api_key_id == key_id)
    if model:
        query = query.where(Usage.model == model)
    if status in STATUSES:
        query = query.where(Usage.status == status)
    if before:
        query = query.where(Usage.id < before)  # keyset paging stays fast deep into history
    with db.read() as s:
        rows = list(s.scalars(query.order_by(Usage.id.desc()).limit(PAGE + 1)))
        keys = list(s.scalars(select(ApiKey).where(ApiKey.user_id == current_user.id).order_by(ApiKey.id)))
    more = len(rows) > PAGE
    return render_template("requests.html", rows=rows[:PAGE], keys=keys, statuses=STATUSES,
                           filters={"key": key_id, "model": model, "status": status},
                           next_before=rows[PAGE - 1].id if more else None)


@bp.get("/requests/<int:usage_id>")
@login_required
def request_detail(usage_id: int):
    """Show one request: timings, tokens, worker, error, and its content while retained."""
    with db.read() as s:
        row = s.get(Usage, usage_id)
        if row is None or row.user_id != current_user.id:
            abort(404)
        job = s.get(Job, row.job_id) if row.job_id else None
        # Past retention the content is as good as gone, even before the clean-up deletes it.
        kept_since = utcnow() - dt.timedelta(hours=settings.get("retention_hours"))
        if job is not None and job.finished_at is not None and job.finished_at < kept_since:
            job = None
        worker = s.get(Worker, row.worker_id) if row.worker_id else None
        deltas = [c.delta for c in s.scalars(select(Chunk).where(Chunk.job_id == job.id).order_by(Chunk.seq))] if job else []
    answer = merge_deltas(deltas) if job else None
    return render_template("request.html", row=row, job=job, worker=worker, answer=answer,
                           running=job is not None and job.state not in TERMINAL)


def owned_job(usage_id: int) -> Job:
    """Return the job behind one of the signed-in user's requests, or 404."""
    with db.read() as s:
        row = s.get(Usage, usage_id)
        job = s.get(Job, row.job_id) if row is not None and row.job_id else None
    if row is None or row.user_id != current_user.id or job is None:
        abort(404)
    return job


@bp.get("/requests/<int:usage_id>/progress")
@login_required
def request_progress(usage_id: int):
    """Return a running request's state and its answer from chunk ?after= on, for the page to follow."""
    after = request.args.get("after", 0, type=int)
    job, chunks = jobs.read_progress(owned_job(usage_id).id, max(0, after))
    answer = merge_deltas([c.delta for c in chunks])
    # Counted from what was read, not job.next_seq: a chunk committed between the two reads
    # is sent now and must not be sent again.
    return jsonify({"state": job.state, "next_seq": max(0, after) + len(chunks), "ended": job.state in TERMINAL,
                    "content": answer.get("content") or "", "reasoning_content": answer.get("reasoning_content") or ""})


@bp.post("/requests/<int:usage_id>/cancel")
@login_required
def cancel_request(usage_id: int):
    """Cancel one of the user's running requests; its worker is told on its next report."""
    if jobs.cancel_job(owned_job(usage_id).id, "cancelled", "Cancelled by its owner from the dashboard."):
        flash("The request is cancelled; its worker stops at its next report.", "info")
    else:
        flash("The request had already ended.", "info")
    return redirect(url_for("history.request_detail", usage_id=usage_id))
