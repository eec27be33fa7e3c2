"""Admin pages: the queue, every worker, users, tiers and invites, prices and aliases, settings, the log."""
from __future__ import annotations

import datetime as dt
from functools import wraps

from flask import Blueprint, abort, flash, redirect, render_template, request, url_for
from flask_login import current_user, login_required
from sqlalchemy import func, select, update

from . import accounts, budget, cors, events, jobs, metrics, migrate, settings
from .db import db
from .models import WINDOWS, Event, Invite, Job, ModelAlias, ModelPrice, Tier, User, Worker, utcnow
from .workers import public_url, worker_state

bp = Blueprint("admin", __name__, url_prefix="/admin")

LIMIT_FIELDS = [f"{kind}_per_{window}" for kind in ("requests", "tokens") for window in WINDOWS]
# Rows per page of the worker and user lists, so no account can make a page megabytes long.
PAGE = 50


def _page() -> tuple[int, int]:
    """Return the page asked for (from 1) and the rows to skip before it."""
    page = request.args.get("page", 1, type=int)
    page = page if page and 1 <= page <= 100_000 else 1
    return page, (page - 1) * PAGE


def _pages(page: int, total: int) -> dict:
    """Describe the page links: this page, the last one, and whether there are others."""
    return {"page": page, "last": max(1, -(-total // PAGE)), "total": total}


def admin_required(view):
    """Let only administrators in; everyone else gets 403."""

    @wraps(view)
    @login_required
    def wrapped(*args, **kwargs):
        if not current_user.is_admin:
            abort(403)
        return view(*args, **kwargs)

    return wrapped


@bp.get("/")
@admin_required
def queue():
    """Show the queue per model, running jobs and every worker's health."""
    now = utcnow()
    with db.read() as s:
        depth = s.execute(
            select(Job.model, Job.state, func.count(), func.min(Job.created_at))
            .where(Job.state.in_(("queued", "running")))
            .group_by(Job.model, Job.state)
        ).all()
        running = list(s.scalars(select(Job).where(Job.state.in_(("queued", "running"))).order_by(Job.id).limit(200)))
        page, offset = _page()
        # Revoked workers serve nothing; the newest-seen come first, a page at a time.
        live = select(Worker).where(Worker.revoked_at.is_(None))
        workers = list(s.scalars(live.order_by(Worker.last_seen_at.desc(), Worker.id.desc()).offset(offset).limit(PAGE)))
        total = s.scalar(select(func.count()).select_from(live.subquery()))
        people = {j.user_id for j in running} | {w.user_id for w in workers} | {w.shared_by for w in workers}
        owners = dict(s.execute(select(User.id, User.email).where(User.id.in_(people))).all())
        busy = dict(s.execute(select(Job.worker_id, func.count()).where(Job.state == "running").group_by(Job.worker_id)).all())
    models: dict[str, dict] = {}
    for model, state, count, oldest in depth:
        entry = models.setdefault(model, {"queued": 0, "running": 0, "oldest": None})
        entry[state] = count
        if state == "queued":
            entry["oldest"] = round((now - oldest).total_seconds(), 1)
    states = {w.id: worker_state(w, busy.get(w.id, 0)) for w in workers}
    return render_template("admin/queue.html", models=models, jobs=running, workers=workers, states=states,
                           owners=owners, now=now, held=budget.in_use(), kinds=budget.KINDS,
                           pages=_pages(page, total))


@bp.post("/jobs/<int:job_id>/cancel")
@admin_required
def cancel(job_id: int):
    """Cancel a queued or running job; its client gets an error and its worker is told."""
    if jobs.cancel_job(job_id, "cancelled", "An administrator cancelled the request."):
        events.record("job_cancelled", str(job_id), f"cancelled by {current_user.email}", current_user.id)
        flash(f"Job {job_id} is cancelled.", "info")
    else:
        flash(f"Job {job_id} had already ended.", "error")
    return redirect(url_for("admin.queue"))


@bp.post("/workers/<int:worker_id>/shared")
@admin_required
def share_worker(worker_id: int):
    """Let a worker serve every user's jobs, or only its owner's again."""
    shared = request.form.get("shared") == "1"
    with db.begin() as s:
        # Who trusted a worker with everyone's prompts stays on record with it.
        who = {"shared_by": current_user.id, "shared_at": utcnow()} if shared else {"shared_by": None, "shared_at": None}
        if not s.execute(update(Worker).where(Worker.id == worker_id).values(shared=shared, **who)).rowcount:
            abort(404)
    events.record("worker_shared" if shared else "worker_unshared", str(worker_id),
                  f"{'shared' if shared else 'unshared'} by {current_user.email}", current_user.id)
    flash("The worker now serves everyone's jobs: it reads their prompts and answers, and the token counts it "
          "reports are billed to them." if shared else "The worker now serves only its owner.", "info")
    return redirect(url_for("admin.queue"))


@bp.get("/users")
@admin_required
def users(invite_link: str = ""):
    """List users with their tier, the tiers with their limits, and open invites."""
    page, offset = _page()
    with db.read() as s:
        found = list(s.scalars(select(User).order_by(User.id).offset(offset).limit(PAGE)))
        total = s.scalar(select(func.count()).select_from(User))
        tiers = list(s.scalars(select(Tier).order_by(Tier.id)))
        invites = list(s.scalars(select(Invite).where(Invite.used_at.is_(None), Invite.expires_at > utcnow())
                                 .order_by(Invite.id.desc()).limit(50)))
    return render_template("admin/users.html", users=found, tiers=tiers, fields=LIMIT_FIELDS, invites=invites,
                           invite_link=invite_link, pages=_pages(page, total))


@bp.post("/users")
@admin_required
def create_user():
    """Create a user from the admin page."""
    try:
        accounts.create_user(request.form.get("email", ""), request.form.get("password", ""),
                             is_admin=request.form.get("admin") == "1", tier=request.form.get("tier") or None)
    except ValueError as err:
        flash(f"Could not create the user: {err}.", "error")
        return redirect(url_for("admin.users"))
    flash("The user is created.", "info")
    return redirect(url_for("admin.users"))


@bp.post("/users/<int:user_id>")
@admin_required
def edit_user(user_id: int):
    """Change a user's tier, admin flag and priority adjustment."""
    tier_id = request.form.get("tier_id", type=int)
    priority = request.form.get("priority", type=int)
    if priority is None or not -100 <= priority <= 100:
        flash("Priority must be a whole number from -100 to 100.", "error")
        return redirect(url_for("admin.users"))
    if user_id == current_user.id and request.form.get("admin") != "1":
        flash("You cannot take away your own admin rights.", "error")
        return redirect(url_for("admin.users"))
    with db.begin() as s:
        if tier_id is not None and s.get(Tier, tier_id) is None:
            abort(400)
        done = s.execute(update(User).where(User.id == user_id).values(
            tier_id=tier_id, is_admin=request.form.get("admin") == "1", priority=priority)).rowcount
    if not done:
        abort(404)
    flash("The user is updated.", "info")
    return redirect(url_for("admin.users"))


@bp.post("/tiers/<int:tier_id>")
@admin_required
def edit_tier(tier_id: int):
    """Change a tier's limits, priority and concurrency cap (empty means no cap)."""
    values: dict = {}
    for field in [*LIMIT_FIELDS, "max_concurrent"]:
        raw = request.form.get(field, "").strip()
        if raw and (not raw.isdigit() or int(raw) < 1):
            flash(f"{field.replace('_', ' ')} must be a positive whole number, or empty for no cap.", "error")
            return redirect(url_for("admin.users"))
        values[field] = int(raw) if raw else None
    priority = request.form.get("priority", type=int)
    if priority is None or not -100 <= priority <= 100:
        flash("Priority must be a whole number from -100 to 100.", "error")
        return redirect(url_for("admin.users"))
    with db.begin() as s:
        if not s.execute(update(Tier).where(Tier.id == tier_id).values(priority=priority, **values)).rowcount:
            abort(404)
    flash("The tier is updated; its limits apply from the next request.", "info")
    return redirect(url_for("admin.users"))


@bp.route("/prices", methods=["GET", "POST"])
@admin_required
def prices():
    """List model prices and set one (dollars per million tokens)."""
    if request.method == "POST":
        model = request.form.get("model", "").strip()
        try:
            prompt = round(float(request.form.get("prompt", "")) * 1_000_000)
            completion = round(float(request.form.get("completion", "")) * 1_000_000)
        except ValueError:
            prompt = completion = -1
        if not model or len(model) > 191 or prompt < 0 or completion < 0:
            flash("Give a model id and two prices of 0 or more, in dollars per million tokens.", "error")
            return redirect(url_for("admin.prices"))
        with db.begin() as s:
            price = s.scalar(select(ModelPrice).where(ModelPrice.model == model)) or ModelPrice(model=model)
            price.prompt_micros_per_m, price.completion_micros_per_m = prompt, completion
            s.add(price)
        flash(f"The price of {model} is set; it applies to requests that end from now on.", "info")
        return redirect(url_for("admin.prices"))
    with db.read() as s:
        found = list(s.scalars(select(ModelPrice).order_by(ModelPrice.model)))
        aliases = list(s.scalars(select(ModelAlias).order_by(ModelAlias.alias)))
    return render_template("admin/prices.html", prices=found, aliases=aliases)


@bp.post("/aliases")
@admin_required
def set_alias():
    """Map a public model name to a model workers advertise, or drop the mapping."""
    alias = request.form.get("alias", "").strip()
    target = request.form.get("target", "").strip()
    if not alias or len(alias) > 191 or len(target) > 191 or alias == target:
        flash("Give a public name and the different model id it stands for (up to 191 characters each).", "error")
        return redirect(url_for("admin.prices"))
    with db.begin() as s:
        found = s.scalar(select(ModelAlias).where(ModelAlias.alias == alias))
        if not target:
            if found is not None:
                s.delete(found)
        elif s.scalar(select(ModelAlias.id).where(ModelAlias.alias == target)) is not None:
            flash(f"{target} is itself an alias; point {alias} at the model it stands for.", "error")
            return redirect(url_for("admin.prices"))
        else:
            found = found or ModelAlias(alias=alias)
            found.target = target
            s.add(found)
    settings.forget()
    flash(f"{alias} now stands for {target}." if target else f"The alias {alias} is gone.", "info")
    return redirect(url_for("admin.prices"))


# Whole-number settings: (form field, lowest, highest, what to say when out of range).
NUMBERS = (
    ("retention_hours", 0, 24 * 365, "Retention must be a whole number of hours from 0 to 8760."),
    ("max_long_polls", 0, 1000, "Long-polls held at once must be a whole number from 0 (no cap) to 1000."),
    ("max_streams", 0, 1000, "Open API requests must be a whole number from 0 (no cap) to 1000."),
    ("max_api_keys_per_user", 0, 10_000, "API keys per user must be a whole number from 0 (no cap) to 10000."),
    ("max_worker_tokens_per_user", 0, 10_000,
     "Worker tokens per user must be a whole number from 0 (no cap) to 10000."),
    ("max_answer_mb", 1, 1024, "The answer size cap must be a whole number of megabytes from 1 to 1024."),
    ("max_choices", 1, 128, "Choices per chat request must be a whole number from 1 to 128."),
)


@bp.route("/settings", methods=["GET", "POST"])
@admin_required
def site_settings():
    """Show and change the site's settings: sign-up, retention, the held-request budget and the caps."""
    if request.method == "POST":
        values: dict = {"public_signup": request.form.get("public_signup") == "1"}
        for field, low, high, message in NUMBERS:
            if field not in request.form:
                continue  # a form from before this setting existed keeps its value
            raw = request.form[field].strip()
            if not raw.isdigit() or not low <= int(raw) <= high:
                flash(message, "error")
                return redirect(url_for("admin.site_settings"))
            values[field] = int(raw)
        if "cors_origins" in request.form:
            origins = {o: cors.normalise(o) for o in request.form["cors_origins"].replace(",", " ").split()}
            bad = [o for o, origin in origins.items() if origin is None]
            if bad:
                flash(f"{bad[0]} is not an origin: write it as https://chat.example.com (a scheme, a host, "
                      "a port if not the usual one, no path), or * for any site.", "error")
                return redirect(url_for("admin.site_settings"))
            values["cors_origins"] = sorted(set(origins.values()))
        settings.save(values)
        events.record("settings_changed", current_user.email, "site settings changed", current_user.id)
        flash("The settings are saved.", "info")
        return redirect(url_for("admin.site_settings"))
    return _settings_page()


def _settings_page(new_metrics_token: str = ""):
    """Render the settings page, with a metrics token just made if there is one."""
    return render_template("admin/settings.html", settings=settings.all_settings(), held=budget.in_use(),
                           metrics_url=public_url("metrics.scrape"), new_metrics_token=new_metrics_token)


@bp.post("/settings/metrics-token")
@admin_required
def metrics_token():
    """Make a new token for Prometheus and show it this once, or revoke the one there is."""
    if request.form.get("revoke") == "1":
        metrics.revoke_token()
        events.record("metrics_token_revoked", current_user.email, "metrics token revoked; /metrics is off",
                      current_user.id)
        flash("The metrics token is revoked: /metrics answers 404 until you make another.", "info")
        return redirect(url_for("admin.site_settings"))
    secret = metrics.create_token()
    events.record("metrics_token_created", current_user.email, f"metrics token {secret[:12]} made, replacing any other",
                  current_user.id)
    # Rendered here rather than flashed: a flash travels in the session cookie, which is signed, not secret.
    return _settings_page(new_metrics_token=secret)


@bp.route("/upgrade", methods=["GET", "POST"])
@admin_required
def upgrade():
    """List migrations a newly uploaded version brings, and apply them with one click."""
    if request.method == "POST":
        try:
            migrate.upgrade()
        except RuntimeError as err:
            flash(f"The migrations did not run: {err}", "error")
            return redirect(url_for("admin.upgrade"))
        events.record("upgraded", current_user.email, "database migrations applied", current_user.id)
        flash("The database is up to date.", "info")
        return redirect(url_for("admin.upgrade"))
    # Administrators are led here by migrate.hold_until_upgraded while the schema differs.
    state = migrate.schema_state()
    return render_template("admin/upgrade.html", state=state, problem=migrate.describe(state))


@bp.post("/invites")
@admin_required
def invite():
    """Make a one-time sign-up link, optionally for one address and one tier."""
    tier_id = request.form.get("tier_id", type=int)
    email = request.form.get("email", "").strip().lower()
    if email and accounts.email_problem(email):
        flash("That is not an email address; leave it empty to let anyone use the invite.", "error")
        return redirect(url_for("admin.users"))
    with db.read() as s:
        if tier_id is not None and s.get(Tier, tier_id) is None:
            abort(400)
    secret = accounts.create_invite(current_user.id, email, tier_id)
    link = public_url("auth.signup", invite=secret)
    return users(invite_link=link)


@bp.get("/events")
@admin_required
def system_log():
    """Show the newest notable events, optionally of one kind."""
    kind = request.args.get("kind", "")
    query = select(Event).order_by(Event.id.desc()).limit(200)
    if kind:
        query = query.where(Event.kind == kind)
    with db.read() as s:
        found = list(s.scalars(query))
        kinds = list(s.scalars(select(Event.kind).distinct().order_by(Event.kind)))
        day = s.scalar(select(func.count()).select_from(Event).where(Event.created_at >= utcnow() - dt.timedelta(days=1)))
    return render_template("admin/events.html", events=found, kinds=kinds, kind=kind, day=day)
