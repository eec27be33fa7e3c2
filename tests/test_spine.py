"""The request spine under faults, in-process: readers' heartbeat, hang-ups, re-queued streams, poison rows, deadlocks."""
from __future__ import annotations

import datetime as dt
import json
import socket
import threading
import time
from urllib.parse import urlsplit

import flask
import openai
import requests
import pytest
from sqlalchemy import event, select, text, update

from conftest import make_app, read_until_error
from protocol import ProtoWorker, WorkerThread
from webapp import jobs, maintenance, usage
from webapp.db import db, retrying
from webapp.models import Chunk, Event, Job, Usage, utcnow

PROMPT = [{"role": "user", "content": "are you there"}]


def wait_for(condition, timeout: float = 15, what: str = "condition") -> None:
    """Poll a condition until it holds, or fail after a bound."""
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.05)


def job_row(app, job_id: int) -> Job:
    with app.app_context(), db.read() as s:
        return s.get(Job, job_id)


def only_job(app) -> Job | None:
    with app.app_context(), db.read() as s:
        return s.scalar(select(Job).order_by(Job.id.desc()))


def test_a_job_whose_reader_stops_renewing_is_cancelled_and_its_worker_told(app, account, live):
    worker = ProtoWorker(live.url, account.token)
    worker.claim(wait=0)
    with app.app_context():
        # A reader that renews nothing: the process that submitted it died.
        job, _ = jobs.submit_job(account.user_id, None, "echo", {"model": "echo", "messages": PROMPT}, True,
                                 reader=True)
    claimed = worker.claim(wait=2)
    assert [j["id"] for j in claimed] == [job.public_id]
    assert worker.report(claimed[0], [{"content": "partial "}])["stop"] is False
    with app.app_context():
        assert maintenance.reap()["unread"] == 0  # its reader's hold has not lapsed yet
        # HOLD_TTL later, with no renewal: what a process that died leaves behind.
        with db.begin() as s:
            s.execute(update(Job).where(Job.id == job.id).values(reader_expires_at=utcnow() - dt.timedelta(seconds=1)))
        assert maintenance.reap()["unread"] == 1
    assert job_row(app, job.id).state == "cancelled" and job_row(app, job.id).error_code == "client_gone"
    answer = worker.report(claimed[0], [{"content": "more"}])
    assert answer["stop"] is True and answer["reason"] == "cancelled"


def test_a_renewing_reader_keeps_its_job(app, account, live):
    app.config.update(HOLD_TTL=2.0, HOLD_RENEW=0.2)  # ten renewals per hold: room for a busy machine
    worker = ProtoWorker(live.url, account.token)
    worker.claim(wait=0)
    api = openai.OpenAI(base_url=f"{live.url}/v1", api_key=account.key, max_retries=0)
    claimed: list = []
    first = threading.Thread(target=lambda: claimed.extend(worker.claim(wait=5)) or
                             worker.report(claimed[0], [{"content": "slow "}]))
    first.start()
    stream = api.chat.completions.create(model="echo", messages=PROMPT, stream=True)
    first.join(timeout=10)
    deadline = time.monotonic() + 5  # a few HOLD_TTLs, with the reaper running meanwhile
    dots = 0
    while time.monotonic() < deadline:
        with app.app_context():
            maintenance.reap()
        assert worker.report(claimed[0], [{"content": "."}])["stop"] is False  # keeps the worker's lease
        dots += 1
        time.sleep(0.1)
    assert worker.report(claimed[0], [{"content": "answer"}], finish={"reason": "stop"})["reason"] == "finished"
    text_ = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text_ == "slow " + "." * dots + "answer"


def raw_request(live, body: dict) -> socket.socket:
    """Send a chat request over a bare socket, so the test can hang up like a client would."""
    url = urlsplit(live.url)
    sock = socket.create_connection((url.hostname, url.port), timeout=10)
    key = body.pop("_key")
    payload = json.dumps(body).encode()
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: {url.netloc}\r\nAuthorization: Bearer {key}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n")
    sock.sendall(head.encode() + payload)
    return sock


# A minute's hold: the reaper's fallback for a reader that stopped renewing cannot be what
# cancels the job here, only the request noticing its client.
@pytest.mark.parametrize("app_config", [{"HOLD_TTL": 60.0}])
@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_a_client_that_hangs_up_cancels_its_job(app, account, live, stream):
    worker = ProtoWorker(live.url, account.token)
    worker.claim(wait=0)
    sock = raw_request(live, {"_key": account.key, "model": "echo", "messages": PROMPT, "stream": stream})
    claimed = worker.claim(wait=5)
    assert claimed
    assert worker.report(claimed[0], [{"content": "thinking "}])["stop"] is False
    sock.close()
    # The plain request peeks at its socket while it waits; the stream finds out on its
    # next write (a chunk or a keep-alive), so the worker keeps sending until told.
    told = {}

    def stopped() -> bool:
        told.update(worker.report(claimed[0], [{"content": "."}]))
        return told["stop"]

    wait_for(stopped, what="the worker to be told to stop")
    assert told["reason"] == "cancelled"
    job = only_job(app)
    assert (job.state, job.error_code, job.error_message) == ("cancelled", "client_gone", "The client went away.")

    def settled() -> bool:
        # A fresh read each time: one read transaction keeps seeing its first snapshot.
        with app.app_context(), db.read() as s:
            return s.scalar(select(Usage.settled).where(Usage.job_id == job.id)) is True

    wait_for(settled, what="settlement")


# The stream must start (HEARTBEAT_INTERVAL after the request sees the claim) before the
# vanished worker's lease lapses: with both at 2 s, a loaded machine that noticed the claim
# 0.2 s late got the job back in the queue first, and a 503 instead of a started stream.
@pytest.mark.parametrize("app_config", [{"HEARTBEAT_INTERVAL": 1.0, "LEASE_TTL": 4.0}])
def test_a_stream_whose_worker_vanished_and_finds_no_other_ends_with_no_worker(app, account, live):
    worker = ProtoWorker(live.url, account.token)
    worker.claim(wait=0)
    api = openai.OpenAI(base_url=f"{live.url}/v1", api_key=account.key, max_retries=0)
    started = time.monotonic()
    holder: dict = {}

    def vanish():
        holder["claimed"] = worker.claim(wait=5)  # claims, then says nothing ever again

    thread = threading.Thread(target=vanish)
    thread.start()
    stream = api.chat.completions.create(model="echo", messages=PROMPT, stream=True)
    _, err = read_until_error(stream)
    thread.join(timeout=10)
    assert holder["claimed"], "the worker never got the job"
    assert err.code == "no_worker_available"
    cfg = app.config
    # Stream start (HEARTBEAT_INTERVAL) + lease lapse + reap + DISPATCH_TIMEOUT, far below JOB_TIMEOUT.
    assert time.monotonic() - started < cfg["HEARTBEAT_INTERVAL"] + cfg["LEASE_TTL"] + cfg["DISPATCH_TIMEOUT"] + 10


def test_a_row_that_cannot_be_settled_is_set_aside_and_the_rest_go_on(app, account, live):
    worker = ProtoWorker(live.url, account.token)
    worker.claim(wait=0)
    with app.app_context():
        ids = [jobs.submit_job(account.user_id, None, "echo", {"model": "echo", "messages": PROMPT}, False)[0].id
               for _ in range(2)]
        with db.begin() as s:
            for job_id in ids:
                usage.open_row(s, s.get(Job, job_id), None, 3, s.get(Job, job_id).created_at)
    for claimed in worker.claim(max_jobs=2, wait=2):
        worker.say(claimed, "fine answer", finish={"reason": "stop"})
    with app.app_context(), db.begin() as s:
        # Garbage that only a bug or a hand edit could store: a tool call that is not an object.
        s.add(Chunk(job_id=ids[0], seq=2, delta_json='{"tool_calls":[1]}'))
        s.execute(update(Job).where(Job.id == ids[0]).values(next_seq=3))
    with app.app_context():
        assert usage.settle_pending() == 2  # one settled on what admission counted, one fully
        with db.read() as s:
            rows = {u.job_id: u for u in s.scalars(select(Usage))}
            logged = list(s.scalars(select(Event).where(Event.kind == "housekeeping_error")))
        assert rows[ids[0]].settled and rows[ids[0]].usage_source == "admission"
        assert rows[ids[1]].settled and rows[ids[1]].completion_tokens > 0
        assert len(logged) == 1 and f"job {ids[0]}" == logged[0].subject
        assert maintenance.reap() is not None  # and the lazy path and cron go on too
    assert app.test_cli_runner().invoke(args=["reap"]).exit_code == 0


def test_lazy_housekeeping_never_ends_the_request_that_ran_it(app, account, live, monkeypatch):
    calls = []

    def broken():
        calls.append(flask.request.path)
        raise RuntimeError("housekeeping bug")

    monkeypatch.setattr(maintenance, "reap", broken)
    worker = ProtoWorker(live.url, account.token)
    worker.claim(wait=0)
    api = openai.OpenAI(base_url=f"{live.url}/v1", api_key=account.key, max_retries=0)

    def serve():
        claimed = worker.claim(wait=5)
        wait_for(lambda: calls.count("/v1/chat/completions") >= 2, what="the request to run housekeeping")
        worker.say(claimed[0], "still here", finish={"reason": "stop"})

    thread = threading.Thread(target=serve)
    thread.start()
    reply = api.chat.completions.create(model="echo", messages=PROMPT)
    thread.join(timeout=10)
    assert reply.choices[0].message.content == "still here"


def test_a_deadlock_victim_runs_again_whole(mariadb, tmp_path):
    # MariaDB only: SQLite serialises writers with BEGIN IMMEDIATE and has no deadlocks to retry.
    app = make_app(mariadb.new_database(), str(tmp_path / "instance"))
    with app.app_context(), db.begin() as s:
        s.execute(text("CREATE TABLE spine_rows (id INT PRIMARY KEY, n INT) ENGINE=InnoDB"))
        s.execute(text("INSERT INTO spine_rows VALUES (1, 0), (2, 0)"))
    both_hold_one = threading.Barrier(2, timeout=10)
    tries = {"a": 0, "b": 0}

    @retrying
    def bump(name: str, first: int, second: int) -> None:
        tries[name] += 1
        with db.begin() as s:
            s.execute(text("UPDATE spine_rows SET n = n + 1 WHERE id = :i"), {"i": first})
            if tries[name] == 1:
                both_hold_one.wait()  # each holds one row and wants the other's: a cycle
            s.execute(text("UPDATE spine_rows SET n = n + 1 WHERE id = :i"), {"i": second})

    errors: list[BaseException] = []

    def run(*args):
        try:
            with app.app_context():
                bump(*args)
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=run, args=("a", 1, 2)), threading.Thread(target=run, args=("b", 2, 1))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert errors == []
    assert sorted(tries.values()) == [1, 2]  # InnoDB picked one victim, and it ran again
    with app.app_context(), db.read() as s:
        assert s.execute(text("SELECT n FROM spine_rows ORDER BY id")).scalars().all() == [2, 2]


def app_connections(server, db_url: str) -> list[int]:
    """List the server's connection ids on the app's database."""
    name = db_url.rsplit("/", 1)[1].split("?")[0]
    with server.root() as conn, conn.cursor() as cur:
        cur.execute("SELECT ID FROM information_schema.PROCESSLIST WHERE DB = %s", (name,))
        return [row[0] for row in cur.fetchall()]


@pytest.mark.parametrize("db_url", ["mariadb"], indirect=True)
@pytest.mark.parametrize("loss", ["wait_timeout", "killed"])
def test_requests_recover_when_the_server_dropped_the_pools_connections(request, app, account, live, db_url, loss):
    """A shared host's MariaDB closes connections idle past wait_timeout, and a restart or an
    admin kills them; the next request must get a fresh one (the pool pings first), not an error."""
    server = request.getfixturevalue("mariadb")
    engine = app.extensions["pollgate.engine"]

    @event.listens_for(engine, "connect")
    def short_wait(dbapi_connection, _record) -> None:
        with dbapi_connection.cursor() as cursor:
            cursor.execute("SET SESSION wait_timeout = 1")

    engine.dispose()  # every pooled connection from now on carries the short timeout
    api = openai.OpenAI(base_url=f"{live.url}/v1", api_key=account.key, max_retries=0, timeout=30)
    with WorkerThread(live.url, account.token):
        assert api.chat.completions.create(model="echo", messages=PROMPT).choices[0].message.content
    assert engine.pool.checkedin() > 0
    if loss == "killed":
        with server.root() as conn, conn.cursor() as cur:
            for connection_id in app_connections(server, db_url):
                cur.execute(f"KILL CONNECTION {connection_id}")
    wait_for(lambda: not app_connections(server, db_url), 30, "the server to close every idle connection")
    assert engine.pool.checkedin() > 0  # the pool still holds them: dead, and it does not know yet
    with WorkerThread(live.url, account.token):
        reply = api.chat.completions.create(model="echo", messages=PROMPT)
        streamed = list(api.chat.completions.create(model="echo", messages=PROMPT, stream=True))
    assert reply.choices[0].message.content == PROMPT[0]["content"]
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == PROMPT[0]["content"]


def test_pages_that_fail_look_like_the_dashboard(app):
    client = app.test_client()
    missing_page = client.get("/no-such-page")
    assert missing_page.status_code == 404 and "Page not found" in missing_page.text
    assert "<html" in missing_page.text and "Werkzeug" not in missing_page.text
    api_miss = client.get("/v1/no-such-thing")
    assert api_miss.status_code == 404 and api_miss.json["error"]["code"] == "unknown_url"


def test_lone_surrogates_become_replacement_characters_everywhere(app, account, live, admin):
    client, _ = admin
    worker = ProtoWorker(live.url, account.token)
    # Raw JSON: a lone surrogate escape is valid JSON but no valid Unicode, unstorable in utf8mb4.
    claim = worker.session.post(f"{live.url}/worker/v1/claim", timeout=10, headers={"Content-Type": "application/json"},
                                data='{"models": ["echo", "bad\\ud800name"], "wait": 0}')
    assert claim.status_code == 200
    assert client.get("/admin/").status_code == 200  # the admin queue lists that worker's models
    holder: dict = {}

    def serve():
        job = worker.claim(wait=5)[0]
        entry = {"id": job["id"], "lease": job["lease"],
                 "chunks": [{"seq": 0, "delta": {"content": "half \\udc00 a pair"}}], "finish": {"reason": "stop"}}
        holder["answer"] = worker.session.post(f"{live.url}/worker/v1/chunks", data=json.dumps({"jobs": [entry]})
                                               .replace("\\\\udc00", "\\udc00"), timeout=10,
                                               headers={"Content-Type": "application/json"}).json()

    thread = threading.Thread(target=serve)
    thread.start()
    body = '{"model": "echo", "stream": true, "messages": [{"role": "user", "content": "x\\ud800y"}]}'
    with requests.post(f"{live.url}/v1/chat/completions", data=body, stream=True, timeout=30,
                       headers={"Authorization": f"Bearer {account.key}", "Content-Type": "application/json"}) as r:
        events = [line[6:] for line in r.iter_lines(decode_unicode=True) if line.startswith("data: ")]
    thread.join(timeout=10)
    assert holder["answer"]["jobs"][0]["ok"] is True
    assert events[-1] == "[DONE]"
    deltas = [json.loads(e)["choices"][0]["delta"].get("content") or "" for e in events[:-1]]
    assert "".join(deltas) == "half \ufffd a pair"
    with app.app_context(), db.read() as s:
        assert json.loads(s.scalar(select(Job.request_json)))["messages"][0]["content"] == "x\ufffdy"


def test_json_nested_too_deep_is_a_400(live, account):
    deep = '{"model": "echo", "messages": ' + "[" * 100 + "]" * 100 + "}"
    r = requests.post(f"{live.url}/v1/chat/completions", data=deep, timeout=10,
                      headers={"Authorization": f"Bearer {account.key}", "Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    very_deep = "[" * 100000 + "]" * 100000  # past Python's own recursion limit
    r = requests.post(f"{live.url}/v1/chat/completions", data=very_deep, timeout=10,
                      headers={"Authorization": f"Bearer {account.key}", "Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
