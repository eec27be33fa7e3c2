"""POST /v1/images/generations, served by workers whose adapter advertises image models."""
from __future__ import annotations

from typing import Any

from flask import Blueprint, current_app, jsonify, request

from . import budget, relay, tokens, usage
from .accounts import authenticate_api_key
from .api import epoch, hold_slot, queue_job, resolve_model
from .errors import ApiError, json_body
from .models import Job
from .validation import validate_image

bp = Blueprint("images", __name__, url_prefix="/v1")


@bp.post("/images/generations")
def generate():
    """Queue an image request for a worker and answer with its images, as OpenAI does."""
    key = authenticate_api_key(request.headers.get("Authorization"))
    worker_request = validate_image(json_body())
    model = worker_request["model"] = resolve_model(key, worker_request["model"], "image")
    hold = hold_slot()
    try:
        job = queue_job(key, model, worker_request, False, tokens.count_text(worker_request["prompt"]), kind="image")
        try:
            images = collect_images(job, worker_request["n"])
        finally:
            usage.settle(job.id)
        return jsonify({"created": epoch(job.created_at), "data": images})
    finally:
        budget.release(hold)


def collect_images(job: Job, n: int) -> list[dict[str, Any]]:
    """Wait for an image job to end and return its images, or raise its error."""
    job = relay.wait_for_start(job.id, current_app.config["JOB_TIMEOUT"])
    images: list[dict[str, Any]] = []
    for kind, payload in relay.follow(job.id):
        if kind == "chunks":
            images += [image for chunk in payload for image in chunk.delta.get("images", [])]
        elif kind == "end":
            job = payload
    if job.state != "completed":
        raise relay.job_error(job)
    if not images:
        raise ApiError(502, "The worker finished without producing an image.", code="upstream_error")
    return images[:n]
