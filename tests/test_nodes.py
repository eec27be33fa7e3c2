"""Two stateless gunicorn nodes on one MariaDB: a job submitted on one is claimed through the other."""
from __future__ import annotations

import contextlib
import threading

import openai

from nodes import bounded, stack  # noqa: F401  (stack: a fixture)
from protocol import ProtoWorker


@bounded(90)
def test_a_job_crosses_nodes(stack):
    with contextlib.ExitStack() as nodes:
        # Each node has its own instance folder, so its own bells: only the database links them.
        node_a, node_b = (nodes.enter_context(stack.node(f"node{i}")) for i in range(2))
        worker = ProtoWorker(node_b.url, stack.account.token)
        worker.claim(wait=0)  # node B hears of the worker; node A sees it through the database
        served = []

        def serve():
            for job in worker.claim(wait=10):
                worker.say(job, "answered through node B", finish={"reason": "stop"})
                served.append(job["id"])

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        api = openai.OpenAI(base_url=f"{node_a.url}/v1", api_key=stack.account.key, max_retries=0, timeout=30)
        chunks = list(api.chat.completions.create(model="echo", stream=True,
                                                  messages=[{"role": "user", "content": "hi"}]))
        thread.join(timeout=15)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "answered through node B"
    assert served == [chunks[0].id]


@bounded(90)
def test_a_stream_that_lost_its_client_is_resumed_on_another_node(stack):
    import datetime as dt

    import requests

    from support import wait_for
    from webapp.models import utcnow

    with contextlib.ExitStack() as nodes:
        # A grace well under the hold (30 s): a reader expiry under 25 s away is the grace's.
        node_a, node_b = (nodes.enter_context(stack.node(f"node{i}", RESUME_GRACE=20)) for i in range(2))
        worker = ProtoWorker(node_b.url, stack.account.token)
        worker.claim(wait=0)
        claimed: list[dict] = []

        def first_word() -> None:
            claimed.extend(worker.claim(wait=10))
            worker.report(claimed[0], [{"content": "one "}])

        thread = threading.Thread(target=first_word, daemon=True)
        thread.start()
        headers = {"Authorization": f"Bearer {stack.account.key}"}
        with requests.post(f"{node_a.url}/v1/chat/completions", stream=True, timeout=30, headers=headers,
                           json={"model": "echo", "stream": True, "messages": [{"role": "user", "content": "hi"}]}) as r:
            public_id = r.headers["x-request-id"]
            for line in r.iter_lines(decode_unicode=True):
                if '"one "' in line:
                    break
        thread.join(timeout=15)

        def graced() -> bool:
            expires = stack.job(public_id).reader_expires_at
            return expires is not None and expires < utcnow() + dt.timedelta(seconds=25)

        wait_for(graced, 30, "node A to notice the hang-up and start the grace")
        with requests.get(f"{node_b.url}/v1/chat/completions/{public_id}", params={"stream": "true"}, stream=True,
                          timeout=30, headers={**headers, "Last-Event-ID": "1"}) as r:
            lines = r.iter_lines(decode_unicode=True)
            seen = [next(lines)]
            worker.report(claimed[0], [{"content": "two"}], finish={"reason": "stop"})
            seen.extend(lines)
    data = [line[6:] for line in seen if line.startswith("data: ")]
    # A comment first, so the headers go out at once; then the events after the one named.
    assert seen[:2] == [": resumed", "id: 2"] and data[-1] == "[DONE]"
    assert '"content":"two"' in data[0]
    assert stack.job(public_id).state == "completed"
