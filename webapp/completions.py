"""Build OpenAI's answer objects from a job and its deltas: chunks, completions and usage."""
from __future__ import annotations

import json
from typing import Any, Optional

from . import features, usage
from .models import Job, epoch


def chunk_event(job: Job, delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
    """Build one chat.completion.chunk; a delta's log probabilities go beside it, where OpenAI puts them."""
    logprobs = None
    if "logprobs" in delta:
        logprobs = merge_logprobs(job, [delta])
        delta = {k: v for k, v in delta.items() if k != "logprobs"}
    return {
        "id": job.public_id,
        "object": "chat.completion.chunk",
        "created": epoch(job.created_at),
        "model": job.model,
        "system_fingerprint": None,
        "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}],
    }


def usage_event(job: Job, deltas: list[dict[str, Any]]) -> dict[str, Any]:
    """Build the last chunk of a stream that asked for usage: no choices, just the counts."""
    event = chunk_event(job, {})
    event["choices"] = []
    event["usage"] = usage_for(job, deltas)
    return event


def sse(data: Any, event_id: Optional[int] = None) -> str:
    """Frame one server-sent event, with its id when it has one."""
    head = "" if event_id is None else f"id: {event_id}\n"
    return f"{head}data: {json.dumps(data, separators=(',', ':'), ensure_ascii=False)}\n\n"


# A job's state as a background completion's `status` says it (OpenAI's background words).
STATUS = {"queued": "queued", "running": "in_progress", "completed": "completed", "failed": "failed",
          "cancelled": "cancelled", "expired": "expired"}


def status_object(job: Job, deltas: list[dict[str, Any]], error: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """Describe a job as a chat.completion with its `status`: the whole answer once completed, else what is there so far."""
    if job.state == "completed":
        return {**completion(job, deltas), "status": "completed"}
    found = {
        "id": job.public_id,
        "object": "chat.completion",
        "created": epoch(job.created_at),
        "model": job.model,
        "system_fingerprint": None,
        "status": STATUS[job.state],
        "choices": [{"index": 0, "message": merge_deltas(deltas), "logprobs": merge_logprobs(job, deltas),
                     "finish_reason": None}]
        if deltas else [],
        "usage": None,
    }
    if error is not None:
        found["error"] = error
    return found


def completion(job: Job, deltas: list[dict[str, Any]]) -> dict[str, Any]:
    """Build the chat.completion of a completed job."""
    return {
        "id": job.public_id,
        "object": "chat.completion",
        "created": epoch(job.created_at),
        "model": job.model,
        "system_fingerprint": None,
        "choices": [
            {"index": 0, "message": merge_deltas(deltas), "logprobs": merge_logprobs(job, deltas),
             "finish_reason": job.finish_reason or "stop"}
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


def merge_logprobs(job: Job, deltas: list[dict[str, Any]]) -> Optional[dict[str, Any]]:
    """Join the deltas' log probabilities into OpenAI's choice.logprobs; None when there are none."""
    if not features.asked(job.needs or "", features.LOGPROBS):
        return None  # sent by a worker unasked: the client gets what it asked for
    found: dict[str, list[dict[str, Any]]] = {}
    for delta in deltas:
        for name, tokens in (delta.get("logprobs") or {}).items():
            found.setdefault(name, []).extend(tokens)
    return {"content": found.get("content"), "refusal": found.get("refusal")} if found else None


def usage_for(job: Job, deltas: list[dict[str, Any]]) -> dict[str, int]:
    """Return the usage a client sees: the same counts its usage row is settled with."""
    prompt, completion_tokens, _ = usage.job_tokens(job, deltas)
    return {"prompt_tokens": prompt, "completion_tokens": completion_tokens, "total_tokens": prompt + completion_tokens}


def images(deltas: list[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    """Collect the first n images a job's deltas carry."""
    return [image for delta in deltas for image in delta.get("images", [])][:n]
