"""Tavern mode: one leading system message for clients that send several, per key or per request."""
from __future__ import annotations

import openai
import pytest
from sqlalchemy import select

from conftest import VALIDATION_ONLY, csrf, make_account, sign_in
from protocol import WorkerThread
from webapp import accounts, tavern
from webapp.db import db
from webapp.models import ApiKey

# What SillyTavern sends: a main prompt, the chat, and more system text between the turns.
CHAT = [
    {"role": "system", "content": "You are Seraphina."},
    {"role": "system", "content": [{"type": "text", "text": "Scenario: a forest."}]},
    {"role": "user", "content": "hello"},
    {"role": "assistant", "content": "Greetings, traveller."},
    {"role": "system", "content": "[Stay in character.]"},
    {"role": "user", "content": "who are you?"},
]
MERGED = [
    {"role": "system", "content": "You are Seraphina.\n\nScenario: a forest.\n\n[Stay in character.]"},
    {"role": "user", "content": "hello"},
    {"role": "assistant", "content": "Greetings, traveller."},
    {"role": "user", "content": "who are you?"},
]


def test_merge_keeps_order_and_leaves_a_single_leading_system_message_alone():
    assert tavern.merge_system(CHAT) == MERGED
    alone = [{"role": "system", "content": "x"}, {"role": "user", "content": "y"}]
    assert tavern.merge_system(alone) is alone
    assert tavern.merge_system(alone[1:]) == alone[1:]
    late = [{"role": "user", "content": "y"}, {"role": "system", "content": "x"}]
    assert tavern.merge_system(late) == [late[1], late[0]]


def seen_by_worker(app, account, live, key: str, headers: dict | None = None) -> list:
    """Send CHAT with a key (and headers); return the messages the worker received."""
    seen: list = []

    def handler(worker, job):
        seen.extend(job["request"]["messages"])
        worker.say(job, "ok", finish={"reason": "stop"})

    with WorkerThread(live.url, account.token, handler):
        openai.OpenAI(base_url=f"{live.url}/v1", api_key=key, max_retries=0).chat.completions.create(
            model="echo", messages=CHAT, extra_headers=headers or {})
    return seen


def test_a_tavern_key_merges_and_the_header_overrides_it(app, account, live):
    with app.app_context():
        tavern_key = accounts.create_api_key(account.user_id, "st", tavern=True)
    assert seen_by_worker(app, account, live, tavern_key) == MERGED
    assert seen_by_worker(app, account, live, tavern_key, {"X-Tavern-Mode": "off"}) == CHAT
    assert seen_by_worker(app, account, live, account.key) == CHAT
    assert seen_by_worker(app, account, live, account.key, {"X-Tavern-Mode": "on"}) == MERGED


@VALIDATION_ONLY
def test_a_bad_tavern_header_is_a_400(app, account, live):
    with WorkerThread(live.url, account.token), pytest.raises(openai.BadRequestError) as err:
        openai.OpenAI(base_url=f"{live.url}/v1", api_key=account.key, max_retries=0).chat.completions.create(
            model="echo", messages=CHAT, extra_headers={"X-Tavern-Mode": "sometimes"})
    assert err.value.param == "X-Tavern-Mode"


@VALIDATION_ONLY
def test_create_key_tavern_from_the_command_line(app, account):
    out = app.test_cli_runner().invoke(args=["create-key", account.email, "--name", "st", "--tavern"])
    assert out.exit_code == 0, out.output
    with app.app_context():
        assert accounts.authenticate_api_key(f"Bearer {out.output.splitlines()[-1]}").tavern is True


@VALIDATION_ONLY
def test_the_dashboard_sets_tavern_mode_per_key(app, account):
    client = app.test_client()
    sign_in(client, account.email)
    client.post("/keys", data={"name": "st", "tavern": "on", "csrf_token": csrf(client.get("/keys"))})
    with app.app_context(), db.read() as s:
        made = s.scalar(select(ApiKey).where(ApiKey.name == "st"))
        plain = s.scalar(select(ApiKey).where(ApiKey.name == "test"))
    assert made.tavern is True and plain.tavern is False
    r = client.post(f"/keys/{plain.id}/tavern", data={"tavern": "on", "csrf_token": csrf(client.get("/keys"))})
    assert r.status_code == 302
    client.post(f"/keys/{made.id}/tavern", data={"tavern": "off", "csrf_token": csrf(client.get("/keys"))})
    with app.app_context(), db.read() as s:
        assert {k.name: k.tavern for k in s.scalars(select(ApiKey))} == {"st": False, "test": True}
    # Another user cannot touch the key, and a form without its CSRF token changes nothing.
    other = make_account(app, "eve@example.com")
    intruder = app.test_client()
    sign_in(intruder, other.email)
    assert intruder.post(f"/keys/{plain.id}/tavern",
                         data={"tavern": "off", "csrf_token": csrf(intruder.get("/keys"))}).status_code == 404
    assert client.post(f"/keys/{plain.id}/tavern", data={"tavern": "off"}).status_code == 400
    with app.app_context(), db.read() as s:
        assert s.get(ApiKey, plain.id).tavern is True
