"""Side by side: the same work through LiteLLM proxy, through Pollgate, and straight to the model server.

All three answer from one bench model server (bench/upstream.py) and are driven by the
official openai client: first the time to first token of sequential streamed requests,
then non-streamed throughput with many client threads. LiteLLM runs from its own venv
(LITELLM_VENV, made on first use from bench/requirements-litellm.txt), as its users run
it: `litellm --config ... --num_workers 2`, a master key and no database.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Optional

from latency import openai_client, timed_streams
from load import drive, in_window
from mariadb import free_port
from profile import Profile
from stack import HERE, PYTHON, ROOT, Stack, utcnow
from stats import Row, ms, spread_ms

LITELLM_VENV = os.environ.get("LITELLM_VENV", os.path.join(ROOT, ".bench-litellm"))
LITELLM_KEY = "sk-bench-master"
MODEL = "bench-chat"
SLOW_MODEL = "think-8-40"  # upstream.py: 8 s before the first word, then 40 words over 12 s
MODELS = (MODEL, SLOW_MODEL)
TARGETS = ("upstream", "LiteLLM", "Pollgate")


def litellm_bin() -> str:
    """Return the litellm command of the bench's own venv, making the venv on first use."""
    exe = os.path.join(LITELLM_VENV, "bin", "litellm")
    if not os.path.exists(exe):
        print(f"  making LiteLLM's venv in {LITELLM_VENV} (once; about two minutes)", flush=True)
        subprocess.run([sys.executable, "-m", "venv", LITELLM_VENV], check=True)
        subprocess.run([os.path.join(LITELLM_VENV, "bin", "pip"), "install", "-q", "-r",
                        os.path.join(HERE, "requirements-litellm.txt")], check=True)
    return exe


def litellm_version() -> str:
    """Return the installed LiteLLM version, or a dash before its venv exists."""
    python = os.path.join(LITELLM_VENV, "bin", "python")
    if not os.path.exists(python):
        return "-"
    done = subprocess.run([python, "-c", "import importlib.metadata as m; print(m.version('litellm'))"],
                          capture_output=True, text=True)
    return done.stdout.strip() or "-"


def start_upstream(stack: Stack) -> str:
    """Start the bench model server; return its OpenAI base URL (with /v1)."""
    port = free_port()
    proc = stack.spawn("upstream", [PYTHON, os.path.join(HERE, "upstream.py"), "--port", str(port)], dict(os.environ))
    base = f"http://127.0.0.1:{port}"
    stack.wait_http(base + "/v1/models", proc, "upstream", 15)
    return base


def start_litellm(stack: Stack, upstream: str, processes: int) -> str:
    """Start LiteLLM proxy with `processes` workers in front of the model server; return its base URL."""
    exe = litellm_bin()
    port = free_port()
    config = os.path.join(stack.dir, "litellm.yaml")
    # JSON is YAML: no YAML writer needed here.
    with open(config, "w") as f:
        json.dump({"model_list": [{"model_name": name, "litellm_params": {
            "model": f"openai/{name}", "api_base": upstream + "/v1", "api_key": "upstream-key"}} for name in MODELS],
            "general_settings": {"master_key": LITELLM_KEY}, "litellm_settings": {"telemetry": False}}, f)
    # The model cost map is fetched from GitHub unless told to use the copy in the package.
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_LOG": "ERROR"}
    proc = stack.spawn("litellm", [exe, "--config", config, "--host", "127.0.0.1", "--port", str(port),
                                   "--num_workers", str(processes)], env)
    base = f"http://127.0.0.1:{port}"
    stack.wait_http(base + "/health/liveliness", proc, "litellm", 120)
    return base


def run_versus(stack: Stack, requests_count: int, warmup: int, clients: int, seconds: float,
               warmup_seconds: float, procs: int, pollclients: int, slots: int) -> list[Row]:
    """Measure TTFT and throughput through each target in turn; return their rows and the ratios."""
    upstream = start_upstream(stack)
    figures: dict[str, dict[str, float]] = {}
    details: dict[str, list[Row]] = {}
    bases = {"upstream": (upstream, "upstream-key")}
    for name in TARGETS:
        if name == "LiteLLM":
            bases[name] = (start_litellm(stack, upstream, stack.processes), LITELLM_KEY)
        elif name == "Pollgate":
            bases[name] = start_pollgate(stack, upstream, pollclients, slots)
        base, key = bases[name]
        print(f"  {name} ...", flush=True)
        ttft = ttft_of(base, key, requests_count, warmup)
        rate, details[name] = throughput_of(stack, name, base, key, clients, seconds, warmup_seconds, procs)
        figures[name] = {**ttft, "rate": rate}
        print(f"  {name}: TTFT p50 {ms(ttft['p50'])}, p99 {ms(ttft['p99'])}; {rate:.1f} req/s", flush=True)
        if name == "LiteLLM":
            stack.stop_named("litellm")
    stack.stop_named("pollclient")
    stack.stop_gateway()
    stack.stop_named("upstream")
    return versus_rows(figures, details, clients)


def start_pollgate(stack: Stack, upstream: str, pollclients: int, slots: int, name: str = "versus",
                   env: Optional[dict[str, str]] = None) -> tuple[str, str]:
    """Start the gateway and openai-backend pollclients in front of the model server; return (base, key)."""
    site = stack.new_site(name)
    base = stack.start_gateway(site, env)
    since = utcnow()
    for i, token in enumerate(site.worker_tokens(pollclients)):
        stack.start_pollclient(site, base, token, f"pollclient-{i}", "--backend", "openai",
                               "--upstream-url", upstream + "/v1", "--models", ",".join(MODELS),
                               "--max-concurrent", str(slots))
    stack.wait_workers(site, pollclients, since, timeout=90)
    time.sleep(0.5)  # into their long-polls
    return base, site.key


def ttft_of(base: str, key: str, count: int, warmup: int) -> dict[str, float]:
    """Time sequential streamed requests from just before create() to the first content delta."""
    client = openai_client(base, key)
    samples = timed_streams(client, MODEL, count, warmup)
    client.close()
    return spread_ms([first - started for started, first, _ in samples])


def throughput_of(stack: Stack, name: str, base: str, key: str, clients: int, seconds: float, warmup: float,
                  procs: int) -> tuple[float, list[Row]]:
    """Drive non-streamed requests from `clients` threads over a window; return req/s and detail rows."""
    folder = os.path.join(stack.dir, f"versus-{name}")
    os.makedirs(folder, exist_ok=True)
    # Pollgate's window is sampled too, so the page can say where its CPU goes.
    profile = Profile(stack.gateway.pid, seconds, os.path.join(folder, "py-spy.txt")) if name == "Pollgate" else None
    records, (measure_from, stop_at), watch = drive(stack, base, key, clients, procs, warmup, seconds, folder, (),
                                                    "--model", MODEL, "--no-stream", profile=profile)
    ok, errors, latency = in_window(records, measure_from, stop_at)
    print(f"  {name}: {len(ok)} ok in the window, {len(errors)} errors in {len(records)} requests; "
          f"latency p50 {ms(latency['p50'])}, p99 {ms(latency['p99'])}"
          + (f"; first error: {errors[0]['error']}" if errors else ""))
    return len(ok) / seconds, [
        Row("errors", f"{len(errors)} of {len(records)}", "0", not errors),
        Row("latency p50 / p99", f"{ms(latency['p50'])} / {ms(latency['p99'])}"),
        Row("CPU in cores", watch.cpu_used),
        *([Row(f"gunicorn CPU {part} (py-spy)", value) for part, value in profile.shares().items()] if profile else []),
    ]


def versus_rows(figures: dict[str, dict[str, float]], details: dict[str, list[Row]], clients: int) -> list[Row]:
    """Lay the three targets side by side and judge Pollgate against LiteLLM."""
    rows: list[Row] = []
    for name in TARGETS:
        f = figures[name]
        rows.append(Row(f"vs {name}: stream TTFT p50 / p99", f"{ms(f['p50'])} / {ms(f['p99'])}"))
        rows.append(Row(f"vs {name}: non-stream, {clients} clients", f"{f['rate']:.1f} req/s"))
        rows += [Row(f"  {row.name}", row.value, row.target, row.met) for row in details[name]]
    ours, theirs = figures["Pollgate"], figures["LiteLLM"]
    p50 = ours["p50"] / theirs["p50"]
    rate = ours["rate"] / theirs["rate"] if theirs["rate"] else float("nan")
    rows += [
        Row("vs: Pollgate / LiteLLM TTFT p50", f"{p50:.2f}x", "<= 1.00x", p50 <= 1.0),
        Row("vs: Pollgate TTFT p99", ms(ours["p99"]), "<= 100 ms", ours["p99"] <= 100),
        Row("vs: Pollgate / LiteLLM throughput", f"{rate:.2f}x", ">= 1.00x", rate >= 1.0),
    ]
    return rows
