"""Sign-in (password or touchscreen PIN), sign-out, first-administrator set-up, own account.

Part of the core: the login gate (:mod:`.security`) sends every app's visitors here, and a
sign-in lands on the app's home page (``HOME_ENDPOINT``, set by :func:`web.core.init_core`).
"""
from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from flask import Blueprint, abort, current_app, flash, g, redirect, render_template, request, session, url_for
from flask_babel import gettext as _

from appliance import accounts, audit
from appliance.login_throttle import LockedError

from .i18n import LANGUAGES
from .security import database, end_session, start_session

bp = Blueprint("auth", __name__)


def _home() -> str:
    return url_for(current_app.config["HOME_ENDPOINT"])


def _safe_next(target: str) -> str:
    """Only local paths: an open redirect would let a link send users to a look-alike site."""
    parts = urlsplit(target or "")
    if parts.scheme or parts.netloc or not target.startswith("/") or target.startswith("//"):
        return _home()
    return target


def _wait_words(seconds: int) -> str:
    if seconds < 120:
        return _("%(n)d s", n=seconds)
    if seconds < 2 * 3600:
        return _("%(n)d min", n=-(-seconds // 60))
    if seconds < 2 * 86400:
        return _("%(n)d h", n=-(-seconds // 3600))
    return _("%(n)d d", n=-(-seconds // 86400))


def _locked_message(exc: LockedError) -> str:
    """Words for a sign-in limit.  They name the limit, never whether the user name exists."""
    if exc.scope == "pin":
        return _("PIN sign-in is blocked for this user name after too many wrong PINs. Sign in with your "
                 "password and set a new PIN, or ask an administrator to unlock it.")
    if exc.scope == "account":
        return _("Too many failed sign-ins for this user name from this device: locked for %(wait)s. An "
                 "administrator can unlock it.", wait=_wait_words(exc.retry_after))
    return _("Too many sign-in attempts from this device: locked for %(wait)s.", wait=_wait_words(exc.retry_after))


@bp.route("/login", methods=["GET", "POST"])
def login() -> Any:
    lang = request.args.get("lang")
    if lang in LANGUAGES:
        session["lang"] = lang  # the page's language before anyone signs in
    method = request.values.get("method", "password")
    if method not in ("password", "pin"):
        method = "password"
    reason = request.args.get("reason", "")
    error = ""
    status = 200
    headers: dict[str, str] = {}
    if request.method == "POST":
        db = database()
        username = request.form.get("username", "").strip()
        secret = request.form.get("pin" if method == "pin" else "password", "")
        try:
            user = accounts.authenticate(db, username, secret, method, client=request.remote_addr or "")
        except LockedError as exc:
            if exc.attempted:
                # Only a checked attempt is recorded: refusals are cheap for a flood to
                # produce and would bury the trail.
                audit.record(db, username[:32] or "-", "login_locked", detail={"method": method, "limit": exc.scope})
            error, status = _locked_message(exc), 429
            headers["Retry-After"] = str(exc.retry_after)
        else:
            if user is None:
                audit.record(db, username[:32] or "-", "login_failed", detail={"method": method})
                error = _("Wrong user name, password or PIN.") if method == "password" else \
                    _("Wrong user name or PIN (PIN sign-in is for staff and viewer accounts).")
                status = 401
            else:
                start_session(user)
                audit.record(db, user.username, "login", detail={"method": method})
                return redirect(_safe_next(request.form.get("next", "")))
    return render_template("auth/login.html", method=method, error=error, reason=reason,
                           next=request.values.get("next", "")), status, headers


@bp.post("/logout")
def logout() -> Any:
    audit.record(database(), g.user.username, "logout")
    end_session()  # the server-side record goes: a copy of the cookie no longer signs anyone in
    return redirect(url_for("auth.login", reason="signed_out"))


@bp.route("/setup", methods=["GET", "POST"])
def setup() -> Any:
    """Create the first administrator; exists only while there is no user at all.

    Open to the network only on a truly new box (no images, never a user); from the box's own
    screen (loopback) once it holds images; never after it has had users or its database was
    rebuilt (appliance.dbguard): then the administrator is created with the CLI, and this page
    answers 403 with the command.  Checked on POST as on GET.
    """
    from ipaddress import ip_address

    from appliance.dbguard import first_admin_setup

    db = database()
    if accounts.user_count(db) > 0:
        abort(404)
    state = first_admin_setup(db)
    try:
        client = ip_address(request.remote_addr or "")
    except ValueError:
        client = None
    mapped = getattr(client, "ipv4_mapped", None)  # ::ffff:127.0.0.1 on a dual-stack socket
    local = client is not None and (client.is_loopback or (mapped is not None and mapped.is_loopback))
    if state == "closed" or (state == "local" and not local):
        return render_template("auth/setup.html", closed=state, min_password=accounts.MIN_PASSWORD), 403
    error = ""
    if request.method == "POST":
        password = request.form.get("password", "")
        if password != request.form.get("confirm", ""):
            error = _("The two passwords differ.")
        else:
            language = request.form.get("language", "en")
            try:
                user = accounts.create_user(db, request.form.get("username", ""), password, "admin",
                                            language if language in LANGUAGES else "en", only_if_first=True)
            except accounts.AccountError as exc:
                error = account_error_words(exc)
            else:
                audit.record(db, user.username, "setup_admin")
                start_session(user)
                return redirect(_home())
    return render_template("auth/setup.html", error=error, min_password=accounts.MIN_PASSWORD), 400 if error else 200


def account_error_words(exc: accounts.AccountError) -> str:
    """An account refusal in the user's language (the exception's message is English, for the CLI)."""
    if exc.code == "name_taken":
        return _("That user name is already taken.")
    if exc.code == "bad_name":
        return _("User names are 1-32 letters, digits, '.', '_' or '-'.")
    if exc.code == "short_password":
        return _("Passwords need at least %(n)d characters.", n=accounts.MIN_PASSWORD)
    if exc.code == "bad_pin":
        return _("A PIN is %(a)d to %(b)d digits.", a=accounts.PIN_LENGTH[0], b=accounts.PIN_LENGTH[1])
    if exc.code == "admin_pin":
        return _("Administrators sign in with their password only.")
    if exc.code == "last_admin":
        return _("The last active administrator cannot be disabled or demoted.")
    return _("The change was refused.")


@bp.route("/account", methods=["GET", "POST"])
def account() -> Any:
    """The signed-in user's language, password and PIN."""
    db = database()
    user = g.user
    if request.method == "POST":
        action = request.form.get("action")
        try:
            if action == "language":
                accounts.set_language(db, user.id, request.form.get("language", ""))
                audit.record(db, user.username, "language_change", detail={"language": request.form.get("language")})
            elif action in ("password", "pin"):
                if accounts.authenticate(db, user.username, request.form.get("current", ""),
                                         client=request.remote_addr or "") is None:
                    flash(_("Your current password is not correct."), "error")
                    return redirect(url_for("auth.account"))
                if action == "password":
                    accounts.set_password(db, user.id, request.form.get("new", ""))
                    audit.record(db, user.username, "password_change")
                else:
                    accounts.set_pin(db, user.id, request.form.get("new", "") or None)
                    audit.record(db, user.username, "pin_change")
                # Changing a secret ends all sessions of the user; keep this one alive.
                refreshed = accounts.get_user(db, user.id)
                if refreshed is not None:
                    start_session(refreshed)
            else:
                abort(400)
        except LockedError as exc:
            flash(_locked_message(exc), "error")
            return redirect(url_for("auth.account"))
        except accounts.AccountError as exc:
            flash(account_error_words(exc), "error")
            return redirect(url_for("auth.account"))
        flash(_("Saved."), "ok")
        return redirect(url_for("auth.account"))
    return render_template("auth/account.html", min_password=accounts.MIN_PASSWORD)
