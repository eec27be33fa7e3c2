"""Tavern mode: a chat's system messages merged, in order, into one leading system message.

Role-play clients such as SillyTavern send several system messages, some between the
turns; many model servers and chat sites honour only the first, or refuse the rest.
"""
from __future__ import annotations

from typing import Any

from flask import request

from .errors import ApiError
from .models import ApiKey

HEADER = "X-Tavern-Mode"
ON = ("on", "true", "1", "yes")
OFF = ("off", "false", "0", "no")


def wanted(key: ApiKey) -> bool:
    """Tell whether this request merges its system messages: the header if sent, else the key's option."""
    value = request.headers.get(HEADER)
    if value is None:
        return key.tavern
    value = value.strip().lower()
    if value not in ON + OFF:
        raise ApiError(400, f"{HEADER} must be 'on' or 'off'.", code="invalid_value", param=HEADER)
    return value in ON


def merge_system(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Return the messages with every system message's text, in order, as one leading system message."""
    system = [m for m in messages if m["role"] == "system"]
    if not system or (len(system) == 1 and messages[0] is system[0]):
        return messages
    texts = [text for text in (_text(m["content"]) for m in system) if text]
    rest = [m for m in messages if m["role"] != "system"]
    return [{"role": "system", "content": "\n\n".join(texts)}, *rest]


def _text(content: Any) -> str:
    # A system message's parts are text (validation lets nothing else through but images,
    # which no system prompt carries); join them as the client would have written them.
    if isinstance(content, str):
        return content
    return "\n".join(part["text"] for part in content or [] if part.get("type") == "text")
