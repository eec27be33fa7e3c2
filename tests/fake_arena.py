"""A fake arena.ai (LMArena) for the userscript tests: a page with a model catalogue in its HTML
and a streaming endpoint that speaks the site's line format.

It is served over TLS as https://arena.ai to Chromium (`host_rules()` maps the site's hosts to
this server on loopback; the certificate is a throwaway, so contexts ignore certificate
errors), answers https://lmarena.ai with a 301 to arena.ai as the real one does since
2026-02, and serves generated images from https://cdn.arena.ai.

What it checks, in the order the tests rely on: `.gate` "cloudflare" answers every request
with Cloudflare's "Just a moment..." page (403); a request without the session cookie the
page set, or with `.gate` "login_gate", gets 403 {"code":"LOGIN_GATE"} (the userscript must
use the user's own session); a `mode` not in `.modes` gets a 400 that names it (an older
site); with `.recaptcha` on (the default, as on the real site) a body without a
recaptchaV3Token gets 403 {"error":"recaptcha validation failed"}. Every body received is in
`.requests`; how each answer's stream ended is in `.endings`, "whole" or "cut" (the reader
went away before the last line). Then the prompt (the user message, or an image prompt) picks the answer:

    contains "forbidden"    429 {"error":"prompt failed"}: the site refuses that prompt
    contains "draw"         a heartbeat, then an image line (a2) pointing at the CDN's cat.png
    contains "refuse"       an error line (a3) about content policy
    contains "arena error"  a0:"hasArenaError", the site's in-band failure
    contains "say nothing"  heartbeats and a finish, without text or image
    contains "filtered"     some text, then finishReason "content-filter"
    contains "break"        some text, then finishReason "error"
    contains "slow"         SLOW_PIECES text lines, SLOW_DELAY seconds apart
    contains "wait"         thinks WAIT seconds before the usual answer
    anything else           reasoning (ag), ANSWER in text lines (a0) among heartbeats and side
                            B's lines, citations (ac, as tool-call deltas), a finish with usage
    contains "framed"       (with any of the above) every line prefixed with "data: "
"""
from __future__ import annotations

import base64
import json
import os
import ssl
import threading
import time
from typing import Any

from werkzeug.serving import make_server
from werkzeug.wrappers import Request, Response

ANSWER = "Hello from the arena!"
PARTIAL = "Here is the start"
USAGE = {"promptTokens": 7, "completionTokens": 5}  # the AI SDK's names
SOURCES = [{"title": "A source", "url": "https://example.org/source"},
           {"title": "Another [source]", "url": "https://example.org/other"},
           {"title": "A third", "url": "https://example.org/third"}]
REASONING = "Thinking it over."
SLOW_PIECES = 60
SLOW_DELAY = 0.1
WAIT = 2.0
SESSION = "arena-session-cookie"
URL = "https://arena.ai"
CDN = "https://cdn.arena.ai"
HOSTS = ("arena.ai", "cdn.arena.ai", "lmarena.ai", "www.lmarena.ai")
CERT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fake_arena_tls.pem")
# A 1x1 PNG.
CAT_PNG = base64.b64decode("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg==")


def _model(model_id: str, name: str, output: dict, **extra: Any) -> dict:
    return {"id": model_id, "publicName": name, "organization": "fake", "provider": "fake",
            "capabilities": {"inputCapabilities": {"text": True}, "outputCapabilities": output}, **extra}


# The catalogue in the shape the site's `initialModels` entries have (gpt4free's LMArena
# provider lists real ones, 2025-2026): hidden variants, repeated public names, video, web
# and search-only models, quotes in fields. SPLIT's entry is cut across two flight pushes.
SPLIT = "arena-split-across-pushes"
MODELS = [
    _model("0199a1b2-text", "arena-text", {"text": True}, userSelectable=True),
    _model("0199a1b2-image", "arena-image", {"image": {"aspectRatios": ["1:1"]}}),
    _model("0199a1b2-text-hidden", "arena-text", {"text": True}, userSelectable=False),  # after the visible one
    _model("0199a1b2-twin-hidden", "arena-twin", {"text": True}, userSelectable=False),  # before the visible one
    _model("0199a1b2-twin", "arena-twin", {"text": True}),
    _model("0199a1b2-secret", "arena-secret", {"text": True}, userSelectable=False),
    _model("0199a1b2-video", "arena-video", {"video": True}),
    _model("0199a1b2-web", "arena-webdev", {"web": True}),
    _model("0199a1b2-search-only", "arena-search-only", {"search": True}),
    _model("0199a1b2-search", "arena-search", {"text": True, "search": True}),
    _model("0199a1b2-quoted", 'arena "quoted" model', {"text": True}, organization='O\'Brien "Labs" </script>'),
    _model("0199a1b2-split", SPLIT, {"text": True}),
]
CHAT_MODELS = ["arena-text", "arena-twin", "arena-search", 'arena "quoted" model', SPLIT]
IMAGE_MODELS = ["arena-image"]


class FakeArena:
    """The running site: `.url`, `.requests` (the JSON bodies received), `.gate`, `.modes`, `.recaptcha`."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.endings: list[str] = []
        self.reset()
        tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        tls.load_cert_chain(CERT)
        self.server = make_server("127.0.0.1", 0, self.wsgi, threaded=True, ssl_context=tls)
        self.url = URL
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def reset(self) -> None:
        """Back to the real site's behaviour, with no request seen."""
        self.requests.clear()
        self.endings.clear()
        self.gate = ""
        self.modes = ("direct-battle", "direct", "battle", "side-by-side")
        self.recaptcha = True

    def host_rules(self) -> str:
        """Chromium's --host-resolver-rules that send the site's hosts to this server."""
        return ", ".join(f"MAP {host}:443 127.0.0.1:{self.server.server_port}" for host in HOSTS)

    def stop(self) -> None:
        """Stop serving."""
        self.server.shutdown()
        self.server.server_close()

    def wsgi(self, environ, start_response):
        request = Request(environ)
        host = request.host.split(":")[0]
        if host.endswith("lmarena.ai"):  # the old name: every path moved to arena.ai
            response = Response("", status=301, headers={"Location": URL + request.full_path.rstrip("?")})
        elif host == "cdn.arena.ai":
            response = Response(CAT_PNG, mimetype="image/png") if request.path == "/generated/cat.png" else \
                Response("not found", status=404)
        elif request.path == "/":
            response = Response(page(), mimetype="text/html")
            response.set_cookie("arena-session", SESSION, secure=True, httponly=True)
        elif request.path == "/nextjs-api/stream/create-evaluation" and request.method == "POST":
            response = self.evaluate(request)
        else:
            response = Response("not found", status=404)
        return response(environ, start_response)

    def evaluate(self, request: Request) -> Response:
        if self.gate == "cloudflare":
            return Response("<!DOCTYPE html><html><head><title>Just a moment...</title></head><body>Checking "
                            "your browser<script src=\"/cdn-cgi/challenge-platform/h/g/orchestrate/chl_page/v1\">"
                            "</script></body></html>", status=403, mimetype="text/html")
        if self.gate == "login_gate" or request.cookies.get("arena-session") != SESSION:
            return _json(403, {"code": "LOGIN_GATE"})
        body = request.get_json()
        self.requests.append(body)
        if body.get("mode") not in self.modes:
            return _json(400, {"error": "Invalid request body", "issues": [
                {"path": ["mode"], "message": f"Invalid enum value, received '{body.get('mode')}'"}]})
        if self.recaptcha and not body.get("recaptchaV3Token"):
            return _json(403, {"error": "recaptcha validation failed"})
        prompt = body["userMessage"]["content"]
        if "forbidden" in prompt:
            return _json(429, {"error": "prompt failed"})
        framing = "data: " if "framed" in prompt else ""
        return Response(self._watched(framing + line for line in lines(prompt)), mimetype="text/plain")

    def _watched(self, answer):
        # The server closes the generator when a write fails: that is the reader hanging up.
        ending = "cut"
        try:
            yield from answer
            ending = "whole"
        finally:
            self.endings.append(ending)


def _json(status: int, body: dict) -> Response:
    return Response(json.dumps(body), status=status, mimetype="application/json")


def lines(prompt: str):
    """Yield the answer's lines as the site streams them."""
    heartbeat = 'a2:[{"type":"heartbeat"}]\n'
    if "refuse" in prompt:
        yield 'a3:"This prompt violates our content policy"\n'
        return
    if "arena error" in prompt:
        yield 'a0:"hasArenaError"\n'
        yield 'ad:{"finishReason":"stop"}\n'
        return
    if "say nothing" in prompt:
        yield heartbeat
        yield heartbeat
        yield 'ad:{"finishReason":"stop"}\n'
        return
    if "filtered" in prompt or "break" in prompt:
        yield "a0:" + json.dumps(PARTIAL) + "\n"
        yield 'ad:{"finishReason":"%s"}\n' % ("content-filter" if "filtered" in prompt else "error")
        return
    if "draw" in prompt:
        yield heartbeat
        yield "a2:" + json.dumps([{"type": "image", "image": f"{CDN}/generated/cat.png"}]) + "\n"
    elif "slow" in prompt:
        for i in range(SLOW_PIECES):
            yield "a0:" + json.dumps(f"piece {i} ") + "\n"
            time.sleep(SLOW_DELAY)
    else:
        if "wait" in prompt:
            time.sleep(WAIT)
        yield "ag:" + json.dumps(REASONING) + "\n"
        yield 'b0:"side B is ignored"\n'
        yield "zz:{\"unknown\": true}\n"  # tolerated, not an error
        for i, word in enumerate(ANSWER.split(" ")):
            yield "a0:" + json.dumps(word + " ") + "\n"
            if i == 1:
                yield heartbeat
            time.sleep(0.01)
        # Citations are tool-call deltas: one call's JSON in two pieces, another's a list.
        one = json.dumps({"source": SOURCES[0]})
        yield "ac:" + json.dumps({"toolCallId": "call_1", "argsTextDelta": one[:12]}) + "\n"
        yield "ac:" + json.dumps({"toolCallId": "call_1", "argsTextDelta": one[12:]}) + "\n"
        yield "ac:" + json.dumps({"toolCallId": "call_2", "argsTextDelta": json.dumps({"source": SOURCES})}) + "\n"
        yield 'bd:{"finishReason":"stop"}\n'
    yield "ad:" + json.dumps({"finishReason": "stop", "usage": USAGE}) + "\n"




def page() -> str:
    """The site's page, its catalogue in the flight data as Next.js writes it: React Server
    Components rows (`<id>:<JSON>` lines, a `T` text row without one) cut into pushes of
    `self.__next_f.push([1, "<JSON string>"])`, escaped for a script element."""
    props = {"initialModels": MODELS, "initialModelAId": MODELS[0]["id"], "initialModelBId": None}
    note = "Welcome to the arena ✨\nVote for the better answer."
    rows = ('0:{"P":null,"b":"fake-build","p":"","c":["",""],"i":false}\n'
            '1:I[51234,["static/chunks/app-a1b2.js"],"Evaluation"]\n'
            '2:HL["/_next/static/css/a1b2.css","style"]\n'
            f'3:T{len(note.encode()):x},{note}'
            f'4:["$","$L1",null,{json.dumps(props, separators=(",", ":"))}]\n')
    cut = rows.index(f'"publicName":"{SPLIT}"')  # this entry starts in one push and ends in the next
    pieces = [rows[:200], rows[200:cut], rows[cut:cut + 40], rows[cut + 40:]]
    pushes = "".join(f"<script>self.__next_f.push({_script_json([1, piece])})</script>" for piece in pieces)
    return ("<!DOCTYPE html><html><head><title>Arena</title>"
            f"<script>{GRECAPTCHA_TRAP}</script></head><body><main>chat here</main>"
            "<script>(self.__next_f=self.__next_f||[]).push([0])</script>"
            f"{pushes}</body></html>")


# The page's reCAPTCHA, as a trap: every touch of the global `grecaptcha` (reading it,
# `typeof`, any property, call or `in` check below it) is recorded in the page's
# `__grecaptchaTouches`, which the tests read. Pollgate must never touch it.
GRECAPTCHA_TRAP = """(() => {
  const touches = [];
  const trap = (path) => new Proxy(function () {}, {
    get(target, key) { touches.push(path + "." + String(key)); return trap(path + "." + String(key)); },
    has(target, key) { touches.push(String(key) + " in " + path); return true; },
    set(target, key) { touches.push(path + "." + String(key) + " ="); return true; },
    apply() { touches.push(path + "()"); return Promise.resolve("a-token-pollgate-must-never-ask-for"); },
    construct() { touches.push("new " + path); return {}; },
  });
  Object.defineProperty(window, "grecaptcha", {
    get() { touches.push("grecaptcha"); return trap("grecaptcha"); },
    set() { touches.push("grecaptcha ="); },
  });
  Object.defineProperty(window, "__grecaptchaTouches", { value: touches });
})();"""


def _script_json(value: Any) -> str:
    """JSON safe inside a script element, as Next.js writes it (htmlEscapeJsonString)."""
    text = json.dumps(value, separators=(",", ":"))
    for char, escaped in (("&", "\\u0026"), ("<", "\\u003c"), (">", "\\u003e"),
                          ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        text = text.replace(char, escaped)
    return text
