"""Start and stop what a benchmark needs: a database, the gateway under gunicorn, workers.

Everything runs on 127.0.0.1. Every process started here is tracked and stopped by
`Stack.stop()`, which `run.py` calls on success, error and Ctrl-C alike.
"""
from __future__ import annotations

import datetime as dt
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import requests

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for path in (ROOT, os.path.join(ROOT, "tests")):
    if path not in sys.path:
        sys.path.insert(0, path)

from mariadb import MariaDB, free_port  # noqa: E402  (tests/mariadb.py)

PYTHON = sys.executable
EMAIL, PASSWORD = "bench@example.com", "bench-password"
HERE = os.path.dirname(os.path.abspath(__file__))


def utcnow() -> dt.datetime:
    """Return naive UTC now, the way the gateway stores times."""
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)


@dataclass
class Site:
    """One fresh database with its instance folder, a user, an API key and worker tokens."""

    name: str
    url: str
    instance: str
    key: str
    tokens: list[str]
    app: Any = field(default=None, repr=False)
    engine: Any = field(default=None, repr=False)

    def env(self) -> dict[str, str]:
        """Return the environment every process of this site shares (DB and bell folder)."""
        # No default tier: the bench measures the gateway, not the free tier's 10 requests a
        # minute (the rate-limit check itself still runs on every request).
        return {**os.environ, "DATABASE_URL": self.url, "POLLGATE_INSTANCE_PATH": self.instance,
                "SECRET_KEY": "bench-secret-key", "POLLGATE_DEFAULT_TIER": "null"}

    def flask_app(self):
        """Return an in-process app on the same database, for bulk setup and checks."""
        if self.app is None:
            from webapp import create_app

            self.app = create_app({"DATABASE_URL": self.url, "SECRET_KEY": "bench", "DB_POOL_SIZE": 8},
                                  instance_path=self.instance)
        return self.app

    def reader(self):
        """Open a plain SQLAlchemy session on the site's database for checks (not the app's pool)."""
        from sqlalchemy import create_engine
        from sqlalchemy.orm import Session

        if self.engine is None:
            self.engine = create_engine(self.url)
        return Session(self.engine)

    def user_id(self) -> int:
        """Return the bench user's id."""
        from webapp import accounts

        with self.flask_app().app_context():
            return accounts.find_user(EMAIL).id

    def worker_tokens(self, count: int) -> list[str]:
        """Return count worker tokens, creating the missing ones in-process.

        The first token comes from the CLI; the rest call the same function the CLI wraps,
        because 50 CLI runs at ~0.5 s each would eat a third of the time budget.
        """
        from webapp import accounts

        uid = self.user_id()
        with self.flask_app().app_context():
            while len(self.tokens) < count:
                self.tokens.append(accounts.create_worker_token(uid, f"bench-{len(self.tokens)}"))
        return self.tokens[:count]

    def workers_seen_since(self, since: dt.datetime) -> int:
        """Count the site's workers that claimed at least once since a moment."""
        from sqlalchemy import func, select

        from webapp.models import Worker

        with self.reader() as s:
            return s.scalar(select(func.count()).select_from(Worker).where(Worker.last_seen_at >= since))

    def close(self) -> None:
        """Close the in-process app's and the checks' connections."""
        if self.app is not None:
            self.app.extensions["pollgate.engine"].dispose()
            self.app = None
        if self.engine is not None:
            self.engine.dispose()
            self.engine = None


class Stack:
    """The database server, gunicorn and worker processes of one benchmark run."""

    def __init__(self, db_kind: str, keep: bool = False, processes: int = 2, threads: int = 64,
                 worker_class: str = "gthread", connections: int = 4000) -> None:
        self.db_kind = db_kind
        self.keep = keep
        self.processes = processes
        self.threads = threads
        self.worker_class = worker_class
        self.connections = connections
        self.dir = tempfile.mkdtemp(prefix="pollgate-bench-")
        self.mariadb: Optional[MariaDB] = None
        self.procs: list[tuple[str, subprocess.Popen]] = []
        self.gateway: Optional[subprocess.Popen] = None
        self.gateway_base = ""
        self.sites: list[Site] = []
        self._root = None

    # -- database ---------------------------------------------------------------------

    def start_database(self) -> None:
        """Start the throwaway MariaDB server when the run uses one."""
        if self.db_kind == "mariadb" and self.mariadb is None:
            server = MariaDB()
            if not server.available:
                raise SystemExit("MariaDB server binaries not found (apt-get install mariadb-server)")
            self.mariadb = server
            server.start()

    def new_site(self, name: str) -> Site:
        """Create a fresh database, migrate it and create the bench user, key and a token with the CLI."""
        instance = os.path.join(self.dir, name)
        os.makedirs(instance)
        if self.mariadb is not None:
            url = self.mariadb.new_database()
        else:
            url = f"sqlite:///{instance}/pollgate.db"
        site = Site(name, url, instance, key="", tokens=[])
        self._cli(site, "db-upgrade")
        # Caps the load never reaches, so the budget's bookkeeping is paid but turns nothing away.
        self._cli(site, "setting", "max_long_polls", "1000")
        self._cli(site, "setting", "max_streams", "1000")
        self._cli(site, "setting", "max_worker_tokens_per_user", "1000")  # the claim race has 50 claimers
        self._cli(site, "create-user", EMAIL, "--password", PASSWORD)
        site.key = self._cli(site, "create-key", EMAIL)
        site.tokens.append(self._cli(site, "create-worker-token", EMAIL))
        self.sites.append(site)
        return site

    def _cli(self, site: Site, *args: str) -> str:
        done = subprocess.run([PYTHON, "-m", "flask", "--app", "webapp", *args], cwd=ROOT, env=site.env(),
                              capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"flask {args[0]} failed: {done.stderr.strip()[-500:]}")
        return done.stdout.strip().splitlines()[-1]

    def status(self, *names: str) -> dict[str, int]:
        """Read MariaDB global status counters in one statement (which counts as one question)."""
        if self._root is None:
            self._root = self.mariadb.root()
        with self._root.cursor() as cur:
            cur.execute("SHOW GLOBAL STATUS WHERE Variable_name IN %s", (names,))
            return {name: int(value) for name, value in cur.fetchall()}

    # -- processes --------------------------------------------------------------------

    def spawn(self, name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen:
        """Start a tracked process in its own session, its output in a log file."""
        log = open(os.path.join(self.dir, f"{name}.log"), "ab")
        # Own session: a Ctrl-C reaches only this script, which stops the children in order.
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        self.procs.append((name, proc))
        return proc

    def start_gateway(self, site: Site, env: Optional[dict[str, str]] = None, config: Optional[str] = None) -> str:
        """Serve the gateway with gunicorn as production would; return its base URL."""
        self.stop_gateway()
        port = free_port()
        # Always name a config file: without -c gunicorn reads ./gunicorn.conf.py from ROOT,
        # whose held-request cap (3/4 of the threads) and access log would apply to some
        # phases and not to the idle one, which names its counting hook.
        argv = [PYTHON, "-m", "gunicorn", *self.gunicorn_options(), "-b", f"127.0.0.1:{port}",
                "-c", os.path.join(HERE, config or "gunicorn_bench.py")]
        # One pooled connection per thread, so a held request never waits for a connection.
        full_env = {**site.env(), "POLLGATE_DB_POOL_SIZE": str(self.threads), **(env or {})}
        self.gateway = self.spawn(f"gunicorn-{site.name}", argv + ["webapp:create_app()"], full_env)
        base = f"http://127.0.0.1:{port}"
        self.wait_http(base + "/healthz", self.gateway, f"gunicorn-{site.name}", 30)
        self.gateway_base = base
        return base

    def wait_http(self, url: str, proc: subprocess.Popen, name: str, timeout: float) -> None:
        """Wait until a started server answers url with 2xx; fail at once if its process exits."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited; see {self.dir}/{name}.log")
            try:
                if requests.get(url, timeout=1).ok:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"{name} did not answer {url} within {timeout:g} s")

    def gunicorn_options(self) -> list[str]:
        """Return the gunicorn options every phase uses (a phase may add a -c hook)."""
        if self.worker_class == "gevent":
            size = ["-k", "gevent", "--worker-connections", str(self.connections)]
        else:
            size = ["--threads", str(self.threads), "-k", "gthread"]
        return ["-w", str(self.processes), *size, "--graceful-timeout", "1"]

    def production_cap(self) -> int:
        """Return the held-request cap per process that gunicorn.conf.py sets for this shape of node."""
        env = {"PATH": os.environ.get("PATH", ""), "POLLGATE_WORKER_CLASS": self.worker_class,
               "POLLGATE_THREADS": str(self.threads), "POLLGATE_CONNECTIONS": str(self.connections)}
        script = "import os, runpy; runpy.run_path('gunicorn.conf.py'); print(os.environ['POLLGATE_MAX_HELD_PER_PROCESS'])"
        done = subprocess.run([PYTHON, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
                              check=True)
        return int(done.stdout)

    def stop_gateway(self) -> None:
        """Stop gunicorn if it runs (SIGINT is its quick shutdown)."""
        if self.gateway is not None:
            self._stop(self.gateway, signal.SIGINT, 10)
            self.gateway = None

    def start_pollclient(self, site: Site, base: str, token: str, name: str, *extra: str) -> subprocess.Popen:
        """Start one echo pollclient process; the token travels in the environment, not argv."""
        argv = [PYTHON, "pollclient", "--api-url", base, "--backend", "echo", "--echo-delay", "0",
                "--drain-timeout", "1", "--log-level", "WARNING", *extra]
        return self.spawn(name, argv, {**os.environ, "POLLCLIENT_TOKEN": token})

    def wait_workers(self, site: Site, count: int, since: dt.datetime, timeout: float = 60) -> None:
        """Wait until count workers of this site have claimed since a moment."""
        end = time.monotonic() + timeout
        while site.workers_seen_since(since) < count:
            dead = [n for n, p in self.procs if p.poll() is not None and n.startswith("pollclient")]
            if dead:
                raise RuntimeError(f"{dead[0]} exited; see {self.dir}/{dead[0]}.log")
            if time.monotonic() > end:
                raise RuntimeError(f"only {site.workers_seen_since(since)} of {count} workers connected")
            time.sleep(0.2)

    def cpu_groups(self) -> dict[str, list[int]]:
        """Name the process groups whose CPU use is worth telling apart; this script comes last."""
        groups: dict[str, list[int]] = {}
        for name, proc in self.procs:
            groups.setdefault(name.split("-")[0], []).append(proc.pid)
        if self.mariadb is not None and self.mariadb.proc is not None:
            groups["mariadbd"] = [self.mariadb.proc.pid]
        groups["bench"] = [os.getpid()]  # its children were counted above
        return groups

    def stop_named(self, prefix: str) -> None:
        """Stop every tracked process whose name starts with prefix (pollclients take SIGTERM)."""
        procs = [p for n, p in self.procs if n.startswith(prefix)]
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)  # all first, so their drains overlap
        for proc in procs:
            self._stop(proc, None, 10)

    def _stop(self, proc: subprocess.Popen, sig: Optional[int], grace: float) -> None:
        """Signal a process (unless sig is None: already done), wait, then kill its group."""
        if proc.poll() is None:
            if sig is not None:
                proc.send_signal(sig)
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass
        try:
            # The process group is the one this script created for it: take its children too.
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        proc.wait()
        self.procs = [(n, p) for n, p in self.procs if p is not proc]

    def stop(self) -> None:
        """Stop everything this stack started, newest first, then remove its files."""
        for prefix in ("clients", "pollclient"):
            self.stop_named(prefix)  # signalled together: twenty drains overlap
        for name, proc in reversed(list(self.procs)):
            self._stop(proc, signal.SIGINT if name.startswith("gunicorn") else signal.SIGTERM, 10)
        self.gateway = None
        for site in self.sites:
            site.close()
        if self._root is not None:
            self._root.close()
        if self.mariadb is not None:
            self.mariadb.stop()
            self.mariadb = None
        if not self.keep:
            shutil.rmtree(self.dir, ignore_errors=True)
