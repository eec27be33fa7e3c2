"""The web installer, served in place of the app until the site is installed, then never again."""
from __future__ import annotations

import logging
import os
import secrets
import threading
from typing import Callable, Optional

from flask import Flask, abort, flash, redirect, render_template, request, url_for

from . import installer
from .extensions import csrf
from .keyfile import shared_secret

log = logging.getLogger(__name__)
TOKEN_REFUSED = ("The setup token is missing or wrong, so nothing was done. Open instance/setup-token in "
                 "cPanel's File Manager and paste its contents into the Setup token field.")


def create_installer_app(instance_path: str) -> Flask:
    """Build the small app that runs the installer pages."""
    app = Flask(__name__, instance_path=instance_path)
    # Every process must check the same CSRF tokens, so the key lives in a file.
    app.config["SECRET_KEY"] = _installer_secret(instance_path)
    app.config["WTF_CSRF_TIME_LIMIT"] = None
    # Its session (the CSRF token) is not sent on cross-site requests either, as the app's.
    app.config["SESSION_COOKIE_SAMESITE"] = "Lax"
    csrf.init_app(app)
    if not installer.installed(instance_path):
        # Written on first start, so the owner finds it in the File Manager before visiting.
        installer.setup_token(instance_path)
    from .extensions import security_headers

    app.after_request(security_headers)

    @app.before_request
    def locked():
        # Once installed the installer answers nothing: it cannot be used to take over the site.
        if installer.installed(instance_path):
            abort(404)

    @app.before_request
    def owner_only():
        # Before install, whoever reaches the site first would pick its database and admin:
        # act only for someone who can read the instance folder. The CSRF check runs first.
        if request.method == "POST" and not installer.setup_token_matches(
                instance_path, request.form.get("setup_token", "")):
            return page(request.form.to_dict(), error=TOKEN_REFUSED, status=403)

    @app.get("/")
    def start():
        return redirect(url_for("form", token=request.args.get("token") or None))

    def page(values: dict, db_checks=None, error: str = "", status: int = 400):
        if error:
            flash(error, "error")
        installer.setup_token(instance_path)  # the file the page points to exists, even if deleted meanwhile
        return render_template("install.html", checks=installer.environment_checks(instance_path),
                               db_checks=db_checks, values=values,
                               token_file=installer.setup_token_path(instance_path)), status if error else 200

    @app.get("/install")
    def form():
        """Show the environment checks and the installation form, its token field prefilled from ?token=."""
        return page({**_defaults(), "setup_token": request.args.get("token", "")})

    @app.post("/install/test")
    def test_connection():
        """Check the database the form describes, without saving anything."""
        values = request.form.to_dict()
        try:
            url = _database_url(values, instance_path)
        except installer.InstallError as err:
            return page(values, error=str(err))
        return page(values, installer.database_checks(url))

    @app.post("/install")
    def run():
        """Install: migrate, create the admin, write the config; then show the next steps."""
        values = request.form.to_dict()
        try:
            answers = installer.Answers(_database_url(values, instance_path), values.get("site_url", "").strip(),
                                        values.get("admin_email", "").strip(), values.get("admin_password", ""))
            if answers.admin_password != values.get("admin_password2", ""):
                raise installer.InstallError("The two administrator passwords differ.")
            installer.install(instance_path, answers)
        except installer.InstallError as err:
            return page(values, error=str(err))
        # The next request of this process goes to the real app; this page is the last.
        return render_template("install_done.html", cron=installer.cron_lines(), admin_email=answers.admin_email,
                               site_url=answers.site_url or request.url_root.rstrip("/"))

    return app


def _defaults() -> dict:
    return {"engine": "mysql", "db_host": "localhost", "db_port": "3306", "site_url": request.url_root.rstrip("/")}


def _database_url(values: dict, instance_path: str) -> str:
    if values.get("engine") == "sqlite":
        return installer.sqlite_url(instance_path)
    return installer.mysql_url(values.get("db_host", ""), values.get("db_port", ""), values.get("db_name", ""),
                               values.get("db_user", ""), values.get("db_password", ""))


def _installer_secret(instance_path: str) -> str:
    return shared_secret(os.path.join(instance_path, "installer-secret"), secrets.token_hex(32))


class SiteSwitch:
    """The WSGI entry point: the installer until the config file exists, then the real app."""

    def __init__(self, instance_path: Optional[str] = None, make_app: Optional[Callable[[], Flask]] = None) -> None:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        self.instance_path = instance_path or os.environ.get("POLLGATE_INSTANCE_PATH") or os.path.join(root, "instance")
        self.make_app = make_app
        self.app: Optional[Flask] = None
        self.installer: Optional[Flask] = None
        self.lock = threading.Lock()

    def configured(self) -> bool:
        """Tell whether the app can run: installed here, or given a database by the environment."""
        return installer.installed(self.instance_path) or bool(os.environ.get("DATABASE_URL"))

    def __call__(self, environ, start_response):
        if self.app is None:
            self.build()
            if self.app is None:
                return self.installer(environ, start_response)
        return self.app(environ, start_response)

    def build(self) -> None:
        """Build the app if the site is configured, else the installer; until it is, each request asks again."""
        with self.lock:
            if self.app is None and self.configured():
                from . import create_app

                self.app = (self.make_app or (lambda: create_app(instance_path=self.instance_path)))()
                self.installer = None
            elif self.app is None and self.installer is None:
                self.installer = create_installer_app(self.instance_path)

    def warm(self) -> None:
        """Do a new process's slow work now, before Passenger hands it a request: the app, tiktoken, migrations/."""
        try:
            self.build()
            if self.app is not None:
                from . import migrate, token_count

                token_count.warm_up()
                migrate.scripts()
        except Exception:  # the first request builds again and shows the error the usual way
            log.exception("could not build the app at start-up; the first request will try again")

