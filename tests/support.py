"""What every test module and harness shares: the repo root and how a missing part is reported."""
from __future__ import annotations

import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IN_CI = os.environ.get("CI", "").lower() in ("true", "1")


def missing(reason: str) -> None:
    """Skip loudly when a real part is missing; in CI a missing part is a failure."""
    if IN_CI:
        pytest.fail(f"{reason} -- CI must provide it", pytrace=False)
    pytest.skip(f"MISSING PART, NOT TESTED: {reason}")
