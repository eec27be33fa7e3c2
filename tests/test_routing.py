"""Provider routing (X-Provider, X-Target-Domain, X-Session-Name) through the official `openai`
client with real workers, on SQLite and MariaDB (both claim paths)."""
from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor

import openai
import pytest

from conftest import VALIDATION_ONLY, make_account
from protocol import ProtoWorker
from webapp import accounts, jobs
from webapp.models import Job

PROMPT = [{"role": "user", "content": "route me please"}]


def client(live, key) -> openai.OpenAI:
    """An OpenAI client pointed at the gateway; retries off so each call is one request."""
    return openai.OpenAI(base_url=f"{live.url}/v1", api_key=key, max_retries=0)


def new_worker(app, live, user_id: int, name: str, kind: str, site: str = "", models=("echo",),
               shared: bool = False) -> ProtoWorker:
    """Make a worker token and bring its worker live (one claim that takes nothing)."""
    with app.app_context():
        token = accounts.create_worker_token(user_id, name, shared=shared)
    worker = ProtoWorker(live.url, token, models, kind=kind, site=site)
    worker.claim(wait=0)
    return worker


@pytest.fixture
def fleet(app, account, live) -> dict[str, ProtoWorker]:
    """Three live workers of the default user: two pollclients and a userscript on arena.ai."""
    return {
        "gpu": new_worker(app, live, account.user_id, "gpu", "pollclient", models=("echo", "llama3.1:8b")),
        "spare": new_worker(app, live, account.user_id, "spare", "pollclient"),
        "tab": new_worker(app, live, account.user_id, "tab", "userscript/lmarena", "arena.ai",
                          models=("echo", "arena-model")),
    }


def ask(live, key, headers: dict[str, str], stream: bool = False, model: str = "echo") -> Future:
    """Send one chat request in the background; the future holds (headers, text)."""

    def call():
        raw = client(live, key).chat.completions.with_raw_response.create(
            model=model, messages=PROMPT, stream=stream, extra_headers=headers)
        answer = raw.parse()
        text = "".join(c.choices[0].delta.content or "" for c in answer if c.choices) if stream \
            else answer.choices[0].message.content
        return raw.headers, text

    pool = ThreadPoolExecutor(1)
    future = pool.submit(call)
    pool.shutdown(wait=False)
    return future


def queued_job(app, timeout: float = 10) -> Job:
    """Wait until the request's job is in the queue and return it."""
    end = time.monotonic() + timeout
    while True:
        with app.app_context(), jobs.db.read() as s:
            job = s.query(Job).order_by(Job.id.desc()).first()
        if job is not None:
            return job
        assert time.monotonic() < end, "the request queued no job"
        time.sleep(0.05)


def serve(worker: ProtoWorker, timeout: float = 10) -> dict:
    """Claim the queued job with this worker and answer it with the prompt."""
    end = time.monotonic() + timeout
    while not (claimed := worker.claim(wait=0)):
        assert time.monotonic() < end, "the worker got no job"
        time.sleep(0.05)
    worker.say(claimed[0], PROMPT[0]["content"], finish={"reason": "stop"})
    return claimed[0]


def long_poll(worker: ProtoWorker, wait: float) -> Future:
    """Hold a claim long-poll in the background; the future holds the jobs it got."""
    pool = ThreadPoolExecutor(1)
    future = pool.submit(worker.claim, 1, wait)
    pool.shutdown(wait=False)
    return future


@pytest.mark.parametrize("headers, stored, served_by, provider", [
    ({"X-Provider": "userscript"}, "userscript", "tab", "arena.ai"),
    ({"X-Provider": "arena.ai"}, "arena.ai", "tab", "arena.ai"),
    ({"X-Target-Domain": "arena.ai"}, "arena.ai", "tab", "arena.ai"),
    ({"X-Provider": "Pollclient"}, "pollclient", "gpu", "pollclient"),
])
def test_a_job_for_a_provider_is_claimed_only_by_its_workers(app, account, live, fleet, headers, stored, served_by,
                                                              provider):
    wrong = fleet["gpu"] if served_by == "tab" else fleet["tab"]
    # The wrong worker is already waiting in its long-poll when the job arrives: the bell
    # wakes it, and it must still come back empty.
    waiting = long_poll(wrong, 2)
    time.sleep(0.3)
    answer = ask(live, account.key, headers)
    job = queued_job(app)
    assert (job.provider, job.pinned_worker_id) == (stored, None)
    serve(fleet[served_by])
    response_headers, text = answer.result(timeout=30)
    assert text == PROMPT[0]["content"]
    assert waiting.result(timeout=30) == []
    assert response_headers["x-pollgate-worker"] == served_by
    assert response_headers["x-pollgate-provider"] == provider


def test_auto_goes_to_any_worker(app, account, live, fleet):
    for served_by, provider, headers in (("tab", "arena.ai", {}), ("gpu", "pollclient", {"X-Provider": "auto"})):
        answer = ask(live, account.key, headers)
        job = queued_job(app)
        assert (job.provider, job.pinned_worker_id) == ("", None)
        serve(fleet[served_by])
        response_headers, text = answer.result(timeout=30)
        assert text == PROMPT[0]["content"]
        assert (response_headers["x-pollgate-worker"], response_headers["x-pollgate-provider"]) == (served_by, provider)
        with app.app_context(), jobs.db.begin() as s:
            s.query(Job).delete()  # the next round's job is the only one


def test_a_streamed_answer_names_its_provider_and_worker(app, account, live, fleet):
    answer = ask(live, account.key, {"X-Provider": "arena.ai"}, stream=True)
    queued_job(app)
    serve(fleet["tab"])
    response_headers, text = answer.result(timeout=30)
    assert text == PROMPT[0]["content"]
    assert response_headers["content-type"].startswith("text/event-stream")
    assert response_headers["x-pollgate-provider"] == "arena.ai"
    assert response_headers["x-pollgate-worker"] == "tab"
    assert response_headers["x-request-id"].startswith("chatcmpl-")


def test_a_pinned_job_goes_only_to_the_named_worker(app, account, live, fleet):
    # Same kind, same models: only the name tells them apart.
    waiting = long_poll(fleet["gpu"], 2)
    time.sleep(0.3)
    answer = ask(live, account.key, {"X-Session-Name": "spare"}, stream=True)
    job = queued_job(app)
    assert job.pinned_worker_id is not None and job.provider == ""
    assert fleet["tab"].claim(wait=0) == []
    serve(fleet["spare"])
    response_headers, text = answer.result(timeout=30)
    assert text == PROMPT[0]["content"]
    assert waiting.result(timeout=30) == []
    assert (response_headers["x-pollgate-worker"], response_headers["x-pollgate-provider"]) == ("spare", "pollclient")


def test_a_pin_and_a_provider_together(app, account, live, fleet):
    answer = ask(live, account.key, {"X-Session-Name": "gpu", "X-Provider": "pollclient"})
    queued_job(app)
    assert fleet["spare"].claim(wait=0) == []
    serve(fleet["gpu"])
    assert answer.result(timeout=30)[0]["x-pollgate-worker"] == "gpu"
    # A worker of that name that is not of that provider is no match.
    with pytest.raises(openai.NotFoundError) as err:
        ask(live, account.key, {"X-Session-Name": "tab", "X-Provider": "pollclient"}).result(timeout=30)
    assert err.value.code == "worker_not_found"


@VALIDATION_ONLY
def test_pinning_only_names_the_callers_own_live_workers(app, account, live, fleet):
    bob = make_account(app, "bob@example.com")
    new_worker(app, live, bob.user_id, "bobs-shared", "pollclient", shared=True)
    api = client(live, account.key)
    for name in ("nobody", "bobs-shared"):  # Bob's worker serves Alice, but is not hers to pin
        with pytest.raises(openai.NotFoundError) as err:
            api.chat.completions.create(model="echo", messages=PROMPT, extra_headers={"X-Session-Name": name})
        assert err.value.code == "worker_not_found"
        assert err.value.body["param"] == "X-Session-Name"
        assert name in err.value.message
    with app.app_context(), jobs.db.read() as s:
        assert s.query(Job).count() == 0


@VALIDATION_ONLY
def test_an_unknown_provider_is_a_400_listing_the_live_ones(app, account, live, fleet):
    bob = make_account(app, "bob@example.com")
    new_worker(app, live, bob.user_id, "private", "pollclient", "bob.example")
    new_worker(app, live, bob.user_id, "public", "pollclient", "shared.example", shared=True)
    api = client(live, account.key)
    with pytest.raises(openai.BadRequestError) as err:
        api.chat.completions.create(model="echo", messages=PROMPT, extra_headers={"X-Provider": "openrouter"})
    assert err.value.code == "invalid_provider"
    assert err.value.body["param"] == "X-Provider"
    # Bob's private worker is none of Alice's business; his shared one serves her.
    assert err.value.message.endswith(
        "Providers live for you now: auto, arena.ai, pollclient, shared.example, userscript, userscript/lmarena.")
    with pytest.raises(openai.BadRequestError) as err:
        api.models.list(extra_headers={"X-Provider": "bob.example"})
    assert err.value.code == "invalid_provider"
    with pytest.raises(openai.BadRequestError) as err:
        api.chat.completions.create(model="echo", messages=PROMPT,
                                    extra_headers={"X-Provider": "pollclient", "X-Target-Domain": "arena.ai"})
    assert err.value.body["param"] == "X-Target-Domain"
    with app.app_context(), jobs.db.read() as s:
        assert s.query(Job).count() == 0


@VALIDATION_ONLY
def test_models_lists_only_the_providers_models(app, account, live, fleet):
    api = client(live, account.key)

    def listed(headers):
        return sorted(m.id for m in api.models.list(extra_headers=headers))

    assert listed({}) == ["arena-model", "echo", "llama3.1:8b"]
    assert listed({"X-Provider": "auto"}) == ["arena-model", "echo", "llama3.1:8b"]
    assert listed({"X-Provider": "arena.ai"}) == ["arena-model", "echo"]
    assert listed({"X-Target-Domain": "arena.ai"}) == ["arena-model", "echo"]
    assert listed({"X-Provider": "pollclient"}) == ["echo", "llama3.1:8b"]
    assert listed({"X-Session-Name": "spare"}) == ["echo"]
    assert api.models.retrieve("llama3.1:8b", extra_headers={"X-Provider": "pollclient"}).id == "llama3.1:8b"
    with pytest.raises(openai.NotFoundError):
        api.models.retrieve("llama3.1:8b", extra_headers={"X-Provider": "arena.ai"})
    # A chat request for a model its provider does not serve is the usual 404.
    with pytest.raises(openai.NotFoundError) as err:
        api.chat.completions.create(model="llama3.1:8b", messages=PROMPT, extra_headers={"X-Provider": "arena.ai"})
    assert err.value.code == "model_not_found"
