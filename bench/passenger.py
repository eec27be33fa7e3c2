"""Time to first token and whole-request time through real Apache + mod_passenger, against gunicorn.

    python bench/passenger.py [--requests 200] [--warmup 20]

Both serve the same code on one throwaway MariaDB with an echo pollclient (flushing at
once); the client is the official `openai` package streaming one short answer at a time.
Needs root, apache2 and libapache2-mod-passenger (tests/passenger.py builds the app's venv).
"""
from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

import openai  # noqa: E402

from mariadb import MariaDB, free_port  # noqa: E402
from passenger import PassengerSite, missing_part  # noqa: E402
from stats import percentile  # noqa: E402

EMAIL = "bench@example.com"


def pollclient(url: str, token: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "pollclient"), "--api-url", url, "--token", token,
                             "--backend", "echo", "--flush-interval", "0", "--poll-wait", "20"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def measure(url: str, key: str, count: int, warmup: int) -> tuple[list[float], list[float]]:
    """Stream `count` sequential requests; return TTFT and total times in milliseconds."""
    client = openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=60)
    end = time.monotonic() + 30
    while "echo" not in {m.id for m in client.models.list()}:
        if time.monotonic() > end:
            raise SystemExit("the echo worker never showed up")
        time.sleep(0.2)
    first, whole = [], []
    for i in range(warmup + count):
        started = time.perf_counter()
        ttft = None
        for chunk in client.chat.completions.create(model="echo", stream=True,
                                                    messages=[{"role": "user", "content": "hello"}]):
            if ttft is None and chunk.choices and chunk.choices[0].delta.content:
                ttft = time.perf_counter() - started
        if i >= warmup:
            first.append(ttft * 1000)
            whole.append((time.perf_counter() - started) * 1000)
    return first, whole


def describe(name: str, first: list[float], whole: list[float]) -> str:
    return (f"{name:<34} TTFT p50 {percentile(first, 50):6.1f} ms  p90 {percentile(first, 90):6.1f} ms  "
            f"p99 {percentile(first, 99):6.1f} ms | whole request p50 {percentile(whole, 50):6.1f} ms")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--gunicorn-workers", type=int, default=2, help="processes of the gunicorn node (64 threads each)")
    args = parser.parse_args()
    reason = missing_part()
    if reason:
        raise SystemExit(f"cannot run: {reason}")
    server = MariaDB()
    server.start()
    try:
        url = server.new_database()
        env = {"DATABASE_URL": url, "SECRET_KEY": "bench", "POLLGATE_DEFAULT_TIER": "null"}
        with PassengerSite(env) as site:
            site.flask("create-user", EMAIL, "--password", "bench password")
            key = site.flask("create-key", EMAIL).strip().splitlines()[-1]
            token = site.flask("create-worker-token", EMAIL).strip().splitlines()[-1]
            results = []
            worker = pollclient(site.url, token)
            try:
                results.append(describe("Apache + mod_passenger, under /api", *measure(site.url, key, args.requests,
                                                                                      args.warmup)))
            finally:
                worker.terminate()
                worker.wait()
            port = free_port()
            node = subprocess.Popen([sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "passenger_wsgi:application"],
                                    cwd=ROOT, env={**os.environ, **env, "POLLGATE_BIND": f"127.0.0.1:{port}",
                                                   "POLLGATE_WORKERS": str(args.gunicorn_workers),
                                                   "POLLGATE_INSTANCE_PATH": os.path.join(site.dir, "gunicorn")},
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(2)
            # A new worker identity, so the stopped one's long-poll cannot take a job.
            token = site.flask("create-worker-token", EMAIL).strip().splitlines()[-1]
            worker = pollclient(f"http://127.0.0.1:{port}", token)
            try:
                results.append(describe(f"gunicorn {args.gunicorn_workers} x 64 threads, same db", *measure(f"http://127.0.0.1:{port}", key,
                                                                                     args.requests, args.warmup)))
            finally:
                worker.terminate()
                worker.wait()
                node.terminate()
                node.wait()
        print(f"{platform.node()}: {os.cpu_count()} cores, Python {platform.python_version()} (app under Passenger: "
              f"Debian's), {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {args.requests} requests each")
        for line in results:
            print(line)
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
