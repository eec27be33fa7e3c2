"""One error type for the API and the worker protocol, and the app-level handlers."""
from __future__ import annotations

import logging
from typing import Optional

import re
from typing import Any

from flask import Flask, Response, jsonify, render_template, request
from werkzeug.exceptions import HTTPException

from .db import is_unavailable

log = logging.getLogger(__name__)

# The error `type` OpenAI's clients expect for each status.
TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    502: "upstream_error",
    503: "service_unavailable",
    504: "timeout_error",
}


class ApiError(Exception):
    """The request could not be served."""

    def __init__(
        self,
        status: int,
        message: str,
        code: Optional[str] = None,
        param: Optional[str] = None,
        retry_after: Optional[float] = None,
        headers: Optional[dict[str, str]] = None,
    ) -> None:
        super().__init__(message)
        self.headers = headers or {}
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.retry_after = retry_after

    def body(self) -> dict:
        """Return the OpenAI error envelope."""
        return error_body(self.status, self.message, self.code, self.param)


# Deeper JSON than this is no chat request: refuse it before anything walks it recursively.
MAX_JSON_DEPTH = 64
LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def json_body() -> Any:
    """Parse the request body as JSON, with valid Unicode and bounded nesting, or raise a clear 400."""
    try:
        body = request.get_json(silent=True, force=True)
    except RecursionError:  # Python's parser gives up on very deep nesting before we could
        body = None
    if body is None:
        raise ApiError(
            400,
            "We could not parse the JSON body of your request. Send valid JSON with "
            "'Content-Type: application/json'.",
            code="invalid_json",
        )
    return clean_json(body)


def clean_json(value: Any, depth: int = 0) -> Any:
    """Replace lone UTF-16 surrogates (unstorable, unprintable) with U+FFFD and refuse deep nesting."""
    if depth > MAX_JSON_DEPTH:
        raise ApiError(400, f"The JSON body is nested more than {MAX_JSON_DEPTH} levels deep.", code="invalid_json")
    if isinstance(value, str):
        return LONE_SURROGATE.sub("\ufffd", value)
    if isinstance(value, list):
        return [clean_json(v, depth + 1) for v in value]
    if isinstance(value, dict):
        return {clean_json(k, depth + 1): clean_json(v, depth + 1) for k, v in value.items()}
    return value


class ClientGone(Exception):
    """The client closed its connection before the answer was ready."""


def error_body(status: int, message: str, code: Optional[str] = None, param: Optional[str] = None) -> dict:
    """Build {"error": {...}} the way OpenAI's API does."""
    return {
        "error": {
            "message": message,
            "type": TYPES.get(status, "invalid_request_error" if status < 500 else "server_error"),
            "param": param,
            "code": code,
        }
    }


def error_response(err: ApiError) -> Response:
    """Render an ApiError as a JSON response with its status and Retry-After."""
    resp = jsonify(err.body())
    resp.status_code = err.status
    resp.headers.update(err.headers)
    if err.retry_after is not None:
        resp.headers["Retry-After"] = str(max(1, int(round(err.retry_after))))
    return resp


def is_api_path() -> bool:
    """Tell whether this request is an API or worker call (JSON errors) rather than a page."""
    return request.path.startswith(("/v1/", "/worker/")) or request.path in ("/v1", "/worker")


def init_app(app: Flask) -> None:
    """Register the handlers that turn every failure into a clean answer."""

    @app.errorhandler(ApiError)
    def handle_api_error(err: ApiError):
        return error_response(err)

    @app.errorhandler(HTTPException)
    def handle_http(err: HTTPException):
        if not is_api_path():
            if err.code in PAGES:
                return page(err.code, *PAGES[err.code])
            return err
        messages = {
            404: f"Unknown path {request.path}.",
            405: f"Method {request.method} is not allowed on {request.path}.",
            413: f"Request body is larger than {app.config['MAX_CONTENT_LENGTH']} bytes.",
        }
        code = {404: "unknown_url", 413: "request_too_large"}.get(err.code)
        message = messages.get(err.code, err.description or err.name)
        return error_response(ApiError(err.code or 500, message, code=code))

    @app.errorhandler(ClientGone)
    def handle_gone(err: ClientGone):
        # Nobody will read this; 499 is nginx's "client closed request", for the access log.
        return Response(status=499)

    @app.errorhandler(Exception)
    def handle_crash(err: Exception):
        if is_unavailable(err):
            # The database is restarting or full of connections: nobody's fault, and it passes.
            log.warning("database unavailable on %s %s: %s", request.method, request.path, err.__class__.__name__)
            if not is_api_path():
                return page(503, *PAGES[503], retry_after=DB_RETRY_AFTER)
            return error_response(database_unavailable())
        # Log the traceback server-side; the caller gets a clean 500 without internals.
        log.exception("unhandled error on %s %s", request.method, request.path)
        if not is_api_path():
            return page(500, *PAGES[500])
        return error_response(ApiError(500, "The gateway hit an internal error.", code="internal_error"))


# Seconds a caller is asked to wait while the database is unreachable: a restart takes a few.
DB_RETRY_AFTER = 5
PAGES = {
    404: ("Page not found", "There is no page at this address."),
    405: ("Not allowed", "This page cannot be used that way."),
    500: ("Something went wrong", "The gateway hit an internal error. It has been logged; try again in a moment."),
    503: ("Temporarily unavailable", "The gateway cannot reach its database right now. Try again in a few seconds."),
}


def database_unavailable() -> ApiError:
    """Build the 503 a caller gets while the database cannot be reached."""
    return ApiError(503, "The gateway cannot reach its database right now. Try again in a few seconds.",
                    code="database_unavailable", retry_after=DB_RETRY_AFTER)


def page(status: int, title: str, message: str, retry_after: Optional[int] = None) -> Response:
    """Render an error as a page like the rest of the dashboard."""
    resp = Response(render_template("error.html", title=title, message=message), status=status)
    if retry_after is not None:
        resp.headers["Retry-After"] = str(retry_after)
    return resp
