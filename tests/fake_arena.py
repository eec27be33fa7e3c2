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
MODELS = [
    {"id": "0199a1b2-text", "publicName": "arena-text", "organization": "fake", "provider": "fake",
     "capabilities": {"inputCapabilities": {"text": True, "image": True}, "outputCapabilities": {"text": True}}},
    {"id": "0199a1b2-image", "publicName": "arena-image", "organization": "fake", "provider": "fake",
     "capabilities": {"inputCapabilities": {"text": True}, "outputCapabilities": {"image": True}}},
]


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
    """The site's page: its catalogue escaped inside Next.js flight data, as the real one is."""
    flight = json.dumps(json.dumps({"initialModels": MODELS}))
    return ("<!DOCTYPE html><html><head><title>Fake Arena</title></head><body><main>chat here</main>"
            f"<script>self.__next_f = self.__next_f || []; self.__next_f.push([1, {flight}]);</script>"
            "</body></html>")
