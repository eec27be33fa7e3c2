"""A real nginx in front of a gunicorn node, with nginx's proxy buffering left on, as nginx ships it.

With buffering on, nginx passes a response on as it arrives only where it can tell where
each piece ends: a chunked body (proxy_http_version 1.1, as docs/deploy.md configures) or
a response that says `X-Accel-Buffering: no`, as the app's event streams do. Under nginx's
default HTTP/1.0 to the upstream, only that header keeps words from waiting in a partly
filled buffer; a control location that ignores it (`/buffered/`) shows the stream arriving
all at once at the end, so the streaming test can fail.
"""
from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from dataclasses import dataclass
from typing import Any, Iterator

import openai
import pytest
import requests
from sqlalchemy import select

from conftest import Account, make_account, make_app
from mariadb import find
from nodes import bounded, gunicorn_node, spawned
from protocol import StreamReader, WorkerThread, echo_handler
from support import free_port, missing, wait_for
from webapp.db import db
from webapp.models import Job

NGINX = find("nginx")
NGINX_CONF = """\
daemon off;
worker_processes 1;
{user}
pid {dir}/nginx.pid;
error_log {dir}/error.log info;
events {{
    worker_connections 128;
}}
http {{
    access_log {dir}/access.log;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    upstream pollgate {{
        server {upstream};
        keepalive 8;
    }}
    server {{
        listen 127.0.0.1:{port};
        client_max_body_size 4m;
{locations}
    }}
}}
"""
# The location docs/deploy.md gives; proxy buffering stays on, as nginx ships it.
LOCATION = """\
        location {path} {{
            proxy_pass http://pollgate{strip};
            proxy_http_version {http};
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_read_timeout 620s;
{extra}        }}
"""
IGNORE_HEADER = "            proxy_ignore_headers X-Accel-Buffering;\n"
# Each location's path prefix: (proxy_http_version, whether nginx ignores the app's X-Accel-Buffering).
# Under HTTP/1.0, nginx's default, the body is not chunked and nginx holds a partly filled
# buffer until it fills or the response ends; only the app's header makes it pass words on.
# Under HTTP/1.1 nginx passes each complete chunk on even with buffering, header or not.
LOCATIONS = {
    "": ("1.1", False),  # the docs' config
    "/http10": ("1.0", False),  # nginx's default protocol to the upstream
    "/buffered": ("1.0", True),  # the control: as if the app sent no header
    "/http11-ignored": ("1.1", True),
}


def locations() -> str:
    """Render LOCATIONS as nginx location blocks."""
    return "".join(LOCATION.format(path=f"{prefix}/", strip="/" if prefix else "", http=http,
                                   extra=IGNORE_HEADER if ignored else "")
                   for prefix, (http, ignored) in LOCATIONS.items())


WORDS = 5  # content chunks a worker sends, each GAP seconds after the client saw the one before
GAP = 0.4
# How long a streamed word may take to reach the client through nginx before the test calls
# it held back: generous for a busy 2-core machine; a buffered word never comes before the end.
PATIENCE = 10.0


@contextlib.contextmanager
def nginx_in_front(upstream: str, folder: str) -> Iterator[str]:
    """Run nginx on a free loopback port in front of upstream (host:port) until the block ends; yield its URL."""
    if NGINX is None:
        missing("nginx is not installed (apt-get install nginx)")
    os.makedirs(folder, exist_ok=True)
    # As root nginx would serve as nobody, who cannot enter pytest's private temp folders.
    user = "user root;" if os.geteuid() == 0 else ""
    for attempt in range(3):
        port = free_port()
        with contextlib.suppress(FileNotFoundError):  # each try reads only its own errors
            os.remove(f"{folder}/error.log")
        with open(f"{folder}/nginx.conf", "w") as handle:
            handle.write(NGINX_CONF.format(dir=folder, user=user, upstream=upstream, port=port, locations=locations()))
        with spawned([NGINX, "-p", folder, "-c", f"{folder}/nginx.conf", "-e", f"{folder}/error.log"],
                     dict(os.environ), f"{folder}/nginx.out") as proc:
            url = f"http://127.0.0.1:{port}"
            if _wait_ready(proc, url):
                yield url
                return
        with open(f"{folder}/error.log", errors="replace") as handle:
            log = handle.read()
        if "Address already in use" not in log or attempt == 2:  # else another listener took the port: retry
            pytest.fail(f"nginx did not start:\n{log[-3000:]}")


def _wait_ready(proc: Any, url: str, timeout: float = 20) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end and proc.poll() is None:
        with contextlib.suppress(requests.RequestException):
            if requests.get(f"{url}/healthz", timeout=2).ok:  # through nginx to the node
                return True
        time.sleep(0.1)
    return False


@dataclass
class Gateway:
    """The app on SQLite, a gunicorn node serving it, and nginx in front of the node."""

    app: Any
    account: Account
    url: str  # nginx

    def job(self, public_id: str) -> Job:
        """Read one job by the id its client and worker see."""
        with self.app.app_context(), db.read() as s:
            return s.scalars(select(Job).where(Job.public_id == public_id)).one()


@pytest.fixture(scope="module")
def gateway(tmp_path_factory) -> Iterator[Gateway]:
    """Start a node and nginx in front of it once for this module's tests."""
    if NGINX is None:
        missing("nginx is not installed (apt-get install nginx)")
    folder = tmp_path_factory.mktemp("nginx-front")
    db_url = f"sqlite:///{folder}/pollgate.db"
    app = make_app(db_url, str(folder / "setup"))
    try:
        # A minute's hold, so only the request noticing its client gone can cancel a job in
        # time, and no resume grace: the hang-up test checks that the hang-up reaches the node
        # (test_resume and test_nodes check the grace).
        with gunicorn_node(db_url, str(folder / "node"), HOLD_TTL=60.0, RESUME_GRACE=0) as node, \
                nginx_in_front(node.url.removeprefix("http://"), str(folder / "nginx")) as url:
            yield Gateway(app, make_account(app), url)
    finally:
        app.extensions["pollgate.engine"].dispose()


def api(gateway: Gateway) -> openai.OpenAI:
    """An OpenAI client that goes through nginx."""
    return openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=gateway.account.key, max_retries=0, timeout=30)


def spaced_words(reader_of: dict, sent: list[float], lockstep: bool):
    """A worker handler sending WORDS words GAP seconds apart, noting when it sent each.

    In lockstep it waits (up to PATIENCE) until the client has read a word before it sends
    the next, so a slow machine slows the test instead of failing it.
    """
    def handler(worker, job) -> None:
        for i in range(WORDS):
            sent.append(time.monotonic())
            worker.report(job, [{"content": f"w{i} "}])
            if lockstep:
                reader_of["reader"].wait_until(lambda r, seen=i + 1: len(r.contents()) >= seen, PATIENCE,
                                               f"word {i} through nginx")
            time.sleep(GAP)
        sent.append(time.monotonic())
        worker.report(job, finish={"reason": "stop"})
    return handler


def stream_through(gateway: Gateway, base: str, lockstep: bool) -> tuple[list[float], list[float]]:
    """Stream one completion through nginx at base while a worker sends spaced words; return sent and arrival times."""
    reader_of: dict = {}
    sent: list[float] = []
    with WorkerThread(gateway.url, gateway.account.token, spaced_words(reader_of, sent, lockstep)):
        reader_of["reader"] = reader = StreamReader(base, gateway.account.key, "say five words")
        reader.join(timeout=PATIENCE * WORDS + 20)
    assert reader.status == 200 and reader.error is None, (reader.status, reader.error)
    assert reader.text == "".join(f"w{i} " for i in range(WORDS))
    assert reader.lines[-1][1] == "data: [DONE]"
    return sent, [at for at, _ in reader.contents()]


def figures(sent: list[float], arrived: list[float]) -> str:
    """Each word's arrival after it was sent, in ms, for failure messages and -s runs."""
    return ", ".join(f"{(a - s) * 1000:.0f}" for s, a in zip(sent, arrived)) + " ms after sending"


@pytest.mark.parametrize("prefix", ["", "/http10", "/http11-ignored"],
                         ids=["docs-config", "nginx-default-http10", "http11-header-ignored"])
@bounded(120)
def test_a_stream_arrives_word_by_word_through_nginx_with_buffering_on(gateway, prefix):
    sent, arrived = stream_through(gateway, gateway.url + prefix, lockstep=True)
    print(f"through nginx at {prefix or '/'}: {figures(sent, arrived)}")
    # Each word reached the client before the worker sent the next one (the handler waited
    # for it), so the words came spread out as they were sent, not together at the end.
    assert all(arrived[i] < sent[i + 1] for i in range(WORDS)), figures(sent, arrived)
    assert arrived[-1] - arrived[0] >= (WORDS - 1) * GAP, figures(sent, arrived)


@bounded(120)
def test_without_the_apps_header_nginx_holds_the_stream_back_until_it_ends(gateway):
    sent, arrived = stream_through(gateway, f"{gateway.url}/buffered", lockstep=False)
    print(f"through nginx at /buffered: {figures(sent, arrived)}")
    # Under HTTP/1.0 nginx keeps a partly filled buffer until it fills (4 KiB or more; the
    # whole answer is smaller) or the upstream response ends, after the worker's finish.
    assert all(at > sent[-1] for at in arrived), figures(sent, arrived)


@bounded(60)
def test_plain_and_streamed_completions_through_nginx(gateway):
    with WorkerThread(gateway.url, gateway.account.token, echo_handler):
        reply = api(gateway).chat.completions.create(
            model="echo", messages=[{"role": "user", "content": "plain through nginx"}])
        chunks = list(api(gateway).chat.completions.create(
            model="echo", stream=True, messages=[{"role": "user", "content": "streamed through nginx"}]))
    assert reply.choices[0].message.content == "plain through nginx"
    assert reply.choices[0].finish_reason == "stop"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "streamed through nginx"
    assert gateway.job(reply.id).state == gateway.job(chunks[0].id).state == "completed"


@bounded(60)
def test_a_body_over_nginxs_default_cap_reaches_the_app(gateway):
    # 3 MiB: over nginx's default client_max_body_size (1m), within the app's own 4 MiB.
    body = json.dumps({"model": "echo", "messages": "x" * (3 << 20)})
    r = requests.post(f"{gateway.url}/v1/chat/completions", data=body, timeout=30,
                      headers={"Authorization": f"Bearer {gateway.account.key}", "Content-Type": "application/json"})
    # The app read it and refused it on its merits, with its own error, not nginx's 413 page.
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages", r.text[:300]


@bounded(60)
def test_a_client_hanging_up_on_nginx_cancels_the_job(gateway):
    told = threading.Event()
    answers = []

    def endless(worker, job) -> None:
        for i in range(400):
            answer = worker.report(job, [{"content": f"{i} "}])
            if answer["stop"]:
                answers.append(answer)
                told.set()
                return
            time.sleep(0.05)

    with WorkerThread(gateway.url, gateway.account.token, endless):
        with requests.post(f"{gateway.url}/v1/chat/completions", stream=True, timeout=30,
                           headers={"Authorization": f"Bearer {gateway.account.key}"},
                           json={"model": "echo", "stream": True,
                                 "messages": [{"role": "user", "content": "go on forever"}]}) as r:
            lines = r.iter_lines()
            first = json.loads(next(line for line in lines if line.startswith(b"data: "))[len("data: "):])
            for _ in range(3):
                next(lines)
        # The connection to nginx is closed here; nginx closes its own to the node, and the
        # node notices at its next write.
        assert told.wait(15), "the worker was never told to stop"
    assert answers[0]["reason"] == "cancelled"
    job = wait_for(lambda: (j := gateway.job(first["id"])).state == "cancelled" and j, 10, "the job cancelled")
    assert (job.error_code, job.error_message) == ("client_gone", "The client went away.")
