"""The results page: run.py fills page_template.md with one full run's figures and the machine.

The page (docs/benchmarks.md) is generated, never typed: method prose lives in the
template, every number comes from the run that writes it.
"""
from __future__ import annotations

import datetime as dt
import importlib.metadata
import os
import platform
import sqlite3
import string
import subprocess
import sys
import time
from typing import Sequence

from stack import ROOT, Stack
from stats import Row

HERE = os.path.dirname(os.path.abspath(__file__))
TEMPLATE = os.path.join(HERE, "page_template.md")
PAGE = os.path.join(ROOT, "docs", "benchmarks.md")
# What the gateway, the workers and the bench's client import: their versions move the figures.
PACKAGES = ("flask", "werkzeug", "flask-login", "sqlalchemy", "pymysql", "alembic", "requests", "tiktoken",
            "gunicorn", "openai")
TICK = os.sysconf("SC_CLK_TCK")


def _busy_seconds() -> float:
    """Return the CPU seconds every core of the machine has spent busy since boot (/proc/stat)."""
    with open("/proc/stat") as f:
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in f.readline().split()[1:9])
    return (user + nice + system + irq + softirq + steal) / TICK


def _own_seconds() -> float:
    """Return the CPU seconds of this process and of every child it has waited for."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


class Clock:
    """How long the run took and how busy the machine was around it, from outside the figures."""

    def __init__(self) -> None:
        self.started_at = dt.datetime.now(dt.timezone.utc)
        self.start = time.monotonic()
        self.load_start = os.getloadavg()
        self.busy0, self.own0 = _busy_seconds(), _own_seconds()
        self.phase_loads: list[tuple[str, float]] = []

    def phase(self, name: str) -> None:
        """Note the 1-minute load average as a phase starts."""
        self.phase_loads.append((name, os.getloadavg()[0]))

    def finish(self) -> None:
        """Take the closing readings; call after every process the run started has been waited for."""
        self.seconds = time.monotonic() - self.start
        self.load_end = os.getloadavg()
        # Children's CPU reaches os.times() once they are reaped, so after Stack.stop() the
        # difference is what everything else on the machine used meanwhile.
        self.own = _own_seconds() - self.own0
        self.others = max(0.0, _busy_seconds() - self.busy0 - self.own)

    def describe(self) -> str:
        """Say in Markdown how loaded the machine was, so a reader can judge the figures."""
        def three(load: tuple[float, float, float]) -> str:
            return " / ".join(f"{x:.2f}" for x in load)

        phases = ", ".join(f"{name} {load:.2f}" for name, load in self.phase_loads)
        cores = os.cpu_count() or 1
        return (f"Load average (1 / 5 / 15 min) at the start: {three(self.load_start)}; at the end: "
                f"{three(self.load_end)}; 1-minute load as each phase started: {phases}. The load counts the "
                f"bench's own processes too, so the CPU time tells them apart: over the {self.seconds:.0f} s "
                f"the bench and everything it started used {self.own / self.seconds:.2f} cores on average and "
                f"other processes {self.others / self.seconds:.2f} cores, of {cores} (busy time from "
                "`/proc/stat` minus the bench's own `os.times()`, children included).")


def machine(stack: Stack) -> list[str]:
    """Describe the machine, the database and the gunicorn shape, one Markdown list item each."""
    cpu = _cpuinfo("model name") or platform.processor() or "unknown"
    mem = _meminfo()
    release = _os_release()
    return [
        f"CPU: {cpu}, {os.cpu_count()} cores (`os.cpu_count()`, the bench shares them all)",
        f"Memory: {mem.get('MemTotal', 0) / 2**20:.1f} GiB, swap {mem.get('SwapTotal', 0) / 2**20:.1f} GiB "
        "(`/proc/meminfo`)",
        f"OS: {release}, Linux kernel {platform.release()}",
        f"Python: {platform.python_implementation()} {platform.python_version()}",
        f"Database: {database(stack)}",
        f"gunicorn: `{' '.join(stack.gunicorn_options())} -c bench/gunicorn_bench.py` (the idle phase: "
        f"`-c bench/count_queries.py`), `POLLGATE_DB_POOL_SIZE={stack.threads}`, "
        f"`POLLGATE_MAX_HELD_PER_PROCESS={os.environ.get('POLLGATE_MAX_HELD_PER_PROCESS', '0')}`; "
        "the repository's `gunicorn.conf.py` is not read",
        "Packages: " + ", ".join(f"{name} {_version(name)}" for name in PACKAGES),
        f"Code: {git_describe()}",
    ]


def database(stack: Stack) -> str:
    """Name the database and, for MariaDB, the server settings the figures depend on."""
    if stack.mariadb is None:
        return f"SQLite {sqlite3.sqlite_version} (a file per phase)"
    names = ("innodb_buffer_pool_size", "innodb_flush_log_at_trx_commit", "max_connections", "transaction_isolation")
    with stack.mariadb.root() as conn, conn.cursor() as cur:
        cur.execute("SELECT VERSION()")
        version = cur.fetchone()[0]
        cur.execute("SHOW GLOBAL VARIABLES WHERE Variable_name IN %s", (names,))
        found = dict(cur.fetchall())
    if found.get("innodb_buffer_pool_size", "").isdigit():
        found["innodb_buffer_pool_size"] = f"{int(found['innodb_buffer_pool_size']) / 2**20:g} MiB"
    settings = ", ".join(f"{k} {found[k]}" for k in names if k in found)
    return f"MariaDB {version}, a throwaway server on loopback (`tests/mariadb.py`): {settings}"


def git_describe() -> str:
    """Name the commit the bench ran on, and say whether the tree had other changes."""
    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30)
        return done.stdout.strip() if done.returncode == 0 else ""

    commit = git("rev-parse", "--short=12", "HEAD")
    if not commit:
        return "not a git checkout"
    # The page itself is rewritten by every run; it does not make the code differ.
    dirty = git("status", "--porcelain", "--", ".", ":(exclude)docs/benchmarks.md")
    return f"commit {commit}" + (" with uncommitted changes" if dirty else "")


def _symbols(target: str) -> str:
    """Write a target's comparison as the page prints it."""
    return target.replace("<=", "≤").replace(">=", "≥")


def results(rows: Sequence[Row]) -> str:
    """Render the figures as a Markdown table; sub-rows (indented names) keep a dash."""
    lines = ["| figure | value | target | met |", "|---|---|---|---|"]
    for r in rows:
        name = "— " + r.name.strip() if r.name.startswith("  ") else r.name
        met = "" if r.met is None else ("yes" if r.met else "**no**")
        lines.append(f"| {name} | {r.value} | {_symbols(r.target) or '—'} | {met} |")
    return "\n".join(lines)


def summary(rows: Sequence[Row]) -> str:
    """Say in one sentence how many targets were met and which were not."""
    judged = [r for r in rows if r.met is not None]
    missed = [r for r in judged if not r.met]
    said = f"{len(judged) - len(missed)} of {len(judged)} targets met"
    if not missed:
        return said + "."
    return said + "; missed: " + "; ".join(
        f"{r.name.strip()} ({r.value}, target {_symbols(r.target)})" for r in missed) + "."


def render(rows: Sequence[Row], machine: list[str], clock: Clock, sizes: dict[str, str]) -> str:
    """Fill the template with one run's figures, its machine and its options."""
    with open(TEMPLATE) as f:
        template = string.Template(f.read())
    return template.substitute(
        date=clock.started_at.strftime("%Y-%m-%d"),
        started=clock.started_at.strftime("%Y-%m-%d %H:%M UTC"),
        duration=f"{clock.seconds:.0f} s",
        command="python bench/run.py" + "".join(" " + a for a in sys.argv[1:]),
        summary=summary(rows),
        results=results(rows),
        machine="\n".join("- " + line for line in machine),
        load=clock.describe(),
        **sizes,
    )


def write(path: str, text: str) -> None:
    """Replace the page in one step, so a reader never sees half of it."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _cpuinfo(key: str) -> str:
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.split(":", 1)[0].strip() == key:
                return line.split(":", 1)[1].strip()
    return ""


def _meminfo() -> dict[str, int]:
    """Return /proc/meminfo's fields in KiB."""
    with open("/proc/meminfo") as f:
        return {k: int(v.split()[0]) for k, v in (line.split(":", 1) for line in f)}


def _os_release() -> str:
    try:
        return platform.freedesktop_os_release().get("PRETTY_NAME", "Linux")
    except OSError:
        return platform.system()


def _version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "(not installed)"
