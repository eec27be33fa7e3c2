"""A throwaway MariaDB server on loopback, started and stopped by the test suite."""
from __future__ import annotations

import itertools
import os
import shutil
import signal
import subprocess
import tempfile
import time
from typing import Optional

import pymysql

from support import free_port  # noqa: F401  (tests import it from here)

SEARCH = ("/usr/sbin", "/usr/bin", "/usr/local/bin", "/usr/local/sbin", "/usr/libexec")


def find(*names: str) -> Optional[str]:
    """Find the first of these programs on PATH or in the usual sbin folders."""
    for name in names:
        found = shutil.which(name) or next(
            (os.path.join(d, name) for d in SEARCH if os.access(os.path.join(d, name), os.X_OK)), None
        )
        if found:
            return found
    return None


class PortTaken(RuntimeError):
    """Another process took the port between its pick and the server's bind."""


class MariaDB:
    """One mariadbd process in a temporary data folder, with a password user for the app."""

    USER, PASSWORD = "pollgate", "pollgate-test"
    started: list["MariaDB"] = []  # every server of this process that start() began and stop() has not ended

    def __init__(self) -> None:
        self.server = find("mariadbd", "mysqld")
        self.installer = find("mariadb-install-db", "mysql_install_db")
        self.dir = ""
        self.proc: Optional[subprocess.Popen] = None
        self.port = 0
        self._names = itertools.count(1)
        # Databases made by new_database that nothing has used yet: make_app fills them from
        # the template (a database migrated once) instead of migrating each one again.
        self.fresh: set[str] = set()
        self.template: Optional[str] = None

    @property
    def available(self) -> bool:
        """Tell whether the server binaries are installed."""
        return bool(self.server and self.installer)

    def start(self) -> None:
        """Create a data folder, start the server and a password user for the tests.

        Whatever this starts, stop() ends, also after a failed start.
        """
        self.dir = tempfile.mkdtemp(prefix="pollgate-mariadb-")
        MariaDB.started.append(self)
        subprocess.run(
            [self.installer, "--no-defaults", f"--datadir={self.data}", "--user=" + _user(),
             "--auth-root-authentication-method=normal", "--skip-test-db"],
            check=True, capture_output=True, timeout=120,
        )
        for attempt in range(5):
            self.port = free_port()
            try:
                self._boot(60)
                break
            except PortTaken:
                if attempt == 4:
                    raise
        with self.root() as conn, conn.cursor() as cur:
            for host in ("127.0.0.1", "localhost"):
                cur.execute(f"CREATE USER IF NOT EXISTS '{self.USER}'@'{host}' IDENTIFIED BY '{self.PASSWORD}'")
                cur.execute(f"GRANT ALL PRIVILEGES ON *.* TO '{self.USER}'@'{host}'")

    def _launch(self) -> None:
        self._log_start = os.path.getsize(self.log) if os.path.exists(self.log) else 0
        self.proc = subprocess.Popen(
            [self.server, "--no-defaults", f"--datadir={self.data}", f"--socket={self.socket}",
             f"--port={self.port}", "--bind-address=127.0.0.1", "--user=" + _user(),
             "--skip-name-resolve", "--innodb-buffer-pool-size=64M", "--max-connections=500",
             "--innodb-flush-log-at-trx-commit=2", f"--log-error={self.log}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )

    @property
    def running(self) -> bool:
        """Tell whether mariadbd is up (it may have been killed by a fault test)."""
        return self.proc is not None and self.proc.poll() is None

    def kill(self, timeout: float = 10) -> None:
        """Kill mariadbd with SIGKILL, as a crash or the OOM killer would, and wait until it is gone."""
        if self.running:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=timeout)

    def restart(self, timeout: float = 30) -> None:
        """Start mariadbd again on the same port and data folder (crash recovery included), within timeout."""
        self.kill()
        self._boot(timeout)

    def _boot(self, timeout: float) -> None:
        self._launch()
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.kill()  # a server that did not come up in time is not left running
            raise

    @property
    def data(self) -> str:
        return os.path.join(self.dir, "data")

    @property
    def log(self) -> str:
        return os.path.join(self.dir, "error.log")

    @property
    def socket(self) -> str:
        return os.path.join(self.dir, "mariadb.sock")

    def root(self) -> pymysql.Connection:
        """Connect as root over the socket."""
        return pymysql.connect(unix_socket=self.socket, user="root", autocommit=True, ssl_disabled=True)

    def _wait_ready(self, timeout: float = 60) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                with open(self.log, errors="replace") as handle:
                    handle.seek(self._log_start)
                    if "Address already in use" in handle.read():
                        raise PortTaken(f"port {self.port} was taken")
                raise RuntimeError(f"mariadbd exited; see {self.log}")
            try:
                self.root().close()
                return
            except pymysql.err.OperationalError:
                time.sleep(0.1)
        raise RuntimeError(f"mariadbd did not start in {timeout} s; see {self.log}")

    def new_database(self) -> str:
        """Create an empty database and return its SQLAlchemy URL (over TCP, as a password user)."""
        name = f"pg_test_{os.getpid()}_{next(self._names)}"
        with self.root() as conn, conn.cursor() as cur:
            cur.execute(f"CREATE DATABASE {name} CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci")
        # ssl_disabled: this server has no TLS, and PyMySQL would otherwise build a TLS context,
        # loading the system's CA certificates (0.05-0.1 s), for every connection to find that out.
        url = f"mysql+pymysql://{self.USER}:{self.PASSWORD}@127.0.0.1:{self.port}/{name}?charset=utf8mb4&ssl_disabled=1"
        self.fresh.add(url)
        return url

    def drop_database(self, url: str) -> None:
        """Drop a database made by new_database."""
        self.fresh.discard(url)
        with self.root() as conn, conn.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS {database_name(url)}")

    def copy_database(self, source: str, target: str) -> None:
        """Fill the empty database target with the tables, keys and rows of the database source.

        SHOW CREATE TABLE, not CREATE TABLE ... LIKE: LIKE leaves out the foreign keys.
        """
        with self.root() as conn, conn.cursor() as cur:
            cur.execute(f"SHOW FULL TABLES FROM {source} WHERE Table_type = 'BASE TABLE'")
            tables = [row[0] for row in cur.fetchall()]
            cur.execute(f"USE {target}")
            cur.execute("SET SESSION foreign_key_checks = 0")  # tables come in name order, not dependency order
            for table in tables:
                cur.execute(f"SHOW CREATE TABLE {source}.`{table}`")
                cur.execute(cur.fetchone()[1])
                cur.execute(f"INSERT INTO `{table}` SELECT * FROM {source}.`{table}`")

    def is_empty(self, name: str) -> bool:
        """Tell whether a database has no tables."""
        with self.root() as conn, conn.cursor() as cur:
            cur.execute("SELECT COUNT(*) FROM information_schema.tables WHERE table_schema = %s", (name,))
            return cur.fetchone()[0] == 0

    def stop(self) -> None:
        """Stop the server, if it runs, and remove its data."""
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.dir:
            shutil.rmtree(self.dir, ignore_errors=True)
        if self in MariaDB.started:
            MariaDB.started.remove(self)


def database_name(url: str) -> str:
    """Return the database name a MariaDB URL names."""
    return url.rsplit("/", 1)[1].split("?")[0]


def _user() -> str:
    import getpass

    return getpass.getuser()
