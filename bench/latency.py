"""Latency: time to first token through the echo pollclient, and chunk relay latency."""
from __future__ import annotations

import datetime as dt
import threading
import time
from typing import Any, Optional

import openai
import requests
from openai import OpenAI

from stack import Site, Stack, utcnow
from stats import Row, ms, percentile, spread_ms

PROMPT = "hello"


def openai_client(base: str, key: str) -> OpenAI:
    """Build the official client; no retries, so every failure is counted."""
    return OpenAI(base_url=base + "/v1", api_key=key, max_retries=0, timeout=60)


def run_latency(stack: Stack, which: set[str], requests_count: int, warmup: int, chunks: int, rate: float) -> list[Row]:
    """Run the TTFT and relay figures against one gateway and return their rows."""
    site = stack.new_site("latency")
    base = stack.start_gateway(site)
    rows: list[Row] = []
    if "ttft" in which:
        rows += ttft(stack, site, base, requests_count, warmup, "")
        stack.stop_named("pollclient")
        # A stopped worker's long-poll lives on in the gateway until its wait ends (only a
        # newer poll of the same worker retires it): start afresh so it cannot interfere.
        base = stack.start_gateway(site)
        # The same again with the pollclient flushing at once, which leaves the gateway's share.
        rows += ttft(stack, site, base, requests_count, warmup, "0")
    if "relay" in which:
        rows += relay(site, base, chunks, rate)
    stack.stop_named("pollclient")
    stack.stop_gateway()
    return rows


def ttft(stack: Stack, site: Site, base: str, count: int, warmup: int, flush: str) -> list[Row]:
    """Time sequential streamed requests from just before create() to the first content delta.

    flush is the pollclient's --flush-interval; empty leaves its default.
    """
    since = utcnow()
    extra = ["--flush-interval", flush] if flush else []
    stack.start_pollclient(site, base, site.tokens[0], "pollclient-ttft", *extra)
    stack.wait_workers(site, 1, since)
    time.sleep(0.5)  # let its first long-poll open
    client = openai_client(base, site.key)
    samples = timed_streams(client, "echo", count, warmup)
    client.close()
    waits = spread_ms([f - s for s, f, _ in samples])
    label = f"TTFT (pollclient --flush-interval {flush})" if flush else "TTFT"
    print(f"  {label} over {count} requests: " + ", ".join(f"{k} {ms(v)}" for k, v in waits.items()))
    return [
        Row(f"{label} p50", ms(waits["p50"]), "<= 25 ms", waits["p50"] <= 25),
        Row(f"{label} p90 / max", f"{ms(waits['p90'])} / {ms(waits['max'])}"),
        Row(f"{label} p99", ms(waits["p99"]), "<= 100 ms", waits["p99"] <= 100),
        stage_row(site, samples, f"{label} stages"),
    ]


def timed_streams(client: OpenAI, model: str, count: int, warmup: int) -> list[tuple[float, float, str]]:
    """Stream requests one after another; return (start, first content delta, response id) of each
    after the warm-ups, in wall-clock seconds so they line up with the job's own timestamps."""
    samples: list[tuple[float, float, str]] = []
    for i in range(warmup + count):
        started = time.time()
        first: Optional[float] = None
        with client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": PROMPT}], stream=True
        ) as stream:
            for chunk in stream:
                if first is None and chunk.choices and chunk.choices[0].delta.content:
                    first, job_id = time.time(), chunk.id
        if first is None:
            raise RuntimeError(f"a stream of {model} ended without content")
        if i >= warmup:
            samples.append((started, first, job_id))
    return samples


def _epoch(moment: Optional[dt.datetime]) -> float:
    return moment.replace(tzinfo=dt.timezone.utc).timestamp() if moment else float("nan")


STAGES = ("request -> job row", "row -> claimed", "claimed -> chunk POST", "chunk POST -> client")


def stage_row(site: Site, samples: list[tuple[float, float, str]], label: str) -> Row:
    """Split each TTFT with the job's own timestamps (same host clock); print p50/p90, return the p50s."""
    from sqlalchemy import select

    from webapp.models import Job

    ids = [job_id for _, _, job_id in samples]
    with site.reader() as s:
        rows = {r.public_id: r for r in s.execute(
            select(Job.public_id, Job.created_at, Job.claimed_at, Job.first_chunk_at).where(Job.public_id.in_(ids))
        )}
    stages: dict[str, list[float]] = {name: [] for name in STAGES}
    for started, first, job_id in samples:
        row = rows[job_id]
        marks = [started, _epoch(row.created_at), _epoch(row.claimed_at), _epoch(row.first_chunk_at), first]
        for name, a, b in zip(stages, marks, marks[1:]):
            stages[name].append(b - a)
    print(f"  {label} (p50 / p90): " + "; ".join(
        f"{name} {ms(percentile(v, 50) * 1000)} / {ms(percentile(v, 90) * 1000)}" for name, v in stages.items()))
    # The row names each stage by where it ends, to keep the table narrow.
    ends = ("to row", "to claim", "to chunk POST", "to client")
    p50s = [ms(percentile(v, 50) * 1000) for v in stages.values()]
    return Row(f"{label} p50", ", ".join(f"{end} {p50}" for end, p50 in zip(ends, p50s)))


def relay(site: Site, base: str, chunks: int, rate: float) -> list[Row]:
    """Post chunks stamped with their send time at a steady rate; the client subtracts on receipt."""
    token = site.worker_tokens(2)[1]
    worker = requests.Session()
    worker.headers["Authorization"] = f"Bearer {token}"
    claim = {"models": ["bench-relay"], "max_jobs": 1, "wait": 0, "kind": "bench", "version": "1"}
    worker.post(f"{base}/worker/v1/claim", json=claim, timeout=30).raise_for_status()  # advertise the model
    failure: list[BaseException] = []
    producer = threading.Thread(target=_produce, args=(worker, base, claim, chunks, rate, failure), daemon=True)
    producer.start()
    client = openai_client(base, site.key)
    delays: list[float] = []
    stream = client.chat.completions.create(
        model="bench-relay", messages=[{"role": "user", "content": "relay"}], stream=True
    )
    with stream:
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                delays.append(time.time() - float(chunk.choices[0].delta.content))
    producer.join(timeout=30)
    client.close()
    worker.close()
    if failure:
        raise RuntimeError(f"relay worker failed: {failure[0]!r}")
    # The first chunk also waits for the response to start (that is TTFT); the rest are relay.
    spread = spread_ms(delays[1:])
    summary = ", ".join(f"{k} {ms(v)}" for k, v in spread.items())
    print(f"  relay over {len(delays) - 1} chunks at {rate:g}/s: {summary}")
    return [
        Row("relay p50", ms(spread["p50"]), "<= 25 ms", spread["p50"] <= 25),
        Row("relay p99", ms(spread["p99"])),
    ]


def _produce(worker: requests.Session, base: str, claim: dict[str, Any], chunks: int, rate: float,
             failure: list[BaseException]) -> None:
    """Claim the relay job, then send one chunk per POST on a fixed schedule, then finish."""
    try:
        job = None
        end = time.monotonic() + 20
        while job is None and time.monotonic() < end:
            answer = worker.post(f"{base}/worker/v1/claim", json={**claim, "wait": 5}, timeout=30)
            answer.raise_for_status()
            job = (answer.json()["jobs"] or [None])[0]
        if job is None:
            raise RuntimeError("the relay job was never claimable")
        start = time.monotonic()
        for seq in range(chunks):
            pause = start + seq / rate - time.monotonic()
            if pause > 0:
                time.sleep(pause)
            entry = {"id": job["id"], "lease": job["lease"],
                     "chunks": [{"seq": seq, "delta": {"content": f"{time.time():.6f}"}}]}
            _report(worker, base, entry)
        _report(worker, base, {"id": job["id"], "lease": job["lease"], "chunks": [], "finish": {"reason": "stop"}})
    except BaseException as err:  # surfaced by relay() on the main thread
        failure.append(err)


def _report(worker: requests.Session, base: str, entry: dict[str, Any]) -> None:
    answer = worker.post(f"{base}/worker/v1/chunks", json={"jobs": [entry]}, timeout=30)
    answer.raise_for_status()
    result = answer.json()["jobs"][0]
    if not result["ok"]:
        raise RuntimeError(f"report refused: {result}")


def run_restart(stack: Stack) -> list[Row]:
    """Time the first request after a pollclient restart; the old process's long-poll lingers."""
    site = stack.new_site("restart")
    base = stack.start_gateway(site)
    for name in ("pollclient-old", "pollclient-new"):
        stack.stop_named("pollclient")
        since = utcnow()
        stack.start_pollclient(site, base, site.tokens[0], name)
        stack.wait_workers(site, 1, since)
        time.sleep(0.5)  # into its long-poll
    client = openai_client(base, site.key)
    started, outcome = time.time(), "ok"
    try:
        with client.chat.completions.create(
            model="echo", messages=[{"role": "user", "content": PROMPT}], stream=True
        ) as stream:
            for _ in stream:
                pass
    except openai.APIError as err:
        outcome = f"{type(err).__name__} {getattr(err, 'status_code', '')}".strip()
    gap = time.time() - started
    client.close()
    stack.stop_named("pollclient")
    stack.stop_gateway()
    print(f"  first request after a worker restart: {gap:.2f} s, {outcome}")
    return [Row("first request after a worker restart", f"{gap * 1000:.0f} ms, {outcome}", "~TTFT", gap < 0.5)]
