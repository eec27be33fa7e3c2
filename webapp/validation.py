"""Validate an OpenAI chat request and reduce it to what a worker receives."""
from __future__ import annotations

from typing import Any, NamedTuple

from . import settings
from .errors import ApiError

ROLES = ("system", "developer", "user", "assistant", "tool", "function")
# Passed through to the worker as the client sent them, after a type check.
NUMBER_RANGES = {
    "temperature": (0.0, 2.0),
    "top_p": (0.0, 1.0),
    "presence_penalty": (-2.0, 2.0),
    "frequency_penalty": (-2.0, 2.0),
}
# Passed through after a type check: the pollclient relays the whole request to its
# OpenAI-compatible upstream, which honours what it knows; the browser worker ignores them.
OPAQUE = {
    "tools": list,
    "tool_choice": (str, dict),
    "response_format": dict,
    "parallel_tool_calls": bool,
    "reasoning_effort": str,
    "user": str,
    "logit_bias": dict,
    "prompt_cache_key": str,
    "prompt_cache_options": dict,
    "safety_identifier": str,
    "moderation": dict,
}
# Passed through when they are one of OpenAI's values; a typo is the caller's 400, not the upstream's.
CHOICES = {
    "verbosity": ("low", "medium", "high"),
    "prompt_cache_retention": ("in_memory", "24h"),
}
# Accepted and dropped: they describe the client's bookkeeping, not the answer.
IGNORED = ("metadata", "store", "service_tier", "stream_options", "stream", "model", "messages", "background")
# Known OpenAI parameters no worker can honour: say so instead of silently ignoring them.
UNSUPPORTED = {
    "audio": "Audio output is not supported.",
    "prediction": "Predicted outputs are not supported.",
    "functions": "The deprecated 'functions' parameter is not supported; use 'tools'.",
    "function_call": "The deprecated 'function_call' parameter is not supported; use 'tool_choice'.",
    "web_search_options": "Web search options are not supported.",
}
# Checked on their own in _param.
CHECKED = ("max_tokens", "max_completion_tokens", "seed", "n", "stop", "modalities")
# Passed through when true: only a worker that declared the feature may take the job (webapp/features.py).
LOGPROBS = ("logprobs", "top_logprobs")
MAX_TOP_LOGPROBS = 20
# Every request parameter Pollgate understands; tests hold it against the openai package's own list.
KNOWN = frozenset([*NUMBER_RANGES, *OPAQUE, *CHOICES, *IGNORED, *UNSUPPORTED, *CHECKED, *LOGPROBS])
MAX_STOP = 4
INT32_MAX = 2**31 - 1  # the widest count any column or client library holds safely
INT64_MAX = 2**63 - 1


# The little rules the client API and the worker protocol (worker_input.py) share.


def bad(message: str, param: str, code: str = "invalid_value") -> ApiError:
    """Build a 400 that names the offending parameter."""
    return ApiError(400, message, code=code, param=param)


def check_int(value: Any, param: str, low: int, high: int) -> int:
    """Return value if it is an integer (not a bool) from low to high, else raise a 400 naming param."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad(f"{param} must be an integer.", param, "invalid_type")
    if not low <= value <= high:
        raise bad(f"{param} must be an integer from {low} to {high}.", param)
    return value


def check_str(value: Any, param: str, max_length: int | None = None) -> str:
    """Return value if it is a string of at most max_length characters, else raise a 400 naming param."""
    if not isinstance(value, str):
        raise bad(f"{param} must be a string.", param, "invalid_type")
    if max_length is not None and len(value) > max_length:
        raise bad(f"{param} must be at most {max_length} characters.", param)
    return value


class ChatRequest(NamedTuple):
    """A validated chat request: what the worker receives, and how the client wants the answer."""

    request: dict[str, Any]
    stream: bool
    include_usage: bool
    background: bool
    n: int  # how many choices: each one a job of its own


def validate_chat(body: Any) -> ChatRequest:
    """Return the validated request or raise a 400 naming the param."""
    if not isinstance(body, dict):
        raise ApiError(400, "The request body must be a JSON object.", code="invalid_json")
    model = body.get("model")
    if not isinstance(model, str) or not model.strip():
        raise bad("You must provide a model parameter.", "model", "missing_required_parameter")
    out: dict[str, Any] = {"model": model, "messages": _messages(body.get("messages"))}
    stream = _flag(body, "stream")
    include_usage = False
    options = body.get("stream_options")
    if options is not None:
        if not stream:
            raise bad("stream_options is only allowed when stream is true.", "stream_options")
        if not isinstance(options, dict):
            raise bad("stream_options must be an object.", "stream_options", "invalid_type")
        include_usage = _flag(options, "include_usage", "stream_options.include_usage")
    background = _flag(body, "background")
    if background and stream:
        raise bad("A background request cannot stream; stream its answer with "
                  "GET /v1/chat/completions/{id}?stream=true.", "background")
    n = _choices(body.get("n"), background)
    for name, value in body.items():
        if value is None or name in IGNORED:
            continue
        out_value = _param(name, value, body)
        if out_value is not None:
            out[name] = out_value
    return ChatRequest(out, stream, include_usage, background, n)


def _flag(obj: dict, name: str, param: str | None = None) -> bool:
    value = obj.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise bad(f"{param or name} must be a boolean.", param or name, "invalid_type")
    return value


def _choices(value: Any, background: bool) -> int:
    """Return how many choices the request asks for, up to the site's max_choices."""
    if value is None or value == 1 and not isinstance(value, bool):
        return 1  # the common case reads no setting
    n = check_int(value, "n", 1, settings.get("max_choices"))
    if background:
        raise bad("A background request answers with one choice: n must be 1.", "n")
    return n


def _param(name: str, value: Any, body: dict) -> Any:
    if name in NUMBER_RANGES:
        low, high = NUMBER_RANGES[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
            raise bad(f"{name} must be a number between {low:g} and {high:g}.", name)
        return value
    if name in ("max_tokens", "max_completion_tokens"):
        return check_int(value, name, 1, INT32_MAX)
    if name == "seed":
        return check_int(value, name, -INT64_MAX - 1, INT64_MAX)
    if name == "n":
        return None  # checked by _choices: each choice is a job of its own, asked for one answer
    if name == "stop":
        return _stop(value)
    if name in LOGPROBS:
        return _logprobs(name, value, body)
    if name in OPAQUE:
        if not isinstance(value, OPAQUE[name]):
            raise bad(f"{name} has the wrong type.", name, "invalid_type")
        return value
    if name in CHOICES:
        if value not in CHOICES[name]:
            raise bad(f"{name} must be one of {', '.join(CHOICES[name])}.", name)
        return value
    if name in UNSUPPORTED:
        if value is False or value == 0:
            return None
        raise bad(UNSUPPORTED[name], name, "unsupported_parameter")
    if name == "modalities":
        if value != ["text"]:
            raise bad("Only the text modality is supported.", name, "unsupported_parameter")
        return None
    raise bad(f"Unrecognized request argument supplied: {name}", name, "unknown_parameter")


def _logprobs(name: str, value: Any, body: dict) -> Any:
    if name == "logprobs":
        if not isinstance(value, bool):
            raise bad("logprobs must be a boolean.", name, "invalid_type")
        return value or None  # false asks for nothing: dropped
    check_int(value, name, 0, MAX_TOP_LOGPROBS)
    if body.get("logprobs") is not True:
        raise bad("logprobs must be set to true if top_logprobs is used.", name)
    return value


def _stop(value: Any) -> Any:
    if isinstance(value, str):
        return value
    if (
        isinstance(value, list)
        and 0 < len(value) <= MAX_STOP
        and all(isinstance(v, str) and v for v in value)
    ):
        return value
    raise bad(f"stop must be a string or a list of 1 to {MAX_STOP} non-empty strings.", "stop")


def _messages(messages: Any) -> list[dict[str, Any]]:
    if not isinstance(messages, list) or not messages:
        raise bad("messages must be a non-empty array.", "messages", "missing_required_parameter")
    return [_message(i, m) for i, m in enumerate(messages)]


def _message(i: int, message: Any) -> dict[str, Any]:
    where = f"messages[{i}]"
    if not isinstance(message, dict):
        raise bad(f"{where} must be an object.", where, "invalid_type")
    role = message.get("role")
    if role not in ROLES:
        raise bad(f"{where}.role must be one of {', '.join(ROLES)}.", f"{where}.role")
    content = message.get("content")
    if content is None:
        if role != "assistant" or not message.get("tool_calls"):
            raise bad(f"{where}.content is required.", f"{where}.content", "missing_required_parameter")
    elif isinstance(content, list):
        for j, part in enumerate(content):
            _part(f"{where}.content[{j}]", part)
    elif not isinstance(content, str):
        raise bad(f"{where}.content must be a string or an array of parts.", f"{where}.content", "invalid_type")
    if message.get("name") is not None:
        check_str(message["name"], f"{where}.name")
    if role == "tool":
        if message.get("tool_call_id") is None:
            raise bad(f"{where}.tool_call_id is required in a tool message.", f"{where}.tool_call_id",
                      "missing_required_parameter")
        check_str(message["tool_call_id"], f"{where}.tool_call_id")
    if message.get("tool_calls") is not None:
        _tool_calls(f"{where}.tool_calls", message["tool_calls"])
    # Keep the message as sent: names, tool_call_id and tool_calls matter to the worker.
    return message


def _tool_calls(where: str, calls: Any) -> None:
    # Token counting and every worker read these as OpenAI shapes them; refuse anything else here.
    if not isinstance(calls, list):
        raise bad(f"{where} must be an array.", where, "invalid_type")
    for j, call in enumerate(calls):
        at = f"{where}[{j}]"
        if not isinstance(call, dict):
            raise bad(f"{at} must be an object.", at, "invalid_type")
        check_str(call.get("id"), f"{at}.id")
        if call.get("type") != "function":
            raise bad(f"{at}.type must be 'function'.", f"{at}.type")
        function = call.get("function")
        if not isinstance(function, dict):
            raise bad(f"{at}.function must be an object.", f"{at}.function", "invalid_type")
        check_str(function.get("name"), f"{at}.function.name")
        check_str(function.get("arguments"), f"{at}.function.arguments")


def _part(where: str, part: Any) -> None:
    if not isinstance(part, dict):
        raise bad(f"{where} must be an object.", where, "invalid_type")
    kind = part.get("type")
    if kind == "text":
        if not isinstance(part.get("text"), str):
            raise bad(f"{where}.text must be a string.", f"{where}.text", "invalid_type")
    elif kind == "image_url":
        image = part.get("image_url")
        url = image.get("url") if isinstance(image, dict) else None
        if not isinstance(url, str) or not url.startswith(("http://", "https://", "data:image/")):
            raise bad(f"{where}.image_url.url must be an http(s) URL or a data:image/ URL.", f"{where}.image_url.url")
    else:
        raise bad(f"{where}.type must be 'text' or 'image_url'.", f"{where}.type", "unsupported_parameter")


IMAGE_FORMATS = ("url", "b64_json")
MAX_IMAGE_PROMPT = 32000  # characters; OpenAI's gpt-image-1 limit
MAX_IMAGES = 4


def validate_image(body: Any) -> dict[str, Any]:
    """Return the image request a worker receives, or raise a 400 naming the param."""
    if not isinstance(body, dict):
        raise ApiError(400, "The request body must be a JSON object.", code="invalid_json")
    model = body.get("model")
    if not isinstance(model, str) or not model.strip():
        raise bad("You must provide a model parameter: an image model a worker serves (see /v1/models).", "model",
                  "missing_required_parameter")
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise bad("You must provide a prompt.", "prompt", "missing_required_parameter")
    if len(prompt) > MAX_IMAGE_PROMPT:
        raise bad(f"The prompt is longer than {MAX_IMAGE_PROMPT} characters.", "prompt")
    n = check_int(body.get("n", 1), "n", 1, MAX_IMAGES)
    response_format = body.get("response_format") or "url"
    if response_format not in IMAGE_FORMATS:
        raise bad("response_format must be 'url' or 'b64_json'.", "response_format")
    out: dict[str, Any] = {"model": model, "prompt": prompt, "n": n, "response_format": response_format}
    for name in ("size", "quality", "style", "user"):
        if name in body and body[name] is not None:
            if not isinstance(body[name], str) or len(body[name]) > 64:
                raise bad(f"{name} must be a string.", name)
            out[name] = body[name]
    return out
