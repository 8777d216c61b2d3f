"""The clinic app: the box's touchscreen UI (Flask application factory).

One blueprint per screen: ``worklist``, ``study`` (viewer, review, forward), ``status``,
``admin`` and ``api`` (the small JSON endpoints the pages poll); sign-in, set-up, the account
page and ``/healthz`` come with :func:`web.core.init_core`, as do security (login gate, roles,
CSRF, session expiry, headers), which applies to every route unless a view is explicitly public.
Blueprints read; what they change goes through ``appliance`` functions.
"""
from __future__ import annotations

from typing import Any, Optional

from flask import Flask
from flask_babel import lazy_gettext

from appliance.config import Config, load_config
from web.core import init_core

WORKLIST_PAGE_SIZE = 25
POLL_INTERVAL_MS = 5000


def create_app(config: Optional[Config] = None, test_config: Optional[dict[str, Any]] = None) -> Flask:
    """Build the app.  ``config`` is the appliance :class:`~appliance.config.Config` (loaded
    from the usual layers when omitted); ``test_config`` overrides Flask settings in tests."""
    app = Flask(__name__)
    init_core(app, config if config is not None else load_config(), home_endpoint="worklist.index",
              home_label=lazy_gettext("Back to the worklist"))
    app.config.update(WORKLIST_PAGE_SIZE=WORKLIST_PAGE_SIZE, POLL_INTERVAL_MS=POLL_INTERVAL_MS)
    if test_config:
        app.config.update(test_config)

    from .blueprints.admin import bp as admin_bp
    from .blueprints.api import bp as api_bp
    from .blueprints.status import bp as status_bp
    from .blueprints.study import bp as study_bp
    from .blueprints.worklist import bp as worklist_bp

    for blueprint in (worklist_bp, study_bp, status_bp, admin_bp, api_bp):
        app.register_blueprint(blueprint)
    return app
