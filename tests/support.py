"""What every test module and harness shares: the repo root and how a missing part is reported."""
from __future__ import annotations

import math
import os
import socket
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IN_CI = os.environ.get("CI", "").lower() in ("true", "1")


def missing(reason: str) -> None:
    """Skip loudly when a real part is missing; in CI a missing part is a failure."""
    if IN_CI:
        pytest.fail(f"{reason} -- CI must provide it", pytrace=False)
    pytest.skip(f"MISSING PART, NOT TESTED: {reason}")


def wait_for_hangup(connection: socket.socket, bound: float = 30) -> float:
    """Answer nothing on a connection until the peer closes it; return when it did (inf if it never did)."""
    connection.settimeout(bound)
    try:
        closed = connection.recv(1) == b""  # the peer sends nothing more on this connection
    except TimeoutError:
        closed = False
    except ConnectionError:
        closed = True
    return time.monotonic() if closed else math.inf
