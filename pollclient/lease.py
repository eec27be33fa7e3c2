"""Every report timing of the worker, derived from the lease the gateway hands out with each job."""
from __future__ import annotations

import math
from typing import Any

# The gateway's default LEASE_TTL (webapp/config.py), used until a claim answer names one.
DEFAULT_LEASE_TTL = 15.0

# A job's lease lapses `ttl` seconds after the gateway last heard about it. Counting from
# the last report that got through, the worker's reports keep to this schedule:
#
#   ttl/3         a heartbeat goes out (the protocol asks for one at least this often)
#   2 ttl/3       at the latest, a hung report is given up (connect + read <= ttl/3)
#   3 ttl/4       at the latest, it is sent again (retries wait at most ttl/12)
#   ttl           the lease lapses: the retry had a quarter of the lease to land
#
# A report normally takes milliseconds, so ttl/3 (5 s with the default lease) is long
# enough for a slow shared host and short enough to leave room for the retry. The floors
# keep a tiny lease (tests use 1-3 s) from turning into a busy loop, at the price of the
# schedule for leases under 1.5 s; the ceiling keeps a long lease from waiting minutes on
# a dead connection.
REPORT_TIMEOUT_FLOOR = 0.5
REPORT_TIMEOUT_CEILING = 15.0
HEARTBEAT_FLOOR = 0.2
# The connection is usually pooled and costs nothing; a new one gets a third of the budget,
# enough for a lost SYN and a TLS handshake, and the answer the rest.
CONNECT_SHARE = 1 / 3


def lease_ttl(*sources: Any, default: float = DEFAULT_LEASE_TTL) -> float:
    """Return the first positive `lease_ttl` among the given dicts (claim answer, then job), else the default."""
    for source in sources:
        value = source.get("lease_ttl") if isinstance(source, dict) else None
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0:
            return float(value)
    return default


def heartbeat_interval(ttl: float) -> float:
    """Return how long a job may go without a report before a heartbeat renews its lease."""
    return max(HEARTBEAT_FLOOR, ttl / 3)


def report_budget(ttl: float) -> float:
    """Return the longest a report may take, connecting included, before it is given up."""
    return min(REPORT_TIMEOUT_CEILING, max(REPORT_TIMEOUT_FLOOR, ttl / 3))


def report_timeout(ttl: float) -> tuple[float, float]:
    """Return the (connect, read) timeouts of a report, which add up to report_budget(ttl)."""
    budget = report_budget(ttl)
    return budget * CONNECT_SHARE, budget * (1 - CONNECT_SHARE)


def retry_cap(ttl: float) -> float:
    """Return the longest wait before a failed report is sent again, Retry-After or not."""
    return report_budget(ttl) / 4
