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
