"""Internationalisation: Flask-Babel with English (source language) and French.

The language is the signed-in user's setting; before login it is the one picked on the login
page, else the browser's preference.  Compiled catalogues (``messages.mo``) are shipped next to
their ``.po`` sources so a fresh machine needs no build step; ``tests/web/test_i18n.py`` checks
that they match and that French is complete.
"""
from __future__ import annotations

from pathlib import Path

from flask import Flask, g, request, session
from flask_babel import Babel

LANGUAGES = {"en": "English", "fr": "Français"}
# One catalogue for every web app (web/translations; web/babel.cfg says what is extracted).
TRANSLATIONS_DIR = Path(__file__).resolve().parents[1] / "translations"


def select_locale() -> str:
    user = g.get("user")
    if user is not None and user.language in LANGUAGES:
        return str(user.language)
    chosen = session.get("lang")
    if chosen in LANGUAGES:
        return str(chosen)
    return request.accept_languages.best_match(list(LANGUAGES)) or "en"


def init_app(app: Flask) -> None:
    app.config["BABEL_TRANSLATION_DIRECTORIES"] = str(TRANSLATIONS_DIR)
    app.config["BABEL_DEFAULT_LOCALE"] = "en"
    Babel(app, locale_selector=select_locale)
    app.jinja_env.globals["LANGUAGES"] = LANGUAGES
    app.jinja_env.globals["current_language"] = select_locale
