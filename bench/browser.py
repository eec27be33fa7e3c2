"""Time to first token through a browser worker: gunicorn + MariaDB, the userscript in headless
Chromium on the fake arena.ai, the openai client streaming.

    python bench/browser.py [--requests 100] [--warmup 10]

The fake site answers at once (a reasoning line, then words 10 ms apart), so the figure is
what the gateway, the browser and the userscript add. Needs Debian's chromium and playwright.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

import openai  # noqa: E402
from playwright.sync_api import sync_playwright  # noqa: E402

from fake_arena import FakeArena  # noqa: E402
from stack import Stack  # noqa: E402
from stats import percentile  # noqa: E402
from webapp import userscript  # noqa: E402

ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run", "--disable-web-security"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=10)
    args = parser.parse_args()
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # the fake site's request log
    stack = Stack("mariadb")
    arena = FakeArena()
    try:
        stack.start_database()
        site = stack.new_site("browser")
        base = stack.start_gateway(site)
        shim = open(os.path.join(ROOT, "tests", "gm_shim.js")).read()
        seed = {"gateway": base, "token": site.tokens[0], "adapter": "lmarena"}
        # The real site's per-message reCAPTCHA stops every job, by design (docs/userscript.md).
        arena.recaptcha = False
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=shutil.which("chromium"), headless=True,
                                        args=ARGS + [f"--host-resolver-rules={arena.host_rules()}"])
            context = browser.new_context(bypass_csp=True, ignore_https_errors=True)
            context.add_init_script(
                f"if (location.origin === {json.dumps(arena.url)}) (() => {{\n"
                f"const {{ GM_getValue, GM_setValue, GM_xmlhttpRequest }} = ({shim})({json.dumps(seed)});\n"
                f"const run = () => {{ {userscript.build()} }};\n"
                "document.readyState === 'loading' ? addEventListener('DOMContentLoaded', run) : run(); })();")
            context.new_page().goto(arena.url + "/")
            client = openai.OpenAI(base_url=base + "/v1", api_key=site.key, max_retries=0, timeout=60)
            end = time.monotonic() + 30
            while "arena-text" not in {m.id for m in client.models.list()}:
                if time.monotonic() > end:
                    raise SystemExit("the browser worker never showed up")
                time.sleep(0.2)
            first, whole = [], []
            for i in range(args.warmup + args.requests):
                started = time.perf_counter()
                ttft = None
                for chunk in client.chat.completions.create(model="arena-text", stream=True,
                                                            messages=[{"role": "user", "content": "hello"}]):
                    delta = chunk.choices[0].delta if chunk.choices else None
                    if ttft is None and delta and (delta.content or (delta.model_extra or {}).get("reasoning_content")):
                        ttft = time.perf_counter() - started
                if i >= args.warmup:
                    first.append(ttft * 1000)
                    whole.append((time.perf_counter() - started) * 1000)
            browser.close()
        print(f"{platform.node()}: {os.cpu_count()} cores, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
              f"{args.requests} requests, gunicorn {stack.processes} x {stack.threads} on MariaDB")
        print(f"browser worker (fake LMArena): TTFT p50 {percentile(first, 50):.1f} ms, p90 {percentile(first, 90):.1f} ms,"
              f" p99 {percentile(first, 99):.1f} ms; whole answer p50 {percentile(whole, 50):.1f} ms")
    finally:
        arena.stop()
        stack.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
