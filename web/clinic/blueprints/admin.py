"""Administration (admin role only): users, DICOM connections, models, audit log."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from flask import Blueprint, abort, current_app, flash, g, redirect, render_template, request, url_for
from flask_babel import gettext as _

from appliance import accounts, audit, login_throttle
from web.core.auth import account_error_words
from web.core.security import database, roles_required

from .. import engines_info, queries
from .study import destination_details

bp = Blueprint("admin", __name__, url_prefix="/admin")
AUDIT_PAGE = 50


@bp.before_request
@roles_required("admin")
def _admins_only() -> None:
    """Every admin route, including ones added later, is admin-only."""


@bp.get("/")
def index() -> Any:
    return redirect(url_for("admin.users"))


@bp.get("/users")
def users() -> Any:
    db = database()
    rows = accounts.list_users(db)
    return render_template("admin/users.html", users=rows, roles=accounts.ROLES, min_password=accounts.MIN_PASSWORD,
                           locks={u.id: login_throttle.lock_state(db, u.username) for u in rows})


@bp.post("/users")
def add_user() -> Any:
    db = database()
    form = request.form
    try:
        user = accounts.create_user(db, form.get("username", ""), form.get("password", ""), form.get("role", ""),
                                    form.get("language", "en"))
        if form.get("pin"):
            accounts.set_pin(db, user.id, form["pin"])
    except accounts.AccountError as exc:
        flash(account_error_words(exc), "error")
        return redirect(url_for("admin.users"))
    audit.record(db, g.user.username, "user_add", detail={"user": user.username, "role": user.role})
    flash(_("User %(name)s added.", name=user.username), "ok")
    return redirect(url_for("admin.users"))


@bp.post("/users/<int:user_id>")
def update_user(user_id: int) -> Any:
    db = database()
    target = accounts.get_user(db, user_id)
    if target is None:
        abort(404)
    action = request.form.get("action", "")
    value = request.form.get("value", "")
    try:
        if action == "role":
            accounts.set_role(db, user_id, value)
        elif action == "disable":
            accounts.set_disabled(db, user_id, True)
        elif action == "enable":
            accounts.set_disabled(db, user_id, False)
        elif action == "password":
            accounts.set_password(db, user_id, value)
        elif action == "pin":
            accounts.set_pin(db, user_id, value or None)
        elif action == "unlock":
            login_throttle.unlock(db, target.username)
        else:
            abort(400)
    except accounts.AccountError as exc:  # also the last active administrator's role and state
        flash(account_error_words(exc), "error")
        return redirect(url_for("admin.users"))
    # Never the secret itself in the audit trail.
    shown = value if action == "role" else ""
    audit.record(db, g.user.username, "user_update", detail={"user": target.username, "action": action, "value": shown})
    flash(_("User %(name)s updated.", name=target.username), "ok")
    return redirect(url_for("admin.users"))


@bp.get("/connections")
def connections() -> Any:
    config = current_app.config["APPLIANCE"]
    return render_template("admin/connections.html", dicom=config.dicom, destinations=destination_details(),
                           sources=config.sources)


@bp.get("/models")
def models() -> Any:
    engines_dir = current_app.config["APPLIANCE"].analyze.engines_dir
    return render_template("admin/models.html", models=engines_info.installed(engines_dir), engines_dir=engines_dir)


@bp.get("/models/<model_id>/card")
def model_card(model_id: str) -> Any:
    engines_dir = Path(current_app.config["APPLIANCE"].analyze.engines_dir)
    models = engines_info.installed(engines_dir)
    if model_id not in models:
        abort(404)
    # The id comes from the directory listing above, so the path stays inside engines_dir.
    card = engines_dir / model_id / "MODEL_CARD.md"
    text = card.read_text(encoding="utf-8", errors="replace") if card.is_file() else ""
    return render_template("admin/model_card.html", model_id=model_id, info=models[model_id], text=text)


@bp.get("/audit")
def audit_log() -> Any:
    actor = request.args.get("user", "").strip()[:32]
    study_uid = request.args.get("study", "").strip()[:64]
    action = request.args.get("action", "")
    action = action if action in audit.ACTIONS else ""
    try:
        page = queries.page_number(request.args.get("page", ""))
    except ValueError:
        abort(400)
    rows, total = audit.entries(database(), actor, study_uid, action, AUDIT_PAGE, (page - 1) * AUDIT_PAGE)
    pages = max(1, -(-total // AUDIT_PAGE))
    if page > pages:  # past the end (an old link, a typed number): the last page
        page = pages
        rows, total = audit.entries(database(), actor, study_uid, action, AUDIT_PAGE, (page - 1) * AUDIT_PAGE)
    return render_template("admin/audit.html", rows=rows, total=total, page=page, pages=pages,
                           filters={"user": actor, "study": study_uid, "action": action}, actions=audit.ACTIONS)
