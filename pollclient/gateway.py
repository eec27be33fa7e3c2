"""The three calls of the worker protocol (docs/worker-protocol.md) over one HTTP session."""
from __future__ import annotations

from typing import Any

import requests

from . import __version__
from .lease import DEFAULT_LEASE_TTL, lease_ttl, report_timeout
from .retry import describe_error, retry_after

# A claim holds no lease yet, so its connection may take longer than a report's; its read
# waits out the long-poll (`wait`) plus one lease: an answer later than that would carry
# jobs whose leases lapsed on the way.
CLAIM_CONNECT_TIMEOUT = 10.0


class GatewayError(Exception):
    """The gateway refused the call."""

    def __init__(self, message: str | None = None, status: int | None = None, detail: str = "") -> None:
        super().__init__(message or self.__doc__)
        self.status = status
        self.detail = detail or str(self)  # the gateway's own words, e.g. a 400's naming the field


class TokenRejected(GatewayError):
    """The gateway refused the worker token (401): it is missing, unknown or revoked."""


# What a 429 or 503 means, in words, by its error code.
BUSY_REASONS = {
    "upgrade_pending": "the gateway is being upgraded",
    "database_unavailable": "the gateway's database is unavailable",
    "gateway_busy": "the gateway is busy",
}


class GatewayBusy(GatewayError):
    """The gateway is busy; try again after `retry_after` seconds."""

    def __init__(
        self, message: str | None = None, status: int | None = None, retry_after: float = 5.0, code: str = ""
    ) -> None:
        super().__init__(message, status)
        self.retry_after = retry_after
        self.code = code  # gateway_busy, upgrade_pending, database_unavailable, ...

    @property
    def reason(self) -> str:
        """Say in a few words why the gateway asks the worker to wait."""
        return BUSY_REASONS.get(self.code, "the gateway is busy")


class GatewayUnavailable(GatewayError):
    """The gateway could not be reached or failed (network error or 5xx); retry later."""


class Gateway:
    """Talk to one gateway with one token over one pooled HTTP session."""

    def __init__(self, base_url: str, token: str, site: str = "") -> None:
        self.base_url = base_url.rstrip("/")
        self.site = site  # what callers' X-Provider may name to reach this worker; "" for none
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"Bearer {token}"
        self.session.headers["User-Agent"] = f"pollgate-pollclient/{__version__}"
        self.lease_ttl = DEFAULT_LEASE_TTL  # the latest lease a claim answer named

    def claim(self, models: list[str], max_jobs: int, capacity: int, wait: float,
              features: list[str] | None = None) -> dict[str, Any]:
        """Long-poll for up to max_jobs jobs; return the answer with its `worker` and `jobs`."""
        body = {
            "models": models,
            "features": features or [],
            "max_jobs": max_jobs,
            "capacity": capacity,
            "wait": wait,
            "kind": "pollclient",
            "version": __version__,
        }
        if self.site:
            body["site"] = self.site
        answer = self._post("/worker/v1/claim", body, (CLAIM_CONNECT_TIMEOUT, wait + self.lease_ttl))
        jobs = answer.get("jobs", [])
        if not isinstance(jobs, list):
            raise GatewayUnavailable("the claim answer has no job list")
        self.lease_ttl = lease_ttl(answer, *jobs[:1], default=self.lease_ttl)
        return answer

    def report(self, entries: list[dict[str, Any]], ttl: float) -> list[dict[str, Any]]:
        """Send chunks, finishes, errors and heartbeats within a third of the lease ttl; return one result per job."""
        answer = self._post("/worker/v1/chunks", {"jobs": entries}, report_timeout(ttl))
        results = answer.get("jobs")
        return results if isinstance(results, list) else []

    def release(self, jobs: list[dict[str, str]], ttl: float) -> list[dict[str, Any]]:
        """Hand jobs back, given as {"id", "lease"}; return one result per job."""
        answer = self._post("/worker/v1/release", {"jobs": jobs}, report_timeout(ttl))
        results = answer.get("jobs")
        return results if isinstance(results, list) else []

    def close(self) -> None:
        """Close the pooled connections."""
        self.session.close()

    def _post(self, path: str, body: dict[str, Any], timeout: tuple[float, float]) -> dict[str, Any]:
        try:
            response = self.session.post(self.base_url + path, json=body, timeout=timeout)
        except requests.RequestException as exc:
            raise GatewayUnavailable(describe_error(exc)) from None
        with response:
            status = response.status_code
            if status == 401:
                raise TokenRejected(_error_message(response) or None, status)
            if status in (429, 503):
                raise GatewayBusy(
                    _error_message(response) or "busy", status, retry_after(response.headers), _error_code(response)
                )
            if status >= 500:
                raise GatewayUnavailable(f"HTTP {status}: {_error_message(response)}".rstrip(": "), status)
            if status >= 400:
                message = _error_message(response)
                raise GatewayError(f"HTTP {status} from {path}: {message}".rstrip(": "), status, message)
            # A proxy's or host's error page can come with a 200: retry it like a 5xx.
            try:
                answer = response.json()
            except ValueError:
                raise GatewayUnavailable(f"{path} did not answer JSON (is the gateway URL right?)", status) from None
        if not isinstance(answer, dict):
            raise GatewayUnavailable(f"{path} answered {type(answer).__name__}, not an object", status)
        return answer


def _error_code(response: requests.Response) -> str:
    """Return the `code` of an OpenAI-shaped error, or ""."""
    try:
        error = response.json().get("error")
    except (ValueError, AttributeError):
        return ""
    code = error.get("code") if isinstance(error, dict) else None
    return code if isinstance(code, str) else ""


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
