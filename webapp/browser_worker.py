"""The browser worker's side of the gateway: the userscript download and the local-endpoint page."""
from __future__ import annotations

import re

from flask import Blueprint, Response, abort, render_template, request
from flask_login import current_user, login_required

from . import userscript
from .accounts import authenticate_worker
from .errors import ApiError
from .workers import gateway_url

bp = Blueprint("browser_worker", __name__)


@bp.get("/userscript/pollgate.user.js")
def script():
    """Serve the userscript for this gateway, without a token (also its update URL)."""
    return Response(userscript.build(gateway_url()), mimetype="text/javascript",
                    headers={"Cache-Control": "no-cache"})


@bp.post("/workers/userscript")
@login_required
def download():
    """Send a userscript set up with one of the user's worker tokens, as a file to install."""
    token = request.form.get("token", "")
    try:
        worker = authenticate_worker(f"Bearer {token}")
    except ApiError:
        abort(404)
    if worker.user_id != current_user.id:
        abort(404)
    name = re.sub(r"[^A-Za-z0-9_-]+", "-", worker.name or "worker").strip("-") or "worker"
    return Response(userscript.build(gateway_url(), token), mimetype="text/javascript",
                    headers={"Content-Disposition": f'attachment; filename="pollgate-{name}.user.js"',
                             "Cache-Control": "no-store"})


@bp.get("/browser-worker")
def local_page():
    """A page for the userscript's local-endpoint adapter to run in: this tab becomes a worker."""
    return render_template("browser_worker.html", gateway=gateway_url())
