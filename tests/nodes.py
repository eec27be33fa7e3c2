"""Real gunicorn nodes on MariaDB for tests, and the bounds that keep a faulty one from hanging the suite.

Every process started here runs in its own process group and is killed, whole group, when
its `with` block ends; every wait is bounded, and `bounded` puts a hard limit on a test.
"""
from __future__ import annotations

import contextlib
import faulthandler
import functools
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import pytest
import requests
from gunicorn.config import KNOWN_SETTINGS
from sqlalchemy import func, select

from conftest import ROOT, Account, make_account, make_app
from mariadb import MariaDB
from support import children
from webapp import accounts, budget
from webapp.db import db
from webapp.models import Job

# Fault timings: a lost worker, reader or database shows within seconds, not minutes.
# A hung-up stream's job is cancelled at once (RESUME_GRACE 0): these tests check the
# cancellation; test_nodes resumes a stream on another node within a grace.
FAST = {"LEASE_TTL": 2, "HOLD_TTL": 3, "HOLD_RENEW": 0.5, "REAP_INTERVAL": 0.2, "DISPATCH_TIMEOUT": 3,
        "HEARTBEAT_INTERVAL": 2, "WAKE_RECHECK": 0.5, "CLAIM_WAIT_MAX": 5, "RESUME_GRACE": 0}


def bounded(seconds: float) -> Callable:
    """Fail a test that runs past `seconds`, printing every thread's stack; its cleanups still run."""
    def decorate(test: Callable) -> Callable:
        @functools.wraps(test)
        def run(*args: Any, **kwargs: Any) -> Any:
            def expire(signum: int, frame: Any) -> None:
                faulthandler.dump_traceback(all_threads=True)
                pytest.fail(f"the test ran past its {seconds} s bound (stacks above)")

            previous = signal.signal(signal.SIGALRM, expire)
            signal.setitimer(signal.ITIMER_REAL, seconds)
            try:
                return test(*args, **kwargs)
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
                signal.signal(signal.SIGALRM, previous)
        return run
    return decorate


# -- processes ---------------------------------------------------------------------------


@contextlib.contextmanager
def spawned(args: list[str], env: dict[str, str], log_path: str, listener: Optional[socket.socket] = None
            ) -> Iterator[subprocess.Popen]:
    """Run a command in its own process group, and SIGKILL the whole group when the block ends.

    A listener is handed to the command (as its file descriptor) and closed here: once the
    command dies, nothing of ours answers on that port.
    """
    try:
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True, pass_fds=(listener.fileno(),) if listener else ())
    finally:
        if listener is not None:
            listener.close()
    try:
        yield proc
    finally:
        # A late time-limit alarm must not cut this short and leave the group running.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
        try:
            # The group outlives its leader: gunicorn's workers, one the master was starting.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGALRM})


# gunicorn 27 opens a control socket at one fixed path per user; nodes (and test runs) side by side
# would take it from each other.
NO_CONTROL_SOCKET = ["--no-control-socket"] if any(
    setting.name == "control_socket_disable" for setting in KNOWN_SETTINGS) else []


@dataclass
class Node:
    """One gunicorn node: its master process, URL and log."""

    proc: subprocess.Popen
    url: str
    log_path: str

    def worker_pids(self) -> list[int]:
        """Return the pids of the master's worker processes."""
        return children(self.proc.pid)

    def kill_worker(self) -> int:
        """SIGKILL the node's only worker process, as the OOM killer would; return its pid."""
        pids = self.worker_pids()
        assert len(pids) == 1, f"expected one gunicorn worker, found {pids}"
        os.kill(pids[0], signal.SIGKILL)
        return pids[0]

    def log(self) -> str:
        """Return the end of the node's log, for failure messages."""
        with open(self.log_path, errors="replace") as handle:
            return handle.read()[-4000:]


@contextlib.contextmanager
def gunicorn_node(db_url: str, instance: str, workers: int = 1, threads: Optional[int] = 16,
                  worker_class: str = "gthread", **settings: Any) -> Iterator[Node]:
    """Run one node with the repo's gunicorn.conf.py; settings become POLLGATE_<NAME> variables.

    threads=None keeps gunicorn.conf.py's own thread count; a gevent node has no threads
    and holds up to its CONNECTIONS setting (gunicorn.conf.py's own unless given).
    """
    os.makedirs(instance, exist_ok=True)
    # The node gets a socket already bound to a port the kernel chose (gunicorn's fd://), so no
    # other process can take the port between its pick and the node's bind.
    listener = socket.create_server(("127.0.0.1", 0), backlog=2048)
    port = listener.getsockname()[1]
    settings = {"DEFAULT_TIER": None, "DB_POOL_SIZE": 8, "WAKE_RECHECK": 0.5, **settings}
    env = {**os.environ, "DATABASE_URL": db_url, "SECRET_KEY": "shared-by-all-nodes",
           "POLLGATE_INSTANCE_PATH": instance, "POLLGATE_BIND": f"fd://{listener.fileno()}",
           "POLLGATE_WORKERS": str(workers), "POLLGATE_WORKER_CLASS": worker_class,
           **{f"POLLGATE_{name}": json.dumps(value) for name, value in settings.items()}}
    if threads is None or worker_class != "gthread":
        env.pop("POLLGATE_THREADS", None)
    else:
        env["POLLGATE_THREADS"] = str(threads)
    log_path = os.path.join(instance, "gunicorn.log")
    args = [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", *NO_CONTROL_SOCKET,
            "passenger_wsgi:application"]
    with spawned(args, env, log_path, listener) as proc:
        node = Node(proc, f"http://127.0.0.1:{port}", log_path)
        _wait_ready(node)
        try:
            yield node
        except BaseException:
            print(f"--- the end of the gunicorn node's log, {log_path}:\n{node.log()}")  # shown for a failed test
            raise


def _wait_ready(node: Node, timeout: float = 30) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if node.proc.poll() is not None:
            break
        with contextlib.suppress(requests.RequestException):
            if requests.get(f"{node.url}/healthz", timeout=2).ok:
                return
        time.sleep(0.1)
    pytest.fail(f"the gunicorn node did not start:\n{node.log()}")


@contextlib.contextmanager
def pollclient(url: str, token: str, log_path: str, *args: str) -> Iterator[subprocess.Popen]:
    """Run the real pollclient against a node (echo backend unless args say otherwise)."""
    env = {**os.environ, "POLLCLIENT_TOKEN": token, "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, os.path.join(ROOT, "pollclient"), "--api-url", url, "--poll-wait", "2", *args]
    with spawned(command, env, log_path) as proc:
        yield proc


# -- the database under test -------------------------------------------------------------


@dataclass
class Stack:
    """A migrated database on MariaDB, an app in this process to inspect it, and one account."""

    server: MariaDB
    db_url: str
    app: Any
    account: Account
    dir: str
    worker_class: str = "gthread"

    def node(self, name: str = "node", **options: Any):
        """Start a gunicorn node of this stack's worker class on this database (see gunicorn_node)."""
        return gunicorn_node(self.db_url, os.path.join(self.dir, name), worker_class=self.worker_class, **options)

    def worker_token(self, name: str) -> str:
        """Create another worker token for the account."""
        with self.app.app_context():
            return accounts.create_worker_token(self.account.user_id, name)

    def jobs(self) -> list[Job]:
        """Read every job, oldest first."""
        with self.app.app_context(), db.read() as s:
            return list(s.scalars(select(Job).order_by(Job.id)))

    def job(self, public_id: str) -> Job:
        """Read one job by the id its client and worker see."""
        with self.app.app_context(), db.read() as s:
            return s.scalars(select(Job).where(Job.public_id == public_id)).one()

    def held(self, kind: str = "streams") -> int:
        """Count the live held-request slots of a kind."""
        with self.app.app_context():
            return budget.in_use()[kind][0]

    def scalar(self, query: Any) -> Any:
        """Run one read query."""
        with self.app.app_context(), db.read() as s:
            return s.scalar(query)


def make_stack(server: MariaDB, tmp_path: Any, worker_class: str = "gthread") -> Iterator[Stack]:
    """Yield a Stack on a fresh database of this server; drop the database afterwards if the server is up."""
    url = server.new_database()
    app = make_app(url, str(tmp_path / "setup"))
    try:
        yield Stack(server, url, app, make_account(app), str(tmp_path), worker_class)
    finally:
        app.extensions["pollgate.engine"].dispose()
        if server.running:
            server.drop_database(url)


# The worker classes gunicorn.conf.py offers: each test that starts nodes runs on both.
WORKER_CLASSES = ["gthread", "gevent"]


@pytest.fixture(params=WORKER_CLASSES)
def stack(mariadb, tmp_path, request) -> Iterator[Stack]:
    """A Stack on the session's shared MariaDB, once per worker class."""
    yield from make_stack(mariadb, tmp_path, request.param)


def count(model: Any, *where: Any):
    """A query counting a model's rows."""
    return select(func.count()).select_from(model).where(*where)
