"""Two stateless gunicorn nodes on one MariaDB: a job submitted on one is claimed through the other."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import openai
import pytest
import requests

from conftest import ROOT, make_account, make_app
from mariadb import free_port
from protocol import ProtoWorker


def start_node(db_url: str, instance: str) -> tuple[subprocess.Popen, str]:
    """Run one node with the repo's gunicorn config, its own instance (and so its own bells)."""
    port = free_port()
    env = {**os.environ, "DATABASE_URL": db_url, "SECRET_KEY": "shared-by-all-nodes",
           "POLLGATE_INSTANCE_PATH": instance, "POLLGATE_BIND": f"127.0.0.1:{port}", "POLLGATE_WORKERS": "1",
           "POLLGATE_THREADS": "16", "POLLGATE_DEFAULT_TIER": "null", "POLLGATE_WAKE_RECHECK": "0.5",
           "POLLGATE_DB_POOL_SIZE": "8"}
    node = subprocess.Popen([sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "passenger_wsgi:application"],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    end = time.monotonic() + 30
    while True:
        try:
            if requests.get(f"{url}/healthz", timeout=1).ok:
                return node, url
        except requests.ConnectionError:
            pass
        if node.poll() is not None or time.monotonic() > end:
            node.kill()
            pytest.fail(f"gunicorn node did not start: {node.stderr.read()[-2000:]}")
        time.sleep(0.1)


def test_a_job_crosses_nodes(mariadb, tmp_path):
    db_url = mariadb.new_database()
    app = make_app(db_url, str(tmp_path / "setup"))
    account = make_account(app)
    nodes = [start_node(db_url, str(tmp_path / f"node{i}")) for i in range(2)]
    try:
        (_, node_a), (_, node_b) = nodes
        worker = ProtoWorker(node_b, account.token)
        worker.claim(wait=0)  # node B hears of the worker; node A sees it through the database
        served = []

        def serve():
            for job in worker.claim(wait=10):
                worker.say(job, "answered through node B", finish={"reason": "stop"})
                served.append(job["id"])

        thread = threading.Thread(target=serve)
        thread.start()
        api = openai.OpenAI(base_url=f"{node_a}/v1", api_key=account.key, max_retries=0)
        chunks = list(api.chat.completions.create(model="echo", stream=True,
                                                  messages=[{"role": "user", "content": "hi"}]))
        thread.join(timeout=15)
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "answered through node B"
        assert served == [chunks[0].id]
    finally:
        for node, _ in nodes:
            node.terminate()
            node.wait(timeout=30)
