"""The worker protocol (docs/worker-protocol.md): claim by long-poll, report chunks, release."""
from __future__ import annotations

import time
from typing import Any

from flask import Blueprint, current_app, jsonify, request

from . import budget, jobs, maintenance, routing, wake, workers
from .accounts import authenticate_worker
from .errors import json_body
from .models import Job, utcnow
from .worker_input import parse_claim, parse_release, parse_reports, parse_status

bp = Blueprint("worker_api", __name__, url_prefix="/worker/v1")


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
    workers.touch_worker(worker, ask["models"], ask["capacity"], ask["kind"], ask["version"], ask["image_models"],
                           ask["site"], ask["features"])
    cfg = current_app.config
    end = time.monotonic() + ask["wait"]
    # A worker holds one long-poll. A newer one means the client of this one is gone
    # (restarted, or its connection dropped): this one must stop claiming jobs that
    # would be answered to a dead socket and sit until their leases lapse.
    me = wake.worker_topic(worker.id)
    wake.ring(me)
    mine = wake.stamp(me)
    superseded = False
    providers = routing.provider_names(ask["kind"], ask["site"])
    hold = None  # a slot of the held-request budget, taken only once the poll has to wait
    try:
        while True:
            since = wake.stamp("jobs")
            superseded = wake.stamp(me) != mine
            claimed = [] if superseded else jobs.claim_jobs(worker, ask["models"], ask["max_jobs"], ask["image_models"],
                                                             providers, ask["features"])
            left = end - time.monotonic()
            if claimed or superseded or left <= 0:
                break
            if hold is None:
                hold = budget.acquire_or_refuse("long_polls", left + cfg["WAKE_RECHECK"] + 5, worker.user_id)
            maintenance.housekeep()
            wake.wait_any({"jobs": since, me: mine}, min(cfg["WAKE_RECHECK"], left))
    finally:
        budget.release(hold)
    # lease_ttl also at the top, so a worker can size its report timeouts before it holds a job.
    body: dict[str, Any] = {"worker": {"id": worker.id, "name": worker.name}, "lease_ttl": cfg["LEASE_TTL"],
                            "jobs": [job_payload(j) for j in claimed]}
    if superseded:
        body["superseded"] = True
    return jsonify(body)


@bp.post("/status")
def status():
    """Let a worker that is not claiming say why (paused, needs a person, broken) and stay listed."""
    worker = authenticate_worker(request.headers.get("Authorization"))
    state, message = parse_status(json_body())
    workers.set_worker_status(worker.id, state, message)
    return jsonify({"worker": {"id": worker.id, "name": worker.name}, "status": state})


@bp.post("/chunks")
def chunks():
    """Store a batch of deltas for the worker's jobs and say which jobs to stop."""
    worker = authenticate_worker(request.headers.get("Authorization"))
    reports = parse_reports(json_body())
    workers.mark_seen(worker)
    return jsonify({"jobs": [jobs.apply_report(worker, r) for r in reports]})


@bp.post("/release")
def release():
    """Hand jobs back, for a worker that is shutting down."""
    worker = authenticate_worker(request.headers.get("Authorization"))
    pairs = parse_release(json_body())
    return jsonify({"jobs": [jobs.release_job(worker, public_id, lease) for public_id, lease in pairs]})
