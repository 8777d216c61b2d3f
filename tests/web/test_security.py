"""Security of the web app with Flask's test client: login gate on every route, CSRF, lockout,
roles, session expiry, first-admin set-up, headers, secret key."""
from __future__ import annotations

import os
import re
import stat
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from appliance import accounts, login_throttle
from tests.web.conftest import PASSWORDS, STAFF_PIN, add_users, csrf_of, login, make_app

PUBLIC = {"static", "core.static", "health.healthz", "auth.login", "auth.setup"}


def _url(rule: Any) -> str:
    """A concrete URL for a rule, dummy values for its arguments."""
    values = {arg: (1 if rule._converters[arg].__class__.__name__ == "IntegerConverter" else "1.2.3")
              for arg in rule.arguments}
    return re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", lambda m: str(values[m.group(1)]), rule.rule)


def test_every_route_needs_a_session(app: Any) -> None:
    client = app.test_client()
    checked = 0
    for rule in app.url_map.iter_rules():
        if rule.endpoint in PUBLIC:
            continue
        for method in sorted(rule.methods - {"HEAD", "OPTIONS"}):
            response = client.open(_url(rule), method=method)
            ok = response.status_code in (401, 403) or (
                response.status_code == 302 and "/login" in response.headers["Location"])
            assert ok, f"{method} {rule.rule} answered {response.status_code} without a session"
            checked += 1
    assert checked >= 20


def test_public_routes(app: Any) -> None:
    from web.core.security import PUBLIC_ENDPOINTS

    assert PUBLIC_ENDPOINTS == PUBLIC  # publishing another endpoint is a decision this test records
    client = app.test_client()
    assert client.get("/healthz").status_code == 200
    assert client.get("/login").status_code == 200
    assert client.get("/static/clinic.css").status_code == 200
    assert client.get("/core/static/core.css").status_code == 200
    assert client.get("/setup").status_code == 404  # users exist: set-up is gone


def test_api_without_session_is_401_json(app: Any) -> None:
    response = app.test_client().get("/api/worklist")
    assert response.status_code == 401 and response.json["error"] == "login required"


def test_first_admin_setup_only_while_no_user(tmp_path: Path) -> None:
    app = make_app(tmp_path / "data")
    client = app.test_client()
    for path in ("/", "/status", "/admin/users", "/login"):
        response = client.get(path)
        assert response.status_code == 302 and response.headers["Location"].endswith("/setup"), path
    token = csrf_of(client.get("/setup").text)
    weak = client.post("/setup", data={"csrf_token": token, "username": "boss", "password": "short", "confirm": "short"})
    assert weak.status_code == 400 and "at least" in weak.text
    response = client.post("/setup", data={"csrf_token": token, "username": "boss", "password": "long-enough-pw",
                                           "confirm": "long-enough-pw"})
    assert response.status_code == 302
    assert accounts.find_user(app.extensions["appliance_db"], "boss").role == "admin"
    assert client.get("/").status_code == 200  # signed in as the new admin
    other = app.test_client()
    assert other.get("/setup").status_code == 404
    token = csrf_of(other.get("/login").text)
    again = other.post("/setup", data={"csrf_token": token, "username": "mallory", "password": "long-enough-pw",
                                       "confirm": "long-enough-pw"})
    assert again.status_code == 404
    assert accounts.find_user(app.extensions["appliance_db"], "mallory") is None


def test_post_without_valid_csrf_is_refused(app: Any) -> None:
    client = app.test_client()
    token = login(client, "admin")
    posts = [("/logout", {}), ("/account", {"action": "language", "language": "fr"}),
             ("/admin/users", {"username": "x1", "password": "0123456789", "role": "staff"}),
             ("/study/1.2.3/review", {}), ("/study/1.2.3/forward", {"destination": "hub"}),
             ("/study/1.2.3/outbox/1/cancel", {}), ("/study/1.2.3/outbox/1/retry", {})]
    for path, data in posts:
        assert client.post(path, data=data).status_code == 400, path
        assert client.post(path, data={**data, "csrf_token": "forged"}).status_code == 400, path
    assert client.post("/api/alerts/ack", json={"upto": 1}).status_code == 400
    assert client.post("/api/alerts/ack", json={"upto": 1}, headers={"X-CSRF-Token": "nope"}).status_code == 400
    assert client.post("/api/alerts/ack", json={"upto": 1}, headers={"X-CSRF-Token": token}).status_code == 200
    cross = client.post("/account", data={"csrf_token": token, "action": "language", "language": "fr"},
                        headers={"Origin": "http://evil.example"})
    assert cross.status_code == 400
    # The login form itself is CSRF-protected (no login CSRF).
    fresh = app.test_client()
    fresh.get("/login")
    assert fresh.post("/login", data={"username": "admin", "password": PASSWORDS["admin"]}).status_code == 400
    assert accounts.find_user(app.extensions["appliance_db"], "x1") is None


def _try(client: Any, username: str, method: str, secret: str) -> Any:
    token = csrf_of(client.get(f"/login?method={method}").text)
    field = "pin" if method == "pin" else "password"
    return client.post("/login", data={"csrf_token": token, "method": method, "username": username, field: secret})


@pytest.mark.parametrize("method,right,wrong", [("password", PASSWORDS["staff"], "wrong-password"),
                                                ("pin", STAFF_PIN, "0000")])
def test_lockout_after_five_failures(app: Any, monkeypatch: pytest.MonkeyPatch, method: str, right: str,
                                     wrong: str) -> None:
    start = login_throttle.clock()
    monkeypatch.setattr(login_throttle, "clock", lambda: start)  # the delay runs only when the test says so
    client = app.test_client()
    assert _try(client, "staff", method, wrong).status_code == 401
    for _ in range(login_throttle.ACCOUNT_FREE_FAILURES - 2):
        assert _try(client, "staff", method, wrong).status_code == 401
    locked = _try(client, "staff", method, wrong)
    assert locked.status_code == 429 and "locked" in locked.text and locked.headers["Retry-After"] == "1"
    refused = _try(client, "staff", method, right)  # the right secret is refused while locked
    assert refused.status_code == 429
    assert client.get("/").status_code == 302
    db = app.extensions["appliance_db"]
    # The lock expires after its delay (test_hardening walks through the doubling delays).
    monkeypatch.setattr(login_throttle, "clock", lambda: start + timedelta(seconds=1))
    assert _try(client, "staff", method, right).status_code == 302
    actions = [r["action"] for r in db.query("SELECT action FROM audit_log WHERE actor = 'staff'")]
    assert actions.count("login_failed") == login_throttle.ACCOUNT_FREE_FAILURES - 1 and "login_locked" in actions


def test_pin_login_for_staff_not_for_admin(app: Any) -> None:
    client = app.test_client()
    assert _try(client, "staff", "pin", STAFF_PIN).status_code == 302
    assert client.get("/").status_code == 200
    with pytest.raises(accounts.AccountError):
        accounts.set_pin(app.extensions["appliance_db"], accounts.find_user(app.extensions["appliance_db"], "admin").id,
                         "1234")


def test_roles_enforced(study_app: Any) -> None:
    uid = study_app.config["STUDY_UIDS"]["RG1_UNCR.dcm"]
    viewer = study_app.test_client()
    token = login(viewer, "viewer")
    assert viewer.get(f"/study/{uid}").status_code == 200
    assert viewer.post(f"/study/{uid}/review", data={"csrf_token": token}).status_code == 403
    assert viewer.post(f"/study/{uid}/forward", data={"csrf_token": token, "destination": "hub",
                                                      "priority": "urgent"}).status_code == 403
    page = viewer.get(f"/study/{uid}").text
    assert 'id="mark-reviewed"' not in page and 'id="request-forward"' not in page
    staff = study_app.test_client()
    staff_token = login(staff, "staff")
    for client, tok in ((viewer, token), (staff, staff_token)):
        for path in ("/admin/users", "/admin/connections", "/admin/models", "/admin/audit", "/admin/"):
            assert client.get(path).status_code == 403, path
        assert client.post("/admin/users", data={"csrf_token": tok, "username": "evil", "password": "0123456789a",
                                                 "role": "admin"}).status_code == 403
        assert client.post("/admin/users/1", data={"csrf_token": tok, "action": "disable"}).status_code == 403
    assert staff.post(f"/study/{uid}/review", data={"csrf_token": staff_token}).status_code == 302
    db = study_app.extensions["appliance_db"]
    assert db.query("SELECT state FROM studies WHERE study_uid = ?", (uid,))[0]["state"] == "reviewed"
    assert db.query("SELECT COUNT(*) AS n FROM outbox_items")[0]["n"] == 0
    assert accounts.find_user(db, "evil") is None


def test_session_idle_expiry(tmp_path: Path) -> None:
    app = make_app(tmp_path / "data", IDLE_TIMEOUT_S=1)
    add_users(app)
    client = app.test_client()
    login(client, "staff")
    assert client.get("/").status_code == 200
    time.sleep(0.6)
    assert client.get("/api/alerts").status_code == 200  # polling does not count as activity...
    time.sleep(0.6)
    response = client.get("/")  # ...so the idle timeout still ends the session
    assert response.status_code == 302 and "reason=expired" in response.headers["Location"]
    assert client.get("/").status_code == 302
    actions = [r["action"] for r in app.extensions["appliance_db"].query("SELECT action FROM audit_log")]
    assert "session_expired" in actions


def test_password_reset_ends_other_sessions(app: Any) -> None:
    client = app.test_client()
    login(client, "staff")
    db = app.extensions["appliance_db"]
    accounts.set_password(db, accounts.find_user(db, "staff").id, "another-password-2")
    response = client.get("/")
    assert response.status_code == 302 and "reason=ended" in response.headers["Location"]


def test_security_headers(app: Any) -> None:
    client = app.test_client()
    login(client, "staff")
    for path in ("/", "/login", "/status", "/nope"):
        headers = client.get(path).headers
        csp = headers["Content-Security-Policy"]
        assert "script-src 'self'" in csp and "unsafe-inline" not in csp and "frame-ancestors 'none'" in csp
        assert headers["X-Frame-Options"] == "DENY"
        assert headers["X-Content-Type-Options"] == "nosniff"
        assert headers["Referrer-Policy"] == "no-referrer"
        assert headers["Cache-Control"] == "no-store"
    cookie = client.get_cookie("appliance_session")
    assert cookie is not None and cookie.http_only and cookie.same_site == "Strict"


def test_no_inline_script_in_pages(study_app: Any) -> None:
    client = study_app.test_client()
    login(client, "admin")
    uid = study_app.config["STUDY_UIDS"]["RG1_UNCR.dcm"]
    for path in ("/", f"/study/{uid}", "/status", "/admin/users", "/admin/audit", "/admin/models", "/account"):
        html = client.get(path).text
        assert not re.search(r"<script(?![^>]*\bsrc=)[^>]*>", html), path  # CSP would block them anyway
        assert not re.search(r"\son[a-z]+=", html), path
        assert " style=" not in html, path


def test_secret_key_generated_once_with_0600(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    first = make_app(data_dir)
    key_file = data_dir / "secret_key"
    assert stat.S_IMODE(os.stat(key_file).st_mode) == 0o600
    second = make_app(data_dir)
    assert first.config["SECRET_KEY"] == second.config["SECRET_KEY"] == key_file.read_text().strip()


def test_error_pages_are_specific(app: Any) -> None:
    client = app.test_client()
    login(client, "staff")
    missing = client.get("/study/does-not-exist")
    assert missing.status_code == 404 and "does not exist" in missing.text
    forbidden = client.get("/admin/users")
    assert forbidden.status_code == 403 and "role does not allow" in forbidden.text
    assert client.get("/api/nope").json["status"] == 404


def test_unexpected_errors_log_no_message(app: Any, caplog: pytest.LogCaptureFixture) -> None:
    @app.get("/boom")
    def boom() -> str:
        raise KeyError("DOE^JANE")

    client = app.test_client()
    login(client, "staff")
    response = client.get("/boom")
    assert response.status_code == 500 and "could not complete" in response.text
    assert "DOE" not in caplog.text and "KeyError" in caplog.text
