"""A real Apache + mod_passenger serving passenger_wsgi.py under /api, laid out as cPanel does it."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from typing import Callable, Iterator, Optional

import pytest
import requests

from support import ROOT, RUN_MARK, descendants, free_port, missing, reap
from mariadb import find

APACHE = find("apache2", "httpd")
PASSENGER_STATUS = find("passenger-status")
MODULES = "/usr/lib/apache2/modules"
PASSENGER_ROOT = "/usr/lib/ruby/vendor_ruby/phusion_passenger/locations.ini"
# Passenger runs the app as the owner of passenger_wsgi.py and cannot execute a Python
# under /root (pyenv), so the app gets its own venv from Debian's Python.
SYSTEM_PYTHON = "/usr/bin/python3"
USER = "www-data"
BASE_URI = "/api"
APP_FILES = ("passenger_wsgi.py", "install.py", "requirements.txt", "webapp", "migrations", "cron")
SKIP = shutil.ignore_patterns("__pycache__", "*.pyc")

HTTPD_CONF = """\
ServerRoot {dir}
ServerName 127.0.0.1
Listen 127.0.0.1:{port}
PidFile {dir}/apache2.pid
DefaultRuntimeDir {dir}
Mutex file:{dir} default
ErrorLog {dir}/error.log
LogLevel warn
User {user}
Group {user}
LoadModule mpm_event_module {modules}/mod_mpm_event.so
LoadModule authz_core_module {modules}/mod_authz_core.so
LoadModule mime_module {modules}/mod_mime.so
LoadModule dir_module {modules}/mod_dir.so
LoadModule env_module {modules}/mod_env.so
LoadModule passenger_module {modules}/mod_passenger.so
TypesConfig /etc/mime.types

DocumentRoot {dir}/public_html
<Directory />
    AllowOverride None
    Require all denied
</Directory>
<Directory {dir}/public_html>
    Require all granted
</Directory>
# What cPanel's "Setup Python App" writes into public_html/api/.htaccess. Debian's Passenger
# refuses PassengerAppRoot in .htaccess (CloudLinux's build allows it), so it goes here.
<Directory {dir}/public_html{base_uri}>
    PassengerAppRoot "{app_root}"
    PassengerBaseURI "{base_uri}"
    PassengerPython "{python}"
{set_env}
</Directory>

PassengerRoot {passenger_root}
PassengerDefaultRuby /usr/bin/ruby
# Keep this Passenger's sockets, buffers and log apart from any other instance on the machine.
PassengerInstanceRegistryDir {dir}/passenger
PassengerDataBufferDir {dir}/buffer
PassengerLogFile {dir}/passenger.log
PassengerMaxPoolSize {pool_size}
# The test machine has no outside network: no phoning home.
PassengerDisableAnonymousTelemetry on
PassengerDisableSecurityUpdateCheck on
# The default, said out loud: event streams must reach the client as the app yields them.
PassengerBufferResponse off
# Notice tmp/restart.txt on the next request instead of up to 10 s later.
PassengerStatThrottleRate 0
"""


def missing_part() -> Optional[str]:
    """Name the first part this harness needs that the machine lacks."""
    if APACHE is None:
        return "Apache is not installed (apt-get install apache2)"
    if not os.path.exists(f"{MODULES}/mod_passenger.so") or not os.path.exists(PASSENGER_ROOT):
        return "mod_passenger is not installed (apt-get install libapache2-mod-passenger)"
    if not os.access(SYSTEM_PYTHON, os.X_OK):
        return f"{SYSTEM_PYTHON} is missing (apt-get install python3)"
    if subprocess.run([SYSTEM_PYTHON, "-c", "import ensurepip, venv"], capture_output=True).returncode:
        return "python3 -m venv cannot work (apt-get install python3-venv)"
    if os.geteuid() != 0:
        return "Apache + Passenger tests must run as root (they serve the app as www-data)"
    return None


def app_python() -> str:
    """Build (once per requirements.txt) the venv Passenger runs the app with; return its python."""
    with open(os.path.join(ROOT, "requirements.txt"), "rb") as handle:
        digest = hashlib.sha256(handle.read()).hexdigest()[:12]
    venv = f"/var/tmp/pollgate-passenger-venv-{digest}"
    python = f"{venv}/bin/python"
    if os.path.exists(f"{venv}/.complete"):
        return python
    # Build beside it and rename, so an interrupted build is never mistaken for a complete one.
    building = tempfile.mkdtemp(prefix=f"{os.path.basename(venv)}.", dir="/var/tmp")
    try:
        subprocess.run([SYSTEM_PYTHON, "-m", "venv", building], check=True, capture_output=True, text=True)
        pip = subprocess.run([f"{building}/bin/python", "-m", "pip", "install", "-q", "-r",
                              os.path.join(ROOT, "requirements.txt")], capture_output=True, text=True)
        if pip.returncode:
            raise RuntimeError(f"pip install for the Passenger venv failed:\n{pip.stdout}{pip.stderr}")
        open(f"{building}/.complete", "w").close()
        subprocess.run(["chmod", "-R", "a+rX", building], check=True)  # www-data runs it, whatever our umask
        os.rename(building, venv)
    except OSError:
        if not os.path.exists(f"{venv}/.complete"):  # a parallel run that finished first is fine
            raise
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return python


class PassengerSite:
    """One Apache with mod_passenger serving a copy of the app at http://127.0.0.1:PORT/api."""

    def __init__(self, env: Optional[dict[str, str]] = None, sqlite: bool = False, migrate: bool = True,
                 pool_size: int = 6) -> None:
        self.dir = tempfile.mkdtemp(prefix="pollgate-passenger-")
        self.app_root = os.path.join(self.dir, "app")
        self.instance_path = os.path.join(self.app_root, "instance")  # the app's default, as on cPanel
        self.env = dict(env or {})
        if sqlite:
            self.env["DATABASE_URL"] = f"sqlite:///{self.instance_path}/pollgate.db"
        self.migrate = migrate
        self.pool_size = pool_size
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}{BASE_URI}"
        self.proc: Optional[subprocess.Popen] = None

    def __enter__(self) -> PassengerSite:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        """Copy the app where www-data can read it, migrate, start Apache and wait for the app."""
        try:
            self._lay_out()
            if self.migrate:
                self.flask("db-upgrade")
            for attempt in range(5):
                self._launch()
                if self._wait_ready():
                    break
                # Another process took the port between its pick and Apache's bind: take another.
                assert attempt < 4, f"Apache found its port taken five times\n{self.logs()}"
                self.port = free_port()
                self.url = f"http://127.0.0.1:{self.port}{BASE_URI}"
        except BaseException:
            self.stop()  # a failed start leaves nothing running; the logs are in the error
            raise

    def _launch(self) -> None:
        conf = os.path.join(self.dir, "httpd.conf")
        with open(conf, "w") as handle:
            handle.write(HTTPD_CONF.format(
                dir=self.dir, port=self.port, user=USER, modules=MODULES, passenger_root=PASSENGER_ROOT,
                pool_size=self.pool_size, app_root=self.app_root, base_uri=BASE_URI, python=app_python(),
                set_env="\n".join(f'    SetEnv {name} "{_quote(value)}"' for name, value in self.env.items())))
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(self.dir, "apache2.pid"))  # _wait_ready waits for this launch's
        # A bare environment: nothing of the test run's (DATABASE_URL, CI, ...) reaches the app.
        with open(os.path.join(self.dir, "stderr.log"), "w") as stderr:  # config errors, before ErrorLog opens
            self.proc = subprocess.Popen([APACHE, "-f", conf, "-DFOREGROUND"], env=_bare_env(), start_new_session=True,
                                         stdout=subprocess.DEVNULL, stderr=stderr)

    def _lay_out(self) -> None:
        os.chmod(self.dir, 0o755)
        os.makedirs(self.app_root, exist_ok=True)  # a test may have put files in instance/ already
        for name in APP_FILES:
            source = os.path.join(ROOT, name)
            if os.path.isdir(source):
                shutil.copytree(source, os.path.join(self.app_root, name), ignore=SKIP)
            else:
                shutil.copy(source, self.app_root)
        for folder in (self.instance_path, os.path.join(self.app_root, "tmp"), os.path.join(self.dir, "passenger"),
                       os.path.join(self.dir, "buffer"), os.path.join(self.dir, "public_html", BASE_URI.strip("/"))):
            os.makedirs(folder, exist_ok=True)
        # Passenger runs the app as the owner of passenger_wsgi.py; like a cPanel user, it owns its files.
        for path in [self.app_root, os.path.join(self.dir, "public_html")]:
            subprocess.run(["chown", "-R", f"{USER}:{USER}", path], check=True)

    def flask(self, *args: str) -> str:
        """Run a flask CLI command in the app's venv, as the app's user with the app's environment."""
        # python -m, not bin/flask: the venv was renamed after its build, so the scripts' #! lines are stale.
        done = subprocess.run([app_python(), "-m", "flask", "--app", "webapp", *args],
                              cwd=self.app_root, env={**_bare_env(), **self.env}, user=USER, group=USER,
                              extra_groups=[], capture_output=True, text=True, timeout=120)
        if done.returncode:
            raise RuntimeError(f"flask {' '.join(args)} failed:\n{done.stdout}{done.stderr}")
        return done.stdout

    def _wait_ready(self, timeout: float = 60) -> bool:
        """Wait until the app answers; return False if Apache exited because its port was taken."""
        end = time.monotonic() + timeout
        # Apache writes its pid file after it bound its port: until then, whatever answers
        # on the port is not this Apache.
        while not os.path.exists(os.path.join(self.dir, "apache2.pid")):
            if self.proc.poll() is not None:
                if "Address already in use" in _read(os.path.join(self.dir, "stderr.log")):
                    return False
                raise RuntimeError(f"apache2 exited with {self.proc.returncode}\n{self.logs()}")
            if time.monotonic() > end:
                raise RuntimeError(f"Apache did not start in {timeout} s\n{self.logs()}")
            time.sleep(0.05)
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"apache2 exited with {self.proc.returncode}\n{self.logs()}")
            try:
                # The first request spawns the app; a 5xx here is Passenger failing to start it.
                response = requests.get(self.url + "/", allow_redirects=False, timeout=timeout)
            except requests.ConnectionError:
                time.sleep(0.05)
                continue
            if response.status_code >= 500:
                raise RuntimeError(f"the app did not start: {response.status_code}\n{self.logs()}")
            return True
        raise RuntimeError(f"Apache did not answer in {timeout} s\n{self.logs()}")

    def restart(self) -> None:
        """Restart the app as a cPanel user does: touch tmp/restart.txt (the next request respawns it)."""
        path = os.path.join(self.app_root, "tmp", "restart.txt")
        with open(path, "a"):
            os.utime(path)

    def app_pids(self) -> list[int]:
        """Return the pids of the app's processes: the Pythons Passenger spawned with its WSGI loader."""
        return [pid for pid in descendants(self.proc.pid) if "wsgi-loader.py" in _read(f"/proc/{pid}/cmdline")]

    def serving(self, path: str) -> list[int]:
        """Return the pids of the app processes serving a request for path (e.g. /v1/models) now.

        Read from Passenger's own view of its requests: `passenger-status --show=requests`.
        """
        assert PASSENGER_STATUS, "passenger-status is missing (apt-get install passenger)"
        registry = os.path.join(self.dir, "passenger")
        done = subprocess.run([PASSENGER_STATUS, "--show=requests"], capture_output=True, text=True, timeout=60,
                              env={**_bare_env(), "PASSENGER_INSTANCE_REGISTRY_DIR": registry})
        assert done.returncode == 0 and "{" in done.stdout, f"passenger-status failed: {done.stdout}{done.stderr}"
        report = json.loads(done.stdout[done.stdout.index("{"):])  # after a few lines of preamble
        requests_now = [client.get("current_request") or {} for thread in report.values() if isinstance(thread, dict)
                        for client in (thread.get("active_clients") or {}).values()]
        return sorted(r["session"]["pid"] for r in requests_now
                      if r.get("path") == BASE_URI + path and (r.get("session") or {}).get("pid"))

    def error_log(self) -> str:
        """Return Apache's error log so far."""
        return _read(os.path.join(self.dir, "error.log"))

    def logs(self) -> str:
        """Return every log the site wrote, for a failure message."""
        return "\n".join(f"--- {name}:\n{_read(os.path.join(self.dir, name))}"
                         for name in ("stderr.log", "error.log", "passenger.log"))

    def stop(self) -> None:
        """Stop Apache, its Passenger agents and the app processes, and remove the site."""
        if self.proc is not None and self.proc.poll() is None:
            family = descendants(self.proc.pid)
            # SIGTERM stops Apache at once; Passenger's watchdog sees it go and stops the rest.
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            reap(family)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def passenger_site() -> Iterator[Callable[..., PassengerSite]]:
    """Start Apache + Passenger sites on demand: passenger_site(env, sqlite=..., migrate=...)."""
    reason = missing_part()
    if reason:
        missing(reason)
    with contextlib.ExitStack() as running:  # every site is stopped, even if stopping another fails
        def start(env: Optional[dict[str, str]] = None, **options) -> PassengerSite:
            site = PassengerSite(env, **options)
            running.callback(site.stop)
            site.start()
            return site

        yield start


def _bare_env() -> dict[str, str]:
    # The run's mark, so a Passenger process that outlived its Apache is still found as ours.
    return {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8",
            RUN_MARK: os.environ.get(RUN_MARK, "")}


def _quote(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"')


def _read(path: str) -> str:
    try:
        with open(path, errors="replace") as handle:
            return handle.read()
    except FileNotFoundError:
        return "(none)"
