"""Flask CLI commands: migrate, create users, keys and worker tokens, reap, settings, the metrics token, run the demo."""
from __future__ import annotations

import json

import click
from flask.cli import with_appcontext
from flask import Flask

from . import accounts, events, maintenance, metrics, migrate, settings


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
@click.option("--tavern", is_flag=True,
              help="Tavern mode: merge each request's system messages into one leading system message.")
def create_key(email: str, name: str, tavern: bool) -> None:
    """Create an API key; the secret is printed once, alone on the last line."""
    try:
        secret = accounts.create_api_key(_user_id(email), name, tavern)
    except accounts.TooMany as err:
        raise click.ClickException(str(err))
    click.echo(f"API key for {email} (shown once, store it now):")
    click.echo(secret)


@click.command("create-worker-token")
@with_appcontext
@click.argument("email")
@click.option("--name", default="", help="A label to recognise the worker by.")
@click.option("--shared", is_flag=True,
              help="Let this worker serve every user's jobs: it reads their prompts and reports their token counts.")
def create_worker_token(email: str, name: str, shared: bool) -> None:
    """Create a worker token; the secret is printed once, alone on the last line."""
    try:
        secret = accounts.create_worker_token(_user_id(email), name, shared)
    except accounts.TooMany as err:
        raise click.ClickException(str(err))
    if shared:
        events.record("worker_shared", email, f"worker token {secret[:12]} created shared from the command line")
        click.echo(f"This worker is shared: it will read every user's prompts and answers, and the token counts "
                   f"it reports are billed to them. Only share a worker whose owner ({email}) you trust that far.",
                   err=True)
    click.echo(f"worker token for {email} (shown once, store it now):")
    click.echo(secret)


@click.command("reap")
@with_appcontext
def reap() -> None:
    """Re-queue or fail lost jobs, expire late ones, and account requests that ended."""
    counts = maintenance.reap()
    click.echo(", ".join(f"{k} {v}" for k, v in counts.items()))


@click.command("setting")
@with_appcontext
@click.argument("name", required=False)
@click.argument("value", required=False)
def setting(name: str | None, value: str | None) -> None:
    """Show the admin settings, or set one: setting max_streams 0 (values are JSON: 0, true, 24)."""
    if name is None:
        for key, current in settings.all_settings().items():
            click.echo(f"{key} = {json.dumps(current)}")
        return
    if name not in settings.DEFAULTS:
        raise click.ClickException(f"no setting {name!r}; settings: {', '.join(settings.DEFAULTS)}")
    if value is None:
        click.echo(json.dumps(settings.get(name)))
        return
    try:
        parsed = json.loads(value)
    except ValueError:
        raise click.ClickException(f"{value!r} is not a JSON value (try 0, 24, true or false)") from None
    if type(parsed) is not type(settings.DEFAULTS[name]) or (isinstance(parsed, int) and parsed < 0):
        raise click.ClickException(f"{name} takes a value like {json.dumps(settings.DEFAULTS[name])}")
    settings.save({name: parsed})
    click.echo(f"{name} = {json.dumps(parsed)}")


@click.command("metrics-token")
@with_appcontext
@click.option("--revoke", is_flag=True, help="Forget the token instead: /metrics answers 404 until a new one is made.")
def metrics_token(revoke: bool) -> None:
    """Make the token Prometheus scrapes /metrics with, replacing any other; printed once, alone on the last line."""
    if revoke:
        metrics.revoke_token()
        events.record("metrics_token_revoked", "command line", "metrics token revoked; /metrics is off")
        click.echo("the metrics token is revoked; /metrics answers 404 until you make another")
        return
    secret = metrics.create_token()
    # The prefix names the token in the log; the secret itself is never written anywhere.
    events.record("metrics_token_created", "command line", f"metrics token {secret[:12]} made, replacing any other")
    click.echo("metrics token (shown once, store it now; send it as 'Authorization: Bearer ...'):")
    click.echo(secret)


def init_app(app: Flask) -> None:
    """Register the commands on the app."""
    from .demo import demo

    for command in (db_upgrade, create_user, create_key, create_worker_token, reap, setting, metrics_token, demo):
        app.cli.add_command(command)
