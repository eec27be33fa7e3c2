"""Sign in, sign up, sign out and change password, with throttled sign-in attempts."""
from __future__ import annotations

import datetime as dt

from flask import Blueprint, current_app, flash, redirect, render_template, request, url_for
from flask_login import current_user, login_required, login_user, logout_user
from sqlalchemy import select, update

from . import accounts, events, settings
from .db import db
from .extensions import login_manager
from .models import User

bp = Blueprint("auth", __name__)


@login_manager.user_loader
def load_user(session_id: str):
    """Load the signed-in user for flask-login, if the session's generation is still current."""
    user_id, _, generation = session_id.partition(":")
    if not user_id.isdigit() or not generation.isdigit():
        return None  # a cookie from before session generations, or forged: sign in again
    with db.read() as s:
        user = s.get(User, int(user_id))
    return user if user is not None and user.session_gen == int(generation) else None


@bp.route("/login", methods=["GET", "POST"])
def login():
    """Show the sign-in form, or sign the user in."""
    if current_user.is_authenticated:
        return redirect(url_for("dashboard.overview"))
    if request.method == "GET":
        return render_template("login.html", signup=settings.get("public_signup"))
    email = request.form.get("email", "").strip().lower()
    password = request.form.get("password", "")
    window = dt.timedelta(seconds=current_app.config["SIGNIN_THROTTLE_WINDOW"])
    if events.count_recent("signin_failed", email, window) >= current_app.config["SIGNIN_MAX_FAILURES"]:
        minutes = int(window.total_seconds() // 60)
        flash(f"Too many failed sign-ins for this account. Try again in {minutes} minutes.", "error")
        return render_template("login.html", email=email), 429
    user = _check_password(email, password)
    if user is None:
        # Name the email, never the password tried: it may be the user's other password.
        events.record("signin_failed", email, f"failed sign-in from {request.remote_addr}")
        flash("Wrong email or password.", "error")
        return render_template("login.html", email=email), 401
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
    with db.read() as s:
        user = s.scalar(select(User).where(User.email == email))
    if user is None or not accounts.password_matches(user.password_hash, password):
        return None
    return user


def _safe_next(target: str | None) -> str | None:
    """Follow ?next= only to a path on this site, never to another host."""
    if target and target.startswith("/") and not target.startswith("//") and "\\" not in target:
        return target
    return None


@bp.post("/logout")
def logout():
    """Sign the user out."""
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
    if not accounts.password_matches(current_user.password_hash, current):
        flash("Your current password is not right.", "error")
        return render_template("password.html"), 400
    if accounts.password_problem(new) or new != request.form.get("confirm", ""):
        flash(f"The new password needs at least {accounts.MIN_PASSWORD} characters, typed the same twice.", "error")
        return render_template("password.html"), 400
    with db.begin() as s:
        s.execute(update(User).where(User.id == current_user.id).values(password_hash=accounts.hash_password(new)))
    flash("Your password is changed.", "info")
    return redirect(url_for("dashboard.overview"))
