"""The appliance's web application (Flask application factory)."""
from __future__ import annotations

from typing import Any

from flask import Flask


def create_app(config: Any = None, test_config: dict | None = None) -> Flask:
    """Build the app.  ``config`` is the appliance :class:`~appliance.config.Config`."""
    app = Flask(__name__)
    app.config["APPLIANCE"] = config
    if test_config:
        app.config.update(test_config)

    from .blueprints.health import bp as health_bp

    app.register_blueprint(health_bp)
    return app
