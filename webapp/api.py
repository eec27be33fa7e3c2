"""The OpenAI-compatible API: chat completions (plain and streamed), images, models and usage.

Every completion or image request goes one way: take a held-request slot, queue the job
(admitted against the caller's limits), relay its answer, then `end_request`. A chat
request for n choices takes one slot for n jobs, relayed in turn by choices.py.
"""
from __future__ import annotations

import datetime as dt
from typing import Any, Iterator, Optional

from flask import Blueprint, Response, after_this_request, current_app, jsonify, request, stream_with_context

from . import budget, choices, events, jobs, limits, relay, routing, settings, tavern, token_count, usage
from .accounts import authenticate_api_key
from .completions import chunk_event, completion, images, sse, status_object, usage_event
from .errors import ApiError, ClientGone, json_body
from .models import TERMINAL, Chunk, Job, epoch, utcnow
from .relay import Reader, end_request
from .validation import validate_chat, validate_image

bp = Blueprint("api", __name__, url_prefix="/v1")


def model_object(model_id: str, created: int) -> dict[str, Any]:
    """Describe one model the way OpenAI's /v1/models does."""
    return {"id": model_id, "object": "model", "created": created, "owned_by": "pollgate"}


@bp.get("/models")
def list_models():
    """List the models that live workers advertise to this key's user."""
    key = authenticate_api_key(request.headers.get("Authorization"))
    models = routing.live_models(key.user_id, "any", routing.from_request(key.user_id))
    return jsonify({"object": "list", "data": [model_object(m, c) for m, c in sorted(models.items())]})


@bp.get("/models/<path:model_id>")
def get_model(model_id: str):
    """Describe one live model, or 404."""
    key = authenticate_api_key(request.headers.get("Authorization"))
    models = routing.live_models(key.user_id, "any", routing.from_request(key.user_id))
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


def resolve_model(key, asked: str, kind: str = "chat", route: routing.Route = routing.AUTO) -> str:
    """Return the advertised model behind the name a caller asked for, or raise 403 / 404."""
    # Workers see the model they advertise; the answer names it too, as OpenAI's answers
    # name the dated model behind an alias.
    model = settings.aliases().get(asked, asked)
    if key.allowed_models is not None and not {asked, model} & set(key.allowed_models):
        raise ApiError(403, f"This API key may not use the model '{asked}'.", code="model_not_allowed", param="model")
    if model not in routing.live_models(key.user_id, kind, route):
        raise not_found(asked)
    return model


def queue_jobs(key, model: str, worker_request: dict[str, Any], stream: bool, prompt_tokens: int,
               kind: str = "chat", reader: bool = True, route: routing.Route = routing.AUTO, n: int = 1) -> list[Job]:
    """Admit n alike jobs against the caller's limits, all or none, queue them with their usage rows,
    and put the rate-limit headers on the answer; return them.

    Without `reader` the jobs are background ones: they run whether anybody reads them or not.
    """

    def admit(s, job, now) -> list[limits.WindowState]:
        return limits.admit(s, key, job, prompt_tokens, now)

    def record(s, job, now) -> None:
        usage.open_row(s, job, key.id, prompt_tokens, now)

    try:
        queued, states = jobs.submit_jobs(n, key.user_id, key.id, model, worker_request, stream, kind=kind,
                                          admit=admit, reader=reader, record=record, provider=route.provider,
                                          pinned_worker_id=route.worker_id)
    except ApiError as err:
        # Logged after the refused transaction rolled back, so the log entry stays.
        events.record("rate_limited", key.user.email, err.message, key.user_id)
        raise
    # x-request-id names the completion, as OpenAI's does its request: the openai
    # packages expose it (`_request_id`), and support can find the job by it.
    headers = {**limits.headers(states or []), "x-request-id": queued[0].public_id}
    after_this_request(lambda response: add_headers(response, headers))
    return queued


def start_request(key, model: str, worker_request: dict[str, Any], stream: bool, prompt_tokens: int,
                  kind: str = "chat", route: routing.Route = routing.AUTO) -> Reader:
    """Take a held-request slot, then queue the job; whoever gets the reader must call end_request.

    Each request holds a process (or thread) until it ends, so the slot is taken before
    anything is queued and refused quickly when the gateway is full.
    """
    return start_choices(key, model, worker_request, stream, prompt_tokens, kind, route)[0]


def start_choices(key, model: str, worker_request: dict[str, Any], stream: bool, prompt_tokens: int,
                  kind: str = "chat", route: routing.Route = routing.AUTO, n: int = 1) -> list[Reader]:
    """Take one held-request slot, then queue n jobs, one per choice; return a reader for each, all to be ended.

    The first reader holds the slot; the others hold None, so it is given back once.
    """
    hold = budget.acquire_or_refuse("streams", current_app.config["HOLD_TTL"], key.user_id)
    try:
        queued = queue_jobs(key, model, worker_request, stream, prompt_tokens, kind, route=route, n=n)
    except BaseException:
        budget.release(hold)
        raise
    return [Reader.for_request(job.id, hold if i == 0 else None) for i, job in enumerate(queued)]


def relay_plain(reader: Reader) -> tuple[Job, list[dict[str, Any]]]:
    """Relay a non-streamed request's job to its end and end the request; return the completed job
    with every delta, or raise the error its client gets."""
    answer: Optional[tuple[Job, list[dict[str, Any]]]] = None
    try:
        answer = relay.collect(reader)
    finally:
        end_request(reader, answer is not None, answer[1] if answer else None)
    job, deltas = answer
    if job.state != "completed":
        raise relay.job_error(job)
    return job, deltas


@bp.post("/chat/completions")
def chat_completions():
    """Queue a chat request for a worker and relay its answer."""
    key = authenticate_api_key(request.headers.get("Authorization"))
    worker_request, stream, include_usage, background, n = validate_chat(json_body())
    if tavern.wanted(key):
        worker_request["messages"] = tavern.merge_system(worker_request["messages"])
    route = routing.from_request(key.user_id)
    model = worker_request["model"] = resolve_model(key, worker_request["model"], route=route)
    routing.require_features(key.user_id, model, worker_request, route)
    prompt_tokens = token_count.count_prompt(worker_request["messages"])
    if background:
        # Answered at once, holding no process: the caller polls, streams or cancels it by id.
        job = queue_jobs(key, model, worker_request, False, prompt_tokens, reader=False, route=route)[0]
        return jsonify(status_object(job, [])), 202
    if n > 1:
        readers = start_choices(key, model, worker_request, stream, prompt_tokens, route=route, n=n)
        if stream:
            return choices.stream_response(readers, include_usage)
        answers = choices.relay_plain(readers)
        return routing.tag(jsonify(choices.choices_completion(answers)), answers[0][0])
    reader = start_request(key, model, worker_request, stream, prompt_tokens, route=route)
    if stream:
        return stream_response(reader, include_usage)
    job, deltas = relay_plain(reader)
    return routing.tag(jsonify(completion(job, deltas)), job)


@bp.post("/images/generations")
def generate_images():
    """Queue an image request for a worker and answer with its images, as OpenAI does."""
    key = authenticate_api_key(request.headers.get("Authorization"))
    worker_request = validate_image(json_body())
    route = routing.from_request(key.user_id)
    model = worker_request["model"] = resolve_model(key, worker_request["model"], "image", route)
    reader = start_request(key, model, worker_request, False, token_count.count_text(worker_request["prompt"]),
                           kind="image", route=route)
    job, deltas = relay_plain(reader)
    found = images(deltas, worker_request["n"])
    if not found:
        raise ApiError(502, "The worker finished without producing an image.", code="upstream_error")
    return routing.tag(jsonify({"created": epoch(job.created_at), "data": found}), job)


def stream_response(reader: Reader, include_usage: bool) -> Response:
    """Start an event stream once the job has output (or HEARTBEAT_INTERVAL passed), or answer its error."""
    # Waiting for the first output first lets a worker that fails at once give the client
    # a real HTTP status; past HEARTBEAT_INTERVAL the stream starts anyway.
    try:
        first = relay.wait_for_start(reader, current_app.config["HEARTBEAT_INTERVAL"])
    except BaseException:
        end_request(reader, ended=False, grace=current_app.config["RESUME_GRACE"])
        raise
    job = first[0]
    if job.state in TERMINAL and job.state != "completed" and job.next_seq == 0:
        end_request(reader, ended=True)
        raise relay.job_error(job)
    return event_stream(reader, first, include_usage)


def event_stream(reader: Reader, first: tuple[Job, list[Chunk]], include_usage: bool, after: int = -1) -> Response:
    """Answer with the job's event stream, from the event after `after` on."""
    return Response(
        stream_with_context(sse_stream(reader, first, include_usage, after)),
        mimetype="text/event-stream",
        # Once a worker holds the job (wait_for_start waits for that, a resume may not): name it.
        headers={"Cache-Control": "no-cache, no-store", "X-Accel-Buffering": "no", "x-request-id": first[0].public_id,
                 **routing.served_headers(first[0])},
    )


def sse_stream(reader: Reader, first: tuple[Job, list[Chunk]], include_usage: bool, after: int = -1) -> Iterator[str]:
    """Relay a job as OpenAI's event stream from what was read first; a live process ends each with [DONE].

    Each event's id is its place in the job's stream: 0 the role chunk, seq + 1 each chunk,
    then the finish (or error), the usage and [DONE]. A resume after event `after` starts
    at chunk `after` (`first` holds the chunks from there).
    """
    job = first[0]
    seq = max(0, after)
    deltas: list[dict[str, Any]] = []
    ended = False
    last = after
    try:
        # Something goes out at once: Passenger sends no headers before the first bytes.
        # Inside the try: a client already gone fails this very first write.
        if after < 0:
            last = 0
            yield sse(chunk_event(job, {"role": "assistant", "content": ""}), last)
        else:
            yield ": resumed\n"
        for kind, payload in relay.follow(reader, first, seq):
            if kind == "chunks":
                for chunk in payload:
                    deltas.append(chunk.delta)
                    last = chunk.seq + 1
                    yield sse(chunk_event(job, chunk.delta), last)
            elif kind == "heartbeat":
                # A comment line with no blank line after it: once a stream has an id, the
                # openai package takes a blank line for an event and fails to parse its empty data.
                yield ": keep-alive\n"
            else:
                job = payload
        ended = True
        for event_id, data in closing_events(job, deltas if seq == 0 else None, include_usage):
            if event_id > after:
                last = event_id
                yield sse(data, event_id)
        yield f"id: {last}\ndata: [DONE]\n\n"
    except ApiError as err:
        # No worker in time, or the database gone past DB_OUTAGE_GRACE: say so and end
        # cleanly. The ids stay where they were, so a resume picks up what is missing.
        yield sse(err.body(), last)
        yield f"id: {last}\ndata: [DONE]\n\n"
    except ClientGone:
        pass
    finally:
        # GeneratorExit (the client disconnected) lands here too. Accounted even when
        # abandoned: what the worker produced so far is counted.
        end_request(reader, ended, deltas if seq == 0 else None, current_app.config["RESUME_GRACE"])


def closing_events(job: Job, deltas: Optional[list[dict[str, Any]]], include_usage: bool) -> list[tuple[int, Any]]:
    """Return the ended job's last events with their ids: its finish or error, then its usage; deltas None reads them."""
    end = job.next_seq + 1
    if job.state != "completed":
        return [(end, relay.job_error(job).body())]
    events = [(end, chunk_event(job, {}, job.finish_reason or "stop"))]
    if include_usage:
        if deltas is None:
            deltas = [chunk.delta for chunk in jobs.read_progress(job.id, 0)[1]]
        events.append((end + 1, usage_event(job, deltas)))
    return events


def add_headers(response: Response, headers: dict[str, str]) -> Response:
    """Copy headers onto a response (error responses included)."""
    response.headers.update(headers)
    return response


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
