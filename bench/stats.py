"""Small number helpers: percentiles in milliseconds and the closing table."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence


def percentile(values: Sequence[float], p: float) -> float:
    """Return the p-th percentile (0-100) by the nearest-rank method; NaN when empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


def spread_ms(seconds: Sequence[float]) -> dict[str, float]:
    """Summarise durations given in seconds as p50/p90/p99/max in milliseconds."""
    return {
        "p50": percentile(seconds, 50) * 1000,
        "p90": percentile(seconds, 90) * 1000,
        "p99": percentile(seconds, 99) * 1000,
        "max": (max(seconds) if seconds else math.nan) * 1000,
    }


def ms(value: float) -> str:
    """Format milliseconds compactly."""
    return "-" if math.isnan(value) else (f"{value:.1f} ms" if value < 100 else f"{value:.0f} ms")


@dataclass
class Row:
    """One line of the closing table: what, the figure, the target and whether it was met."""

    name: str
    value: str
    target: str = ""
    met: Optional[bool] = None


def verdict(met: Optional[bool]) -> str:
    """Say whether a target was met, in one word."""
    return "" if met is None else ("ok" if met else "MISSED")


def table(rows: Sequence[Row], title: str) -> str:
    """Render rows as a fixed-width table."""
    head = ("figure", "value", "target", "")
    cells = [head] + [(r.name, r.value, r.target, verdict(r.met)) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(4)]
    lines = [title, "-" * (sum(widths) + 6)]
    for i, cell in enumerate(cells):
        lines.append("  ".join(c.ljust(w) for c, w in zip(cell, widths)).rstrip())
        if i == 0:
            lines.append("-" * (sum(widths) + 6))
    return "\n".join(lines)
