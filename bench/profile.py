"""Where the gateway's CPU goes: py-spy samples of the gunicorn processes over a window.

Only samples taken while a thread holds the GIL count (`py-spy record --gil`), so a thread
waiting on MariaDB, a bell or its client costs nothing here: the shares are of the CPU the
gateway's Python spends, which is what bounds its throughput on a small machine. Each
share is inclusive (a function and everything it called), over every gunicorn process.
"""
from __future__ import annotations

import collections
import os
import re
import shutil
import subprocess
from typing import Optional

from stack import PYTHON

# Samples per second per process: py-spy falls behind on two busy processes of 64 threads
# above about 50 and then drops samples (it says so), so stay under that.
RATE = 40
# The request handlers and the steps inside them the page names, in the order it names them.
ENDPOINTS = {"chat_completions": "completions", "claim": "worker claims", "chunks": "worker reports"}
STEPS = {"start_request": "slot and admission", "wait_for_start": "reads before the first chunk",
         "follow": "reads after it", "settle": "settlement", "resolve_model": "model lookup",
         "authenticate_api_key": "key check"}
# A sample's innermost frame says whose code was running: these libraries, or the rest.
LIBRARIES = (("sqlalchemy", "SQLAlchemy"), ("pymysql", "PyMySQL"), ("webapp", "Pollgate's own"),
             ("flask", "Flask/Werkzeug"), ("werkzeug", "Flask/Werkzeug"), ("gunicorn", "gunicorn"))


def py_spy() -> Optional[str]:
    """Return the py-spy program beside this Python, or on PATH, or None."""
    beside = os.path.join(os.path.dirname(PYTHON), "py-spy")
    return beside if os.access(beside, os.X_OK) else shutil.which("py-spy")


class Profile:
    """Sample one gunicorn master and its workers over a with-block; `shares()` then says where the CPU went."""

    def __init__(self, pid: int, seconds: float, path: str) -> None:
        self.pid = pid
        self.seconds = seconds
        self.path = path
        self.proc: Optional[subprocess.Popen] = None
        self.why_not = ""

    def __enter__(self) -> "Profile":
        program = py_spy()
        if program is None:
            self.why_not = "py-spy is not installed (pip install py-spy)"
            return self
        self.log = open(self.path + ".log", "w")
        self.proc = subprocess.Popen(
            [program, "record", "-p", str(self.pid), "--subprocesses", "--gil", "--nonblocking", "-r", str(RATE),
             "-d", str(max(1, int(self.seconds))), "-f", "raw", "-o", self.path],
            stdout=self.log, stderr=subprocess.STDOUT)
        return self

    def __exit__(self, *exc) -> None:
        if self.proc is None:
            return
        try:
            self.proc.wait(timeout=self.seconds + 30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()
        if self.proc.returncode != 0 or not os.path.exists(self.path):
            with open(self.path + ".log") as f:
                tail = f.read().strip().splitlines()[-1:] or ["no output"]
            # Attaching needs ptrace rights over the gunicorn processes (root, or ptrace_scope 0).
            self.why_not = f"py-spy failed: {tail[0]}"

    def shares(self) -> dict[str, str]:
        """Return the page's profile rows' values: by endpoint and step, and by library."""
        if self.why_not:
            return {"by endpoint": f"not taken: {self.why_not}", "by library": "not taken"}
        inclusive, innermost, total = read_raw(self.path)
        if not total:
            return {"by endpoint": "not taken: py-spy took no samples", "by library": "not taken"}
        pct = lambda n: f"{100 * n / total:.0f} %"  # noqa: E731
        parts = []
        for name, label in ENDPOINTS.items():
            inner = ""
            if name == "chat_completions":
                inner = " (" + ", ".join(f"{STEPS[s]} {pct(inclusive[s])}" for s in STEPS) + ")"
            parts.append(f"{label} {pct(inclusive[name])}{inner}")
        libraries = collections.Counter()
        for module, count in innermost.items():
            label = next((label for prefix, label in LIBRARIES if module.startswith(prefix)), "other")
            libraries[label] += count
        return {"by endpoint": f"{', '.join(parts)}; {total / RATE / self.seconds:.2f} cores sampled",
                "by library": ", ".join(f"{label} {pct(n)}" for label, n in libraries.most_common())}


FRAME = re.compile(r"^(?P<func>.+?) \((?P<file>[^()]*?)(?::\d+)?\)$")


def read_raw(path: str) -> tuple[collections.Counter, collections.Counter, int]:
    """Read py-spy's raw output: samples per function name (inclusive), per innermost top-level package, and in all."""
    inclusive: collections.Counter = collections.Counter()
    innermost: collections.Counter = collections.Counter()
    total = 0
    with open(path) as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not stack or not count.isdigit():
                continue
            n = int(count)
            total += n
            frames = [FRAME.match(frame) for frame in stack.split(";")]
            names = {m["func"].rsplit(".", 1)[-1] for m in frames if m and "webapp/" in m["file"]}
            for name in names:
                inclusive[name] += n
            last = next((m for m in reversed(frames) if m), None)
            innermost[package_of(last["file"]) if last else "?"] += n
    return inclusive, innermost, total


def package_of(file: str) -> str:
    """Name the top-level package a frame's file belongs to (site-packages/sqlalchemy/... -> sqlalchemy)."""
    parts = file.replace("\\", "/").split("/")
    if "site-packages" in parts:
        rest = parts[parts.index("site-packages") + 1:]
        return rest[0] if rest else "?"
    if "webapp" in parts:
        return "webapp"
    return parts[0] if len(parts) > 1 else "stdlib"
