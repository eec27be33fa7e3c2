"""POST /v1/images/generations through a worker that advertises image models; worker status."""
from __future__ import annotations

import threading

import openai
import pytest
import requests
from sqlalchemy import select

from protocol import ProtoWorker
from webapp.db import db
from webapp.models import Usage, Worker

PIXEL = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="


def image_worker(live, token, answer):
    """Claim one image job and answer it with `answer(job)`, in a thread."""
    worker = ProtoWorker(live.url, token)

    def serve():
        r = worker.post("claim", {"models": [], "image_models": ["pixel-1"], "wait": 5, "site": "fake.test"})
        for job in r.json()["jobs"]:
            job["_seq"] = 0
            answer(worker, job)

    thread = threading.Thread(target=serve)
    worker.post("claim", {"models": [], "image_models": ["pixel-1"], "wait": 0})  # advertise at once
    thread.start()
    return thread


def test_an_image_worker_answers_images_generate(app, account, live):
    api = openai.OpenAI(base_url=f"{live.url}/v1", api_key=account.key, max_retries=0)

    def answer(worker, job):
        assert job["kind"] == "image" and job["request"]["prompt"] == "a red pixel"
        assert job["request"]["response_format"] == "b64_json"
        worker.report(job, [{"images": [{"b64_json": PIXEL}]}], finish={"reason": "stop"})

    thread = image_worker(live, account.token, answer)
    assert "pixel-1" in {m.id for m in api.models.list().data}
    result = api.images.generate(model="pixel-1", prompt="a red pixel", response_format="b64_json")
    thread.join()
    assert result.data[0].b64_json == PIXEL
    with app.app_context(), db.read() as s:
        row = s.scalar(select(Usage))
        assert row.status == "completed" and row.prompt_tokens > 0 and row.model == "pixel-1"
    # Chat goes only to chat models: the image model is not a chat model.
    with pytest.raises(openai.NotFoundError):
        api.chat.completions.create(model="pixel-1", messages=[{"role": "user", "content": "hi"}])


def test_image_errors_are_openai_shaped(app, account, live):
    api = openai.OpenAI(base_url=f"{live.url}/v1", api_key=account.key, max_retries=0)
    with pytest.raises(openai.BadRequestError) as bad:
        api.images.generate(model="pixel-1", prompt="")
    assert bad.value.body["param"] == "prompt"
    with pytest.raises(openai.BadRequestError) as bad:
        api.images.generate(model="pixel-1", prompt="x", n=9)
    assert bad.value.body["param"] == "n"
    with pytest.raises(openai.NotFoundError):
        api.images.generate(model="nobody-serves-this", prompt="x")

    def refuse(worker, job):
        worker.report(job, error={"code": "content_filter", "message": "the site refused the prompt"})

    thread = image_worker(live, account.token, refuse)
    with pytest.raises(openai.BadRequestError) as refused:
        api.images.generate(model="pixel-1", prompt="something")
    thread.join()
    assert refused.value.code == "content_filter" and "refused" in refused.value.message


def test_a_worker_that_needs_a_human_stops_advertising(app, account, live):
    worker = ProtoWorker(live.url, account.token)
    worker.claim(wait=0)
    api = openai.OpenAI(base_url=f"{live.url}/v1", api_key=account.key, max_retries=0)
    assert "echo" in {m.id for m in api.models.list().data}
    r = worker.post("status", {"status": "needs_human", "message": "the site shows a challenge page"})
    assert r.status_code == 200
    assert "echo" not in {m.id for m in api.models.list().data}
    with app.app_context(), db.read() as s:
        row = s.scalar(select(Worker))
        assert (row.status, row.status_message) == ("needs_human", "the site shows a challenge page")
    bad = worker.post("status", {"status": "sleepy"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "status"
    worker.claim(wait=0)  # claiming again means ready
    assert "echo" in {m.id for m in api.models.list().data}
    assert requests.post(f"{live.url}/worker/v1/status", json={"status": "paused"}, timeout=10).status_code == 401


def test_admin_and_owner_see_why_a_browser_worker_waits(app, account, live, admin):
    client, _ = admin
    worker = ProtoWorker(live.url, account.token)
    worker.post("claim", {"models": ["arena-text"], "image_models": ["arena-image"], "wait": 0,
                          "kind": "userscript/lmarena", "version": "0.1.0", "site": "lmarena.ai"})
    worker.post("status", {"status": "needs_human", "message": "solve the challenge in the tab"})
    page = client.get("/admin/").text
    assert "needs a human: solve the challenge in the tab" in page
    assert '<td class="site">lmarena.ai</td>' in page and "arena-text, arena-image" in page
