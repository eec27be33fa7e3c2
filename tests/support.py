"""What every test module and harness shares: the repo root, how a missing part is reported, ports and processes."""
from __future__ import annotations

import math
import os
import random
import signal
import socket
import time
from typing import Any, Callable

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IN_CI = os.environ.get("CI", "").lower() in ("true", "1")
# Every process a test run starts inherits this variable (conftest sets it per pytest process),
# so one that escaped its parent, reparented to init, is still known as ours.
RUN_MARK = "POLLGATE_TEST_RUN"


def missing(reason: str) -> None:
    """Skip loudly when a real part is missing; in CI a missing part is a failure."""
    if IN_CI:
        pytest.fail(f"{reason} -- CI must provide it", pytrace=False)
    pytest.skip(f"MISSING PART, NOT TESTED: {reason}")


def wait_for(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll until condition() is truthy and return it, or fail naming what never happened."""
    end = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.05)


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


# -- ports -------------------------------------------------------------------------------


def free_port() -> int:
    """Pick a free loopback port below the kernel's ephemeral range, for a server that cannot take port 0.

    A port from bind(0) lies in the ephemeral range, where every outgoing connection's source
    port comes from too: between this check and the server's bind, one of the suite's own
    connections could take it. Below the range only another listener can, and the servers
    that take a port this way (MariaDB, Apache) try another one when it was taken.
    """
    with open("/proc/sys/net/ipv4/ip_local_port_range") as handle:
        low = int(handle.read().split()[0])
    while True:
        port = random.randrange(max(1024, low - 12000), low)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port


# -- processes, read from /proc ------------------------------------------------------------


def _stat(pid: int) -> list[str]:
    """Return the fields of /proc/PID/stat after the command name: state, ppid, pgrp, session, ..."""
    with open(f"/proc/{pid}/stat") as handle:
        return handle.read().rsplit(")", 1)[1].split()


def alive(pid: int) -> bool:
    """Tell whether a process still runs (a zombie waiting to be reaped does not)."""
    try:
        return _stat(pid)[0] != "Z"
    except (OSError, IndexError):
        return False


def _parents() -> dict[int, int]:
    """Map every live process to its parent."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = _stat(int(entry))
            except (OSError, IndexError):
                continue
            if fields[0] != "Z":
                parents[int(entry)] = int(fields[1])
    return parents


def children(pid: int) -> list[int]:
    """List the live child processes of pid."""
    return sorted(child for child, parent in _parents().items() if parent == pid)


def descendants(pid: int) -> list[int]:
    """List a process's live descendants: children, their children, and so on."""
    kids: dict[int, list[int]] = {}
    for child, parent in _parents().items():
        kids.setdefault(parent, []).append(child)
    found, todo = [], [pid]
    while todo:
        for child in kids.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def command_line(pid: int) -> str:
    """Return a process's command line, or '' once it is gone."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return handle.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def reap(pids: list[int], timeout: float = 15) -> None:
    """Wait for these processes to exit; SIGKILL those still there after the timeout."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        pids = [pid for pid in pids if alive(pid)]
        if not pids:
            return
        time.sleep(0.05)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def marked(mark: str) -> list[int]:
    """List live processes whose environment carries RUN_MARK=mark (this one excluded)."""
    needle = f"{RUN_MARK}={mark}".encode()
    found = []
    for pid in _parents():
        if pid == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/environ", "rb") as handle:
                if needle in handle.read().split(b"\0"):
                    found.append(pid)
        except OSError:  # gone, or not ours to read
            continue
    return found


def leftovers(mark: str, grace: float = 15) -> dict[int, str]:
    """Wait up to grace seconds for this process's children and marked processes to end; return those left, killed."""
    end = time.monotonic() + grace
    while True:
        left = set(descendants(os.getpid())) | set(marked(mark))
        if not left or time.monotonic() > end:
            break
        time.sleep(0.1)
    found = {pid: command_line(pid) for pid in sorted(left)}
    for pid in found:  # nothing outlives the run, even when the run fails for it
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return found
