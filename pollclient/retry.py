"""Backoff delays and short, readable descriptions of network failures."""
from __future__ import annotations

import email.utils
import random
import time
from collections.abc import Mapping

import requests


class Backoff:
    """Exponential delays with jitter, starting over after a success."""

    def __init__(self, first: float = 1.0, cap: float = 30.0) -> None:
        self.first = first
        self.cap = cap
        self.failures = 0

    def next(self, cap: float | None = None) -> float:
        """Return the delay before the next try (at most cap, if given) and count this failure."""
        delay = min(self.cap if cap is None else min(cap, self.cap), self.first * 2**min(self.failures, 32))
        self.failures += 1
        # "Equal jitter": never less than half the delay, so a crowd of workers spreads out
        # without any of them hammering a gateway that is still down.
        return delay / 2 + random.uniform(0, delay / 2)

    def reset(self) -> None:
        """Start from the first delay again."""
        self.failures = 0


# However long a 429 or 503 asks a worker to wait, it tries again within this many seconds:
# an upgrade or a database outage can end sooner than the gateway guessed.
MAX_RETRY_AFTER = 120.0
RETRY_AFTER_FLOOR = 0.5  # a Retry-After of 0 must not become a busy loop


def polite_delay(seconds: float, cap: float = MAX_RETRY_AFTER) -> float:
    """Return how long to wait on a Retry-After: it, plus up to a fifth more so a crowd spreads out, at most cap."""
    delay = max(seconds, RETRY_AFTER_FLOOR) * random.uniform(1.0, 1.2)
    # Never past the cap, but still spread out below it.
    return delay if delay <= cap else cap * random.uniform(0.8, 1.0)


def retry_after(headers: Mapping[str, str], default: float = 5.0) -> float:
    """Read a Retry-After header (seconds or an HTTP date), clamped to 0..300 seconds."""
    value = (headers.get("Retry-After") or "").strip()
    if not value:
        return default
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = email.utils.parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError):
            return default
    return min(max(seconds, 0.0), 300.0)


_CAUSES = (
    ("Connection refused", "connection refused"),
    ("Name or service not known", "host name not found"),
    ("nodename nor servname", "host name not found"),
    ("Temporary failure in name resolution", "host name not found"),
    ("getaddrinfo failed", "host name not found"),
    ("No route to host", "no route to host"),
    ("Network is unreachable", "network unreachable"),
    ("Connection reset", "connection reset"),
    ("Connection aborted", "connection aborted"),
    ("RemoteDisconnected", "connection closed by the server"),
)


def describe_error(exc: BaseException) -> str:
    """Say in a few words why a request failed, instead of urllib3's nested reprs."""
    if isinstance(exc, requests.Timeout):
        return "timed out"
    if isinstance(exc, requests.exceptions.SSLError):
        return "TLS error"
    if isinstance(exc, requests.exceptions.ChunkedEncodingError):
        return "connection dropped mid-response"
    text = str(exc)
    for needle, words in _CAUSES:
        if needle in text:
            return words
    if isinstance(exc, requests.ConnectionError):
        return "connection failed"
    return f"{type(exc).__name__}: {text[:200]}"
