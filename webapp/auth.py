"""Sign in, sign up, sign out and change password, with throttled sign-in attempts."""
from __future__ import annotations

import math
import secrets
from urllib.parse import urlsplit

from flask import Blueprint, flash, redirect, render_template, request, url_for
from flask_login import current_user, login_required, login_user, logout_user
from sqlalchemy import select, update
from sqlalchemy.orm import Session, defer
from sqlalchemy.orm.attributes import set_committed_value

from . import accounts, events, settings, signin
from .db import db
from .extensions import login_manager
from .models import User

bp = Blueprint("auth", __name__)
# Checked when the email is unknown, so that answer costs one hash check like a wrong
# password and its timing does not tell which accounts exist. Made at import, with the
# same hasher: made lazily, the first unknown email in each process would cost two.
_DUMMY_HASH = accounts.hash_password(secrets.token_urlsafe(16))


@login_manager.user_loader
def load_user(session_id: str):
    """Load the signed-in user for flask-login, if the session's generation is still current."""
    user_id, _, generation = session_id.partition(":")
    if not user_id.isdigit() or not generation.isdigit():
        return None  # a cookie from before session generations, or forged: sign in again
    with db.read() as s:
        user = _find_user(s, User.id == int(user_id))
    return user if user is not None and user.session_gen == int(generation) else None


def _find_user(s: Session, *where) -> User | None:
    """Load a user; before the upgrade that adds session generations, as generation 0."""
    if signin.ready():
        return s.scalar(select(User).where(*where))
    # An administrator signs in between an upload and its upgrade to run it.
    user = s.scalar(select(User).options(defer(User.session_gen)).where(*where))
    if user is not None:
        set_committed_value(user, "session_gen", 0)  # the column's default once it exists
    return user


@bp.route("/login", methods=["GET", "POST"])
def login():
    """Show the sign-in form, or sign the user in."""
    if current_user.is_authenticated:
        return redirect(url_for("dashboard.overview"))
    if request.method == "GET":
        return render_template("login.html", signup=settings.get("public_signup"))
    email = request.form.get("email", "").strip().lower()
    password = request.form.get("password", "")
    # remote_addr is the forwarded client only where the operator configured trusted proxies.
    wait = signin.reserve(email, request.remote_addr)
    if wait is not None:
        return _throttled("login.html", wait, email=email)
    user = _check_password(email, password)
    if user is None:
        # Name the email, never the password tried: it may be the user's other password.
        events.record("signin_failed", email, f"failed sign-in from {request.remote_addr}")
        flash("Wrong email or password.", "error")
        return render_template("login.html", email=email), 401
    signin.release(email, request.remote_addr)
    login_user(user)
    return redirect(_safe_next(request.args.get("next")) or url_for("dashboard.overview"))


@bp.route("/signup", methods=["GET", "POST"])
def signup():
    """Let someone make an account: anyone when the admin allows it, else with an invite."""
    if current_user.is_authenticated:
        return redirect(url_for("dashboard.overview"))
    invite_secret = request.values.get("invite", "").strip()
    invite = accounts.check_invite(invite_secret) if invite_secret else None
    if invite is None and not settings.get("public_signup"):
        message = ("This invite is used up or expired; ask for a new one." if invite_secret
                   else "Sign-up is by invitation only on this site. Ask an administrator for an invite.")
        return render_template("signup.html", closed=message), 403
    if request.method == "GET":
        return render_template("signup.html", invite=invite_secret, email=invite.email if invite else "")
    email = request.form.get("email", "")
    password = request.form.get("password", "")
    if password != request.form.get("confirm", ""):
        flash("The two passwords differ; type the same one twice.", "error")
        return render_template("signup.html", invite=invite_secret, email=email), 400
    try:
        user = accounts.sign_up(email, password, invite_secret or None)
    except ValueError as err:
        flash(f"Could not create the account: {err}.", "error")
        return render_template("signup.html", invite=invite_secret, email=email), 400
    events.record("signup", user.email, "signed up with an invite" if invite else "signed up", user.id)
    login_user(user)
    flash("Welcome to Pollgate. Create an API key and a worker token to get started.", "info")
    return redirect(url_for("dashboard.overview"))


def _check_password(email: str, password: str):
    """Return the user this email and password sign in, or None; unknown emails cost the same."""
    with db.read() as s:
        user = _find_user(s, User.email == email)
    matches = accounts.password_matches(user.password_hash if user is not None else _DUMMY_HASH, password)
    return user if user is not None and matches else None


def _throttled(template: str, wait: float, **context):
    """Answer an attempt over the limit with 429 and when to try again, checking no password."""
    when = f"{math.ceil(wait / 60)} minutes" if wait > 90 else f"{math.ceil(wait)} seconds"
    flash(f"Too many failed sign-ins from your address. Try again in {when}.", "error")
    return render_template(template, **context), 429, {"Retry-After": str(math.ceil(wait))}


def _safe_next(target: str | None) -> str | None:
    """Follow ?next= only to a path on this site, never to another host."""
    if not target or not target.startswith("/") or target.startswith("//"):
        return None
    # Browsers drop tabs and newlines from URLs ("/\t/evil" becomes "//evil") and read a
    # backslash as a slash; a control character in the Location header is a 500.
    if any(c.isspace() or not c.isprintable() or c == "\\" for c in target):
        return None
    parts = urlsplit(target)
    return None if parts.scheme or parts.netloc else target


def end_sessions(user_id: int) -> None:
    """Bump the user's session generation, so every session cookie issued so far stops working."""
    with db.begin() as s:
        s.execute(update(User).where(User.id == user_id).values(session_gen=User.session_gen + 1))


@bp.post("/logout")
def logout():
    """Sign the user out, ending every session of the account, a copied cookie's too."""
    if current_user.is_authenticated and signin.ready():
        end_sessions(current_user.id)
    logout_user()
    flash("You are signed out.", "info")
    return redirect(url_for("auth.login"))


@bp.route("/account/password", methods=["GET", "POST"])
@login_required
def change_password():
    """Let a signed-in user change their password."""
    if request.method == "GET":
        return render_template("password.html")
    current = request.form.get("current", "")
    new = request.form.get("new", "")
    # A stolen session must not become a way to guess the password: same throttle as sign-in.
    wait = signin.reserve(current_user.email, request.remote_addr)
    if wait is not None:
        return _throttled("password.html", wait)
    if not accounts.password_matches(current_user.password_hash, current):
        flash("Your current password is not right.", "error")
        return render_template("password.html"), 400
    signin.release(current_user.email, request.remote_addr)
    if accounts.password_problem(new) or new != request.form.get("confirm", ""):
        flash(f"The new password needs at least {accounts.MIN_PASSWORD} characters, typed the same twice.", "error")
        return render_template("password.html"), 400
    new_hash = accounts.hash_password(new)  # slow: outside the transaction that locks the user
    with db.begin() as s:
        # The new generation ends every other session; this one is signed in again with it.
        s.execute(update(User).where(User.id == current_user.id)
                  .values(password_hash=new_hash, session_gen=User.session_gen + 1))
        user = s.get(User, current_user.id)
    login_user(user)
    flash("Your password is changed. Your other sessions are signed out.", "info")
    return redirect(url_for("dashboard.overview"))
