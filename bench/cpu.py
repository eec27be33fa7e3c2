"""Where the CPU goes: per-group CPU seconds of the processes a benchmark started, from /proc."""
from __future__ import annotations

import os
from typing import Iterable

TICK = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> tuple[int, float]:
    """Return a process's parent pid and its user+system CPU seconds."""
    with open(f"/proc/{pid}/stat") as f:
        # The command name may hold spaces; the fields after its closing parenthesis do not.
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / TICK


def sample(groups: dict[str, Iterable[int]]) -> dict[str, float]:
    """Sum CPU seconds per group: its root pids and their descendants not counted by an earlier group."""
    table: dict[int, tuple[int, float]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                table[int(entry)] = _stat(int(entry))
            except (OSError, IndexError, ValueError):
                pass  # exited while we looked
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    totals, seen = {}, set()
    for name, roots in groups.items():
        todo, total = list(roots), 0.0
        while todo:
            pid = todo.pop()
            if pid in seen or pid not in table:
                continue
            seen.add(pid)
            total += table[pid][1]
            todo += children.get(pid, [])
        totals[name] = total
    return totals


def share(before: dict[str, float], after: dict[str, float], seconds: float) -> str:
    """Describe the CPU each group used over a window, in cores."""
    used = {k: after[k] - before.get(k, 0.0) for k in after}
    return ", ".join(f"{k} {v / seconds:.2f}" for k, v in sorted(used.items(), key=lambda kv: -kv[1]) if v > 0)
