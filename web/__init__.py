"""The appliance's web applications.

- :mod:`web.core`: what every app shares: security (login gate, roles, CSRF, sessions,
  headers), sign-in and account pages, i18n, error pages, image rendering, display formatting,
  and the base layout, stylesheet and script.  An app factory calls :func:`web.core.init_core`.
- :mod:`web.clinic`: the clinic's touchscreen UI (worklist, study, status, admin).
- ``translations/``: one message catalogue for all apps (``babel.cfg`` says what is extracted).

``create_app`` is the clinic app's factory, kept here for the callers that predate the split.
"""
from __future__ import annotations

from .clinic import create_app

__all__ = ["create_app"]
