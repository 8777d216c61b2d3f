"""The appliance's web application (Flask application factory).

One blueprint per screen: ``auth`` (login, first-administrator set-up, account), ``worklist``,
``study`` (viewer, review, forward), ``status``, ``admin`` and ``api`` (the small JSON
endpoints the pages poll).  Security (login gate, roles, CSRF, session expiry, headers) lives
in :mod:`web.security` and applies to every route unless a view is explicitly public.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from flask import Flask

from appliance.config import Config, load_config
from appliance.db import open_database

from . import errors, i18n, queries, security

IDLE_TIMEOUT_S = 15 * 60  # a shared touchscreen left alone must not stay signed in
WORKLIST_PAGE_SIZE = 25
POLL_INTERVAL_MS = 5000


def create_app(config: Optional[Config] = None, test_config: Optional[dict[str, Any]] = None) -> Flask:
    """Build the app.  ``config`` is the appliance :class:`~appliance.config.Config` (loaded
    from the usual layers when omitted); ``test_config`` overrides Flask settings in tests."""
    app = Flask(__name__)
    if config is None:
        config = load_config()
    app.config["APPLIANCE"] = config
    app.config.update(
        IDLE_TIMEOUT_S=IDLE_TIMEOUT_S,
        WORKLIST_PAGE_SIZE=WORKLIST_PAGE_SIZE,
        POLL_INTERVAL_MS=POLL_INTERVAL_MS,
        SESSION_COOKIE_NAME="appliance_session",
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Strict",
        MAX_CONTENT_LENGTH=1 * 1024 * 1024,  # forms and JSON only; nothing large is uploaded
        SEND_FILE_MAX_AGE_DEFAULT=3600,
    )
    if test_config:
        app.config.update(test_config)
    app.config["SECRET_KEY"] = security.load_secret_key(config)
    app.extensions["appliance_db"] = open_database(Path(config.data_dir))

    i18n.init_app(app)
    security.init_app(app)
    errors.init_app(app)
    app.jinja_env.filters["localtime"] = queries.local_time

    from .blueprints.admin import bp as admin_bp
    from .blueprints.api import bp as api_bp
    from .blueprints.auth import bp as auth_bp
    from .blueprints.health import bp as health_bp
    from .blueprints.status import bp as status_bp
    from .blueprints.study import bp as study_bp
    from .blueprints.worklist import bp as worklist_bp

    for blueprint in (health_bp, auth_bp, worklist_bp, study_bp, status_bp, admin_bp, api_bp):
        app.register_blueprint(blueprint)
    return app
