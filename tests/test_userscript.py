"""The userscript in real headless Chromium: LMArena (a fake one) and local-endpoint adapters
serving real jobs from the gateway, asked through the openai package."""
from __future__ import annotations

import base64
import json
import os
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import openai
import pytest
import requests
from sqlalchemy import select

from conftest import ROOT, csrf, expect, launch_chromium, make_account, read_until_error, sign_in
from fake_arena import (ANSWER, CAT_PNG, CHAT_MODELS, IMAGE_MODELS, PARTIAL, REASONING, SLOW_PIECES, SPLIT, USAGE,
                        FakeArena)
from fake_upstream import ANSWER as LOCAL_ANSWER, LONG_ID_TOOL_CALLS, start_fake_upstream
from support import wait_for, wait_for_hangup
from webapp import config as gateway_config
from webapp import userscript
from webapp.db import db
from webapp.models import Chunk, Job, Worker

SHIM = open(os.path.join(ROOT, "tests", "gm_shim.js")).read()
PROMPT = [{"role": "user", "content": "hello arena"}]


@pytest.fixture
def db_url(tmp_path):
    """SQLite only here: the queue runs on MariaDB in the other suites; this one tests the browser."""
    yield f"sqlite:///{tmp_path}/pollgate.db"


@pytest.fixture(scope="module")
def arena():
    site = FakeArena()
    yield site
    site.stop()


@pytest.fixture(scope="module")
def chromium_open(arena):
    """Chromium with web security off (the test's stand-in for the manager's cross-origin
    requests), and the site's hosts resolved to the fake site."""
    yield from launch_chromium("--disable-web-security", f"--host-resolver-rules={arena.host_rules()}")


@pytest.fixture(autouse=True)
def fresh_arena(arena):
    """The site as the real one behaves, except that its reCAPTCHA requirement is off: with it
    on (test_a_site_that_asks_for_recaptcha_...) no job can be served, by design."""
    arena.reset()
    arena.recaptcha = False


# Playwright's locators cannot enter a closed shadow root: the tests of what the worker does
# open the panel's; the token test keeps it closed, as the script ships.
OPEN_SHADOW_ROOTS = """const attachShadow = Element.prototype.attachShadow;
Element.prototype.attachShadow = function (init) { return attachShadow.call(this, { ...init, mode: "open" }); };"""

# What a userscript manager does with a script's @match lines (Chrome's match patterns, as
# Tampermonkey and Violentmonkey read them): run it on a page whose URL one of them matches.
MATCHES = r"""(patterns, href) => {
  const url = new URL(href);
  const glob = (text) => new RegExp("^" + text.split("*").map((part) => part.replace(/[.+?^$|()[\]{}\\]/g, "\\$&")).join(".*") + "$");
  return patterns.some((pattern) => {
    const [, scheme, host, path] = /^(\*|https?):\/\/([^/]*)(\/.*)$/.exec(pattern) || [];
    if (!path || (scheme === "*" ? !/^https?:$/.test(url.protocol) : url.protocol !== scheme + ":")) return false;
    const name = host.includes(":") ? url.host : url.hostname;  // a pattern with a port matches that port
    const wild = host.startsWith("*.") && (name === host.slice(2) || name.endsWith(host.slice(1)));
    return (host === "*" || name === host || wild) && glob(path).test(url.pathname + url.search);
  });
}"""


def metadata(script: str, key: str) -> list[str]:
    """The values of one key in a userscript's metadata block."""
    block = script[:script.index("// ==/UserScript==")]
    return re.findall(rf"^// @{key}\s+(\S+)\s*$", block, re.M)


def worker_context(browser, seed: dict, script: str | None = None, inspect: bool = True, persist: bool = True):
    """A browser context where the userscript, set up with `seed`, runs as a manager runs it.

    It runs on the pages its own @match lines name (top frames only: @noframes), in its own
    scope with the manager's API, whose requests honour its @connect lines. `inspect` opens
    the panel's shadow root for Playwright; `persist` keeps the manager's storage in the
    page's localStorage (for reloads and tabs), else out of the page's reach.
    """
    # The manager's requests leave from the extension, outside the page's CSP; the shim's
    # leave from the page, so the CSP is bypassed as the manager would.
    context = browser.new_context(bypass_csp=True, ignore_https_errors=True)
    script = script or userscript.build()
    top_only = "// @noframes" in script
    options = {"persist": persist, "connect": metadata(script, "connect")}
    context.add_init_script(
        f"if ((window.top === window || {json.dumps(not top_only)}) && ({MATCHES})({json.dumps(metadata(script, 'match'))}, location.href)) (() => {{\n"
        f"{OPEN_SHADOW_ROOTS if inspect else ''}\n"
        f"const {{ GM_getValue, GM_setValue, GM_xmlhttpRequest }} = ({SHIM})({json.dumps(seed)}, {json.dumps(options)});\n"
        f"const runScript = () => {{ {script} }};\n"
        "document.readyState === 'loading' ? addEventListener('DOMContentLoaded', runScript) : runScript(); })();")
    return context


def state(page) -> str:
    return page.evaluate("document.querySelector('#pollgate-panel')?.dataset.state || ''")


def wait_state(page, wanted: str, timeout: float = 30) -> None:
    page.wait_for_function(f"document.querySelector('#pollgate-panel')?.dataset.state === {json.dumps(wanted)}",
                           timeout=timeout * 1000)


def wait_models(api, *models, present=True, timeout: float = 15) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if set(models) <= {m.id for m in api.models.list().data} if present else \
                not set(models) & {m.id for m in api.models.list().data}:
            return
        time.sleep(0.1)
    raise AssertionError(f"models {models} {'never showed up' if present else 'never went away'}")


@pytest.fixture
def arena_tab(chromium_open, arena, account, live):
    """A signed-in fake arena.ai tab with the userscript set up for this gateway and token (the
    adapter left on auto)."""
    context = worker_context(chromium_open, {"gateway": live.url, "token": account.token})
    page = context.new_page()
    page.goto(arena.url + "/")
    yield page
    context.close()


def client(live, account) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{live.url}/v1", api_key=account.key, max_retries=0)


def test_the_script_runs_on_arena_ai_by_its_own_match_lines(chromium_open, arena, account, live):
    """lmarena.ai answers 301 to arena.ai; the manager runs the script there by its @match
    lines, and on no other page (the gateway's, with a generic build that does not name it)."""
    context = worker_context(chromium_open, {"gateway": live.url, "token": account.token})
    page = context.new_page()
    page.goto("https://lmarena.ai/?mode=direct")
    assert page.url == "https://arena.ai/?mode=direct"
    wait_state(page, "connected", timeout=20)
    expect(page.locator("#pollgate-panel [data-role=message]")).to_have_text("lmarena adapter on arena.ai")
    elsewhere = context.new_page()
    elsewhere.goto(live.url + "/browser-worker")
    assert elsewhere.evaluate("document.readyState") == "complete"
    assert elsewhere.locator("#pollgate-panel").count() == 0 and "[Pollgate:" not in elsewhere.title()
    context.close()


def test_a_tab_streams_text_and_reasoning_through_the_gateway(app, arena, arena_tab, live, account):
    api = client(live, account)
    wait_models(api, "arena-text", "arena-image")
    chunks = list(api.chat.completions.create(model="arena-text", messages=PROMPT, stream=True,
                                              stream_options={"include_usage": True}))
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    reasoning = "".join((c.choices[0].delta.model_extra or {}).get("reasoning_content") or "" for c in chunks if c.choices)
    # Citations (tool-call deltas, one call in two pieces, another a list) become one Sources list.
    assert content == ANSWER + " \n\nSources:\n[1] [A source](https://example.org/source)\n" \
        "[2] [Another \\[source\\]](https://example.org/other)\n[3] [A third](https://example.org/third)"
    assert reasoning == REASONING and "side B" not in content  # heartbeats, side B and unknown lines left out
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == \
        (USAGE["promptTokens"], USAGE["completionTokens"])  # the site's own counts
    sent = arena.requests[-1]
    assert sent["modelAId"] == "0199a1b2-text" and sent["userMessage"] == {
        "content": "hello arena", "experimental_attachments": [], "metadata": {}}
    assert (sent["mode"], sent["modality"]) == ("direct-battle", "chat")
    assert "modelBMessageId" not in sent and "recaptchaV3Token" not in sent  # one model; no token made up
    assert sent["id"][14] == "7"  # a UUIDv7, as the site's own ids
    assert "Pollgate: connected" in arena_tab.title() or "Pollgate: busy" in arena_tab.title()
    with app.app_context(), db.read() as s:
        worker = s.scalar(select(Worker))
        assert worker.kind == "userscript/lmarena" and worker.site == "arena.ai"


def test_the_catalogue_is_read_from_the_flight_data(app, arena, arena_tab, live, account):
    """What the site's picker offers, in its order: no hidden variant, no video, web or
    search-only model; a quote in a field or an entry cut across two pushes loses nothing."""
    api = client(live, account)
    wait_models(api, *CHAT_MODELS, *IMAGE_MODELS)
    with app.app_context(), db.read() as s:
        worker = s.scalar(select(Worker))
    assert (json.loads(worker.models_json), json.loads(worker.image_models_json)) == (CHAT_MODELS, IMAGE_MODELS)
    # A public name the site repeats is served by its visible variant, before or after a hidden one.
    served = {"arena-text": "0199a1b2-text", "arena-twin": "0199a1b2-twin",
              'arena "quoted" model': "0199a1b2-quoted", SPLIT: "0199a1b2-split"}
    for name, model_id in served.items():
        assert api.chat.completions.create(model=name, messages=PROMPT).choices[0].message.content.startswith(ANSWER)
        assert arena.requests[-1]["modelAId"] == model_id


def test_images_as_markdown_in_chat_and_as_b64_from_the_images_endpoint(arena_tab, live, account):
    api = client(live, account)
    wait_models(api, "arena-image")
    reply = api.chat.completions.create(model="arena-text", messages=[{"role": "user", "content": "draw a cat"}])
    assert "![image](" in reply.choices[0].message.content and "/cat.png)" in reply.choices[0].message.content
    image = api.images.generate(model="arena-image", prompt="draw a cat", response_format="b64_json")
    assert image.data[0].b64_json == base64.b64encode(CAT_PNG).decode()
    linked = api.images.generate(model="arena-image", prompt="draw a cat")
    assert linked.data[0].url.endswith("/cat.png")


@pytest.mark.parametrize("gate, words", [("cloudflare", "security check (cloudflare) that pollgate does not perform"),
                                         ("login_gate", "asks you to sign in")])
def test_a_site_asking_for_a_human_pauses_the_worker(app, arena, arena_tab, live, account, admin, gate, words):
    api = client(live, account)
    wait_models(api, "arena-text")
    arena.gate = gate
    with pytest.raises(openai.InternalServerError) as failed:
        api.chat.completions.create(model="arena-text", messages=PROMPT)
    assert failed.value.status_code == 503 and failed.value.code == "worker_needs_human"
    assert words in failed.value.message.lower()
    wait_state(arena_tab, "needs_human")
    assert "Pollgate: needs you" in arena_tab.title()
    expect(arena_tab.locator("#pollgate-panel [data-role=message]")).to_contain_text("Resume")
    wait_models(api, "arena-text", present=False)  # it stopped offering what it cannot serve
    admin_client, _ = admin
    assert "needs a human" in admin_client.get("/admin/").text
    # The person fixes it in the tab and resumes; nothing was solved or faked for them.
    arena.gate = ""
    arena_tab.locator("#pollgate-panel button[data-role=toggle]").click()
    wait_models(api, "arena-text")
    assert api.chat.completions.create(model="arena-text", messages=PROMPT).choices[0].message.content.startswith(ANSWER)
    assert arena_tab.evaluate("window.__grecaptchaTouches") == []


def test_a_site_that_asks_for_recaptcha_fails_the_job_and_the_worker_stops_claiming(
        chromium_open, arena, account, live, proxy):
    """Pollgate never makes a reCAPTCHA token, the page's own grecaptcha included: the first
    job fails with worker_needs_human, the tab says why and pauses, and claims no more."""
    arena.recaptcha = True  # as on the real site since 2025-12
    context = worker_context(chromium_open, {"gateway": proxy.url, "token": account.token})
    page = context.new_page()
    page.goto(arena.url + "/")
    api = client(live, account)
    wait_models(api, "arena-text")
    with pytest.raises(openai.InternalServerError) as failed:
        api.chat.completions.create(model="arena-text", messages=PROMPT)
    assert (failed.value.status_code, failed.value.code) == (503, "worker_needs_human")
    said = "Pollgate does not perform human checks, so this worker cannot serve arena.ai while the site asks for them."
    assert failed.value.body["message"].startswith("arena.ai asks for a reCAPTCHA human check") and said in failed.value.body["message"]
    wait_state(page, "needs_human")
    expect(page.locator("#pollgate-panel [data-role=message]")).to_contain_text(said)
    claims = len(proxy.times("claim"))
    # The gateway heard needs_human from the pause and again from the loop going round, which
    # then waits instead of claiming.
    end = time.monotonic() + 15
    while len([b for b in proxy.statuses if b["status"] == "needs_human"]) < 2:
        assert time.monotonic() < end, proxy.statuses
        time.sleep(0.05)
    assert proxy.statuses[0]["message"].startswith("arena.ai asks for a reCAPTCHA human check")
    wait_models(api, "arena-text", present=False)
    with pytest.raises(openai.APIStatusError):  # nothing serves it now: nothing is claimed
        api.chat.completions.create(model="arena-text", messages=PROMPT)
    assert len(proxy.times("claim")) == claims
    # One request reached the site, without a token; the page's grecaptcha was never touched.
    assert [("recaptchaV3Token" in body, body["mode"]) for body in arena.requests] == [(False, "direct-battle")]
    assert page.evaluate("window.__grecaptchaTouches") == []
    context.close()


@pytest.mark.parametrize("prompt, status, code, words", [
    ("arena error please", 502, "upstream_error", "arena.ai: the site reported an error for this answer (hasArenaError)"),
    ("say nothing", 502, "upstream_error", "arena.ai ended the answer without any text or image."),
    ("a forbidden topic", 400, "content_filter", 'arena.ai refused this prompt (429 "prompt failed")'),
    ("refuse this", 400, "content_filter", "arena.ai refused: This prompt violates our content policy"),
])
def test_a_site_failure_is_a_clear_error_and_the_worker_serves_on(arena, arena_tab, live, account, prompt, status,
                                                                   code, words):
    api = client(live, account)
    wait_models(api, "arena-text")
    with pytest.raises(openai.APIStatusError) as failed:
        api.chat.completions.create(model="arena-text", messages=[{"role": "user", "content": prompt}])
    assert (failed.value.status_code, failed.value.code) == (status, code)
    assert failed.value.body["message"].startswith(words)
    assert len(arena.requests) == 1  # none of them is retried: the same prompt would fail the same way
    assert api.chat.completions.create(model="arena-text", messages=PROMPT).choices[0].message.content.startswith(ANSWER)


def test_how_an_answer_ends(arena_tab, live, account):
    api = client(live, account)
    wait_models(api, "arena-text")
    # finishReason "content-filter": what came is kept, and the client is told why it stopped.
    filtered = api.chat.completions.create(model="arena-text", messages=[{"role": "user", "content": "filtered"}])
    assert (filtered.choices[0].message.content, filtered.choices[0].finish_reason) == (PARTIAL, "content_filter")
    # finishReason "error" after some text: the stream ends in an error, not a clean stop.
    stream = api.chat.completions.create(model="arena-text", stream=True, messages=[{"role": "user", "content": "break"}])
    received, error = read_until_error(stream)
    assert received == PARTIAL and "arena.ai ended the answer with an error." in str(error)
    # Lines framed as server-sent events ("data: a0:...") read the same; the site's usage is passed on.
    framed = api.chat.completions.create(model="arena-text", messages=[{"role": "user", "content": "framed"}])
    assert framed.choices[0].message.content.startswith(ANSWER) and framed.choices[0].finish_reason == "stop"
    assert (framed.usage.prompt_tokens, framed.usage.completion_tokens) == (USAGE["promptTokens"], USAGE["completionTokens"])


def test_the_request_names_mode_and_modality_as_the_site_does(arena, arena_tab, live, account):
    api = client(live, account)
    wait_models(api, "arena-search", "arena-image")
    api.chat.completions.create(model="arena-search", messages=PROMPT)
    api.images.generate(model="arena-image", prompt="draw a cat")
    assert [(r["mode"], r["modality"]) for r in arena.requests] == [("direct-battle", "search"),
                                                                   ("direct-battle", "image")]
    # A site from before direct-battle refuses it with a 4xx naming the mode: the tab falls back
    # to "direct" and keeps to it.
    arena.reset()
    arena.recaptcha, arena.modes = False, ("direct", "battle", "side-by-side")
    for _ in range(2):
        assert api.chat.completions.create(model="arena-text", messages=PROMPT).choices[0].message.content.startswith(ANSWER)
    assert [r["mode"] for r in arena.requests] == ["direct-battle", "direct", "direct"]


def test_image_inputs_are_refused_before_the_site_is_asked(arena, arena_tab, live, account):
    api = client(live, account)
    wait_models(api, "arena-text")
    with pytest.raises(openai.BadRequestError) as refused:
        api.chat.completions.create(model="arena-text", messages=[{"role": "user", "content": [
            {"type": "text", "text": "what is this?"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(CAT_PNG).decode()}}]}])
    assert refused.value.code == "invalid_request"
    assert "its own upload flow, which Pollgate does not implement" in refused.value.body["message"]
    assert arena.requests == []  # no conversation was started on the site


def test_a_gateway_built_script_reaches_the_site_images_without_a_prompt(chromium_open, arena, account, live):
    """The downloaded script declares only the gateway, the site's domains and localhost in
    @connect; the site's image CDN is under them, so a b64_json job needs no prompt."""
    script = userscript.build(live.url, account.token)
    assert metadata(script, "connect") == ["127.0.0.1", "arena.ai", "lmarena.ai", "localhost", "127.0.0.1"]
    context = worker_context(chromium_open, {}, script=script)
    context.new_page().goto(arena.url + "/")
    api = client(live, account)
    wait_models(api, "arena-image")
    image = api.images.generate(model="arena-image", prompt="draw a cat", response_format="b64_json")
    assert image.data[0].b64_json == base64.b64encode(CAT_PNG).decode()
    context.close()


def test_the_panel_says_once_that_each_job_lands_in_the_arena_history(arena_tab):
    notice = arena_tab.locator("#pollgate-panel [data-role=notice]")
    expect(notice).to_be_visible()
    expect(notice).to_contain_text("Each job this tab serves starts a conversation in your arena.ai history")
    notice.locator("button").click()
    expect(notice).to_be_hidden()
    arena_tab.reload()  # said once: the panel remembers it was read
    wait_state(arena_tab, "connected")
    expect(arena_tab.locator("#pollgate-panel [data-role=notice]")).to_be_hidden()


def test_pause_and_resume_from_the_panel(arena_tab, live, account):
    api = client(live, account)
    wait_models(api, "arena-text")
    toggle = arena_tab.locator("#pollgate-panel button[data-role=toggle]")
    expect(toggle).to_have_text("Pause")
    toggle.click()
    wait_state(arena_tab, "paused")
    wait_models(api, "arena-text", present=False)
    with pytest.raises(openai.NotFoundError):
        api.chat.completions.create(model="arena-text", messages=PROMPT)
    arena_tab.reload()  # the pause is remembered
    wait_state(arena_tab, "paused")
    arena_tab.locator("#pollgate-panel button[data-role=toggle]").click()
    wait_models(api, "arena-text")
    assert api.chat.completions.create(model="arena-text", messages=PROMPT).choices[0].message.content


def test_a_client_that_hangs_up_stops_the_tab_and_its_request_to_the_site(app, arena, arena_tab, live, account):
    api = client(live, account)
    wait_models(api, "arena-text")
    stream = api.chat.completions.create(model="arena-text", stream=True,
                                         messages=[{"role": "user", "content": "slow please"}])
    for received, _ in enumerate(stream, 1):
        if received == 3:
            break
    stream.close()
    wait_for(lambda: job_state(app) == ("cancelled", "client_gone"), 20, "the job cancelled")
    # Told to stop on its next report, the tab aborts its own request: the site stops writing
    # long before its 6 s answer would have ended by itself.
    wait_for(lambda: arena.endings, 20, "the site's answer to end")
    assert arena.endings == ["cut"] and len(arena.requests) == 1
    wait_state(arena_tab, "connected")


def job_state(app) -> tuple[str, str | None]:
    """The state and error code of the latest job."""
    with app.app_context(), db.read() as s:
        job = s.scalar(select(Job).order_by(Job.id.desc()))
    return job.state, job.error_code


def test_closing_the_tab_mid_answer_fails_the_job_cleanly(app, arena_tab, live, account):
    api = client(live, account)
    wait_models(api, "arena-text")
    stream = api.chat.completions.create(model="arena-text", stream=True,
                                         messages=[{"role": "user", "content": "slow please"}])
    received, error = read_until_error(stream, act_at=3, action=arena_tab.close)
    assert received.startswith("piece 0 ") and "worker" in str(error).lower()
    with app.app_context(), db.read() as s:
        job = s.scalar(select(Job).order_by(Job.id.desc()))
    assert job.state == "failed" and job.next_seq >= 1


# A lease that outlives the test: only the closing tab's release can put its job back in the
# queue in time. The dispatch timeout leaves the second tab time to start on a loaded machine.
@pytest.mark.parametrize("app_config", [{"LEASE_TTL": 60.0, "DISPATCH_TIMEOUT": 40.0}])
def test_closing_the_tab_before_output_hands_the_job_to_the_next_tab(chromium_open, arena, app, account, live):
    seed = {"gateway": live.url, "token": account.token}
    first = worker_context(chromium_open, seed)
    first.new_page().goto(arena.url + "/")
    api = client(live, account)
    wait_models(api, "arena-text")
    replies = []
    asking = threading.Thread(target=lambda: replies.append(api.chat.completions.create(
        model="arena-text", messages=[{"role": "user", "content": "wait for it"}])))
    asking.start()
    end = time.monotonic() + 15
    while not arena.requests:  # the site is thinking; nothing has streamed yet
        assert time.monotonic() < end
        time.sleep(0.05)
    first.close()  # the tab hands its job back as it goes
    second = worker_context(chromium_open, seed)
    second.new_page().goto(arena.url + "/")
    asking.join(timeout=30)
    second.close()
    assert replies and replies[0].choices[0].message.content.startswith(ANSWER)
    assert len(arena.requests) == 2  # asked again by the second tab, answered once
    with app.app_context(), db.read() as s:
        job = s.scalar(select(Job))
        worker = s.scalar(select(Worker))
    # Handed back, not lost: a release does not count as an attempt or as a worker's failure.
    assert (job.state, job.attempts, worker.jobs_failed) == ("completed", 1, 0)


def test_two_tabs_take_turns_with_one_long_poll(chromium_open, arena, account, live):
    context = worker_context(chromium_open, {"gateway": live.url, "token": account.token})
    first, second = context.new_page(), context.new_page()
    first.goto(arena.url + "/")
    api = client(live, account)
    wait_models(api, "arena-text")
    second.goto(arena.url + "/")
    wait_state(first, "connected", timeout=20)
    assert state(second) == "standby"
    first.close()
    wait_state(second, "connected", timeout=20)
    assert api.chat.completions.create(model="arena-text", messages=PROMPT).choices[0].message.content
    context.close()


# The site's own script (LMArena's, or an XSS there), run as the site's scripts run: it plants
# canaries where it can read, records what passes by, and on demand reads everything it can
# reach: the DOM through open shadow roots, every input's value, window properties, storage,
# cookies, the URL, the title, console output, posted messages and the resources fetched.
SITE_SPY = """(() => {
  const seen = [];
  window.siteCanary = "CANARY-WINDOW";
  localStorage.setItem("site", "CANARY-LOCAL");
  sessionStorage.setItem("site", "CANARY-SESSION");
  for (const level of ["log", "info", "warn", "error", "debug"]) {
    const original = console[level];
    console[level] = (...args) => { seen.push(args.map(String).join(" ")); return original.apply(console, args); };
  }
  addEventListener("message", (e) => seen.push(typeof e.data === "string" ? e.data : JSON.stringify(e.data)));
  new MutationObserver((records) => {
    for (const r of records) {
      seen.push(String(r.oldValue), r.attributeName ? String(r.target.getAttribute(r.attributeName)) : "");
    }
    seen.push(location.href, document.title);
  }).observe(document, { subtree: true, childList: true, attributes: true, characterData: true,
                         attributeOldValue: true, characterDataOldValue: true });
  addEventListener("DOMContentLoaded", () => {
    const widget = document.createElement("div");
    widget.attachShadow({ mode: "open" }).innerHTML = "<input>";
    widget.shadowRoot.querySelector("input").value = "CANARY-INPUT";
    document.body.appendChild(widget);
  });
  window.siteSpy = () => {
    const found = [...seen, location.href, document.title, document.cookie, JSON.stringify(history.state)];
    const visit = (root) => {
      found.push(root.textContent || "");
      for (const el of root.querySelectorAll("*")) {
        for (const attr of el.attributes) found.push(`${attr.name}=${attr.value}`);
        if (typeof el.value === "string") found.push(el.value);
        if (el.shadowRoot) visit(el.shadowRoot);
      }
    };
    visit(document);
    found.push(document.documentElement.outerHTML);
    for (const storage of [localStorage, sessionStorage]) {
      for (let i = 0; i < storage.length; i++) found.push(`${storage.key(i)}=${storage.getItem(storage.key(i))}`);
    }
    for (const name of Object.getOwnPropertyNames(window)) {
      let value;
      try { value = window[name]; } catch (e) { continue; }
      if (typeof value === "function") {
        const source = Function.prototype.toString.call(value);
        if (!source.includes("[native code]")) found.push(source);
      } else if (value && typeof value === "object" && !(value instanceof Node)) {
        try { found.push(JSON.stringify(value)); } catch (e) { /* cyclic: window, frames, ... */ }
      } else {
        found.push(`${name}=${String(value)}`);
      }
    }
    found.push(...performance.getEntriesByType("resource").map((entry) => entry.name));
    const panel = document.getElementById("pollgate-panel");
    return { text: found.join("\\n"), panel: Boolean(panel), panelRoot: panel ? panel.shadowRoot : "no panel" };
  };
})();"""


class ClosedPanel:
    """The panel's closed shadow root as a person at the screen (and DevTools) reaches it, not the page."""

    def __init__(self, page):
        self.page = page
        self.cdp = page.context.new_cdp_session(page)

    def node(self, selector: str) -> int:
        document = self.cdp.send("DOM.getDocument", {"depth": -1, "pierce": True})["root"]
        [host] = [n for n in _nodes(document) if "pollgate-panel" in n.get("attributes", [])]
        [root] = host["shadowRoots"]
        assert root["shadowRootType"] == "closed"
        return self.cdp.send("DOM.querySelector", {"nodeId": root["nodeId"], "selector": selector})["nodeId"]

    def read(self, selector: str, expression: str):
        """Evaluate `expression` (with `this` the element) where DevTools can, inside the closed root."""
        element = self.cdp.send("DOM.resolveNode", {"nodeId": self.node(selector)})["object"]
        return self.cdp.send("Runtime.callFunctionOn", {
            "objectId": element["objectId"], "returnByValue": True,
            "functionDeclaration": f"function () {{ return {expression}; }}"})["result"]["value"]

    def visible(self, selector: str) -> bool:
        return self.read(selector, "this.checkVisibility()")

    def click(self, selector: str) -> None:
        assert self.visible(selector), f"{selector} is not shown"
        quad = self.cdp.send("DOM.getContentQuads", {"nodeId": self.node(selector)})["quads"][0]
        self.page.mouse.click(sum(quad[0::2]) / 4, sum(quad[1::2]) / 4)


def _nodes(node: dict):
    yield node
    for child in node.get("children", []) + node.get("shadowRoots", []):
        yield from _nodes(child)


@pytest.mark.parametrize("entered", ["typed in the panel", "in the downloaded script"])
def test_the_page_cannot_read_the_worker_token(chromium_open, arena, account, live, entered):
    typed = entered == "typed in the panel"
    seed = {"gateway": live.url}
    script = None if typed else userscript.build(live.url, account.token)
    context = worker_context(chromium_open, seed, script=script, inspect=False, persist=False)
    context.add_init_script(f"if (location.origin === {json.dumps(arena.url)}) {SITE_SPY}")
    page = context.new_page()
    page.goto(arena.url + "/")
    panel = ClosedPanel(page)
    if typed:
        wait_state(page, "setup")
        assert not panel.visible("[data-role=replace]")
        panel.click("input[name=token]")
        page.keyboard.insert_text(account.token)
        panel.click("button[type=submit]")
    wait_state(page, "connected", timeout=20)
    reply = client(live, account).chat.completions.create(model="arena-text", messages=PROMPT)
    assert reply.choices[0].message.content.startswith(ANSWER)  # the worker serves with the token

    # The person sees that a token is set, and its public prefix; the form holds nothing.
    if not typed:
        panel.click("summary")  # open Settings
    assert panel.read("[data-role=token-set]", "this.textContent.replace(/\\s+/g, ' ').trim()") == \
        f"Worker token: token set ({account.token[:12]}…) Replace token"
    assert panel.read("input[name=token]", "this.value") == "" and not panel.visible("input[name=token]")
    panel.click("[data-role=replace]")
    assert panel.visible("input[name=token]") and panel.read("input[name=token]", "this.value") == ""

    spied = page.evaluate("siteSpy()")
    context.close()
    assert spied["panel"] and spied["panelRoot"] is None  # the host is there; its shadow root is closed
    for canary in ("CANARY-WINDOW", "CANARY-LOCAL", "CANARY-SESSION", "CANARY-INPUT", "pollgate-panel"):
        assert canary in spied["text"]  # the spy does read what the page can reach
    assert account.token not in spied["text"] and account.token[12:] not in spied["text"]


def test_the_local_endpoint_adapter_serves_from_the_gateway_page(chromium_open, account, live):
    upstream = start_fake_upstream()
    try:
        context = worker_context(chromium_open, {"gateway": live.url, "token": account.token,
                                                 "localUrl": upstream.url},
                                 script=userscript.build(live.url))
        page = context.new_page()
        page.goto(live.url + "/browser-worker")
        api = client(live, account)
        wait_models(api, "fake-chat")
        chunks = list(api.chat.completions.create(model="fake-chat", messages=PROMPT, stream=True))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == LOCAL_ANSWER
        posted = [r["body"] for r in upstream.requests if r["method"] == "POST"][-1]
        assert posted["stream"] is True and posted["messages"] == PROMPT
        context.close()
    finally:
        upstream.stop()


def test_the_local_endpoint_adapter_rebuilds_loose_tool_calls(app, chromium_open, account, live):
    upstream = start_fake_upstream()
    try:
        context = worker_context(chromium_open, {"gateway": live.url, "token": account.token,
                                                 "localUrl": upstream.url, "models": "fake-tools-loose"},
                                 script=userscript.build(live.url))
        context.new_page().goto(live.url + "/browser-worker")
        api = client(live, account)
        wait_models(api, "fake-tools-loose")
        reply = api.chat.completions.create(model="fake-tools-loose", messages=PROMPT)
        context.close()
    finally:
        upstream.stop()
    calls = [(c.id, c.type, c.function.name, c.function.arguments) for c in reply.choices[0].message.tool_calls]
    assert calls == [("call_a", "function", "get_weather", '{"city":"Paris"}'),
                     ("call_b", "function", "get_time", '{"zone": "CET"}')]
    assert reply.choices[0].finish_reason == "tool_calls"
    with app.app_context(), db.read() as s:
        assert [j.state for j in s.scalars(select(Job))] == ["completed"]


# The real lease, so a lapsed one would show; the real long-poll, so the panel keeps saying
# what was refused until the tab's next claim answers.
@pytest.mark.parametrize("app_config", [{"LEASE_TTL": gateway_config.LEASE_TTL,
                                         "CLAIM_WAIT_MAX": gateway_config.CLAIM_WAIT_MAX}])
def test_a_refused_report_fails_the_job_at_once_and_the_panel_says_why(app, chromium_open, account, live,
                                                                       monkeypatch):
    monkeypatch.setattr("fake_upstream.LOOSE_TOOL_CALLS", LONG_ID_TOOL_CALLS)
    field = "jobs[0].chunks[0].delta.tool_calls[0].id must be at most 191 characters."
    upstream = start_fake_upstream()
    try:
        context = worker_context(chromium_open, {"gateway": live.url, "token": account.token,
                                                 "localUrl": upstream.url, "models": "fake-tools-loose"},
                                 script=userscript.build(live.url))
        page = context.new_page()
        page.goto(live.url + "/browser-worker")
        api = client(live, account)
        wait_models(api, "fake-tools-loose")
        started = time.monotonic()
        with pytest.raises(openai.APIStatusError) as err:
            api.chat.completions.create(model="fake-tools-loose", messages=PROMPT)
        waited = time.monotonic() - started
        with app.app_context(), db.read() as s:
            [job] = s.scalars(select(Job))
        wait_state(page, "error")
        expect(page.locator("#pollgate-panel [data-role=message]")).to_have_text(
            f"The gateway refused this tab's output, so job {job.public_id} failed: {field}")
        context.close()
    finally:
        upstream.stop()
    assert (err.value.status_code, err.value.code) == (502, "upstream_error")
    assert err.value.body["message"] == f"The worker's output was refused by the gateway: {field} (invalid_output)"
    assert waited < gateway_config.LEASE_TTL / 3  # not the worker_lost that the lapsed lease would bring
    assert (job.state, job.error_code) == ("failed", "invalid_output")


def test_line_parser_and_message_mapping(chromium_open):
    page = chromium_open.new_page()
    for name in ("lines.js", "errors.js", "adapters/lmarena.js"):
        page.add_script_tag(path=os.path.join(ROOT, "userscript", "src", name))
    parsed = page.evaluate("""() => [
        'a0:"hi"', 'data: ag:"think"', 'a2:[{"type":"image","image":"https://x/y.png"}]', 'a3:"bad"',
        'ad:{"finishReason":"length"}', '{"error":{"message":"nope"}}', 'b0:"other side"', 'zz:1', 'a0:broken',
        '', 'a2:[{"type":"heartbeat"}]', 'a0:"hasArenaError"', 'ac:{"toolCallId":"c","argsTextDelta":"{}"}'
    ].map(parseLine)""")
    assert parsed == [
        {"type": "text", "value": "hi"}, {"type": "reasoning", "value": "think"},
        {"type": "images", "value": ["https://x/y.png"]}, {"type": "error", "value": "bad"},
        {"type": "finish", "value": {"finishReason": "length"}}, {"type": "error", "value": "nope"},
        None, None, None, None, None,
        {"type": "error", "value": "the site reported an error for this answer (hasArenaError)"},
        {"type": "citation", "value": {"toolCallId": "c", "argsTextDelta": "{}"}},
    ]
    assert page.evaluate("""() => [{finishReason: "stop", usage: {promptTokens: 3, completionTokens: 4}},
        {finishReason: "content-filter"}, {finishReason: "unknown", usage: {promptTokens: -1}}, {finishReason: "length"}]
        .map(finishOf)""") == [{"reason": "stop", "usage": {"prompt_tokens": 3, "completion_tokens": 4}},
                               {"reason": "content_filter"}, {"reason": "stop"}, {"reason": "length"}]
    sources = page.evaluate("""() => { const c = citationList();
        c.add({toolCallId: "a", argsTextDelta: '{"source":{"title":"T (1)",'});
        c.add({toolCallId: "b", argsTextDelta: '{"source":[{"title":"U","url":"https://u.example/a b"},{"url":"javascript:x"}]}'});
        c.add({toolCallId: "a", argsTextDelta: '"url":"https://t.example/(1)"}}'});
        c.add({toolCallId: "b", argsTextDelta: '{"source":{"title":"again","url":"https://u.example/a b"}}'});
        return c.markdown(); }""")
    assert sources == "[1] [U](https://u.example/a%20b)\n[2] [T (1)](https://t.example/%281%29)"
    split = page.evaluate("""() => { const out = []; const s = lineSplitter((l) => out.push(l));
        s.push('a0:"he'); s.push('llo"\\na0:"x"\\n'); s.push('ad:{}'); s.end(); return out; }""")
    assert split == ['a0:"hello"', 'a0:"x"', "ad:{}"]
    mapped = page.evaluate("""() => flattenMessages([{role: "system", content: "be brief"},
        {role: "user", content: [{type: "text", text: "what is this?"}]}])""")
    assert mapped == "[system]\nbe brief\n\nwhat is this?"
    page.close()


def test_the_dashboard_hands_out_a_userscript_set_up_for_this_gateway(app, account, live):
    browser = app.test_client()
    sign_in(browser, account.email)
    page = browser.post("/workers", data={"name": "arena tab", "csrf_token": csrf(browser.get("/workers"))})
    token = re.search(r'<code id="new-token">([^<]+)</code>', page.text).group(1)
    script = browser.post("/workers/userscript", data={"token": token, "csrf_token": csrf(page)})
    assert script.status_code == 200 and "attachment" in script.headers["Content-Disposition"]
    assert "pollgate-arena-tab.user.js" in script.headers["Content-Disposition"]
    text = script.get_data(as_text=True)
    assert f'"token": "{token}"' in text and "// @connect      localhost" in text
    assert "// ==UserScript==" in text and "// @grant        GM_xmlhttpRequest" in text
    assert browser.post("/workers/userscript", data={"token": "pgw_nope", "csrf_token": csrf(page)}).status_code == 404
    # Another user cannot get a script with this user's token.
    other = app.test_client()
    stranger = make_account(app, "stranger@example.com")
    sign_in(other, stranger.email)
    assert other.post("/workers/userscript", data={"token": token, "csrf_token": csrf(other.get("/workers"))}).status_code == 404
    public = requests.get(f"{live.url}/userscript/pollgate.user.js", timeout=10).text
    assert '"token": ""' in public and f"// @updateURL    {live.url}/userscript/pollgate.user.js" in public


def test_the_committed_userscript_is_built_from_its_sources():
    with open(os.path.join(ROOT, "userscript", "pollgate.user.js"), encoding="utf-8") as handle:
        assert handle.read() == userscript.build(), "run: python userscript/build.py"


# -- timings that follow the lease, and a gateway that hangs or asks to wait ---------------


class GatewayProxy:
    """Forwards the worker's calls to the gateway, except that it leaves the chunk reports
    numbered in `.hang_reports` (from 0) unanswered until the tab gives up on them, loses the
    first report from number `.lose_from` on that carries output (answering "ok" for it
    without passing it on), and answers calls with `.canned` answers while it has some for
    that path. `.answers` keeps the gateway's answers to reports."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.lock = threading.Lock()
        self.calls: list[tuple[str, float]] = []  # (claim / chunks / status / release, when received)
        self.hang_reports: set[int] = set()
        self.hung: list[tuple[float, float]] = []  # (received, abandoned by the tab)
        self.canned: dict[str, list[tuple[int, dict, bytes]]] = {}
        self.statuses: list[dict] = []  # the bodies of the worker's status calls
        self.lose_from: int | None = None
        self.lost: list[dict] = []  # the reports lost
        self.answers: list[dict] = []
        handler = type("Handler", (_ProxyHandler,), {"proxy": self})
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def times(self, kind: str) -> list[float]:
        with self.lock:
            return [at for k, at in self.calls if k == kind]

    def take(self, kind: str, body: bytes):
        """Record a call; return "hang", a canned answer, or None to forward it."""
        with self.lock:
            number = len([k for k, _ in self.calls if k == "chunks"])
            self.calls.append((kind, time.monotonic()))
            if kind == "chunks" and number in self.hang_reports:
                return "hang"
            if kind == "chunks" and self.lose_from is not None and number >= self.lose_from and not self.lost:
                [entry] = json.loads(body)["jobs"]
                if entry.get("chunks") and "finish" not in entry and "error" not in entry:
                    self.lost.append(entry)
                    ok = {"id": entry["id"], "ok": True, "next_seq": entry["chunks"][-1]["seq"] + 1, "stop": False}
                    return 200, {"Content-Type": "application/json"}, json.dumps({"jobs": [ok]}).encode()
            return self.canned[kind].pop(0) if self.canned.get(kind) else None

    def hang(self, connection) -> None:
        received = time.monotonic()
        closed = wait_for_hangup(connection)
        with self.lock:
            self.hung.append((received, closed))

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class _ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    proxy: GatewayProxy

    def log_message(self, format, *args) -> None:
        pass

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.path.endswith("/status"):
            self.proxy.statuses.append(json.loads(body))
        kind = self.path.rsplit("/", 1)[-1]
        action = self.proxy.take(kind, body)
        if action == "hang":
            self.proxy.hang(self.connection)
            self.close_connection = True
            return
        if action is None:
            answer = requests.post(self.proxy.target + self.path, data=body, timeout=60, headers={
                "Authorization": self.headers["Authorization"], "Content-Type": "application/json"})
            headers = {k: answer.headers[k] for k in ("Content-Type", "Retry-After") if k in answer.headers}
            action = (answer.status_code, headers, answer.content)
            if kind == "chunks" and answer.status_code == 200:
                self.proxy.answers.extend(answer.json()["jobs"])
        status, headers, data = action
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def proxy(live):
    server = GatewayProxy(live.url)
    yield server
    server.stop()


def test_report_timings_follow_the_lease(chromium_open):
    page = chromium_open.new_page()
    for name in ("lines.js", "gm.js", "protocol.js"):
        page.add_script_tag(path=os.path.join(ROOT, "userscript", "src", name))
    for ttl in (1.5, 2, 3, 5, 15, 30, 60, 600):
        t = page.evaluate("(ttl) => leaseTimings(ttl)", ttl)
        assert t["reportMs"] <= ttl / 3 * 1000 + 1e-6 and t["heartbeatMs"] <= ttl / 3 * 1000 + 1e-6
        # A heartbeat that hangs for its whole timeout is sent again with a quarter of the lease left.
        assert t["heartbeatMs"] + t["reportMs"] + t["retryMs"] <= ttl * 750 + 1e-6
        assert page.evaluate("(cap) => Math.max(...Array.from({length: 50}, () => politeDelay(3600, cap)))",
                             t["retryMs"] / 1000) <= t["retryMs"] / 1000
    # With no job held, the gateway's default lease: LEASE_TTL in webapp/config.py.
    assert page.evaluate("leaseTimings()") == page.evaluate(f"leaseTimings({gateway_config.LEASE_TTL})")
    assert page.evaluate("leaseTtl([{lease_ttl: 6}, {lease_ttl: 9}])") == 6  # the claim answer's own first
    assert page.evaluate("leaseTtl([{}, {lease_ttl: 9}])") == 9
    assert page.evaluate("leaseTtl([{lease_ttl: '6'}, {lease_ttl: 0}])") == gateway_config.LEASE_TTL
    delays = page.evaluate("Array.from({length: 200}, () => politeDelay(10))")
    assert all(10 <= d <= 12 for d in delays) and len(set(delays)) > 100  # never early, spread out
    assert 96 <= page.evaluate("politeDelay(3600)") <= 120  # bounded
    page.close()


def ask_through(proxy, browser, arena, account, live):
    """Ask one question of a tab that reaches the gateway through the proxy; return the reply."""
    context = worker_context(browser, {"gateway": proxy.url, "token": account.token})
    context.new_page().goto(arena.url + "/")
    api = client(live, account)
    wait_models(api, "arena-text")
    try:
        return api.chat.completions.create(model="arena-text", messages=PROMPT)
    finally:
        context.close()


@pytest.mark.parametrize("app_config", [{"LEASE_TTL": 3.0}])
def test_a_hung_report_is_abandoned_and_resent_within_the_lease(app, chromium_open, arena, account, live, proxy):
    proxy.hang_reports = {0}
    reply = ask_through(proxy, chromium_open, arena, account, live)
    assert reply.choices[0].message.content.startswith(ANSWER)
    [(received, abandoned)] = proxy.hung
    # Given up after a third of the 3 s lease, not a minute; sent again at once, with time to
    # spare before the lease lapses (the slack is for a loaded machine's timers).
    assert abandoned - received < 1 + 0.75
    resent = min(at for at in proxy.times("chunks") if at > received)
    assert resent - received < 1.25 + 0.75
    with app.app_context(), db.read() as s:
        job = s.scalar(select(Job))
    assert (job.state, job.attempts) == ("completed", 1)  # never lapsed, never handed to another worker


def test_busy_and_broken_claim_answers_are_waited_out_and_said(chromium_open, arena, account, live, proxy):
    upgrading = {"error": {"message": "Upgrading.", "type": "service_unavailable", "param": None,
                           "code": "upgrade_pending"}}
    proxy.canned["claim"] = [
        (503, {"Content-Type": "application/json", "Retry-After": "1"}, json.dumps(upgrading).encode()),
        (200, {"Content-Type": "text/html"}, b"<html><body>Welcome to your new site!</body></html>"),
    ]
    context = worker_context(chromium_open, {"gateway": proxy.url, "token": account.token})
    page = context.new_page()
    page.goto(arena.url + "/")
    message = page.locator("#pollgate-panel [data-role=message]")
    wait_state(page, "waiting")
    expect(message).to_contain_text("The gateway is being upgraded; trying again in 1 s, as it asked.")
    assert "Pollgate: waiting for the gateway" in page.title()
    wait_state(page, "error")
    expect(message).to_contain_text("The gateway answered claim with something that is not JSON")
    wait_state(page, "connected")
    claims = proxy.times("claim")
    assert claims[1] - claims[0] >= 0.99  # Retry-After was waited out
    api = client(live, account)
    assert api.chat.completions.create(model="arena-text", messages=PROMPT).choices[0].message.content
    context.close()


def test_a_report_the_gateway_never_got_is_sent_again_on_its_seq_gap(app, chromium_open, arena, account, live, proxy):
    proxy.lose_from = 2
    context = worker_context(chromium_open, {"gateway": proxy.url, "token": account.token})
    context.new_page().goto(arena.url + "/")
    api = client(live, account)
    wait_models(api, "arena-text")
    stream = api.chat.completions.create(model="arena-text", stream=True,
                                         messages=[{"role": "user", "content": "slow please"}])
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    context.close()
    assert proxy.lost, "no report was lost on the way: the test tested nothing"
    assert [a["next_seq"] for a in proxy.answers if a.get("reason") == "seq_gap"] == [proxy.lost[0]["chunks"][0]["seq"]]
    # Every piece once, in order: the lost ones were sent again, nothing twice.
    assert text == "".join(f"piece {i} " for i in range(SLOW_PIECES))
    with app.app_context(), db.read() as s:
        job = s.scalar(select(Job))
        seqs = list(s.scalars(select(Chunk.seq).where(Chunk.job_id == job.id).order_by(Chunk.seq)))
    assert (job.state, job.attempts) == ("completed", 1) and seqs == list(range(len(seqs)))


@pytest.mark.parametrize("app_config", [{"LEASE_TTL": 12.0}])
@pytest.mark.parametrize("status", [429, 503])
def test_a_busy_answer_to_a_report_is_waited_out_within_the_lease(app, chromium_open, arena, account, live, proxy,
                                                                  status):
    busy = {"error": {"message": "Busy.", "type": "service_unavailable", "param": None, "code": "gateway_busy"}}
    # Retry-After asks for longer than the lease: waiting it out would lose the job.
    proxy.canned["chunks"] = [(status, {"Content-Type": "application/json", "Retry-After": "30"},
                               json.dumps(busy).encode())]
    reply = ask_through(proxy, chromium_open, arena, account, live)
    assert reply.choices[0].message.content.startswith(ANSWER)
    refused, resent = proxy.times("chunks")[:2]
    # Backed off (timers never fire early; the wait is 0.8-1 of a twelfth of the lease, 1 s),
    # and sent again well inside the lease rather than after the 30 s asked for.
    assert 0.75 <= resent - refused < 4
    with app.app_context(), db.read() as s:
        job = s.scalar(select(Job))
    assert (job.state, job.attempts) == ("completed", 1)
