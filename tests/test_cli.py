"""The CLI contract other parts rely on, and secrets kept only as hashes."""
from __future__ import annotations

from sqlalchemy import text

from webapp import accounts
from webapp.db import db


def run(app, *args):
    return app.test_cli_runner().invoke(args=list(args))


def test_cli_creates_user_key_and_worker_token(app):
    assert run(app, "db-upgrade").exit_code == 0  # idempotent on a migrated database
    result = run(app, "create-user", "Ann@Example.com", "--password", "long enough", "--admin")
    assert result.exit_code == 0, result.output
    key = run(app, "create-key", "ann@example.com", "--name", "laptop").output.splitlines()[-1]
    token = run(app, "create-worker-token", "ann@example.com").output.splitlines()[-1]
    assert key.startswith("pgk_") and len(key) > 40
    assert token.startswith("pgw_") and len(token) > 40
    with app.app_context():
        assert accounts.authenticate_api_key(f"Bearer {key}").name == "laptop"
        assert accounts.authenticate_worker(f"Bearer {token}").user_id == accounts.find_user("ann@example.com").id
        with db.engine.connect() as conn:
            dump = " ".join(
                str(row) for table in ("users", "api_keys", "workers")
                for row in conn.execute(text(f"SELECT * FROM {table}"))
            )
    # Only hashes and short display prefixes are stored.
    assert key not in dump and token not in dump and "long enough" not in dump
    assert key[:12] in dump


def test_cli_errors_are_readable(app):
    run(app, "create-user", "bo@example.com", "--password", "long enough")
    cases = [
        (("create-user", "bo@example.com", "--password", "long enough"), "already exists"),
        (("create-user", "cy@example.com", "--password", "short"), "at least 8"),
        (("create-user", "not-an-email", "--password", "long enough"), "not an email"),
        (("create-key", "nobody@example.com"), "no user with email"),
        (("create-user", "di@example.com", "--password", "long enough", "--tier", "gold"), "no tier named 'gold'"),
        (("create-worker-token", "nobody@example.com"), "no user with email"),
    ]
    for args, message in cases:
        result = run(app, *args)
        assert result.exit_code != 0
        assert message in result.output
        assert "Traceback" not in result.output


def test_revoked_key_is_refused(app):
    with app.app_context():
        user = accounts.create_user("dee@example.com", "long enough")
        key = accounts.create_api_key(user.id)
        with db.begin() as s:
            s.execute(text("UPDATE api_keys SET revoked_at = created_at"))
        try:
            accounts.authenticate_api_key(f"Bearer {key}")
        except accounts.ApiError as err:
            assert err.status == 401 and err.code == "invalid_api_key"
        else:
            raise AssertionError("a revoked key was accepted")


def test_create_user_in_a_tier(app):
    result = run(app, "create-user", "pro@example.com", "--password", "long enough", "--tier", "premium")
    assert result.exit_code == 0 and "in tier premium" in result.output
    with app.app_context(), db.read() as s:
        tier = s.scalar(text("SELECT t.name FROM users u JOIN tiers t ON t.id = u.tier_id WHERE u.email = 'pro@example.com'"))
    assert tier == "premium"


def test_cli_shows_and_sets_settings(app):
    shown = run(app, "setting").output
    assert "max_streams = 0" in shown and "public_signup = false" in shown  # the suite's defaults
    assert run(app, "setting", "max_streams", "6").output.strip() == "max_streams = 6"
    assert run(app, "setting", "max_streams").output.strip() == "6"
    for bad in (("nope", "1"), ("max_streams", "-1"), ("max_streams", "lots"), ("public_signup", "3")):
        result = run(app, "setting", *bad)
        assert result.exit_code != 0 and "Error:" in result.output and "Traceback" not in result.output
