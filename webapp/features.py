"""Optional worker features: what a worker declares it can relay, and what a job needs of it.

A worker lists its features in each claim (`"features": ["logprobs"]`); a request that asks
for one is stored with it in `jobs.needs` (the names sorted, space-separated; "" needs none),
and only a worker that declared every one of them may claim it. A new feature is a new name
here, not a new column.
"""
from __future__ import annotations

from itertools import combinations
from typing import Any, Iterable

LOGPROBS = "logprobs"
# Every feature the gateway knows, with the words its error names it by. A worker may
# declare names not listed here (a newer worker): they are ignored.
KNOWN = {LOGPROBS: "log probabilities"}


def needed(request: dict[str, Any]) -> list[str]:
    """Return the features a validated chat request needs of its worker, sorted."""
    return [LOGPROBS] if request.get("logprobs") is True else []


def needs_value(request: dict[str, Any]) -> str:
    """Return what `jobs.needs` stores for this request: its features, space-separated."""
    return " ".join(needed(request))


def known(features: Iterable[str]) -> list[str]:
    """Return the features from a worker's list that the gateway knows, sorted, once each."""
    return sorted(set(features) & set(KNOWN))


def claimable_needs(features: Iterable[str]) -> list[str]:
    """Return every `jobs.needs` value a worker with these features may claim: "" and each subset."""
    have = known(features)
    # Few features exist, so listing the subsets keeps the claim an IN on the rows it reads.
    return [" ".join(subset) for size in range(len(have) + 1) for subset in combinations(have, size)]


def asked(needs: str, feature: str) -> bool:
    """Tell whether a job's stored needs include this feature."""
    return feature in needs.split()
