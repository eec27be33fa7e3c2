"""passenger_wsgi.py served by a real Apache + mod_passenger under /api, as on a cPanel host."""
from __future__ import annotations

import re
import time

import pytest
import requests

from protocol import ProtoWorker, StreamReader


@pytest.fixture(scope="module")
def site(passenger_site):
    """One site on a migrated SQLite database in its instance folder."""
    return passenger_site({"SECRET_KEY": "passenger-smoke"}, sqlite=True)


def test_api_without_a_key_is_an_openai_401(site):
    response = requests.get(f"{site.url}/v1/models", timeout=30)
    assert response.status_code == 401, site.logs()
    assert response.headers["Content-Type"].startswith("application/json")
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]


def test_pages_build_urls_under_the_base_uri(site):
    response = requests.get(f"{site.url}/login", timeout=30)
    assert response.status_code == 200, site.logs()
    page = response.text
    actions = re.findall(r'<form[^>]*action="([^"]*)"', page)
    links = re.findall(r'(?:href|src)="(/[^"]*)"', page)
    # The sign-in form has no action (it posts back to its own /api/login); any other must be under /api.
    assert links
    assert all(url.startswith("/api/") for url in actions + links), actions + links
    stylesheet = next(url for url in links if url.endswith(".css"))
    assert requests.get(f"http://127.0.0.1:{site.port}{stylesheet}", timeout=30).status_code == 200


def test_a_stream_reaches_the_client_as_the_worker_sends_it(site):
    """Buffered by Apache or Passenger, the first word would arrive only with the last one.

    The worker sends its second word only once the client holds the first: a buffered response
    never shows the first, and the test fails at the bound instead of passing on a chunk count.
    """
    site.flask("create-user", "stream@example.com", "--password", "long enough pw")
    key = site.flask("create-key", "stream@example.com").strip().splitlines()[-1]
    worker = ProtoWorker(site.url, site.flask("create-worker-token", "stream@example.com").strip().splitlines()[-1])
    worker.claim(wait=0)  # the model is live
    stream = StreamReader(site.url, key, "first second")
    job = worker.claim(wait=20)[0]
    worker.report(job, [{"content": "first "}])
    end = time.monotonic() + 30
    while not stream.contents():
        assert time.monotonic() < end, f"the first word never reached the client on its own: buffered\n{site.logs()}"
        worker.report(job)  # a heartbeat keeps the lease while we wait
        stream.wait_for_news(1)
    second_sent = time.monotonic()
    worker.report(job, [{"content": "second"}], finish={"reason": "stop"})
    stream.join()
    assert stream.status == 200 and stream.text == "first second", site.logs()
    assert stream.contents()[0][0] < second_sent <= stream.contents()[1][0]
