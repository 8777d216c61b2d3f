"""The web core carries a second app: a Flask app that calls init_core and ships only its own
base.html and one screen gets the login gate, sign-in landing on its own home, CSRF, the
security headers, error pages leading back to its home, the shared assets, and French."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from flask import Blueprint, Flask, render_template_string
from flask_babel import lazy_gettext

from appliance import accounts
from tests.web.conftest import csrf_of, make_config
from web.core import init_core
from web.core.security import PUBLIC_ENDPOINTS, roles_required

BASE = """{% extends "core/layout.html" %}
{% block app_name %}Second app{% endblock %}
{% block nav %}<a class="navlink" href="{{ url_for('reading.index') }}" id="second-nav">Cases</a>{% endblock %}
"""


def second_app(tmp_path: Path) -> Flask:
    templates = tmp_path / "templates"
    templates.mkdir()
    (templates / "base.html").write_text(BASE)
    app = Flask("second_app", root_path=str(tmp_path))
    init_core(app, make_config(tmp_path / "data"), home_endpoint="reading.index",
              home_label=lazy_gettext("Back to the worklist"))
    app.config["TESTING"] = True
    bp = Blueprint("reading", "second_app")

    @bp.get("/cases")
    def index() -> Any:
        return render_template_string('{% extends "base.html" %}{% block content %}<h1 id="cases">Cases</h1>'
                                      '{% endblock %}')

    @bp.post("/cases/close")
    @roles_required("admin")
    def close() -> Any:
        return "closed"

    app.register_blueprint(bp)
    accounts.create_user(app.extensions["appliance_db"], "reader", "reader-password-1", "admin", "fr")
    return app


def test_a_second_app_gets_the_gate_sign_in_and_pages(tmp_path: Path) -> None:
    app = second_app(tmp_path)
    client = app.test_client()
    denied = client.get("/cases")
    assert denied.status_code == 302 and "/login" in denied.headers["Location"]
    assert client.post("/cases/close").status_code == 302  # the gate comes before CSRF and roles
    assert client.get("/core/static/core.css").status_code == 200
    assert {r.endpoint for r in app.url_map.iter_rules()} & PUBLIC_ENDPOINTS == \
        {"static", "core.static", "health.healthz", "auth.login", "auth.setup"}

    login_page = client.get("/login")
    assert login_page.status_code == 200 and "core/static/core.css" in login_page.text
    signed_in = client.post("/login", data={"csrf_token": csrf_of(login_page.text), "username": "reader",
                                            "password": "reader-password-1"})
    assert signed_in.status_code == 302 and signed_in.headers["Location"].endswith("/cases")
    page = client.get("/cases")
    assert page.status_code == 200 and 'id="cases"' in page.text and 'id="second-nav"' in page.text
    assert 'lang="fr"' in page.text and "Déconnexion" in page.text  # the user's language, core strings
    assert page.headers["Cache-Control"] == "no-store" and "frame-ancestors 'none'" in \
        page.headers["Content-Security-Policy"]
    assert client.post("/cases/close").status_code == 400  # no CSRF token
    assert client.post("/cases/close", headers={"X-CSRF-Token": csrf_of(page.text)}).text == "closed"

    missing = client.get("/no-such-page")
    assert missing.status_code == 404 and 'href="/cases"' in missing.text
    assert "Retour à la liste de travail" in missing.text and "Second app" in missing.text
