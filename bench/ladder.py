"""The held-stream ladder: 100, 300 and 1,000 streams of ~20 s at once, through LiteLLM and Pollgate.

Each rung starts every stream in the same second and waits for all of them to end. The
model server's `think-8-40` model waits 8 s, then sends 40 words over 12 s, as a slow model
does, so what is measured is how many open streams a 2-process node holds. Pollgate's
pollclients get 4 x 256 slots, so the workers are not the limit, and its gunicorn gets the
production cap on held requests per process. Opt-in (`--only ladder`): it takes about six
minutes and loads the machine with a thousand client threads.
"""
from __future__ import annotations

import collections
import os
import time

from load import drive
from stack import Stack
from stats import Row, ms, spread_ms
from versus import LITELLM_KEY, SLOW_MODEL, start_litellm, start_pollgate, start_upstream


def run_ladder(stack: Stack, rungs: list[int], pollclients: int, slots: int) -> list[Row]:
    """Climb the ladder on LiteLLM, then on Pollgate; return a row per rung and target, and the judgements."""
    upstream = start_upstream(stack)
    results: dict[tuple[str, int], dict] = {}
    for name in ("LiteLLM", "Pollgate"):
        if name == "LiteLLM":
            base, key = start_litellm(stack, upstream, stack.processes), LITELLM_KEY
        else:
            # The per-process cap on held requests that gunicorn.conf.py sets in production:
            # without it held streams take every thread, and the claims and reports their
            # answers wait for cannot get in (a first gthread run: 0 of 300 done).
            base, key = start_pollgate(stack, upstream, pollclients, slots, name="ladder",
                                       env={"POLLGATE_MAX_HELD_PER_PROCESS": str(stack.production_cap())})
        for count in rungs:
            results[(name, count)] = rung(stack, name, base, key, count)
            time.sleep(2.0)  # let cancelled work and closed sockets settle between rungs
        stack.stop_named("litellm")
        stack.stop_named("pollclient")
        stack.stop_gateway()
    stack.stop_named("upstream")
    return ladder_rows(results, rungs)


def rung(stack: Stack, name: str, base: str, key: str, count: int) -> dict:
    """Open `count` streams at once, one per client thread, and wait for every one to end."""
    folder = os.path.join(stack.dir, f"ladder-{name}-{count}")
    os.makedirs(folder, exist_ok=True)
    procs = max(4, count // 250)  # a few hundred threads per client process at most
    # A window of half a second: every thread sends exactly one request, at the start.
    # Five minutes for the last stream to end: a node that holds them all, slowly, is measured.
    records, _, _ = drive(stack, base, key, count, procs, 0.0, 0.5, folder, (), "--model", SLOW_MODEL, grace=300)
    done = [r for r in records if r["error"] is None]
    errors = collections.Counter(r["error"].split(":")[0] for r in records if r["error"])
    first = spread_ms([r["first"] - r["start"] for r in done if r["first"]])
    span = spread_ms([r["end"] - r["start"] for r in done])
    print(f"  {name}, {count} streams: {len(done)} done, {sum(errors.values())} errors {dict(errors) or ''}; "
          f"TTFT p50 {ms(first['p50'])}, p99 {ms(first['p99'])}; duration p50 {ms(span['p50'])}", flush=True)
    return {"done": len(done), "errors": errors, "first": first, "records": len(records)}


def ladder_rows(results: dict[tuple[str, int], dict], rungs: list[int]) -> list[Row]:
    """Lay each rung out for both gateways and judge Pollgate: no errors, TTFT p99 at most twice LiteLLM's."""
    rows: list[Row] = []
    for count in rungs:
        theirs, ours = results[("LiteLLM", count)], results[("Pollgate", count)]
        for name, r in (("LiteLLM", theirs), ("Pollgate", ours)):
            failed = ", ".join(f"{n} {kind}" for kind, n in r["errors"].most_common(2))
            rows.append(Row(f"ladder {count} streams, {name}",
                            f"{r['done']} of {r['records']} done{'; ' + failed if failed else ''}; "
                            f"TTFT p50 {ms(r['first']['p50'])}, p99 {ms(r['first']['p99'])}"))
        errors = ours["records"] - ours["done"]
        rows.append(Row(f"ladder {count}: Pollgate errors", str(errors), "0", errors == 0))
        limit = 2 * theirs["first"]["p99"]
        rows.append(Row(f"ladder {count}: Pollgate TTFT p99", ms(ours["first"]["p99"]), f"<= {ms(limit)} (2x LiteLLM)",
                        ours["first"]["p99"] <= limit))
    return rows
