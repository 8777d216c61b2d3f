"""What every web app of the appliance shares, installed on a Flask app by :func:`init_core`.

- :mod:`.security`: the deny-by-default login gate, roles, CSRF, idle and absolute session
  limits, server-side session records, response headers and the signing key;
- :mod:`.auth` and :mod:`.health`: the sign-in, set-up and account pages, and ``/healthz``
  (the gate's own public endpoints, so every app has them);
- :mod:`.i18n`, :mod:`.errors`, :mod:`.imaging`, :mod:`.formatting`: language, error pages,
  DICOM frames as PNG, and times, names, ages and sizes as people read them.

Templates and assets: the ``core`` blueprint serves ``static/`` under ``/core/static`` and
adds ``templates/`` to the app's template search path, after the app's own folder.  Core pages
(``error.html``, ``auth/*.html``) extend ``base.html``, which each app provides by extending
``core/layout.html`` (page skeleton, top bar with the app's own navigation, flashed messages);
an app can replace any core template by shipping one of the same name.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from flask import Blueprint, Flask

from appliance.config import Config
from appliance.db import open_database

from . import errors, formatting, i18n, security

IDLE_TIMEOUT_S = 15 * 60  # a shared touchscreen left alone must not stay signed in

bp = Blueprint("core", __name__, template_folder="templates", static_folder="static",
               static_url_path="/core/static")


def init_core(app: Flask, config: Config, home_endpoint: str, home_label: Any) -> None:
    """Make ``app`` an appliance web app on ``config``'s data directory.

    ``home_endpoint`` is where a sign-in lands and error pages lead back to; ``home_label`` is
    that link's words (a ``lazy_gettext`` string, translated per request).  Call it before
    registering the app's own blueprints; settings the app sets afterwards win.
    """
    app.config["APPLIANCE"] = config
    app.config.update(
        HOME_ENDPOINT=home_endpoint,
        IDLE_TIMEOUT_S=IDLE_TIMEOUT_S,
        SESSION_COOKIE_NAME="appliance_session",
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Strict",
        MAX_CONTENT_LENGTH=1 * 1024 * 1024,  # forms and JSON only; nothing large is uploaded
        SEND_FILE_MAX_AGE_DEFAULT=3600,
    )
    app.config["SECRET_KEY"] = security.load_secret_key(config)
    app.extensions["appliance_db"] = open_database(Path(config.data_dir))

    i18n.init_app(app)
    security.init_app(app)
    errors.init_app(app)
    app.jinja_env.filters["localtime"] = formatting.local_time
    app.jinja_env.globals["home_label"] = home_label

    from .auth import bp as auth_bp
    from .health import bp as health_bp

    for blueprint in (bp, health_bp, auth_bp):
        app.register_blueprint(blueprint)
