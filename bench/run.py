"""Benchmark the gateway end to end, print the figures and write docs/benchmarks.md.

    python bench/run.py                       # everything on a throwaway MariaDB; writes the page
    python bench/run.py --db sqlite --only ttft,idle    # a subset: prints only

Each phase gets a fresh database and its own gunicorn (2 workers x 64 threads, gthread);
everything started is stopped at the end, on errors and on Ctrl-C too. Only a run of
every phase writes the page, so it never mixes figures from different runs.
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import signal
import sys
import time

import page
from stack import Stack
from stats import Row, table
from versus import litellm_version

PHASES = ("ttft", "relay", "idle", "throughput", "claims", "versus")
# Opt-in: restart is a regression check (a restarted worker's old long-poll must not take a
# job); ladder holds up to 1,000 streams for minutes and loads the whole machine.
EXTRA = ("restart", "ladder")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Read the options."""
    p = argparse.ArgumentParser(description="Pollgate benchmarks (figures, not tests).")
    p.add_argument("--db", choices=("mariadb", "sqlite"), default="mariadb")
    p.add_argument("--only", default=",".join(PHASES),
                   help=f"comma-separated subset of {','.join(PHASES + EXTRA)} (default: all but {','.join(EXTRA)})")
    p.add_argument("--ttft-requests", type=int, default=200)
    p.add_argument("--warmup-requests", type=int, default=5)
    p.add_argument("--relay-chunks", type=int, default=300)
    p.add_argument("--relay-rate", type=float, default=50.0, help="chunks per second")
    p.add_argument("--idle-seconds", type=float, default=10.0)
    p.add_argument("--workers", type=int, default=20, help="pollclient processes for throughput")
    p.add_argument("--slots", type=int, default=4, help="--max-concurrent of each pollclient")
    p.add_argument("--clients", type=int, default=80, help="client threads for throughput")
    p.add_argument("--client-procs", type=int, default=4, help="processes the client threads spread over")
    p.add_argument("--seconds", type=float, default=20.0, help="throughput window")
    p.add_argument("--warmup-seconds", type=float, default=3.0)
    p.add_argument("--claim-jobs", type=int, default=1000)
    p.add_argument("--claimers", type=int, default=50)
    p.add_argument("--claim-paths", default="", help="cas,skip_locked (default: both on MariaDB, cas on SQLite)")
    p.add_argument("--versus-requests", type=int, default=200, help="sequential streams per gateway, side by side")
    p.add_argument("--versus-clients", type=int, default=32, help="non-streamed client threads, side by side")
    p.add_argument("--versus-seconds", type=float, default=15.0, help="throughput window per gateway")
    p.add_argument("--versus-pollclients", type=int, default=4, help="openai-backend pollclients for Pollgate")
    p.add_argument("--versus-slots", type=int, default=16, help="--max-concurrent of each of those")
    p.add_argument("--ladder", default="100,300,1000", help="concurrent ~20 s streams on each rung of the ladder")
    p.add_argument("--ladder-pollclients", type=int, default=4)
    p.add_argument("--ladder-slots", type=int, default=256, help="--max-concurrent of each ladder pollclient")
    p.add_argument("--gunicorn-workers", type=int, default=2, help="gunicorn -w")
    p.add_argument("--gunicorn-threads", type=int, default=64, help="gunicorn --threads (and the DB pool size)")
    p.add_argument("--gunicorn-class", choices=("gthread", "gevent"), default="gthread", help="gunicorn -k")
    p.add_argument("--gunicorn-connections", type=int, default=4000, help="gunicorn --worker-connections (gevent)")
    p.add_argument("--keep", action="store_true", help="keep the logs and data folder")
    p.add_argument("--page", default=page.PAGE,
                   help="where a run of every phase writes the results page (default: docs/benchmarks.md); "
                        "a run with --only and a subset prints only")
    args = p.parse_args(argv)
    args.only = {name.strip() for name in args.only.split(",") if name.strip()}
    unknown = args.only - set(PHASES + EXTRA)
    if unknown:
        p.error(f"unknown phase(s): {', '.join(sorted(unknown))}")
    paths = args.claim_paths or ("cas,skip_locked" if args.db == "mariadb" else "cas")
    args.claim_paths = [x.strip() for x in paths.split(",") if x.strip()]
    return args


def _terminate(signum: int, frame: object) -> None:
    # SIGTERM and SIGHUP take the same way out as Ctrl-C: through the finally below.
    raise KeyboardInterrupt


def run(args: argparse.Namespace, stack: Stack, clock: page.Clock) -> list[Row]:
    """Run the chosen phases in order and collect their rows."""
    from idle import run_idle
    from latency import run_latency, run_restart
    from ladder import run_ladder
    from load import run_claims, run_throughput
    from versus import run_versus

    phases = [
        ("idle", {"idle"}, lambda: run_idle(stack, args.idle_seconds)),
        ("latency", {"ttft", "relay"}, lambda: run_latency(
            stack, args.only, args.ttft_requests, args.warmup_requests, args.relay_chunks, args.relay_rate)),
        ("throughput", {"throughput"}, lambda: run_throughput(
            stack, args.workers, args.slots, args.clients, args.seconds, args.warmup_seconds, args.client_procs)),
        ("claims", {"claims"}, lambda: run_claims(stack, args.claim_paths, args.claim_jobs, args.claimers)),
        ("versus", {"versus"}, lambda: run_versus(
            stack, args.versus_requests, args.warmup_requests, args.versus_clients, args.versus_seconds,
            args.warmup_seconds, args.client_procs, args.versus_pollclients, args.versus_slots)),
        ("restart", {"restart"}, lambda: run_restart(stack)),
        ("ladder", {"ladder"}, lambda: run_ladder(
            stack, [int(n) for n in args.ladder.split(",")], args.ladder_pollclients, args.ladder_slots)),
    ]
    rows: list[Row] = []
    stack.start_database()
    for name, wanted, phase in phases:
        if args.only & wanted:
            clock.phase(name)
            started = time.monotonic()
            print(f"{name} ...", flush=True)
            rows += phase()
            print(f"{name} done in {time.monotonic() - started:.0f} s", flush=True)
    return rows


def describe(stack: Stack) -> str:
    """Name the database, machine and time of the run in one line."""
    db = "SQLite"
    if stack.mariadb is not None:
        with stack.mariadb.root() as conn, conn.cursor() as cur:
            cur.execute("SELECT VERSION()")
            db = "MariaDB " + cur.fetchone()[0]
    now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return f"Pollgate bench: {db}, Python {platform.python_version()}, {os.cpu_count()} cores, {now}"


def sizes(args: argparse.Namespace) -> dict[str, str]:
    """Return the run's sizes as the page's method text quotes them."""
    return {
        "ttft_requests": str(args.ttft_requests), "warmup_requests": str(args.warmup_requests),
        "relay_chunks": str(args.relay_chunks), "relay_rate": f"{args.relay_rate:g}",
        "idle_seconds": f"{args.idle_seconds:g}", "workers": str(args.workers), "slots": str(args.slots),
        "clients": str(args.clients), "client_procs": str(args.client_procs), "seconds": f"{args.seconds:g}",
        "warmup_seconds": f"{args.warmup_seconds:g}", "claim_jobs": f"{args.claim_jobs:,}",
        "claimers": str(args.claimers), "claim_paths": " and ".join(f"`{x}`" for x in args.claim_paths),
        "processes": str(args.gunicorn_workers), "threads": str(args.gunicorn_threads),
        "versus_requests": str(args.versus_requests), "versus_clients": str(args.versus_clients),
        "versus_seconds": f"{args.versus_seconds:g}", "versus_pollclients": str(args.versus_pollclients),
        "versus_slots": str(args.versus_slots), "litellm_version": litellm_version(),
    }


def main() -> int:
    """Run the benchmarks, print the table and, after a full run, write the page; always stop what was started."""
    args = parse_args()
    # A shell starts background jobs with SIGINT ignored; Ctrl-C and kill -INT must still work.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGHUP, _terminate)
    clock = page.Clock()
    stack = Stack(args.db, keep=args.keep, processes=args.gunicorn_workers, threads=args.gunicorn_threads,
                  worker_class=args.gunicorn_class, connections=args.gunicorn_connections)
    try:
        rows = run(args, stack, clock)
        title = describe(stack)
        machine = page.machine(stack)  # asks the database, so before it stops
    except KeyboardInterrupt:
        print("interrupted; stopping everything", file=sys.stderr)
        return 130
    except Exception:
        stack.keep = True  # the logs explain the failure
        raise
    finally:
        if stack.keep:
            print(f"logs and data kept in {stack.dir}", file=sys.stderr)
        stack.stop()
    clock.finish()  # after stop(): every child has been waited for, so its CPU is counted
    print()
    print(table(rows, f"{title}, {clock.seconds:.0f} s"))
    print(clock.describe())
    if set(PHASES) <= args.only:
        page.write(args.page, page.render(rows, machine, clock, sizes(args)))
        print(f"wrote {args.page}")
    else:
        print("a subset of the phases ran: the page is left alone (run every phase to write it)")
    return 0  # figures, not a test: a missed target shows in the table, not the status


if __name__ == "__main__":
    sys.exit(main())
