"""Cross-origin API calls: only origins an administrator lists, only /v1/*, never with credentials.

The headers on SQLite and MariaDB through Flask's client; the browser's own verdict in real
headless Chromium, from a page served by another origin on loopback.
"""
from __future__ import annotations

import http.server
import threading

import pytest
from sqlalchemy import update

from conftest import csrf
from protocol import WorkerThread
from support import free_port
from webapp import settings
from webapp.db import db
from webapp.models import Tier, User

CHAT_UI = "https://chat.example.com"
PREFLIGHT = {"Origin": CHAT_UI, "Access-Control-Request-Method": "POST",
             "Access-Control-Request-Headers": "authorization, content-type, x-stainless-os"}


def allow(app, *origins: str) -> None:
    with app.app_context():
        settings.save({"cors_origins": list(origins)})


def test_no_origin_is_allowed_until_the_setting_names_one(app, account):
    client = app.test_client()
    refused = client.options("/v1/chat/completions", headers=PREFLIGHT)
    assert "Access-Control-Allow-Origin" not in refused.headers
    models = client.get("/v1/models", headers={"Origin": CHAT_UI, "Authorization": f"Bearer {account.key}"})
    assert models.status_code == 200 and "Access-Control-Allow-Origin" not in models.headers
    assert "Origin" in models.headers["Vary"]


def test_a_listed_origin_gets_its_preflight_and_its_answers_errors_included(app, account):
    allow(app, CHAT_UI)
    client = app.test_client()
    pre = client.options("/v1/chat/completions", headers=PREFLIGHT)
    assert pre.status_code == 204 and pre.headers["Access-Control-Allow-Origin"] == CHAT_UI
    allowed = {h.strip().lower() for h in pre.headers["Access-Control-Allow-Headers"].split(",")}
    assert {"authorization", "content-type", "x-stainless-os", "x-provider", "last-event-id"} <= allowed
    assert "POST" in pre.headers["Access-Control-Allow-Methods"] and "Origin" in pre.headers["Vary"]
    assert "Access-Control-Allow-Credentials" not in pre.headers
    # An error answer too, so the page's script can read the OpenAI error body.
    wrong = client.post("/v1/chat/completions", json={}, headers={"Origin": CHAT_UI, "Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.headers["Access-Control-Allow-Origin"] == CHAT_UI
    assert "retry-after" in wrong.headers["Access-Control-Expose-Headers"].lower()
    assert "Access-Control-Allow-Credentials" not in wrong.headers
    # Another site, and the pages and the worker protocol, get nothing.
    other = client.options("/v1/chat/completions", headers={**PREFLIGHT, "Origin": "https://evil.example"})
    assert "Access-Control-Allow-Origin" not in other.headers
    for path in ("/login", "/worker/v1/claim"):
        assert "Access-Control-Allow-Origin" not in client.options(path, headers=PREFLIGHT).headers


def test_a_star_allows_any_origin_without_credentials(app, account):
    allow(app, "*")
    answer = app.test_client().get("/v1/models", headers={"Origin": "https://any.example",
                                                           "Authorization": f"Bearer {account.key}"})
    assert answer.headers["Access-Control-Allow-Origin"] == "*"
    assert "Access-Control-Allow-Credentials" not in answer.headers


def test_the_admin_lists_origins_and_a_wrong_one_is_refused_readably(app, admin):
    client, _ = admin
    page = client.get("/admin/settings")
    saved = client.post("/admin/settings", data={"csrf_token": csrf(page), "cors_origins": "HTTPS://Chat.Example.com/\n"
                                                 "http://localhost:3000, https://b.example:443"},
                        follow_redirects=True)
    assert "The settings are saved." in saved.text
    with app.app_context():
        settings.forget()
        assert settings.get("cors_origins") == ["http://localhost:3000", "https://b.example", "https://chat.example.com"]
    refused = client.post("/admin/settings", data={"csrf_token": csrf(page), "cors_origins": "chat.example.com/path"},
                          follow_redirects=True)
    assert refused.status_code == 200 and "chat.example.com/path is not an origin" in refused.text
    with app.app_context():
        settings.forget()
        assert settings.get("cors_origins") == ["http://localhost:3000", "https://b.example", "https://chat.example.com"]


class _ChatUI(http.server.BaseHTTPRequestHandler):
    """Serve one empty page, the stand-in for a web chat UI on its own origin."""

    def do_GET(self):  # noqa: N802 (http.server's name)
        body = b"<!doctype html><title>chat ui</title>"
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def chat_ui():
    """A page on another loopback origin (another port), as the browser sees a separate site."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), _ChatUI)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


CALL = """async ([url, key, stream]) => {
  try {
    const r = await fetch(url + "/v1/chat/completions", {method: "POST",
      headers: {"Authorization": "Bearer " + key, "Content-Type": "application/json", "X-Stainless-OS": "Linux"},
      body: JSON.stringify({model: "echo", stream: stream, messages: [{role: "user", content: "across origins"}]})});
    return {status: r.status, body: await r.text(), limit: r.headers.get("x-ratelimit-limit-requests")};
  } catch (e) { return {blocked: String(e)}; }
}"""


def test_chromium_calls_the_api_from_a_listed_origin_only(chromium, app, live, account, chat_ui):
    with app.app_context(), db.begin() as s:  # a tier with a cap, so answers carry x-ratelimit-* headers
        tier = Tier(name="cors-tier", requests_per_minute=100)
        s.add(tier)
        s.flush()
        s.execute(update(User).where(User.id == account.user_id).values(tier_id=tier.id))
    context = chromium.new_context()
    page = context.new_page()
    page.goto(chat_ui + "/")
    with WorkerThread(live.url, account.token):
        assert "blocked" in page.evaluate(CALL, [live.url, account.key, False])  # nothing listed yet
        allow(app, chat_ui)
        with app.app_context():
            settings.forget()
        plain = page.evaluate(CALL, [live.url, account.key, False])
        assert plain.get("status") == 200 and "across origins" in plain["body"], plain
        assert plain["limit"], "an exposed rate-limit header the script can read"
        streamed = page.evaluate(CALL, [live.url, account.key, True])
        assert streamed.get("status") == 200 and streamed["body"].rstrip().endswith("data: [DONE]"), streamed
    context.close()
