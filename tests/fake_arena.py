"""A fake arena.ai (LMArena) for the userscript tests: a page with a model catalogue in its HTML
and a streaming endpoint that speaks the site's line format.

It is served over TLS as https://arena.ai to Chromium (`host_rules()` maps the site's hosts to
this server on loopback; the certificate is a throwaway, so contexts ignore certificate
errors), answers https://lmarena.ai with a 301 to arena.ai as the real one does since
2026-02, and serves generated images from https://cdn.arena.ai.

The prompt picks the behaviour (the last user message, or an image prompt):

    contains "draw"    answers with an image line (a2) pointing at the CDN's cat.png
    contains "refuse"  answers with an error line (a3) about content policy
    contains "slow"    streams SLOW_PIECES text lines, SLOW_DELAY seconds apart
    contains "wait"    thinks WAIT seconds before the usual answer
    anything else      reasoning (ag), then ANSWER in text lines (a0), a citation, finish (ad)

`.mode` set to "challenge" answers every request with a Cloudflare-style challenge page,
"expired" with a 401 session error. A request without the session cookie the page set is
answered 401 too: the userscript must use the user's own session.
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
    _model("0199a1b2-quoted", 'arena "quoted" model', {"text": True}, organization='O\'Brien "Labs" </script>'),
    _model("0199a1b2-split", SPLIT, {"text": True}),
]
CHAT_MODELS = ["arena-text", "arena-twin", 'arena "quoted" model', SPLIT]
IMAGE_MODELS = ["arena-image"]


class FakeArena:
    """The running site: `.url`, `.requests` (the JSON bodies received), `.mode`."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.mode = ""
        tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        tls.load_cert_chain(CERT)
        self.server = make_server("127.0.0.1", 0, self.wsgi, threaded=True, ssl_context=tls)
        self.url = URL
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

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
        if self.mode == "challenge":
            return Response("<!DOCTYPE html><html><head><title>Just a moment...</title></head>"
                            "<body>Checking your browser</body></html>", status=403, mimetype="text/html")
        if self.mode == "expired" or request.cookies.get("arena-session") != SESSION:
            return Response(json.dumps({"error": "Session expired, please sign in"}), status=401,
                            mimetype="application/json")
        body = request.get_json()
        self.requests.append(body)
        return Response(lines(body["userMessage"]["content"]), mimetype="text/plain")


def lines(prompt: str):
    """Yield the answer's lines as the site streams them."""
    if "refuse" in prompt:
        yield 'a3:"This prompt violates our content policy"\n'
        return
    if "draw" in prompt:
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
        for word in ANSWER.split(" "):
            yield "a0:" + json.dumps(word + " ") + "\n"
            time.sleep(0.01)
        yield "ac:" + json.dumps({"title": "A source", "url": "https://example.org/source"}) + "\n"
    yield 'ad:{"finishReason":"stop"}\n'


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
    return ("<!DOCTYPE html><html><head><title>Arena</title></head><body><main>chat here</main>"
            "<script>(self.__next_f=self.__next_f||[]).push([0])</script>"
            f"{pushes}</body></html>")


def _script_json(value: Any) -> str:
    """JSON safe inside a script element, as Next.js writes it (htmlEscapeJsonString)."""
    text = json.dumps(value, separators=(",", ":"))
    for char, escaped in (("&", "\\u0026"), ("<", "\\u003c"), (">", "\\u003e"),
                          ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        text = text.replace(char, escaped)
    return text
