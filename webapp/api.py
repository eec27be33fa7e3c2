"""The OpenAI-compatible API: chat completions (plain and streamed) and the model list."""
from __future__ import annotations

import datetime as dt
import json
from typing import Any, Iterator

from flask import Blueprint, Response, after_this_request, current_app, jsonify, request, stream_with_context
from sqlalchemy import select

from . import budget, events, jobs, limits, relay, settings, tokens, usage
from .accounts import authenticate_api_key
from .db import db
from .errors import ApiError, json_body
from .models import NOT_READY, TERMINAL, Chunk, Job, Worker, utcnow
from .validation import validate_chat

bp = Blueprint("api", __name__, url_prefix="/v1")


def epoch(moment: dt.datetime) -> int:
    """Return a naive-UTC datetime as Unix seconds."""
    return int(moment.replace(tzinfo=dt.timezone.utc).timestamp())


def live_models(user_id: int, kind: str = "chat") -> dict[str, int]:
    """Map each model of this kind ("chat", "image" or "any") that a live, ready worker visible
    to this user advertises to when it was first seen."""
    since = utcnow() - dt.timedelta(seconds=current_app.config["MODEL_LIVE_WINDOW"])
    with db.read() as s:
        workers = s.scalars(
            select(Worker).where(
                Worker.revoked_at.is_(None),
                Worker.last_seen_at > since,
                Worker.status.notin_(NOT_READY),
                (Worker.user_id == user_id) | Worker.shared,
            )
        ).all()
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


def model_object(model_id: str, created: int) -> dict[str, Any]:
    """Describe one model the way OpenAI's /v1/models does."""
    return {"id": model_id, "object": "model", "created": created, "owned_by": "pollgate"}


@bp.get("/models")
def list_models():
    """List the models that live workers advertise to this key's user."""
    key = authenticate_api_key(request.headers.get("Authorization"))
    models = live_models(key.user_id, "any")
    return jsonify({"object": "list", "data": [model_object(m, c) for m, c in sorted(models.items())]})


@bp.get("/models/<path:model_id>")
def get_model(model_id: str):
    """Describe one live model, or 404."""
    key = authenticate_api_key(request.headers.get("Authorization"))
    models = live_models(key.user_id, "any")
    if model_id not in models:
        raise not_found(model_id)
    return jsonify(model_object(model_id, models[model_id]))


def not_found(model: str) -> ApiError:
    """Build the 404 a client gets for a model no live worker serves."""
    return ApiError(
        404,
        f"The model '{model}' does not exist or no worker is serving it right now.",
        code="model_not_found",
        param="model",
    )


def resolve_model(key, asked: str, kind: str = "chat") -> str:
    """Return the advertised model behind the name a caller asked for, or raise 403 / 404."""
    # Workers see the model they advertise; the answer names it too, as OpenAI's answers
    # name the dated model behind an alias.
    model = settings.aliases().get(asked, asked)
    if key.allowed_models is not None and not {asked, model} & set(key.allowed_models):
        raise ApiError(403, f"This API key may not use the model '{asked}'.", code="model_not_allowed", param="model")
    if model not in live_models(key.user_id, kind):
        raise not_found(asked)
    return model


def queue_job(key, model: str, worker_request: dict[str, Any], stream: bool, prompt_tokens: int,
              kind: str = "chat") -> Job:
    """Admit a job against the caller's limits, queue it, and put the rate-limit headers on the answer."""
    states: list[limits.WindowState] = []

    def admit(s, job, now):
        states.extend(limits.admit(s, key, job, prompt_tokens, now))

    try:
        job = jobs.submit_job(key.user_id, key.id, model, worker_request, stream, kind=kind, admit=admit)
    except ApiError as err:
        # Logged after the refused transaction rolled back, so the log entry stays.
        events.record("rate_limited", key.user.email, err.message, key.user_id)
        raise
    rate_headers = limits.headers(states)
    after_this_request(lambda response: add_headers(response, rate_headers))
    return job


def hold_slot() -> int:
    """Take a held-request slot for one API request, or refuse it before anything is queued.

    Each request holds a process until it ends (a Passenger process serves one at a
    time). A job ends by its deadline, so the slot lapses by then even if this process dies.
    """
    return budget.acquire_or_refuse("streams", current_app.config["JOB_TIMEOUT"] + 30)


@bp.post("/chat/completions")
def chat_completions():
    """Queue a chat request for a worker and relay its answer."""
    key = authenticate_api_key(request.headers.get("Authorization"))
    worker_request, stream, include_usage = validate_chat(json_body())
    model = worker_request["model"] = resolve_model(key, worker_request["model"])
    prompt_tokens = tokens.count_prompt(worker_request["messages"])
    cfg = current_app.config
    hold = hold_slot()
    streaming = False
    try:
        job = queue_job(key, model, worker_request, stream, prompt_tokens)
        # Wait for the first output before answering, so a worker that fails at once gives the
        # client a real HTTP status; past HEARTBEAT_INTERVAL the stream starts anyway.
        try:
            job = relay.wait_for_start(job.id, cfg["HEARTBEAT_INTERVAL"] if stream else cfg["JOB_TIMEOUT"])
        except BaseException:
            # The caller will never read this job's answer: do not let a worker produce it.
            jobs.cancel_job(job.id, "client_gone", "The request ended before the answer started.")
            usage.settle(job.id)
            raise
        if job.state in TERMINAL and job.state != "completed" and job.next_seq == 0:
            usage.settle(job.id)
            raise relay.job_error(job)
        if stream:
            streaming = True  # the stream gives the slot back when it ends
            return Response(
                stream_with_context(sse_stream(job, include_usage, hold)),
                mimetype="text/event-stream",
                headers={"Cache-Control": "no-cache, no-store", "X-Accel-Buffering": "no"},
            )
        try:
            return jsonify(collect(job))
        finally:
            usage.settle(job.id)
    finally:
        if not streaming:
            budget.release(hold)


def add_headers(response: Response, headers: dict[str, str]) -> Response:
    """Copy headers onto a response (error responses included)."""
    response.headers.update(headers)
    return response


def chunk_event(job: Job, delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
    """Build one chat.completion.chunk."""
    return {
        "id": job.public_id,
        "object": "chat.completion.chunk",
        "created": epoch(job.created_at),
        "model": job.model,
        "system_fingerprint": None,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
    }


def sse(data: Any) -> str:
    """Frame one server-sent event."""
    return f"data: {json.dumps(data, separators=(',', ':'), ensure_ascii=False)}\n\n"


def sse_stream(job: Job, include_usage: bool, hold: int = 0) -> Iterator[str]:
    """Relay a job as OpenAI's event stream; a client that leaves cancels the job."""
    # The role chunk goes out at once: Passenger sends no headers before the first bytes.
    yield sse(chunk_event(job, {"role": "assistant", "content": ""}))
    deltas: list[dict[str, Any]] = []
    finished = False
    try:
        for kind, payload in relay.follow(job.id):
            if kind == "chunks":
                for chunk in payload:
                    deltas.append(chunk.delta)
                    yield sse(chunk_event(job, chunk.delta))
            elif kind == "heartbeat":
                yield ": keep-alive\n\n"
            else:
                job = payload
        finished = True
        if job.state != "completed":
            yield sse(relay.job_error(job).body())
            return
        yield sse(chunk_event(job, {}, job.finish_reason or "stop"))
        if include_usage:
            usage_event = chunk_event(job, {})
            usage_event["choices"] = []
            usage_event["usage"] = usage_for(job, deltas)
            yield sse(usage_event)
        yield "data: [DONE]\n\n"
    finally:
        if not finished:
            # GeneratorExit: the client disconnected; tell the worker to stop.
            jobs.cancel_job(job.id, "client_gone", "The client disconnected.")
        # Accounted even when abandoned: what the worker produced so far is counted.
        usage.settle(job.id, deltas if finished else None)
        budget.release(hold)


def collect(job: Job) -> dict[str, Any]:
    """Wait for a job to end and build the chat.completion, or raise its error."""
    chunks: list[Chunk] = []
    for kind, payload in relay.follow(job.id):
        if kind == "chunks":
            chunks.extend(payload)
        elif kind == "end":
            job = payload
    if job.state != "completed":
        raise relay.job_error(job)
    deltas = [c.delta for c in chunks]
    return {
        "id": job.public_id,
        "object": "chat.completion",
        "created": epoch(job.created_at),
        "model": job.model,
        "system_fingerprint": None,
        "choices": [
            {"index": 0, "message": merge_deltas(deltas), "logprobs": None, "finish_reason": job.finish_reason or "stop"}
        ],
        "usage": usage_for(job, deltas),
    }


def merge_deltas(deltas: list[dict[str, Any]]) -> dict[str, Any]:
    """Fold streamed deltas into one assistant message."""
    message: dict[str, Any] = {"role": "assistant", "content": None, "refusal": None}
    calls: dict[int, dict[str, Any]] = {}
    for delta in deltas:
        for field in ("content", "reasoning_content", "refusal"):
            if isinstance(delta.get(field), str):
                message[field] = (message.get(field) or "") + delta[field]
        for part in delta.get("tool_calls") or []:
            call = calls.setdefault(
                part.get("index", len(calls)),
                {"id": None, "type": "function", "function": {"name": "", "arguments": ""}},
            )
            call["id"] = part.get("id") or call["id"]
            function = part.get("function") or {}
            call["function"]["name"] += function.get("name") or ""
            call["function"]["arguments"] += function.get("arguments") or ""
    if calls:
        message["tool_calls"] = [calls[i] for i in sorted(calls)]
    if message["content"] is None and not calls:
        message["content"] = ""
    return message


def usage_for(job: Job, deltas: list[dict[str, Any]]) -> dict[str, int]:
    """Return the usage a client sees: the same counts its usage row is settled with."""
    prompt, completion, _ = usage.job_tokens(job, deltas)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


@bp.get("/usage")
def get_usage():
    """Summarise the key owner's settled usage per day and model (?start=&end=, ISO dates)."""
    key = authenticate_api_key(request.headers.get("Authorization"))
    today = utcnow().date()
    start = parse_day("start", today - dt.timedelta(days=29))
    end = parse_day("end", today)
    if start > end:
        raise ApiError(400, "start must not be after end.", code="invalid_value", param="start")
    if (end - start).days > 366:
        raise ApiError(400, "Ask for at most 366 days at once.", code="invalid_value", param="start")
    return jsonify({"object": "usage", "start": start.isoformat(), "end": end.isoformat(),
                    **usage.summary(key.user_id, start, end)})


def parse_day(name: str, default: dt.date) -> dt.date:
    """Read an ISO date from the query string, or a 400 naming it."""
    value = request.args.get(name)
    if not value:
        return default
    try:
        return dt.date.fromisoformat(value)
    except ValueError:
        raise ApiError(400, f"{name} must be a date like 2026-11-24.", code="invalid_value", param=name)
