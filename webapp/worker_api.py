"""The worker protocol (docs/worker-protocol.md): claim by long-poll, report chunks, release."""
from __future__ import annotations

import datetime as dt
import time
from typing import Any

from flask import Blueprint, current_app, jsonify, request
from sqlalchemy import update

from . import budget, jobs, maintenance, wake
from .accounts import authenticate_worker
from .db import db
from .errors import ApiError, json_body
from .models import NOT_READY, Job, Worker, utcnow

bp = Blueprint("worker_api", __name__, url_prefix="/worker/v1")

MAX_MODELS = 64
MAX_JOBS_PER_CLAIM = 32
DELTA_FIELDS = {"content": str, "reasoning_content": str, "refusal": str, "tool_calls": list, "images": list}
FINISH_REASONS = ("stop", "length", "tool_calls", "content_filter")
SEEN_GRANULARITY = dt.timedelta(seconds=10)


def bad(message: str, param: str) -> ApiError:
    """Build a 400 for a malformed worker request."""
    return ApiError(400, message, code="invalid_request", param=param)


def _short_str(body: dict, name: str) -> str:
    value = body.get(name, "")
    if not isinstance(value, str) or len(value) > 32:
        raise bad(f"{name} must be a string of at most 32 characters.", name)
    return value


def _int(body: dict, name: str, low: int, high: int, default: int | None = None) -> int:
    value = body.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise bad(f"{name} must be an integer from {low} to {high}.", name)
    return value


def _models(body: dict, name: str) -> list[str]:
    models = body.get(name, [])
    if (
        not isinstance(models, list)
        or len(models) > MAX_MODELS
        or not all(isinstance(m, str) and 0 < len(m) <= 191 for m in models)
    ):
        raise bad(f"{name} must be a list of up to {MAX_MODELS} model ids (at most 191 characters each).", name)
    return list(dict.fromkeys(models))


def parse_claim(body: Any) -> dict[str, Any]:
    """Validate a claim request."""
    if not isinstance(body, dict):
        raise bad("The body must be a JSON object.", "body")
    models, image_models = _models(body, "models"), _models(body, "image_models")
    if not models and not image_models:
        raise bad("models must list at least one model id (or image_models one image model id).", "models")
    wait = body.get("wait", current_app.config["CLAIM_WAIT_MAX"])
    if isinstance(wait, bool) or not isinstance(wait, (int, float)) or wait < 0:
        raise bad("wait must be a number of seconds, 0 or more.", "wait")
    max_jobs = _int(body, "max_jobs", 1, MAX_JOBS_PER_CLAIM, 1)
    site = body.get("site", "")
    if not isinstance(site, str) or len(site) > 191:
        raise bad("site must be a string of at most 191 characters.", "site")
    return {
        "models": models,
        "image_models": image_models,
        "max_jobs": max_jobs,
        "capacity": _int(body, "capacity", 1, 256, max_jobs),
        "wait": min(float(wait), current_app.config["CLAIM_WAIT_MAX"]),
        "kind": _short_str(body, "kind"),
        "version": _short_str(body, "version"),
        "site": site,
    }


def job_payload(job: Job) -> dict[str, Any]:
    """Describe a claimed job to its worker."""
    return {
        "id": job.public_id,
        "lease": job.lease_token,
        "lease_ttl": current_app.config["LEASE_TTL"],
        "deadline_in": round(max(0.0, (job.deadline_at - utcnow()).total_seconds()), 3),
        "attempt": job.attempts,
        "kind": job.kind,
        "model": job.model,
        "request": job.request,
    }


@bp.post("/claim")
def claim():
    """Long-poll for jobs: answer as soon as one is claimed, or empty when the wait ends."""
    worker = authenticate_worker(request.headers.get("Authorization"))
    ask = parse_claim(json_body())
    jobs.touch_worker(worker.id, ask["models"], ask["capacity"], ask["kind"], ask["version"], ask["image_models"],
                      ask["site"])
    cfg = current_app.config
    end = time.monotonic() + ask["wait"]
    # A worker holds one long-poll. A newer one means the client of this one is gone
    # (restarted, or its connection dropped): this one must stop claiming jobs that
    # would be answered to a dead socket and sit until their leases lapse.
    me = wake.worker_topic(worker.id)
    wake.ring(me)
    mine = wake.stamp(me)
    superseded = False
    hold = None  # a slot of the held-request budget, taken only once the poll has to wait
    try:
        while True:
            since = wake.stamp("jobs")
            superseded = wake.stamp(me) != mine
            claimed = [] if superseded else jobs.claim_jobs(worker, ask["models"], ask["max_jobs"], ask["image_models"])
            left = end - time.monotonic()
            if claimed or superseded or left <= 0:
                break
            if hold is None:
                hold = budget.acquire_or_refuse("long_polls", left + cfg["WAKE_RECHECK"] + 5)
            maintenance.housekeep()
            wake.wait_any({"jobs": since, me: mine}, min(cfg["WAKE_RECHECK"], left))
    finally:
        budget.release(hold)
    body: dict[str, Any] = {"worker": {"id": worker.id, "name": worker.name}, "jobs": [job_payload(j) for j in claimed]}
    if superseded:
        body["superseded"] = True
    return jsonify(body)


@bp.post("/status")
def status():
    """Let a worker that is not claiming say why (paused, needs a person, broken) and stay listed."""
    worker = authenticate_worker(request.headers.get("Authorization"))
    body = json_body()
    state = body.get("status") if isinstance(body, dict) else None
    if state not in NOT_READY:
        raise bad(f"status must be one of {', '.join(NOT_READY)}; claiming again means ready.", "status")
    message = body.get("message", "")
    if not isinstance(message, str):
        raise bad("message must be a string.", "message")
    jobs.set_worker_status(worker.id, state, message)
    return jsonify({"worker": {"id": worker.id, "name": worker.name}, "status": state})


def parse_reports(body: Any) -> list[jobs.Report]:
    """Validate a chunk report as a whole, so a malformed one stores nothing."""
    entries = body.get("jobs") if isinstance(body, dict) else None
    if not isinstance(entries, list) or not entries:
        raise bad("jobs must be a non-empty list.", "jobs")
    reports = []
    total = 0
    for i, entry in enumerate(entries):
        where = f"jobs[{i}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("id"), str) or not isinstance(entry.get("lease"), str):
            raise bad(f"{where} needs string fields id and lease.", where)
        chunks = entry.get("chunks", [])
        if not isinstance(chunks, list):
            raise bad(f"{where}.chunks must be a list.", f"{where}.chunks")
        total += len(chunks)
        reports.append(
            jobs.Report(
                public_id=entry["id"],
                lease=entry["lease"],
                chunks=[_chunk(f"{where}.chunks[{j}]", c) for j, c in enumerate(chunks)],
                finish=_finish(where, entry.get("finish")),
                error=_error(where, entry.get("error")),
            )
        )
        if reports[-1].finish is not None and reports[-1].error is not None:
            raise bad(f"{where} has both finish and error.", where)
    if total > current_app.config["MAX_CHUNKS_PER_REPORT"]:
        raise ApiError(413, "Too many chunks in one report; send smaller batches.", code="request_too_large")
    return reports


def _chunk(where: str, chunk: Any) -> tuple[int, dict[str, Any]]:
    if not isinstance(chunk, dict):
        raise bad(f"{where} must be an object.", where)
    seq, delta = chunk.get("seq"), chunk.get("delta")
    if isinstance(seq, bool) or not isinstance(seq, int) or seq < 0:
        raise bad(f"{where}.seq must be an integer, 0 or more.", f"{where}.seq")
    if not isinstance(delta, dict) or not delta:
        raise bad(f"{where}.delta must be a non-empty object.", f"{where}.delta")
    for name, value in delta.items():
        if name not in DELTA_FIELDS or not isinstance(value, DELTA_FIELDS[name]):
            allowed = ", ".join(DELTA_FIELDS)
            raise bad(f"{where}.delta.{name} is not allowed (allowed: {allowed}, with their OpenAI types).", f"{where}.delta")
    for image in delta.get("images", []):
        if not isinstance(image, dict) or len(image) != 1 or not isinstance(image.get("url", image.get("b64_json")), str):
            raise bad(f"{where}.delta.images items must be {{\"url\": ...}} or {{\"b64_json\": ...}}.", f"{where}.delta")
    return seq, delta


def _finish(where: str, finish: Any) -> dict[str, Any] | None:
    if finish is None:
        return None
    if not isinstance(finish, dict) or finish.get("reason", "stop") not in FINISH_REASONS:
        raise bad(f"{where}.finish.reason must be one of {', '.join(FINISH_REASONS)}.", f"{where}.finish")
    usage = finish.get("usage")
    if usage is not None:
        fields = ("prompt_tokens", "completion_tokens")
        if not isinstance(usage, dict) or not all(
            isinstance(usage.get(f), int) and not isinstance(usage.get(f), bool) and usage[f] >= 0 for f in fields
        ):
            raise bad(f"{where}.finish.usage needs integer prompt_tokens and completion_tokens.", f"{where}.finish.usage")
        finish = {**finish, "usage": {f: usage[f] for f in fields}}
    return finish


def _error(where: str, error: Any) -> dict[str, Any] | None:
    if error is None:
        return None
    if not isinstance(error, dict) or not isinstance(error.get("code", ""), str) or not isinstance(error.get("message", ""), str):
        raise bad(f"{where}.error must be an object with string code and message.", f"{where}.error")
    return {
        "code": (error.get("code") or "upstream_error")[:64],
        "message": (error.get("message") or "")[:2000],
        "retry": bool(error.get("retry")),
    }


def mark_seen(worker: Worker) -> None:
    """Keep a busy worker's models listed while it reports instead of polling."""
    now = utcnow()
    if worker.last_seen_at is None or now - worker.last_seen_at > SEEN_GRANULARITY:
        with db.begin() as s:
            s.execute(update(Worker).where(Worker.id == worker.id).values(last_seen_at=now))


@bp.post("/chunks")
def chunks():
    """Store a batch of deltas for the worker's jobs and say which jobs to stop."""
    worker = authenticate_worker(request.headers.get("Authorization"))
    reports = parse_reports(json_body())
    mark_seen(worker)
    return jsonify({"jobs": [jobs.apply_report(worker, r) for r in reports]})


@bp.post("/release")
def release():
    """Hand jobs back, for a worker that is shutting down."""
    worker = authenticate_worker(request.headers.get("Authorization"))
    body = json_body()
    entries = body.get("jobs") if isinstance(body, dict) else None
    if not isinstance(entries, list) or not all(
        isinstance(e, dict) and isinstance(e.get("id"), str) and isinstance(e.get("lease"), str) for e in entries
    ):
        raise bad("jobs must be a list of {id, lease} objects.", "jobs")
    return jsonify({"jobs": [jobs.release_job(worker, e["id"], e["lease"]) for e in entries]})
