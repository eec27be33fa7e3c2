"""The three calls of the worker protocol (docs/worker-protocol.md) over one HTTP session."""
from __future__ import annotations

from typing import Any

import requests

from . import __version__
from .retry import describe_error, retry_after

CONNECT_TIMEOUT = 10.0
# A report that hangs must give up well before the job's lease (30 s by default) runs out,
# so a retry still has time to land.
REPORT_TIMEOUT = 15.0
# The gateway holds a claim for `wait` seconds; give it this much more to answer.
CLAIM_GRACE = 15.0


class GatewayError(Exception):
    """The gateway refused the call."""

    def __init__(self, message: str | None = None, status: int | None = None) -> None:
        super().__init__(message or self.__doc__)
        self.status = status


class TokenRejected(GatewayError):
    """The gateway refused the worker token (401): it is missing, unknown or revoked."""


class GatewayBusy(GatewayError):
    """The gateway is busy; try again after `retry_after` seconds."""

    def __init__(self, message: str | None = None, status: int | None = None, retry_after: float = 5.0) -> None:
        super().__init__(message, status)
        self.retry_after = retry_after


class GatewayUnavailable(GatewayError):
    """The gateway could not be reached or failed (network error or 5xx); retry later."""


class Gateway:
    """Talk to one gateway with one token over one pooled HTTP session."""

    def __init__(self, base_url: str, token: str) -> None:
        self.base_url = base_url.rstrip("/")
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"Bearer {token}"
        self.session.headers["User-Agent"] = f"pollgate-pollclient/{__version__}"

    def claim(self, models: list[str], max_jobs: int, capacity: int, wait: float) -> dict[str, Any]:
        """Long-poll for up to max_jobs jobs; return the answer with its `worker` and `jobs`."""
        body = {
            "models": models,
            "max_jobs": max_jobs,
            "capacity": capacity,
            "wait": wait,
            "kind": "pollclient",
            "version": __version__,
        }
        answer = self._post("/worker/v1/claim", body, wait + CLAIM_GRACE)
        if not isinstance(answer.get("jobs", []), list):
            raise GatewayError("the claim answer has no job list")
        return answer

    def report(self, entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Send chunks, finishes, errors and heartbeats; return one result per job."""
        answer = self._post("/worker/v1/chunks", {"jobs": entries}, REPORT_TIMEOUT)
        results = answer.get("jobs")
        return results if isinstance(results, list) else []

    def release(self, jobs: list[dict[str, str]]) -> list[dict[str, Any]]:
        """Hand jobs back, given as {"id", "lease"}; return one result per job."""
        answer = self._post("/worker/v1/release", {"jobs": jobs}, REPORT_TIMEOUT)
        results = answer.get("jobs")
        return results if isinstance(results, list) else []

    def close(self) -> None:
        """Close the pooled connections."""
        self.session.close()

    def _post(self, path: str, body: dict[str, Any], read_timeout: float) -> dict[str, Any]:
        try:
            response = self.session.post(self.base_url + path, json=body, timeout=(CONNECT_TIMEOUT, read_timeout))
        except requests.RequestException as exc:
            raise GatewayUnavailable(describe_error(exc)) from None
        with response:
            status = response.status_code
            if status == 401:
                raise TokenRejected(_error_message(response) or None, status)
            if status in (429, 503):
                raise GatewayBusy(_error_message(response) or "busy", status, retry_after(response.headers))
            if status >= 500:
                raise GatewayUnavailable(f"HTTP {status}: {_error_message(response)}".rstrip(": "), status)
            if status >= 400:
                raise GatewayError(f"HTTP {status} from {path}: {_error_message(response)}".rstrip(": "), status)
            try:
                answer = response.json()
            except ValueError:
                raise GatewayError(f"{path} did not answer JSON (is the gateway URL right?)", status) from None
        if not isinstance(answer, dict):
            raise GatewayError(f"{path} answered {type(answer).__name__}, not an object", status)
        return answer


def _error_message(response: requests.Response) -> str:
    """Pull the message out of an OpenAI-shaped error, or the start of the body."""
    try:
        body = response.json()
    except ValueError:
        return " ".join(response.text.split())[:200]
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict) and error.get("message"):
        return str(error["message"])[:500]
    return str(body)[:200]
