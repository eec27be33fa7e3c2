"""Attacks on the pre-install web installer: a rogue MySQL server asking for files, and a stranger without the token."""
from __future__ import annotations

import multiprocessing
import os
import re
import socket
import stat
import struct
import subprocess
import sys
import threading
from typing import Iterator

import pymysql
import pytest
import requests

from conftest import ROOT, TEST_CONFIG, serving
from webapp import create_app, installer
from webapp.install_views import SiteSwitch

CLIENT_LOCAL_FILES, CLIENT_PROTOCOL_41 = 0x80, 0x200
# What the rogue server offers: 4.1 protocol, secure auth, plugin auth, and LOCAL INFILE.
SERVER_CAPABILITIES = 0x1 | 0x8 | CLIENT_LOCAL_FILES | CLIENT_PROTOCOL_41 | 0x2000 | 0x8000 | 0x80000
ADMIN = {"site_url": "https://example.com/api", "admin_email": "thief@example.com", "admin_password": "a long password",
         "admin_password2": "a long password"}


class RogueMySQL:
    """A loopback 'MySQL server' that offers LOCAL INFILE and records the capabilities each client offers back."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self.client_flags: list[int] = []
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self) -> None:
        """Greet each client, read its answer, then refuse it: enough for the client to show what it offers."""
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return  # closed by stop()
            self.connections += 1
            with conn:
                conn.settimeout(30)
                try:
                    conn.sendall(packet(0, handshake_v10()))
                    _, answer = read_packet(conn)
                    # HandshakeResponse41 starts with the client's capability flags.
                    self.client_flags.append(struct.unpack("<I", answer[:4])[0])
                    conn.sendall(packet(2, b"\xff" + struct.pack("<H", 1045) + b"#28000Access denied (rogue)"))
                except (OSError, struct.error):
                    pass

    def stop(self) -> None:
        """Stop listening; shutdown wakes the blocked accept."""
        self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self.thread.join(timeout=30)


def packet(seq: int, payload: bytes) -> bytes:
    """Frame a payload as a MySQL packet: 3-byte length, sequence id."""
    return struct.pack("<I", len(payload))[:3] + bytes([seq]) + payload


def handshake_v10() -> bytes:
    """Return a HandshakeV10 payload advertising SERVER_CAPABILITIES."""
    salt = b"01234567" + b"89abcdefghij"
    return (b"\x0a" + b"5.7.44-rogue\x00" + struct.pack("<I", 7) + salt[:8] + b"\x00"
            + struct.pack("<H", SERVER_CAPABILITIES & 0xFFFF) + bytes([45]) + struct.pack("<H", 2)
            + struct.pack("<H", SERVER_CAPABILITIES >> 16) + bytes([21]) + b"\x00" * 10
            + salt[8:] + b"\x00" + b"mysql_native_password\x00")


def read_packet(conn: socket.socket) -> tuple[int, bytes]:
    """Read one MySQL packet and return its sequence id and payload."""
    header = read_exactly(conn, 4)
    return header[3], read_exactly(conn, int.from_bytes(header[:3], "little"))


def read_exactly(conn: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        more = conn.recv(size - len(data))
        if not more:
            raise ConnectionError("the client hung up")
        data += more
    return data


@pytest.fixture
def rogue() -> Iterator[RogueMySQL]:
    """A rogue MySQL server on a free loopback port."""
    server = RogueMySQL()
    yield server
    server.stop()


class Installer:
    """The pre-install site served over real HTTP on loopback, and a visitor's session with it."""

    def __init__(self, url: str, instance: str) -> None:
        self.url, self.instance = url, instance
        self.http = requests.Session()
        self.pages: list[requests.Response] = []

    def get(self, path: str) -> requests.Response:
        """Fetch a page as a visitor would."""
        response = self.http.get(self.url + path, timeout=60)
        self.pages.append(response)
        return response

    def post(self, path: str, fields: dict) -> requests.Response:
        """Post the installer form with a fresh CSRF token."""
        token = re.search(r'name="csrf_token" value="([^"]+)"', self.get("/install").text).group(1)
        response = self.http.post(self.url + path, data={"csrf_token": token, **fields}, timeout=60)
        self.pages.append(response)
        return response

    def owner(self) -> dict:
        """The setup token field, read from the instance folder as the site's owner would."""
        with open(installer.setup_token_path(self.instance)) as handle:
            return {"setup_token": handle.read().strip()}


@pytest.fixture
def served(tmp_path, monkeypatch) -> Iterator[Installer]:
    """A fresh upload (no config, no DATABASE_URL) behind the Passenger entry point, on a loopback port."""
    monkeypatch.delenv("DATABASE_URL", raising=False)
    instance = str(tmp_path / "instance")
    switch = SiteSwitch(instance, make_app=lambda: create_app({**TEST_CONFIG}, instance_path=instance))
    switch.warm()  # as passenger_wsgi.py does: the first start writes the setup token
    with serving(switch) as url:
        yield Installer(url, instance)


def rogue_fields(rogue: RogueMySQL, **changes: str) -> dict:
    """The database fields of an honest-looking form pointing at the rogue server."""
    return {"engine": "mysql", "db_host": "127.0.0.1", "db_port": str(rogue.port), "db_name": "x",
            "db_user": "victim", "db_password": "pw", **changes}


def test_the_rogue_server_notices_a_client_that_offers_local_infile(rogue):
    """The listener's control: a client that does offer LOCAL INFILE is recorded as offering it."""
    with pytest.raises(pymysql.err.OperationalError):
        pymysql.connect(host="127.0.0.1", port=rogue.port, user="u", password="p", local_infile=True,
                        connect_timeout=30)
    assert rogue.client_flags and rogue.client_flags[0] & CLIENT_LOCAL_FILES


def test_a_host_carrying_url_options_is_refused_before_any_connection(served, rogue):
    attack = rogue_fields(rogue, db_host=f"127.0.0.1:{rogue.port}/x?local_infile=1&program_name=")
    refused = served.post("/install/test", {**attack, **served.owner()})
    assert refused.status_code == 400 and "is not a host name or IP address" in refused.text
    assert rogue.connections == 0


def test_test_connection_never_offers_local_infile(served, rogue):
    tested = served.post("/install/test", {**rogue_fields(rogue), **served.owner()})
    assert "refused the user name or password" in tested.text
    assert len(rogue.client_flags) == 1, "the installer did not reach the rogue server"
    assert rogue.client_flags[0] & CLIENT_PROTOCOL_41  # a real HandshakeResponse41 was read
    assert not rogue.client_flags[0] & CLIENT_LOCAL_FILES


@pytest.mark.parametrize("option", ["local_infile=1", "LOCAL_INFILE=true", "client_flag=128"])
def test_a_database_url_asking_for_local_infile_is_refused(tmp_path, rogue, option):
    url = f"mysql+pymysql://victim:pw@127.0.0.1:{rogue.port}/x?{option}"
    [check] = installer.database_checks(url)
    assert not check.ok and "never lets a database server read this account's files" in check.detail
    with pytest.raises(installer.InstallError, match="LOCAL INFILE"):
        installer.install(str(tmp_path / "i"), installer.Answers(url, "https://example.com/api", "ops@example.com", "a long password"))
    clean = {k: v for k, v in os.environ.items() if not k.startswith("POLLGATE_") and k != "DATABASE_URL"}
    terminal = subprocess.run([sys.executable, os.path.join(ROOT, "install.py"), "check", "--database-url", url,
                               "--instance", str(tmp_path / "t")], capture_output=True, text=True, timeout=120,
                              stdin=subprocess.DEVNULL, env=clean)
    assert terminal.returncode == 1 and "LOCAL INFILE" in terminal.stdout
    assert rogue.connections == 0
    assert not installer.installed(str(tmp_path / "i"))


@pytest.mark.parametrize("token", [None, "", "wrong", "   "])
def test_posts_without_the_setup_token_do_nothing(served, rogue, token):
    given = {} if token is None else {"setup_token": token}
    for path, fields in (("/install/test", rogue_fields(rogue)), ("/install", {**rogue_fields(rogue), **ADMIN}),
                         ("/install", {"engine": "sqlite", **ADMIN})):
        refused = served.post(path, {**fields, **given})
        assert refused.status_code == 403 and "setup token is missing or wrong" in refused.text
    assert rogue.connections == 0  # no database was touched
    assert sorted(os.listdir(served.instance)) == ["installer-secret", "setup-token"]
    assert not installer.installed(served.instance)


def test_a_near_miss_token_is_refused(served):
    token = served.owner()["setup_token"]
    for near in (token[:-1], token + "x", token.upper()):
        assert served.post("/install", {"engine": "sqlite", **ADMIN, "setup_token": near}).status_code == 403
    assert not installer.installed(served.instance)


def test_the_setup_token_never_appears_in_installer_pages(served):
    token = served.owner()["setup_token"]
    path = installer.setup_token_path(served.instance)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    form = served.get("/install")
    assert "instance/setup-token" in form.text and "File Manager" in form.text and path in form.text
    assert 'name="setup_token" value=""' in form.text
    prefilled = served.get("/?token=pasted-by-me")
    assert prefilled.url.endswith("/install?token=pasted-by-me") and 'value="pasted-by-me"' in prefilled.text
    served.post("/install/test", {"engine": "sqlite"})
    served.post("/install", {"engine": "sqlite", **ADMIN, "setup_token": "wrong"})
    done = served.post("/install", {"engine": "sqlite", **ADMIN, "setup_token": token})
    assert "Pollgate is installed" in done.text and installer.installed(served.instance)
    assert not os.path.exists(path)
    served.get("/install")  # the real app now: no installer there
    assert len(served.pages) >= 8
    for page in served.pages:
        assert token not in page.text and token not in str(page.headers), page.url


def test_concurrent_processes_agree_on_one_token(tmp_path):
    instance = str(tmp_path / "instance")
    fork = multiprocessing.get_context("fork")
    start, results = fork.Barrier(6), fork.Queue()
    workers = [fork.Process(target=_first_start, args=(instance, start, results)) for _ in range(6)]
    for worker in workers:
        worker.start()
    tokens = {results.get(timeout=120) for _ in workers}
    for worker in workers:
        worker.join(timeout=120)
    assert len(tokens) == 1 and len(tokens.pop()) >= 40
    assert sorted(os.listdir(instance)) == ["setup-token"]  # no temporary files left behind


def _first_start(instance: str, start, results) -> None:
    start.wait(timeout=120)
    results.put(installer.setup_token(instance))


@pytest.mark.parametrize(("host", "port", "name", "user", "problem"), [
    ("127.0.0.1:3306/x?local_infile=1&program_name=", "3306", "db", "u", "not a host name"),
    ("db.example.com/x", "3306", "db", "u", "not a host name"),
    ("u@db.example.com", "3306", "db", "u", "not a host name"),
    ("db?local_infile=1", "3306", "db", "u", "not a host name"),
    ("db#x", "3306", "db", "u", "not a host name"),
    ("db example", "3306", "db", "u", "not a host name"),
    ("db\x00", "3306", "db", "u", "not a host name"),
    ("[::1]:3306", "3306", "db", "u", "not a host name"),
    ("[::1]/x", "3306", "db", "u", "not a host name"),
    ("-db", "3306", "db", "u", "not a host name"),
    ("localhost", "0", "db", "u", "from 1 to 65535"),
    ("localhost", "65536", "db", "u", "from 1 to 65535"),
    ("localhost", "33o6", "db", "u", "from 1 to 65535"),
    ("localhost", "\u00b3", "db", "u", "from 1 to 65535"),
    ("localhost", "3306", "d" * 65, "u", "longer than MySQL allows (64"),
    ("localhost", "3306", "db", "u" * 81, "longer than MySQL allows (80"),
    ("localhost", "3306", "d\x00b", "u", "control character"),
    ("localhost", "3306", "db", "u\nx", "control character"),
    ("", "3306", "db", "u", "Give the database host"),
    ("localhost", "3306", " ", "u", "Give the database host"),
])
def test_mysql_url_refuses_bad_parts(host, port, name, user, problem):
    with pytest.raises(installer.InstallError, match=re.escape(problem)):
        installer.mysql_url(host, port, name, user, "pw")


@pytest.mark.parametrize(("host", "expected"), [
    ("localhost", "localhost"), ("127.0.0.1", "127.0.0.1"), ("db-1.example.com.", "db-1.example.com."),
    ("::1", "::1"), ("[::1]", "::1"), ("2001:DB8::5", "2001:db8::5"), ("my_db", "my_db"),
])
def test_mysql_url_keeps_every_part_as_given(host, expected):
    from sqlalchemy.engine import make_url

    url = make_url(installer.mysql_url(host, " 3307 ", "u1_pg?#/", "u1@pg:x", "p@ss:/?#% w"))
    assert (url.host, url.port, url.database, url.username, url.password) == (
        expected, 3307, "u1_pg?#/", "u1@pg:x", "p@ss:/?#% w")
    assert dict(url.query) == {"charset": "utf8mb4"} and url.drivername == "mysql+pymysql"
