"""Flask CLI commands: migrate, create users, keys and worker tokens, reap, run the demo."""
from __future__ import annotations

import click
from flask.cli import with_appcontext
from flask import Flask

from . import accounts, jobs, migrate
from .usage import settle_pending


def _user_id(email: str) -> int:
    user = accounts.find_user(email)
    if user is None:
        raise click.ClickException(f"no user with email {email}; create it with create-user first")
    return user.id


@click.command("db-upgrade")
@with_appcontext
def db_upgrade() -> None:
    """Apply pending database migrations."""
    try:
        migrate.upgrade()
    except RuntimeError as err:
        raise click.ClickException(str(err))
    click.echo("database is up to date")


@click.command("create-user")
@with_appcontext
@click.argument("email")
@click.option("--password", required=True, help="At least 8 characters.")
@click.option("--admin", is_flag=True, help="Make the user an administrator.")
@click.option("--tier", default=None, help="Tier name (free, premium, enterprise, ...); default: DEFAULT_TIER.")
def create_user(email: str, password: str, admin: bool, tier: str | None) -> None:
    """Create a user who can own API keys and workers."""
    try:
        user = accounts.create_user(email, password, is_admin=admin, tier=tier)
    except ValueError as err:
        raise click.ClickException(str(err))
    click.echo(f"created {'admin' if admin else 'user'} {user.email}" + (f" in tier {tier}" if tier else ""))


@click.command("create-key")
@with_appcontext
@click.argument("email")
@click.option("--name", default="", help="A label to recognise the key by.")
def create_key(email: str, name: str) -> None:
    """Create an API key; the secret is printed once, alone on the last line."""
    secret = accounts.create_api_key(_user_id(email), name)
    click.echo(f"API key for {email} (shown once, store it now):")
    click.echo(secret)


@click.command("create-worker-token")
@with_appcontext
@click.argument("email")
@click.option("--name", default="", help="A label to recognise the worker by.")
@click.option("--shared", is_flag=True, help="Let this worker serve every user's jobs.")
def create_worker_token(email: str, name: str, shared: bool) -> None:
    """Create a worker token; the secret is printed once, alone on the last line."""
    secret = accounts.create_worker_token(_user_id(email), name, shared)
    click.echo(f"worker token for {email} (shown once, store it now):")
    click.echo(secret)


@click.command("reap")
@with_appcontext
def reap() -> None:
    """Re-queue or fail lost jobs, expire late ones, and account requests that ended."""
    counts = jobs.reap_expired()
    counts["settled"] = settle_pending()
    click.echo(", ".join(f"{k} {v}" for k, v in counts.items()))


def init_app(app: Flask) -> None:
    """Register the commands on the app."""
    from .demo import demo

    for command in (db_upgrade, create_user, create_key, create_worker_token, reap, demo):
        app.cli.add_command(command)
