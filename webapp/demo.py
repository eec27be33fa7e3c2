"""`flask --app webapp demo`: a local gateway on SQLite with an echo worker, checked end to end."""
from __future__ import annotations

import json
import logging
import os
import secrets
import subprocess
import sys
import threading
import time

import click
from flask.cli import with_appcontext
import requests
from flask import current_app
from sqlalchemy import update
from werkzeug.serving import make_server

from . import accounts, migrate
from .db import db
from .models import Worker, utcnow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_EMAIL = "demo@localhost.localdomain"


def demo_secrets() -> tuple[str, str]:
    """Ensure the demo user exists and give it a fresh API key and worker token."""
    user = accounts.find_user(DEMO_EMAIL)
    if user is None:
        password = secrets.token_urlsafe(12)
        user = accounts.create_user(DEMO_EMAIL, password)
        click.echo(f"created user {DEMO_EMAIL} with password {password}")
    with db.begin() as s:
        # Old demo workers would linger in the worker list; one live demo worker is enough.
        s.execute(
            update(Worker)
            .where(Worker.user_id == user.id, Worker.name == "demo-echo", Worker.revoked_at.is_(None))
            .values(revoked_at=utcnow())
        )
    return accounts.create_api_key(user.id, "demo"), accounts.create_worker_token(user.id, "demo-echo")


def wait_for_model(base: str, key: str, model: str, timeout: float = 30) -> None:
    """Wait until the worker has advertised the model."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            r = requests.get(f"{base}/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=5)
            if model in [m["id"] for m in r.json().get("data", [])]:
                return
        except (requests.RequestException, ValueError):
            pass
        time.sleep(0.2)
    raise click.ClickException("the demo worker did not come up; see its log above")


def smoke_test(base: str, key: str) -> str:
    """Stream one completion through the gateway the way a user's client would."""
    prompt = "Hello from Pollgate: this answer streamed through the queue."
    try:
        from openai import OpenAI
    except ImportError:  # the runtime requirements do not include the openai package
        body = {"model": "echo", "stream": True, "messages": [{"role": "user", "content": prompt}]}
        text = []
        with requests.post(f"{base}/v1/chat/completions", json=body, stream=True, timeout=60,
                           headers={"Authorization": f"Bearer {key}"}) as r:
            for line in r.iter_lines(decode_unicode=True):
                if line.startswith("data: {"):
                    text.append(json.loads(line[6:])["choices"][0]["delta"].get("content") or "")
        return "".join(text)
    client = OpenAI(base_url=f"{base}/v1", api_key=key)
    stream = client.chat.completions.create(model="echo", stream=True, messages=[{"role": "user", "content": prompt}])
    return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)


@click.command("demo")
@with_appcontext
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=5000, show_default=True, type=int)
@click.option("--once", is_flag=True, help="Exit after the end-to-end check instead of serving.")
def demo(host: str, port: int, once: bool) -> None:
    """Run a local gateway with an echo worker and stream one completion through it."""
    # One line per request from the dev server would drown the demo's own output.
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    migrate.upgrade()
    key, token = demo_secrets()
    app = current_app._get_current_object()
    server = make_server(host, port, app, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://{host}:{server.server_port}"
    env = {**os.environ, "POLLCLIENT_TOKEN": token}
    worker = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "pollclient"), "--api-url", base,
         "--backend", "echo", "--echo-delay", "0.05", "--max-concurrent", "4"],
        env=env,
    )
    try:
        wait_for_model(base, key, "echo")
        answer = smoke_test(base, key)
        click.echo(f"\nstreamed through the gateway: {answer!r}\n")
        click.echo(f"Gateway:  {base}/v1   (database: {current_app.config['DATABASE_URL']})")
        click.echo(f"API key:  {key}")
        click.echo("Try it:")
        click.echo(f"  OPENAI_BASE_URL={base}/v1 OPENAI_API_KEY={key} {sys.executable} -c \"from openai import OpenAI; "
                   "print(OpenAI().chat.completions.create(model='echo', "
                   "messages=[{'role':'user','content':'hi there'}]).choices[0].message.content)\"")
        if once:
            return
        click.echo("\nServing; press Ctrl-C to stop.")
        while worker.poll() is None:
            time.sleep(0.5)
        raise click.ClickException("the demo worker exited")
    except KeyboardInterrupt:
        click.echo("\nstopping")
    finally:
        _stop_worker(worker)
        server.shutdown()


def _stop_worker(worker: subprocess.Popen) -> None:
    """Stop the demo worker without waiting out its open long-poll: the gateway goes too."""
    worker.terminate()
    try:
        worker.wait(timeout=1)
        return
    except subprocess.TimeoutExpired:
        pass
    # A second signal, once the first was taken (two at once may arrive as one), means "quit now".
    worker.terminate()
    try:
        worker.wait(timeout=15)
    except subprocess.TimeoutExpired:
        worker.kill()
