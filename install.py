"""Install or upgrade Pollgate from a terminal (cPanel's Terminal or SSH), as the web installer does.

    python install.py                     # asks for what it needs
    python install.py --non-interactive --db-host localhost --db-name u_pg --db-user u_pg \\
        --admin-email you@example.com --site-url https://example.com/api   # passwords from env
    python install.py check               # environment and database report only
    python install.py upgrade             # apply new migrations after uploading a new version

Every flag has an environment variable (POLLGATE_DB_PASSWORD, POLLGATE_ADMIN_PASSWORD, ...),
so passwords need not appear in the shell history or the process list.
"""
from __future__ import annotations

import argparse
import getpass
import os
import sys

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, ROOT)

try:
    from webapp import installer  # noqa: E402
except ImportError as missing:  # before pip install: say so, not a traceback
    sys.exit(f"install.py: {missing.name} is not installed. In the app's virtualenv run: "
             "pip install -r requirements.txt")

FIELDS = {  # flag: (environment variable, prompt, secret)
    "db_host": ("POLLGATE_DB_HOST", "MySQL host", False),
    "db_port": ("POLLGATE_DB_PORT", "MySQL port", False),
    "db_name": ("POLLGATE_DB_NAME", "MySQL database name", False),
    "db_user": ("POLLGATE_DB_USER", "MySQL user", False),
    "db_password": ("POLLGATE_DB_PASSWORD", "MySQL password", True),
    "site_url": ("POLLGATE_SITE_URL", "Public URL of the gateway (https://example.com/api)", False),
    "admin_email": ("POLLGATE_ADMIN_EMAIL", "First administrator's email", False),
    "admin_password": ("POLLGATE_ADMIN_PASSWORD", "Administrator's password (8+ characters)", True),
}


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="install.py", description=__doc__.splitlines()[0])
    parser.add_argument("command", nargs="?", default="install", choices=("install", "check", "upgrade"))
    parser.add_argument("--instance", default=os.environ.get("POLLGATE_INSTANCE_PATH", os.path.join(ROOT, "instance")),
                        help="folder for the config and the SQLite file (default: ./instance)")
    parser.add_argument("--sqlite", action="store_true", default=os.environ.get("POLLGATE_DB") == "sqlite",
                        help="use SQLite in the instance folder instead of MySQL")
    parser.add_argument("--database-url", default=os.environ.get("POLLGATE_DATABASE_URL"),
                        help="a full SQLAlchemy URL instead of the --db-* parts")
    parser.add_argument("-y", "--non-interactive", action="store_true", help="never prompt; fail if something is missing")
    for name, (env, text, _) in FIELDS.items():
        default = os.environ.get(env, "3306" if name == "db_port" else None)
        parser.add_argument("--" + name.replace("_", "-"), dest=name, default=default, help=f"{text} (env {env})")
    return parser.parse_args(argv)


def ask(args: argparse.Namespace, name: str) -> str:
    """Return a value from flags or the environment, else prompt for it (or fail when we may not)."""
    value = getattr(args, name)
    if value:
        return value
    env, text, secret = FIELDS[name]
    if args.non_interactive or not sys.stdin.isatty():
        raise installer.InstallError(f"{text} is missing: pass --{name.replace('_', '-')} or set {env}.")
    value = (getpass.getpass if secret else input)(f"{text}: ").strip()
    setattr(args, name, value)
    return value


def database_url(args: argparse.Namespace) -> str:
    if args.database_url:
        return args.database_url
    if args.sqlite:
        return installer.sqlite_url(args.instance)
    return installer.mysql_url(ask(args, "db_host"), args.db_port or "3306", ask(args, "db_name"),
                               ask(args, "db_user"), ask(args, "db_password"))


def report(checks: list[installer.Check]) -> bool:
    for check in checks:
        mark = "ok  " if check.ok else ("FAIL" if check.fatal else "warn")
        print(f"  [{mark}] {check.name}: {check.detail}")
    return all(c.ok or not c.fatal for c in checks)


def main(argv: list[str]) -> int:
    args = parse(argv)
    try:
        if args.command == "upgrade":
            return upgrade(args)
        print("This server:")
        ok = report(installer.environment_checks(args.instance))
        if args.command == "check" and installer.installed(args.instance):
            print(f"Installed: {installer.config_path(args.instance)} exists.")
            return 0 if ok else 1
        if args.command == "install" and installer.installed(args.instance):
            print(f"Pollgate is already installed ({installer.config_path(args.instance)} exists); nothing to do.\n"
                  "After uploading a new version, run: python install.py upgrade")
            return 0
        url = database_url(args)
        print("The database:")
        ok = report(installer.database_checks(url)) and ok
        if args.command == "check":
            return 0 if ok else 1
        if not ok:
            raise installer.InstallError("fix the problems above, then run install.py again")
        answers = installer.Answers(url, ask(args, "site_url"), ask(args, "admin_email"), ask(args, "admin_password"))
        installer.install(args.instance, answers)
    except installer.InstallError as err:
        print(f"install.py: {err}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, EOFError):
        print("\ninstall.py: stopped; nothing was saved. Run it again to continue.", file=sys.stderr)
        return 130
    print(f"Installed. Settings written to {installer.config_path(args.instance)} (mode 0600).")
    print("Add these cron jobs (cPanel > Cron Jobs):")
    for line, what in installer.cron_lines():
        print(f"  {line}\n      # {what}")
    print("Then restart the app (touch tmp/restart.txt), sign in, create a worker token and start a worker.")
    return 0


def upgrade(args: argparse.Namespace) -> int:
    """Apply pending migrations to the installed site's database."""
    if not installer.installed(args.instance) and not os.environ.get("DATABASE_URL"):
        raise installer.InstallError(f"not installed yet ({installer.config_path(args.instance)} is missing); "
                                     "run: python install.py")
    from webapp import create_app, migrate

    app = create_app(instance_path=args.instance)
    with app.app_context():
        try:
            pending = migrate.pending()
        except RuntimeError as err:  # a database newer than this code: say so, plainly
            raise installer.InstallError(str(err)) from None
        if not pending:
            print("The database is up to date.")
            return 0
        print(f"Applying {len(pending)} migration(s): {', '.join(pending)}")
        try:
            migrate.upgrade()
        except RuntimeError as err:
            raise installer.InstallError(str(err)) from None
    print("Done. Restart the app: touch tmp/restart.txt")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
