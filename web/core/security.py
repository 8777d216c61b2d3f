"""Security applied to every request: login gate, first-run set-up, session expiry, CSRF, roles,
response headers, the session signing key, and the server-side session records.

A signed cookie alone cannot be taken back, so every session also has a row in
``web_sessions`` (keyed by the sha256 of a random id the cookie carries): signing out deletes
the row and a copy of the cookie replayed later finds nothing.  Ending *all* sessions of a user
(password reset, role change, disabling) still bumps ``users.session_version``; signing out does
not, so a user's other terminals stay signed in.

The gate is deny-by-default: a route is reachable without a login only if its endpoint is in
``PUBLIC_ENDPOINTS`` (the app's and the core's static files, ``/healthz``, sign-in and set-up),
whichever app it serves.  Adding a blueprint, or an app, therefore cannot accidentally publish
patient data.
"""
from __future__ import annotations

import functools
import hashlib
import hmac
import os
import secrets
import time
from pathlib import Path
from typing import Any, Callable, Optional, ParamSpec, TypeVar, cast
from urllib.parse import urlsplit

from flask import Flask, abort, current_app, g, jsonify, redirect, request, session, url_for
from flask.typing import ResponseReturnValue

from appliance import accounts, audit
from appliance.config import Config
from appliance.db import Database

F = TypeVar("F", bound=Callable[..., Any])
P = ParamSpec("P")
R = TypeVar("R")

STATIC_ENDPOINTS = {"static", "core.static"}
PUBLIC_ENDPOINTS = STATIC_ENDPOINTS | {"health.healthz", "auth.login", "auth.setup"}
UNSAFE_METHODS = {"POST", "PUT", "PATCH", "DELETE"}
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "X-CSRF-Token"
ABSOLUTE_SESSION_S = 12 * 3600  # even an active session is re-authenticated once per shift
SECRET_FILE = "secret_key"
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
       "connect-src 'self'; media-src 'self'; font-src 'self'; object-src 'none'; base-uri 'none'; "
       "form-action 'self'; frame-ancestors 'none'")


def load_secret_key(config: Config) -> str:
    """``[http] secret_key`` if set, else a key generated once into ``<data_dir>/secret_key``
    (mode 0600) and reused, so sessions survive a restart and no key ever ships in git."""
    configured = str(config.http.secret_key)
    if configured:
        return configured
    data_dir = Path(config.data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / SECRET_FILE
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        key = path.read_text().strip()
        if len(key) < 32:
            raise RuntimeError(f"{path} holds no usable key; delete it to generate a new one")
        return key
    key = secrets.token_hex(32)
    with os.fdopen(fd, "w") as fh:
        fh.write(key)
        fh.flush()
        os.fsync(fh.fileno())
    return key


def database() -> Database:
    """The app's database (``init_core`` opens it)."""
    return cast(Database, current_app.extensions["appliance_db"])  # Flask types extensions as Any


def csrf_token() -> str:
    token = session.get("csrf")
    if not token:
        token = session["csrf"] = secrets.token_urlsafe(32)
    return str(token)


def passive(view: F) -> F:
    """Mark a polling endpoint: it does not count as activity for the idle timeout, so a
    page left open on a shared screen still signs out."""
    setattr(view, "_passive", True)
    return view


def roles_required(*roles: str) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Refuse (403) signed-in users whose role is not in ``roles``."""
    def decorate(view: Callable[P, R]) -> Callable[P, R]:
        @functools.wraps(view)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            if g.user is None or g.user.role not in roles:
                abort(403, description="role")
            return view(*args, **kwargs)
        return wrapper
    return decorate


def can(action: str) -> bool:
    """Role checks used by templates to hide buttons the user may not press (the views check
    again; hiding is a courtesy, not the control)."""
    user = g.get("user")
    if user is None:
        return False
    allowed = {"review": ("admin", "staff"), "forward": ("admin", "staff"), "admin": ("admin",)}
    return user.role in allowed.get(action, ())


def wants_json() -> bool:
    return request.path.startswith("/api/") or request.accept_mimetypes.best == "application/json"


def _session_key(sid: str) -> str:
    # Stored hashed: a copy of the table does not yield cookies that would be accepted.
    return hashlib.sha256(sid.encode()).hexdigest()


def start_session(user: accounts.User) -> None:
    """A fresh session for a user who just proved who they are: a new server-side record and a
    new CSRF token (no fixation); the record of the session it replaces is deleted."""
    end_session()
    sid, now = secrets.token_urlsafe(32), time.time()
    with database().atomic() as tx:
        # Sessions past the absolute limit can never be used again; forgotten here.
        tx.execute("DELETE FROM web_sessions WHERE created_at < ?", (now - ABSOLUTE_SESSION_S,))
        tx.execute("INSERT INTO web_sessions (id, user_id, created_at) VALUES (?, ?, ?)",
                   (_session_key(sid), user.id, now))
    session.update(uid=user.id, ver=user.session_version, sid=sid, seen=now, born=now,
                   csrf=secrets.token_urlsafe(32))


def end_session() -> None:
    """Delete this session's server-side record and empty the cookie (the language stays)."""
    sid = session.get("sid")
    if sid:
        with database().atomic() as tx:
            tx.execute("DELETE FROM web_sessions WHERE id = ?", (_session_key(str(sid)),))
    language = session.get("lang")
    session.clear()
    if language:
        session["lang"] = language


def _session_alive(db: Database, user_id: int) -> bool:
    sid = session.get("sid")
    return bool(sid) and bool(db.query("SELECT 1 FROM web_sessions WHERE id = ? AND user_id = ?",
                                       (_session_key(str(sid)), user_id)))


def _login_redirect(reason: str = "") -> ResponseReturnValue:
    if wants_json():
        return jsonify(error="login required", reason=reason or "no session"), 401
    args: dict[str, Any] = {"next": request.full_path.rstrip("?")} if request.method == "GET" else {}
    if reason:
        args["reason"] = reason
    return redirect(url_for("auth.login", **args))


def _check_csrf() -> None:
    sent = request.headers.get(CSRF_HEADER) or request.form.get(CSRF_FIELD, "")
    expected = session.get("csrf", "")
    if not expected or not sent or not hmac.compare_digest(str(sent), str(expected)):
        abort(400, description="csrf")
    # Defence in depth: a browser sends Origin on cross-site POSTs.  With our no-referrer
    # policy Chromium sends "null" on same-site form posts, so only a real foreign origin counts.
    origin = request.headers.get("Origin", "null")
    if origin != "null" and urlsplit(origin).netloc != request.host:
        abort(400, description="csrf")


def _gate() -> Optional[ResponseReturnValue]:
    g.user = None
    db = database()
    endpoint = request.endpoint or ""
    if endpoint in PUBLIC_ENDPOINTS:
        if endpoint.startswith("auth.") and request.method in UNSAFE_METHODS:
            _check_csrf()
        if endpoint == "auth.login" and accounts.user_count(db) == 0:
            return redirect(url_for("auth.setup"))
        return None
    if accounts.user_count(db) == 0:
        # First start: nothing is usable until an administrator exists.
        if wants_json():
            return jsonify(error="set-up required"), 401
        return redirect(url_for("auth.setup"))
    uid = session.get("uid")
    if uid is None:
        return _login_redirect()
    user = accounts.get_user(db, int(uid))
    if user is None or user.disabled or user.session_version != session.get("ver") or not _session_alive(db, user.id):
        end_session()
        return _login_redirect("ended")
    now = time.time()
    idle = now - float(session.get("seen", 0))
    if idle > current_app.config["IDLE_TIMEOUT_S"] or now - float(session.get("born", 0)) > ABSOLUTE_SESSION_S:
        audit.record(db, user.username, "session_expired")
        end_session()
        return _login_redirect("expired")
    view = current_app.view_functions.get(endpoint)
    if not getattr(view, "_passive", False):
        session["seen"] = now
    g.user = user
    if request.method in UNSAFE_METHODS:
        _check_csrf()
    return None


def _headers(response: Any) -> Any:
    response.headers["Content-Security-Policy"] = CSP
    response.headers["X-Frame-Options"] = "DENY"
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "no-referrer"
    response.headers["Cross-Origin-Opener-Policy"] = "same-origin"
    response.headers["Permissions-Policy"] = "camera=(), microphone=(), geolocation=()"
    if request.endpoint not in STATIC_ENDPOINTS:
        # Pages and images carry patient data: never kept in a browser or proxy cache.
        response.headers["Cache-Control"] = "no-store"
        response.headers["Pragma"] = "no-cache"
    return response


def init_app(app: Flask) -> None:
    app.before_request(_gate)
    app.after_request(_headers)
    app.jinja_env.globals.update(csrf_token=csrf_token, can=can)
