"""Cross-origin calls to the API from web chat UIs, for the origins an administrator allows.

Only `/v1/*`, and never with credentials: the API authenticates with a bearer key the page
itself holds, so allowing an origin lets its scripts call the API with a key a user gave
them, and nothing that rides on a cookie. No origin is allowed until the setting names one.
"""
from __future__ import annotations

from typing import Optional
from urllib.parse import urlsplit

from flask import Flask, Response, request
from sqlalchemy.exc import SQLAlchemyError

from . import settings

# What browser clients send: the key, JSON, the OpenAI SDKs' own headers (JavaScript's
# sends x-stainless-*), a resumed stream's Last-Event-ID, and Pollgate's routing headers.
ALLOWED_HEADERS = ", ".join((
    "Authorization", "Content-Type", "Accept", "Last-Event-ID", "OpenAI-Organization", "OpenAI-Project",
    "OpenAI-Beta", "X-Stainless-Arch", "X-Stainless-Lang", "X-Stainless-OS", "X-Stainless-Package-Version",
    "X-Stainless-Runtime", "X-Stainless-Runtime-Version", "X-Stainless-Retry-Count", "X-Stainless-Timeout",
    "X-Stainless-Helper-Method", "X-Stainless-Poll-Helper", "X-Provider", "X-Session-Name", "X-Target-Domain",
    "X-Tavern-Mode",
))
# What a page's script may read off an answer besides the simple headers.
EXPOSED_HEADERS = ", ".join((
    "Retry-After", "X-Request-ID", "X-Pollgate-Provider", "X-Pollgate-Worker",
    "X-RateLimit-Limit-Requests", "X-RateLimit-Remaining-Requests", "X-RateLimit-Reset-Requests",
    "X-RateLimit-Limit-Tokens", "X-RateLimit-Remaining-Tokens", "X-RateLimit-Reset-Tokens",
))
# Seconds a browser may reuse a preflight's answer (Chromium caps it at 7200).
MAX_AGE = 600


def normalise(origin: str) -> Optional[str]:
    """Return an origin as browsers send it (scheme://host[:port], lower case), or None if it is not one."""
    origin = origin.strip().rstrip("/")
    if origin == "*":
        return origin
    parts = urlsplit(origin)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.path or parts.query or parts.fragment \
            or parts.username or parts.password:
        return None
    try:
        port = parts.port
    except ValueError:
        return None
    default = {"http": 80, "https": 443}[parts.scheme]
    return f"{parts.scheme}://{parts.hostname}" + (f":{port}" if port and port != default else "")


def allowed(origin: Optional[str]) -> Optional[str]:
    """Return what Access-Control-Allow-Origin should say to this Origin, or None to say nothing."""
    if not origin or not request.path.startswith("/v1/"):
        return None
    try:
        listed = settings.get("cors_origins")
    except SQLAlchemyError:
        return None  # the database is down: the answer (an error) goes out without CORS headers
    if "*" in listed:
        return "*"
    return origin if normalise(origin) in listed else None


def preflight() -> Optional[Response]:
    """Answer a browser's preflight for an allowed origin before anything else looks at the request."""
    if request.method != "OPTIONS" or "Access-Control-Request-Method" not in request.headers:
        return None
    grant = allowed(request.headers.get("Origin"))
    if grant is None:
        return None  # Flask's own OPTIONS answer, without CORS headers: the browser refuses
    response = Response(status=204)
    response.headers.update({
        "Access-Control-Allow-Origin": grant,
        "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
        "Access-Control-Allow-Headers": ALLOWED_HEADERS,
        "Access-Control-Max-Age": str(MAX_AGE),
    })
    response.vary.add("Origin")
    return response


def add_headers(response: Response) -> Response:
    """Let an allowed origin's script read an API answer, errors included."""
    if request.method == "OPTIONS" and "Access-Control-Allow-Origin" in response.headers:
        return response  # the preflight answer, already complete
    grant = allowed(request.headers.get("Origin"))
    if request.path.startswith("/v1/"):
        response.vary.add("Origin")  # the answer differs by Origin: caches must not mix them
    if grant is not None:
        response.headers["Access-Control-Allow-Origin"] = grant
        response.headers["Access-Control-Expose-Headers"] = EXPOSED_HEADERS
    return response


def init_app(app: Flask) -> None:
    """Answer preflights first (before the upgrade-window hook) and mark API answers for allowed origins."""
    app.before_request_funcs.setdefault(None, []).insert(0, preflight)
    app.after_request(add_headers)
