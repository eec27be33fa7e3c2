"""Run the Alembic migrations in migrations/ under a lock, and hold requests while the schema differs from the code.

After a new release is uploaded, its code may run against a database its migrations have
not reached yet (or, after a rollback of the code, one a newer release migrated). Until the
schema matches, API and worker calls get a 503 `upgrade_pending` with Retry-After, an
administrator is led to Admin > Upgrade, and everyone else sees a page saying so.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from functools import lru_cache
from time import monotonic
from typing import Optional

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from flask import Flask, Response, current_app, jsonify, redirect, render_template, request, url_for
from flask_login import current_user
from sqlalchemy.engine import Connection
from sqlalchemy.exc import SQLAlchemyError

from .db import db
from .errors import ApiError, is_api_path, error_response

log = logging.getLogger(__name__)

MIGRATIONS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "migrations")

# While the schema differs from the code, look at alembic_version again at most this often;
# once it matches, never again: a process only gets new code by restarting.
RECHECK = 5.0
# What callers are told to wait while an administrator runs the upgrade.
RETRY_AFTER = 30
# Pages that stay open while the schema differs: an administrator must be able to sign in
# and reach the upgrade page.
OPEN_PAGES = ("static", "auth.login", "auth.logout", "admin.upgrade")
# Signing in reads the events and settings tables, which came with this revision; on an
# older database the upgrade has to run from a terminal.
SIGN_IN_NEEDS = "0004"


@dataclass(frozen=True)
class SchemaState:
    """Where the database's migrations stand against this code's migrations/ folder."""

    database: tuple[str, ...]  # the revisions alembic_version holds (none: an empty database)
    pending: tuple[str, ...]  # this code's migrations the database lacks, oldest first
    unknown: tuple[str, ...]  # revisions this code lacks: a newer release migrated the database

    @property
    def current(self) -> bool:
        """Tell whether the database is exactly at this code's head."""
        return not self.pending and not self.unknown

    @property
    def name(self) -> str:
        """Say "current", "behind" (migrations to run) or "ahead" (the code is older than the database)."""
        return "ahead" if self.unknown else "behind" if self.pending else "current"


def alembic_config(connection: Connection) -> Config:
    """Build an Alembic config that reuses this connection."""
    cfg = Config()
    cfg.set_main_option("script_location", MIGRATIONS)
    cfg.attributes["connection"] = connection
    return cfg


@lru_cache(maxsize=1)
def scripts() -> ScriptDirectory:
    """Read migrations/ once per process (new code comes with a new process)."""
    return ScriptDirectory(MIGRATIONS)


def upgrade(revision: str = "head") -> None:
    """Apply every pending migration, then have this process look at the schema afresh."""
    state = schema_state()
    if state.unknown:
        raise RuntimeError(describe(state))
    try:
        with db.named_lock("migrate", wait=60) as got, db.engine.connect() as connection:
            if not got:
                raise RuntimeError("another installer is migrating this database; try again in a minute")
            command.upgrade(alembic_config(connection), revision)
            connection.commit()
    finally:
        current_app.extensions.pop("pollgate.schema", None)


def schema_state() -> SchemaState:
    """Compare the database's alembic_version with this code's migrations."""
    with db.engine.connect() as connection:
        database = tuple(MigrationContext.configure(connection).get_current_heads())
        connection.rollback()
    script = scripts()
    unknown = tuple(rev for rev in database if not _known(script, rev))
    if unknown:
        return SchemaState(database, (), unknown)
    revisions = script.iterate_revisions(script.get_heads(), database or "base")
    return SchemaState(database, tuple(r.revision for r in reversed(list(revisions))), ())


def readiness() -> tuple[dict, int]:
    """Say whether this process can serve, looking afresh: the database answers and is at this code's migrations."""
    try:
        state = schema_state()
    except SQLAlchemyError as err:
        # The class only: a driver's message can name the server and the account.
        log.warning("readiness: the database did not answer (%s)", err.__class__.__name__)
        return {"ok": False, "database": "unreachable", "error": err.__class__.__name__}, 503
    body = {"ok": state.current, "database": "ok", "schema": state.name, "revisions": list(state.database),
            "pending": list(state.pending), "unknown": list(state.unknown)}
    return body, 200 if state.current else 503


def _known(script: ScriptDirectory, revision: str) -> bool:
    try:
        script.get_revision(revision)
    except CommandError:
        return False
    return True


def pending() -> list[str]:
    """List the migrations not yet applied, oldest first; refuse a database newer than the code."""
    state = schema_state()
    if state.unknown:
        raise RuntimeError(describe(state))
    return list(state.pending)


def describe(state: SchemaState) -> str:
    """Say in one sentence what is wrong with the schema and what fixes it."""
    if state.unknown:
        return (f"the database is at revision {', '.join(state.unknown)}, newer than this release of Pollgate "
                f"(its newest is {', '.join(scripts().get_heads())}): a newer release migrated it. Upload that "
                "release again; Pollgate does not downgrade a database by itself")
    return (f"the database needs {len(state.pending)} migration(s) this release brings ({', '.join(state.pending)}): "
            "an administrator applies them under Admin > Upgrade, or runs: python install.py upgrade")


def seen_state() -> SchemaState:
    """Return this process's view of the schema, re-read at most every RECHECK seconds until it is current."""
    ext = current_app.extensions
    seen: Optional[tuple[float, SchemaState]] = ext.get("pollgate.schema")
    if seen is None or (not seen[1].current and monotonic() - seen[0] >= RECHECK):
        seen = ext["pollgate.schema"] = (monotonic(), schema_state())
    return seen[1]


def init_app(app: Flask) -> None:
    """Hold API calls and pages while the database schema differs from this code's."""
    app.before_request(hold_until_upgraded)


def hold_until_upgraded() -> Optional[Response]:
    """Answer 503 (API), lead administrators to the upgrade page, or show a page, until the schema matches."""
    if request.endpoint == "readyz":
        return None  # it looks for itself, and must answer even when the database does not
    state = seen_state()
    if state.current:
        return None
    if request.endpoint == "healthz":
        body = {"ok": False, "schema": state.name, "database": list(state.database),
                "pending": list(state.pending), "unknown": list(state.unknown)}
        return _retry_later(jsonify(body))
    if is_api_path():
        code = "schema_ahead" if state.unknown else "upgrade_pending"
        message = f"The gateway cannot serve requests until its database matches its code: {describe(state)}."
        return error_response(ApiError(503, message, code=code, retry_after=RETRY_AFTER))
    can_sign_in = SIGN_IN_NEEDS not in state.pending
    if request.endpoint in OPEN_PAGES and (can_sign_in or request.endpoint == "static"):
        return None
    if can_sign_in and _signed_in_admin():
        return redirect(url_for("admin.upgrade"))
    return _retry_later(Response(render_template("upgrading.html", state=state, can_sign_in=can_sign_in)))


def _signed_in_admin() -> bool:
    try:
        return bool(current_user.is_authenticated and current_user.is_admin)
    except SQLAlchemyError:  # the users table is not what this code expects: nobody can be told apart
        return False


def _retry_later(response: Response) -> Response:
    response.status_code = 503
    response.headers["Retry-After"] = str(RETRY_AFTER)
    return response
