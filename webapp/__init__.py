"""Pollgate: an OpenAI-compatible gateway whose workers poll it for jobs."""
from __future__ import annotations

import logging
import os
import secrets
from typing import Any, Optional

from flask import Flask
from werkzeug.middleware.proxy_fix import ProxyFix

from . import config as defaults
from .keyfile import shared_secret

log = logging.getLogger(__name__)


def create_app(test_config: Optional[dict[str, Any]] = None, instance_path: Optional[str] = None) -> Flask:
    """Build the app: defaults, instance config file, environment, then the test dict."""
    instance_path = instance_path or os.environ.get("POLLGATE_INSTANCE_PATH")
    app = Flask(__name__, instance_path=instance_path, instance_relative_config=True)
    app.config.from_object(defaults)
    app.config.from_pyfile("pollgate.cfg", silent=True)
    for name in ("DATABASE_URL", "SECRET_KEY", "SITE_URL"):
        if os.environ.get(name):
            app.config[name] = os.environ[name]
    app.config.from_prefixed_env("POLLGATE")
    if test_config:
        app.config.from_mapping(test_config)
    os.makedirs(app.instance_path, exist_ok=True)
    if not app.config["DATABASE_URL"]:
        app.config["DATABASE_URL"] = "sqlite:///" + os.path.join(app.instance_path, "pollgate.db")
    if not app.config["SECRET_KEY"]:
        # Never a built-in value: one made at random, once per instance, kept 0600.
        app.config["SECRET_KEY"] = shared_secret(os.path.join(app.instance_path, "secret-key"), secrets.token_hex(32))
    _follow_site_url(app)


    from . import cli, cors, errors, migrate
    from .db import db
    from .extensions import csrf, login_manager, security_headers

    db.init_app(app)
    errors.init_app(app)
    cli.init_app(app)
    login_manager.init_app(app)
    csrf.init_app(app)
    migrate.init_app(app)
    cors.init_app(app)

    from . import admin, api, auth, browser_worker, dashboard, history, metrics, retrieve, worker_api

    app.register_blueprint(api.bp)
    app.register_blueprint(retrieve.bp)
    app.register_blueprint(browser_worker.bp)
    app.register_blueprint(worker_api.bp)
    app.register_blueprint(auth.bp)
    app.register_blueprint(dashboard.bp)
    app.register_blueprint(history.bp)
    app.register_blueprint(admin.bp)
    app.register_blueprint(metrics.bp)
    # The API and the worker protocol authenticate with bearer tokens, never cookies,
    # so a cross-site form cannot ride on them: CSRF tokens are for the pages.
    csrf.exempt(api.bp)
    csrf.exempt(retrieve.bp)
    csrf.exempt(worker_api.bp)
    app.after_request(security_headers)
    if app.config["TRUSTED_PROXIES"]:
        hops = int(app.config["TRUSTED_PROXIES"])
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=hops, x_proto=hops, x_host=hops, x_prefix=hops)

    @app.get("/healthz")
    def healthz():
        return {"ok": True}

    @app.get("/readyz")
    def readyz():
        # Liveness is /healthz; this one asks the database, for load balancers and probes.
        body, status = migrate.readiness()
        headers = {"Retry-After": str(migrate.RETRY_AFTER)} if status != 200 else {}
        return body, status, {"Cache-Control": "no-store", **headers}

    return app


def _follow_site_url(app: Flask) -> None:
    """Mark cookies Secure and links https when the site URL is https."""
    site = (app.config.get("SITE_URL") or "").rstrip("/")
    app.config["SITE_URL"] = site or None
    if site.startswith("https://"):
        app.config["SESSION_COOKIE_SECURE"] = True
        app.config["REMEMBER_COOKIE_SECURE"] = True
        app.config["PREFERRED_URL_SCHEME"] = "https"
