"""Validate what workers send (docs/worker-protocol.md) as strictly as client input.

A report is stored whole or not at all, and later readers (the answer's merge, token
counting, usage settlement, the pages) trust what was stored: so every field is checked
here, and a bad one is a 400 whose `param` names it, e.g.
`jobs[0].chunks[3].delta.tool_calls[0].function.arguments`. Optional fields sent as null
count as absent, as on the client API.
"""
from __future__ import annotations

import math
import re
from typing import Any

from flask import current_app

from . import features, jobs
from .errors import ApiError
from .models import NOT_READY
from .validation import INT32_MAX, bad, check_int, check_str

MAX_MODELS = 64
MAX_JOBS_PER_CLAIM = 32
MAX_ID = 191  # job ids, leases, model ids, sites, tool-call ids and names: indexed VARCHAR(191)
MAX_SHORT = 32  # worker kind and version
MAX_STATUS_MESSAGE = 255  # longer is cut: a person reads it, nothing parses it
MAX_ERROR_MESSAGE = 2000  # longer is cut, likewise
MAX_RELEASE = 256
MAX_TOOL_INDEX = 127
MAX_FEATURES = 16
FEATURE_NAME = re.compile(r"[a-z0-9_.-]{1,32}")
TEXT_FIELDS = ("content", "reasoning_content", "refusal")
DELTA_FIELDS = (*TEXT_FIELDS, "tool_calls", "images", "logprobs")
LOGPROBS_FIELDS = ("content", "refusal")
TOKEN_FIELDS = ("token", "logprob", "bytes", "top_logprobs")
TOP_FIELDS = ("token", "logprob", "bytes")
MAX_LOGPROB_TOKENS = 4096  # per delta: a streamed delta has one or a few; a whole answer relayed at once, more
MAX_TOP_LOGPROBS = 20  # OpenAI's top_logprobs ceiling
MAX_TOKEN = 1000  # characters of one token's text
MAX_TOKEN_BYTES = 4 * MAX_TOKEN
TOOL_CALL_FIELDS = ("index", "id", "type", "function")
FUNCTION_FIELDS = ("name", "arguments")
FINISH_REASONS = ("stop", "length", "tool_calls", "content_filter")
# A code outside this alphabet is stored as the catch-all, so the job still fails at once.
ERROR_CODE = re.compile(r"[a-z0-9_.-]{1,64}")
DEFAULT_ERROR_CODE = "upstream_error"
# Codes the gateway itself gives a job; a worker using one would pose as the gateway
# (a "cancelled" that is no cancellation), so it is stored as the catch-all too.
GATEWAY_CODES = ("deadline", "no_worker", "cancelled", "client_gone", "worker_lost", "worker_released")
CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def _label(value: Any, param: str, max_length: int) -> str:
    """Return a string shown on pages (a model id, a site), refusing control characters."""
    check_str(value, param, max_length)
    if CONTROL.search(value):
        raise bad(f"{param} must not contain control characters.", param)
    return value


def _id(value: Any, param: str) -> str:
    """Return a non-empty string of at most MAX_ID characters (a job id, a lease)."""
    if not check_str(value, param, MAX_ID):
        raise bad(f"{param} must not be empty.", param)
    return value


def _object(value: Any, param: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise bad(f"{param} must be an object.", param, "invalid_type")
    return value


def _list(value: Any, param: str, max_items: int | None = None) -> list[Any]:
    if not isinstance(value, list):
        raise bad(f"{param} must be a list.", param, "invalid_type")
    if max_items is not None and len(value) > max_items:
        raise bad(f"{param} must have at most {max_items} items.", param)
    return value


def _only(obj: dict[str, Any], allowed: tuple[str, ...], param: str) -> None:
    for name in obj:
        if name not in allowed:
            raise bad(f"{param}.{name} is not allowed (allowed: {', '.join(allowed)}).", f"{param}.{name}",
                      "unknown_parameter")


# -- claim and status ------------------------------------------------------------------


def _models(body: dict[str, Any], name: str) -> list[str]:
    models = body.get(name)
    if models is None:
        return []
    _list(models, name, MAX_MODELS)
    for i, model in enumerate(models):
        if not _label(model, f"{name}[{i}]", MAX_ID):
            raise bad(f"{name}[{i}] must not be empty.", f"{name}[{i}]")
    return list(dict.fromkeys(models))


def _optional_label(body: dict[str, Any], name: str, max_length: int) -> str:
    value = body.get(name)
    return "" if value is None else _label(value, name, max_length)


def _features(body: dict[str, Any]) -> list[str]:
    """Return the features the gateway knows from a claim's list; the list is checked whole."""
    declared = body.get("features")
    if declared is None:
        return []
    _list(declared, "features", MAX_FEATURES)
    for i, name in enumerate(declared):
        if not isinstance(name, str) or not FEATURE_NAME.fullmatch(name):
            raise bad(f"features[{i}] must be 1-32 characters of a-z 0-9 _ . -.", f"features[{i}]")
    # A name this gateway does not know (a newer worker's) is no reason to refuse the claim.
    return features.known(declared)


def parse_claim(body: Any) -> dict[str, Any]:
    """Validate a claim request and return what the claim view needs."""
    _object(body, "body")
    models, image_models = _models(body, "models"), _models(body, "image_models")
    if not models and not image_models:
        raise bad("models must list at least one model id (or image_models one image model id).", "models")
    wait_max = current_app.config["CLAIM_WAIT_MAX"]
    wait = body.get("wait")
    if wait is None:
        wait = wait_max
    # Python's JSON parser reads NaN, Infinity and 1e999: none of them is a wait.
    if isinstance(wait, bool) or not isinstance(wait, (int, float)) or not math.isfinite(wait) or wait < 0:
        raise bad("wait must be a finite number of seconds, 0 or more.", "wait")
    max_jobs = 1 if body.get("max_jobs") is None else check_int(body["max_jobs"], "max_jobs", 1, MAX_JOBS_PER_CLAIM)
    capacity = max_jobs if body.get("capacity") is None else check_int(body["capacity"], "capacity", 1, 256)
    return {
        "models": models,
        "image_models": image_models,
        "max_jobs": max_jobs,
        "capacity": capacity,
        "wait": min(float(wait), wait_max),
        "kind": _optional_label(body, "kind", MAX_SHORT),
        "version": _optional_label(body, "version", MAX_SHORT),
        "site": _optional_label(body, "site", MAX_ID),
        "features": _features(body),
    }


def parse_status(body: Any) -> tuple[str, str]:
    """Validate a status report and return (status, message), the message cut to 255 characters."""
    state = body.get("status") if isinstance(body, dict) else None
    if state not in NOT_READY:
        raise bad(f"status must be one of {', '.join(NOT_READY)}; claiming again means ready.", "status")
    message = body.get("message")
    return state, "" if message is None else check_str(message, "message")[:MAX_STATUS_MESSAGE]


def parse_release(body: Any) -> list[tuple[str, str]]:
    """Validate a release request and return its (job id, lease) pairs."""
    entries = body.get("jobs") if isinstance(body, dict) else None
    _list(entries, "jobs", MAX_RELEASE)
    pairs = []
    for i, entry in enumerate(entries):
        _object(entry, f"jobs[{i}]")
        pairs.append((_id(entry.get("id"), f"jobs[{i}].id"), _id(entry.get("lease"), f"jobs[{i}].lease")))
    return pairs


# -- chunk reports ---------------------------------------------------------------------


def parse_reports(body: Any) -> list[jobs.Report]:
    """Validate a chunk report as a whole, so a malformed one stores nothing."""
    entries = body.get("jobs") if isinstance(body, dict) else None
    if not _list(entries, "jobs"):
        raise bad("jobs must be a non-empty list.", "jobs")
    reports = []
    total = 0
    for i, entry in enumerate(entries):
        where = f"jobs[{i}]"
        _object(entry, where)
        chunks = [] if entry.get("chunks") is None else _list(entry["chunks"], f"{where}.chunks")
        total += len(chunks)
        # Count before walking them: a report too large is refused without the work.
        if total > current_app.config["MAX_CHUNKS_PER_REPORT"]:
            raise ApiError(413, "Too many chunks in one report; send smaller batches.", code="request_too_large")
        report = jobs.Report(
            public_id=_id(entry.get("id"), f"{where}.id"),
            lease=_id(entry.get("lease"), f"{where}.lease"),
            chunks=[_chunk(f"{where}.chunks[{j}]", c) for j, c in enumerate(chunks)],
            finish=_finish(f"{where}.finish", entry.get("finish")),
            error=_error(f"{where}.error", entry.get("error")),
        )
        if report.finish is not None and report.error is not None:
            raise bad(f"{where} has both finish and error.", where)
        reports.append(report)
    return reports


def _chunk(where: str, chunk: Any) -> tuple[int, dict[str, Any]]:
    _object(chunk, where)
    seq = check_int(chunk.get("seq"), f"{where}.seq", 0, INT32_MAX)
    return seq, _delta(f"{where}.delta", chunk.get("delta"))


def _delta(where: str, delta: Any) -> dict[str, Any]:
    if not _object(delta, where):
        raise bad(f"{where} must be a non-empty object.", where)
    _only(delta, DELTA_FIELDS, where)
    clean: dict[str, Any] = {}
    for name in TEXT_FIELDS:
        if name in delta:
            clean[name] = check_str(delta[name], f"{where}.{name}")
    if "tool_calls" in delta:
        calls = _list(delta["tool_calls"], f"{where}.tool_calls", MAX_TOOL_INDEX + 1)
        clean["tool_calls"] = [_tool_call(f"{where}.tool_calls[{k}]", c) for k, c in enumerate(calls)]
    if "images" in delta:
        clean["images"] = [_image(f"{where}.images[{k}]", image)
                           for k, image in enumerate(_list(delta["images"], f"{where}.images"))]
    if delta.get("logprobs") is not None:
        clean["logprobs"] = _logprobs(f"{where}.logprobs", delta["logprobs"])
    return clean


def _logprobs(where: str, logprobs: Any) -> dict[str, Any]:
    """Return a delta's log probabilities as OpenAI's choice.logprobs has them: content and refusal lists."""
    _object(logprobs, where)
    _only(logprobs, LOGPROBS_FIELDS, where)
    clean: dict[str, Any] = {}
    for name in LOGPROBS_FIELDS:
        if logprobs.get(name) is not None:
            tokens = _list(logprobs[name], f"{where}.{name}", MAX_LOGPROB_TOKENS)
            clean[name] = [_token_logprob(f"{where}.{name}[{k}]", t) for k, t in enumerate(tokens)]
    return clean


def _token_logprob(where: str, entry: Any, top: bool = False) -> dict[str, Any]:
    """Return one token's {"token", "logprob", "bytes", "top_logprobs"} (no top_logprobs inside a top one)."""
    _object(entry, where)
    _only(entry, TOP_FIELDS if top else TOKEN_FIELDS, where)
    logprob = entry.get("logprob")
    # Python's JSON parser reads -Infinity; the client's would not, and no sum over it means anything.
    if isinstance(logprob, bool) or not isinstance(logprob, (int, float)) or not math.isfinite(logprob):
        raise bad(f"{where}.logprob must be a finite number.", f"{where}.logprob", "invalid_type")
    clean: dict[str, Any] = {"token": check_str(entry.get("token"), f"{where}.token", MAX_TOKEN),
                             "logprob": logprob, "bytes": None}
    if entry.get("bytes") is not None:
        raw = _list(entry["bytes"], f"{where}.bytes", MAX_TOKEN_BYTES)
        clean["bytes"] = [check_int(b, f"{where}.bytes[{k}]", 0, 255) for k, b in enumerate(raw)]
    if not top:
        alternatives = [] if entry.get("top_logprobs") is None else \
            _list(entry["top_logprobs"], f"{where}.top_logprobs", MAX_TOP_LOGPROBS)
        clean["top_logprobs"] = [_token_logprob(f"{where}.top_logprobs[{k}]", t, top=True)
                                 for k, t in enumerate(alternatives)]
    return clean


def _tool_call(where: str, call: Any) -> dict[str, Any]:
    """Return one streamed tool-call piece as OpenAI shapes it, without its null fields."""
    _object(call, where)
    _only(call, TOOL_CALL_FIELDS, where)
    clean: dict[str, Any] = {"index": check_int(call.get("index"), f"{where}.index", 0, MAX_TOOL_INDEX)}
    if call.get("id") is not None:
        clean["id"] = check_str(call["id"], f"{where}.id", MAX_ID)
    if call.get("type") is not None:
        if call["type"] != "function":
            raise bad(f"{where}.type must be 'function'.", f"{where}.type")
        clean["type"] = "function"
    if call.get("function") is not None:
        function = _object(call["function"], f"{where}.function")
        _only(function, FUNCTION_FIELDS, f"{where}.function")
        clean["function"] = {}
        if function.get("name") is not None:
            clean["function"]["name"] = check_str(function["name"], f"{where}.function.name", MAX_ID)
        if function.get("arguments") is not None:
            clean["function"]["arguments"] = check_str(function["arguments"], f"{where}.function.arguments")
    return clean


def _image(where: str, image: Any) -> dict[str, str]:
    if not isinstance(image, dict) or len(image) != 1 or not ({"url", "b64_json"} & set(image)):
        raise bad(f'{where} must be {{"url": ...}} or {{"b64_json": ...}}.', where)
    (name, value), = image.items()
    return {name: check_str(value, f"{where}.{name}")}


def _finish(where: str, finish: Any) -> dict[str, Any] | None:
    if finish is None:
        return None
    _object(finish, where)
    reason = finish.get("reason")
    if reason is None:
        reason = "stop"
    if reason not in FINISH_REASONS:
        raise bad(f"{where}.reason must be one of {', '.join(FINISH_REASONS)}.", f"{where}.reason")
    clean: dict[str, Any] = {"reason": reason}
    usage = finish.get("usage")
    if usage is not None:
        # Other counts an upstream sends along (total_tokens, details) are not kept.
        _object(usage, f"{where}.usage")
        clean["usage"] = {name: check_int(usage.get(name), f"{where}.usage.{name}", 0, INT32_MAX)
                          for name in ("prompt_tokens", "completion_tokens")}
    return clean


def _error(where: str, error: Any) -> dict[str, Any] | None:
    if error is None:
        return None
    _object(error, where)
    code = error.get("code")
    code = "" if code is None else check_str(code, f"{where}.code")
    message = error.get("message")
    message = "" if message is None else check_str(message, f"{where}.message")
    retry = error.get("retry")
    if retry is not None and not isinstance(retry, bool):
        raise bad(f"{where}.retry must be a boolean.", f"{where}.retry", "invalid_type")
    return {
        "code": code if ERROR_CODE.fullmatch(code) and code not in GATEWAY_CODES else DEFAULT_ERROR_CODE,
        "message": message[:MAX_ERROR_MESSAGE],
        "retry": bool(retry),
    }
