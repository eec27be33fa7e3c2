"""The pollclient as a real subprocess serving the gateway, on SQLite and MariaDB."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager

import openai
import pytest
import requests
from werkzeug.serving import make_server

from conftest import ROOT, read_until_error
from fake_upstream import ANSWER, LOGPROB, LONG_ID_TOOL_CALLS, REASONING, start_fake_upstream, words
from mariadb import free_port
from webapp import config as gateway_config
from webapp import jobs
from webapp.models import Job

PROMPT = [{"role": "user", "content": "one two three four five six"}]


@contextmanager
def pollclient(url: str, token: str, *args: str):
    """Run `python pollclient` against the gateway; stop it with SIGINT at the end."""
    env = {**os.environ, "POLLCLIENT_TOKEN": token, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "pollclient"), "--api-url", url, "--poll-wait", "2", *args],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    log: list[str] = []
    reader = threading.Thread(target=lambda: log.extend(proc.stdout), daemon=True)
    reader.start()
    try:
        yield proc, log
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        reader.join(timeout=5)


def api(live, key) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{live.url}/v1", api_key=key, max_retries=0)


def wait_for_models(client: openai.OpenAI, *models: str, timeout: float = 20) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if set(models) <= {m.id for m in client.models.list()}:
            return
        time.sleep(0.1)
    raise AssertionError(f"models {models} never showed up")


def job_rows(app) -> list[Job]:
    with app.app_context(), jobs.db.read() as s:
        return list(s.query(Job).order_by(Job.id))


def test_echo_worker_serves_concurrent_streams(app, account, live):
    client = api(live, account.key)
    with pollclient(live.url, account.token, "--backend", "echo", "--max-concurrent", "4", "--echo-delay", "0.05"):
        wait_for_models(client, "echo")
        results: dict[int, str] = {}

        def ask(i: int) -> None:
            stream = client.chat.completions.create(
                model="echo", stream=True, messages=[{"role": "user", "content": f"request {i} says hello"}])
            results[i] = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        plain = client.chat.completions.create(model="echo", messages=PROMPT)
    assert results == {i: f"request {i} says hello" for i in range(6)}
    assert plain.choices[0].message.content == PROMPT[0]["content"]
    rows = job_rows(app)
    assert [r.state for r in rows] == ["completed"] * 7
    # Four slots: some jobs overlapped in time.
    spans = sorted((r.claimed_at, r.finished_at) for r in rows[:6])
    assert any(b[0] < a[1] for a, b in zip(spans, spans[1:]))


def test_openai_backend_relays_an_upstream_stream(app, account, live):
    client = api(live, account.key)
    with start_fake_upstream() as upstream:
        with pollclient(live.url, account.token, "--backend", "openai", "--upstream-url", upstream.url,
                        "--models", "fake-chat,fake-reasoning"):
            wait_for_models(client, "fake-chat", "fake-reasoning")
            stream = client.chat.completions.create(
                model="fake-chat", messages=PROMPT, stream=True, temperature=0.5,
                stream_options={"include_usage": True})
            chunks = list(stream)
            reply = client.chat.completions.create(model="fake-reasoning", messages=PROMPT)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ANSWER
    assert chunks[-1].usage is not None
    assert reply.choices[0].message.content == ANSWER
    assert reply.choices[0].message.model_extra["reasoning_content"] == REASONING
    sent = next(r["body"] for r in upstream.requests if r["method"] == "POST")
    assert sent["model"] == "fake-chat" and sent["temperature"] == 0.5 and sent["messages"] == PROMPT
    assert job_rows(app)[0].usage_source == "worker"


def test_openai_backend_relays_tool_calls_an_upstream_left_loose(app, account, live):
    client = api(live, account.key)
    with start_fake_upstream() as upstream:
        with pollclient(live.url, account.token, "--backend", "openai", "--upstream-url", upstream.url,
                        "--models", "fake-tools-loose"):
            wait_for_models(client, "fake-tools-loose")
            reply = client.chat.completions.create(model="fake-tools-loose", messages=PROMPT)
    calls = [(c.id, c.type, c.function.name, c.function.arguments) for c in reply.choices[0].message.tool_calls]
    assert calls == [("call_a", "function", "get_weather", '{"city":"Paris"}'),
                     ("call_b", "function", "get_time", '{"zone": "CET"}')]
    assert reply.choices[0].finish_reason == "tool_calls"
    assert [r.state for r in job_rows(app)] == ["completed"]


def test_openai_backend_relays_logprobs_and_echo_declares_none(app, account, live):
    client = api(live, account.key)
    with start_fake_upstream() as upstream:
        with pollclient(live.url, account.token, "--backend", "openai", "--upstream-url", upstream.url,
                        "--models", "fake-chat"):
            wait_for_models(client, "fake-chat")
            stream = client.chat.completions.create(model="fake-chat", messages=PROMPT, stream=True, logprobs=True,
                                                    top_logprobs=2)
            chunks = [c for c in stream if c.choices]
            reply = client.chat.completions.create(model="fake-chat", messages=PROMPT, logprobs=True)
    tokens = [t for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert "".join(t.token for t in tokens) == ANSWER
    assert tokens[0].logprob == LOGPROB and [a.token for a in tokens[0].top_logprobs] == ["alt0", "alt1"]
    assert [t.token for t in reply.choices[0].logprobs.content] == words(ANSWER)
    assert reply.choices[0].message.content == ANSWER
    posted = [r["body"] for r in upstream.requests if r["method"] == "POST"]
    assert [(b["logprobs"], b.get("top_logprobs")) for b in posted] == [(True, 2), (True, None)]
    # The echo backend declares no feature: the same question is a clear 400.
    with pollclient(live.url, account.token, "--backend", "echo"):
        wait_for_models(client, "echo")
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model="echo", messages=PROMPT, logprobs=True)
    assert (err.value.code, err.value.param) == ("unsupported_parameter", "logprobs")
    assert [r.state for r in job_rows(app)] == ["completed"] * 2


def image_prompt(url: str) -> list[dict]:
    """A user message pointing at an image, with keys no OpenAI message has (a client may send anything)."""
    return [{"role": "user", "x_vendor": {"callback": "http://169.254.169.254/latest/meta-data/"}, "content": [
        {"type": "text", "text": "what is this?", "cache_control": {"type": "ephemeral"}},
        {"type": "image_url", "image_url": {"url": url, "x_fetch_via": "http://10.0.0.1/"}},
    ]}]


def test_image_urls_on_the_workers_network_never_reach_the_upstream(app, account, live):
    client = api(live, account.key)
    with start_fake_upstream() as upstream:
        with pollclient(live.url, account.token, "--backend", "openai", "--upstream-url", upstream.url,
                        "--models", "fake-chat"):
            wait_for_models(client, "fake-chat")
            refused = {}
            for host in ("169.254.169.254", "localhost:8080", "[::ffff:127.0.0.1]"):
                with pytest.raises(openai.BadRequestError) as refused[host]:
                    client.chat.completions.create(model="fake-chat", messages=image_prompt(f"http://{host}/x.png"))
            public = client.chat.completions.create(model="fake-chat",
                                                    messages=image_prompt("http://93.184.216.34/cat.png"))
    for host, err in refused.items():
        name = host.split(":8080")[0].strip("[]")
        assert f"the image host {name} is a private, loopback, link-local or reserved address" in err.value.message
    posted = [r["body"] for r in upstream.requests if r["method"] == "POST"]
    assert public.choices[0].message.content == ANSWER and len(posted) == 1  # only the public image went on
    assert posted[0]["messages"] == [{"role": "user", "content": [
        {"type": "text", "text": "what is this?"},
        {"type": "image_url", "image_url": {"url": "http://93.184.216.34/cat.png"}},
    ]}]
    assert [(r.state, r.error_code) for r in job_rows(app)] == [("failed", "invalid_request")] * 3 + [
        ("completed", None)]


def test_the_owner_may_let_private_image_urls_through(app, account, live):
    client = api(live, account.key)
    with start_fake_upstream() as upstream:
        with pollclient(live.url, account.token, "--backend", "openai", "--upstream-url", upstream.url,
                        "--models", "fake-chat", "--allow-private-image-urls"):
            wait_for_models(client, "fake-chat")
            reply = client.chat.completions.create(model="fake-chat", messages=image_prompt("http://10.0.0.7/x.png"))
    assert reply.choices[0].message.content == ANSWER
    posted = next(r["body"] for r in upstream.requests if r["method"] == "POST")
    assert posted["messages"][0]["content"][1] == {"type": "image_url", "image_url": {"url": "http://10.0.0.7/x.png"}}
    assert "x_vendor" not in posted["messages"][0]  # unknown keys are dropped with the flag too


@pytest.mark.parametrize("model, status", [("fake-429", 429), ("fake-context", 400), ("fake-400", 400)])
def test_upstream_errors_reach_the_client_as_openai_errors(app, account, live, model, status):
    client = api(live, account.key)
    with start_fake_upstream() as upstream:
        with pollclient(live.url, account.token, "--backend", "openai", "--upstream-url", upstream.url,
                        "--models", model):
            wait_for_models(client, model)
            with pytest.raises(openai.APIStatusError) as err:
                client.chat.completions.create(model=model, messages=PROMPT)
    assert err.value.status_code == status


@pytest.mark.parametrize("app_config", [{"LEASE_TTL": gateway_config.LEASE_TTL}])  # the real lease, not 2 s
def test_a_refused_report_reaches_the_client_at_once(app, account, live, monkeypatch):
    monkeypatch.setattr("fake_upstream.LOOSE_TOOL_CALLS", LONG_ID_TOOL_CALLS)
    client = api(live, account.key)
    with start_fake_upstream() as upstream:
        with pollclient(live.url, account.token, "--backend", "openai", "--upstream-url", upstream.url,
                        "--models", "fake-tools-loose") as (_, log):
            wait_for_models(client, "fake-tools-loose")
            started = time.monotonic()
            with pytest.raises(openai.APIStatusError) as err:
                client.chat.completions.create(model="fake-tools-loose", messages=PROMPT)
            waited = time.monotonic() - started
    field = "jobs[0].chunks[0].delta.tool_calls[0].id must be at most 191 characters."
    assert (err.value.status_code, err.value.code) == (502, "upstream_error")
    assert err.value.body["message"] == f"The worker's output was refused by the gateway: {field} (invalid_output)"
    assert waited < gateway_config.LEASE_TTL / 3  # not the worker_lost that the lapsed lease would bring
    assert [(r.state, r.error_code) for r in job_rows(app)] == [("failed", "invalid_output")]
    assert any(f"invalid_output: The worker's output was refused by the gateway: {field}" in line for line in log), log


def test_client_disconnect_stops_the_upstream_stream(app, account, live):
    with start_fake_upstream() as upstream:
        with pollclient(live.url, account.token, "--backend", "openai", "--upstream-url", upstream.url,
                        "--models", "fake-slow"):
            wait_for_models(api(live, account.key), "fake-slow")
            with requests.post(f"{live.url}/v1/chat/completions", stream=True, timeout=30,
                               headers={"Authorization": f"Bearer {account.key}"},
                               json={"model": "fake-slow", "messages": PROMPT, "stream": True}) as r:
                lines = r.iter_lines()
                for _ in range(4):
                    next(lines)
            assert upstream.wait_closed_early("fake-slow", timeout=15)
    assert job_rows(app)[0].state == "cancelled"


def test_worker_killed_mid_stream_fails_the_job_cleanly(app, account, live):
    client = api(live, account.key)
    with pollclient(live.url, account.token, "--backend", "echo", "--echo-delay", "0.3") as (proc, _):
        wait_for_models(client, "echo")
        stream = client.chat.completions.create(
            model="echo", stream=True, messages=[{"role": "user", "content": " ".join(["word"] * 40)}])
        # SIGKILL after four chunks: no chance to hand the job back.
        text, err = read_until_error(stream, 4, proc.kill)
    assert "stopped answering" in str(err)
    assert text and "word word" in text
    assert job_rows(app)[0].error_code == "worker_lost"


def test_ctrl_c_hands_back_a_job_it_cannot_finish(app, account, live):
    client = api(live, account.key)
    with pollclient(live.url, account.token, "--backend", "echo", "--echo-delay", "0.2",
                    "--drain-timeout", "0.5") as (proc, log):
        wait_for_models(client, "echo")
        stream = client.chat.completions.create(
            model="echo", stream=True, messages=[{"role": "user", "content": " ".join(["word"] * 60)}])
        _, err = read_until_error(stream, 3, lambda: proc.send_signal(signal.SIGINT))
        assert proc.wait(timeout=20) == 0
    assert "shut down" in str(err)
    assert job_rows(app)[0].error_code == "worker_released"
    assert any("released 1 job" in line for line in log)


def test_ctrl_c_lets_a_short_job_finish(app, account, live):
    client = api(live, account.key)
    with pollclient(live.url, account.token, "--backend", "echo", "--echo-delay", "0.1",
                    "--drain-timeout", "10") as (proc, _):
        wait_for_models(client, "echo")
        stream = client.chat.completions.create(model="echo", stream=True, messages=PROMPT)
        first = next(iter(stream))
        proc.send_signal(signal.SIGINT)
        text = (first.choices[0].delta.content or "") + "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        assert proc.wait(timeout=20) == 0
    assert text == PROMPT[0]["content"]


def test_worker_rides_out_a_gateway_outage(app, account):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with pollclient(url, account.token, "--backend", "echo") as (proc, log):
        # Nothing listens yet: the worker says so and backs off instead of exiting.
        end = time.monotonic() + 30
        while not any("cannot reach the gateway" in line for line in log) and time.monotonic() < end:
            time.sleep(0.1)
        assert any("cannot reach the gateway" in line for line in log), log
        assert proc.poll() is None
        server = make_server("127.0.0.1", port, app, threaded=True)
        # shutdown() waits out serve_forever's poll: 0.5 s per test by default.
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        thread.start()
        try:
            client = openai.OpenAI(base_url=f"{url}/v1", api_key=account.key, max_retries=0)
            wait_for_models(client, "echo", timeout=40)
            reply = client.chat.completions.create(model="echo", messages=PROMPT)
        finally:
            server.shutdown()
            thread.join(timeout=10)
            server.server_close()
    assert reply.choices[0].message.content == PROMPT[0]["content"]


def test_bad_token_exits_with_a_readable_error(app, live):
    done = subprocess.run(
        [sys.executable, os.path.join(ROOT, "pollclient"), "--api-url", live.url, "--backend", "echo"],
        cwd=ROOT, env={**os.environ, "POLLCLIENT_TOKEN": "pgw_not-a-real-token"},
        capture_output=True, text=True, timeout=30,
    )
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    assert "token" in done.stderr.lower()
    assert "pgw_not-a-real-token" not in done.stderr + done.stdout


def test_a_site_named_with_site_is_a_provider_callers_can_ask_for(app, account, live):
    client = api(live, account.key)
    with pollclient(live.url, account.token, "--backend", "echo", "--site", "home-gpu"):
        wait_for_models(client, "echo")
        raw = client.chat.completions.with_raw_response.create(
            model="echo", messages=PROMPT, extra_headers={"X-Provider": "home-gpu"})
        assert raw.headers["x-pollgate-provider"] == "home-gpu"
        assert raw.parse().choices[0].message.content == "one two three four five six"
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model="echo", messages=PROMPT, extra_headers={"X-Provider": "elsewhere"})
    assert "home-gpu" in err.value.message and err.value.code == "invalid_provider"
