"""A completion by its id: read it, stream it from the start or resume it after an event, cancel it.

Every answer is stored chunk by chunk, so any job of the caller's, background or not, can be
read again while it is kept (the retention setting); a stream that lost its connection picks
up after the last event id it saw.
"""
from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, current_app, jsonify, request

from . import budget, jobs, relay
from .accounts import authenticate_api_key
from .api import event_stream
from .completions import status_object
from .errors import ApiError
from .models import TERMINAL, Job
from .relay import Reader, end_request

bp = Blueprint("retrieve", __name__, url_prefix="/v1")


def owned_job(public_id: str) -> Job:
    """Return the caller's job with this id, or the 404 another user's id gets too."""
    key = authenticate_api_key(request.headers.get("Authorization"))
    job = jobs.find_job(public_id, key.user_id)
    if job is None or job.kind != "chat":
        raise ApiError(404, f"No chat completion found with id '{public_id}'.", code="not_found", param="completion_id")
    return job


def describe(job: Job) -> dict[str, Any]:
    """Return the job as a chat.completion with its status, read whole."""
    job, chunks = jobs.read_progress(job.id, 0)
    failed = job.state in TERMINAL and job.state != "completed"
    return status_object(job, [c.delta for c in chunks], relay.job_error(job).body()["error"] if failed else None)


@bp.get("/chat/completions/<public_id>")
def get_completion(public_id: str):
    """Return a completion with its status, or with ?stream=true stream it as server-sent events."""
    job = owned_job(public_id)
    if request.args.get("stream", "").lower() in ("true", "1"):
        return resume(job, resume_point(), request.args.get("include_usage", "").lower() in ("true", "1"))
    return jsonify(describe(job))


@bp.post("/chat/completions/<public_id>/cancel")
def cancel_completion(public_id: str):
    """Cancel a completion that has not ended (its worker is told); an ended one is left as it is."""
    job = owned_job(public_id)
    jobs.cancel_job(job.id, "cancelled", "Cancelled by its owner.")
    return jsonify(describe(job))


def resume_point() -> int:
    """Return the id of the last event the client saw (Last-Event-ID or ?starting_after=), -1 for none."""
    for name, value in (("Last-Event-ID", request.headers.get("Last-Event-ID")),
                        ("starting_after", request.args.get("starting_after"))):
        if value is None or value == "":
            continue
        if not value.isascii() or not value.isdigit() or len(value) > 9:
            raise ApiError(400, f"{name} must be the id of an event of this stream: a whole number.",
                           code="invalid_value", param=name)
        return int(value)
    return -1


def resume(job: Job, after: int, include_usage: bool) -> Response:
    """Stream the job's events after `after`, following it live while it runs."""
    hold = budget.acquire_or_refuse("streams", current_app.config["HOLD_TTL"], job.user_id)
    detached = job.reader_expires_at is None
    reader = Reader.for_request(job.id, hold, detached)
    try:
        if not detached:
            # A job waiting out its resume grace is read again: keep the reaper off it at once.
            jobs.await_resume(job.id, current_app.config["HOLD_TTL"])
        first = relay.read(reader, max(0, after))
    except BaseException:
        end_request(reader, ended=False, grace=current_app.config["HOLD_TTL"])
        raise
    return event_stream(reader, first, include_usage, after)
