"""Issue 11, web: sessions end server-side at sign-out, sign-in limits that reveal no user names
and give no lever to lock anyone out, the per-client rate limit, ``page=`` validation, and LIKE
wildcards in search.  Flask's test client on a temp database, plus one real `appliance serve`.

Sign-in limits are tested on a controlled clock (``login_throttle.clock``): delays of seconds to hours
are walked through exactly instead of slept through."""
from __future__ import annotations

import hashlib
import re
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pydicom
import pytest
import requests
from click.testing import CliRunner

from appliance import accounts, audit, login_throttle
from appliance.cli_users import users
from appliance.db import open_database
from appliance.store import InstanceStore
from tests.helpers import sample
from tests.web.conftest import PASSWORDS, STAFF_PIN, csrf_of, login

ATTACKER, KIOSK, OFFICE = "10.0.0.66", "10.0.0.7", "10.0.0.5"


class Clock:
    """The time the sign-in limits see; moves only when told to."""

    def __init__(self) -> None:
        self.t = float(int(datetime.now(timezone.utc).timestamp()))  # whole seconds: exact sums

    def __call__(self) -> datetime:
        return datetime.fromtimestamp(self.t, timezone.utc)

    def advance(self, seconds: float) -> None:
        self.t += seconds


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(login_throttle, "clock", fake)
    return fake


@pytest.fixture
def scrypt_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts real scrypt runs (the call goes through): the cost that makes a check's timing."""
    calls: list[int] = []
    real = hashlib.scrypt

    def counting(*args: Any, **kwargs: Any) -> bytes:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(hashlib, "scrypt", counting)
    return calls


def client_at(app: Any, address: str) -> Any:
    client = app.test_client()
    client.environ_base["REMOTE_ADDR"] = address
    return client


def attempt(client: Any, username: str, secret: str, method: str = "password") -> Any:
    token = csrf_of(client.get(f"/login?method={method}").text)
    field = "pin" if method == "pin" else "password"
    return client.post("/login", data={"csrf_token": token, "method": method, "username": username, field: secret})


def comparable(response: Any) -> tuple[int, str, dict[str, str]]:
    """Status, body without the per-session CSRF token, headers without the cookie's value."""
    body = re.sub(r'(name="csrf[-_]token"\s+(?:content|value)=")[^"]+"', r'\1"', response.text)
    headers = {k: v for k, v in response.headers.items() if k != "Set-Cookie"}
    headers["Set-Cookie"] = str("Set-Cookie" in response.headers)
    return response.status_code, body, headers


# -- sessions --------------------------------------------------------------------------------


def test_logout_ends_the_session_server_side_only(app: Any) -> None:
    desk, tablet = app.test_client(), app.test_client()
    token = login(desk, "staff")
    login(tablet, "staff")
    stolen = desk.get_cookie("appliance_session").value
    assert desk.post("/logout", data={"csrf_token": token}).status_code == 302
    replay = app.test_client()
    replay.set_cookie("appliance_session", stolen)
    page = replay.get("/")
    assert page.status_code == 302 and "/login" in page.headers["Location"]
    api = replay.get("/api/worklist")
    assert api.status_code == 401 and api.json["error"] == "login required"
    assert replay.post("/api/alerts/ack", json={"upto": 1}, headers={"X-CSRF-Token": token}).status_code == 401
    # Signing out on one terminal does not sign the user out of another (session_version unchanged).
    assert tablet.get("/").status_code == 200
    db = app.extensions["appliance_db"]
    assert db.query("SELECT COUNT(*) AS n FROM web_sessions")[0]["n"] == 1


def test_session_records_are_hashed_and_replaced_at_sign_in(app: Any) -> None:
    client = app.test_client()
    login(client, "staff")
    db = app.extensions["appliance_db"]
    first = db.query("SELECT id FROM web_sessions")
    login(client, "viewer")  # signing in again replaces the session, it does not add one
    second = db.query("SELECT id FROM web_sessions")
    assert len(first) == len(second) == 1 and first != second
    cookie = client.get_cookie("appliance_session").value
    assert second[0]["id"] not in cookie


def test_session_replay_after_logout_over_http(server_factory: Any, tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    accounts.create_user(open_database(data_dir), "nurse", "nurse-password-1", "staff")
    server = server_factory(data_dir).start()
    base = f"http://127.0.0.1:{server.http_port}"
    browser = requests.Session()
    token = csrf_of(browser.get(f"{base}/login", timeout=10).text)
    signed_in = browser.post(f"{base}/login", data={"csrf_token": token, "username": "nurse",
                                                    "password": "nurse-password-1"}, allow_redirects=False, timeout=10)
    assert signed_in.status_code == 302, signed_in.text
    assert browser.get(f"{base}/api/worklist", timeout=10).status_code == 200
    cookie = browser.cookies["appliance_session"]
    token = csrf_of(browser.get(f"{base}/", timeout=10).text)
    signed_out = browser.post(f"{base}/logout", data={"csrf_token": token}, allow_redirects=False, timeout=10)
    assert signed_out.status_code == 302
    stolen = {"appliance_session": cookie}
    page = requests.get(f"{base}/", cookies=stolen, allow_redirects=False, timeout=10)
    assert page.status_code == 302 and "/login" in page.headers["Location"]
    api = requests.get(f"{base}/api/worklist", cookies=stolen, timeout=10)
    assert api.status_code == 401 and api.json()["error"] == "login required"
    # Hammering the sign-in over HTTP (40 tries as fast as one client can): after the free
    # failures every answer is 429 with Retry-After, and few attempts are even checked.
    attacker = requests.Session()
    token = csrf_of(attacker.get(f"{base}/login", timeout=10).text)
    answers = [attacker.post(f"{base}/login", data={"csrf_token": token, "username": "nurse", "password": f"guess-{i}"},
                             allow_redirects=False, timeout=10) for i in range(40)]
    statuses = [a.status_code for a in answers]
    assert statuses[:login_throttle.ACCOUNT_FREE_FAILURES - 1] == [401] * (login_throttle.ACCOUNT_FREE_FAILURES - 1)
    assert statuses[login_throttle.ACCOUNT_FREE_FAILURES - 1:] == [429] * (41 - login_throttle.ACCOUNT_FREE_FAILURES)
    assert all(int(a.headers["Retry-After"]) >= 1 for a in answers if a.status_code == 429)
    checked = open_database(data_dir).query(
        "SELECT COUNT(*) AS n FROM audit_log WHERE actor = 'nurse' AND action IN ('login_failed', 'login_locked')")
    assert login_throttle.ACCOUNT_FREE_FAILURES <= checked[0]["n"] < login_throttle.LOGIN_RATE_MAX


# -- no user-name oracle ---------------------------------------------------------------------


@pytest.mark.parametrize("method,known,secret", [("password", "staff", "wrong-password"),
                                                 ("pin", "staff", "0000"),
                                                 ("pin", "admin", "0000"),    # administrators have no PIN
                                                 ("pin", "viewer", "0000")])  # nor has this viewer
def test_unknown_and_known_users_are_indistinguishable(app: Any, clock: Clock, scrypt_calls: list[int],
                                                       method: str, known: str, secret: str) -> None:
    real, ghost = client_at(app, "10.0.1.1"), client_at(app, "10.0.1.2")
    # Waits chosen to land before, on and after the delays, up to the PIN block.
    steps = [0, 0, 0, 0, 0, 0, 0.5, 1, 0, 2, 3, 5, 0, 9, 17, 40, 70, 0, 200, 900, 900, 900]
    seen = []
    for wait in steps:
        clock.advance(wait)
        before = len(scrypt_calls)
        first = attempt(real, known, secret, method)
        checked_known = len(scrypt_calls) - before
        second = attempt(ghost, "nobody", secret, method)
        checked_unknown = len(scrypt_calls) - before - checked_known
        assert comparable(first) == comparable(second), (wait, first.status_code, second.status_code)
        assert checked_known == checked_unknown
        seen.append((first.status_code, checked_known))
    # The sequence went through failures, delays and (for PINs) the block: it tested something.
    assert (401, 1) in seen and (429, 1) in seen and (429, 0) in seen
    if method == "pin":
        assert "PIN sign-in is blocked" in first.text
    assert login_throttle.lock_state(app.extensions["appliance_db"], known) == \
        login_throttle.lock_state(app.extensions["appliance_db"], "nobody")


def test_unknown_user_costs_one_scrypt_like_a_known_one(app: Any, scrypt_calls: list[int]) -> None:
    for name in ("staff", "nobody", "disabled-or-not"):
        before = len(scrypt_calls)
        assert attempt(client_at(app, f"10.0.2.{len(name)}"), name, "wrong-password").status_code == 401
        assert len(scrypt_calls) - before == 1, name


# -- no lock-anyone lever --------------------------------------------------------------------


def test_delays_double_up_to_the_cap(app: Any, clock: Clock) -> None:
    attacker = client_at(app, ATTACKER)
    for _ in range(login_throttle.ACCOUNT_FREE_FAILURES - 1):
        assert attempt(attacker, "admin", "guess").status_code == 401
    delays = []
    for _ in range(14):
        answer = attempt(attacker, "admin", "guess")
        assert answer.status_code == 429 and "locked" in answer.text
        delays.append(int(answer.headers["Retry-After"]))
        refused = attempt(attacker, "admin", PASSWORDS["admin"])  # not even checked while the delay runs
        assert refused.status_code == 429 and int(refused.headers["Retry-After"]) == delays[-1]
        clock.advance(delays[-1])
    assert delays[:10] == [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]
    assert delays[10:] == [login_throttle.DELAY_MAX_S] * 4


def test_attacker_cannot_keep_the_real_user_out(app: Any, clock: Clock) -> None:
    attacker = client_at(app, ATTACKER)
    answers = []
    for i in range(60):  # as fast as it can, wrong passwords for the administrator
        answers.append(attempt(attacker, "admin", f"guess-{i}").status_code)
        clock.advance(0.03)
    assert answers.count(401) + answers.count(429) == 60 and answers[-1] == 429
    assert attempt(attacker, "admin", PASSWORDS["admin"]).status_code == 429  # its own terminal stays locked
    db = app.extensions["appliance_db"]
    assert login_throttle.lock_state(db, "admin").wait_s > 0
    office = client_at(app, OFFICE)
    signed_in = attempt(office, "admin", PASSWORDS["admin"])
    assert signed_in.status_code == 302
    assert office.get("/admin/users").status_code == 200
    assert attempt(attacker, "admin", f"guess-{len(answers)}").status_code == 429  # the attack is still slowed


def test_admin_unlock_lets_the_user_in_again(app: Any, clock: Clock) -> None:
    attacker, kiosk, office = client_at(app, ATTACKER), client_at(app, KIOSK), client_at(app, OFFICE)
    for i in range(12):
        attempt(attacker, "staff", f"guess-{i}")
    # The nurse mistypes once on the kiosk while the name is under attack: the kiosk is now a
    # failing terminal for that name and has to wait...
    assert attempt(kiosk, "staff", "typo").status_code == 429
    assert attempt(kiosk, "staff", PASSWORDS["staff"]).status_code == 429
    # ...until an administrator unlocks the name.
    token = login(office, "admin")
    page = office.get("/admin/users").text
    assert 'id="unlock-staff"' in page and '<span class="bad">locked</span>' in page
    staff_id = accounts.find_user(app.extensions["appliance_db"], "staff").id
    assert office.post(f"/admin/users/{staff_id}", data={"csrf_token": token, "action": "unlock"}).status_code == 302
    assert 'id="unlock-staff"' not in office.get("/admin/users").text
    assert attempt(kiosk, "staff", PASSWORDS["staff"]).status_code == 302
    entries, _total = audit.entries(app.extensions["appliance_db"], action="user_update")
    assert '"action": "unlock"' in entries[0]["detail"]


def test_unlock_from_the_command_line(app: Any, clock: Clock, tmp_path: Path) -> None:
    attacker = client_at(app, ATTACKER)
    for i in range(login_throttle.PIN_MAX_FAILURES):
        attempt(client_at(app, f"10.0.3.{i}"), "staff", f"{i:04d}", "pin")
    assert "PIN sign-in is blocked" in attempt(attacker, "staff", STAFF_PIN, "pin").text
    runner = CliRunner()
    data_dir = str(tmp_path / "data")
    listing = runner.invoke(users, ["list", "--data-dir", data_dir], env={"APPLIANCE_STORAGE_DATA_DIR": data_dir})
    assert re.search(r"^staff\s+staff\s+locked\s+pin=blocked", listing.output, re.M), listing.output
    assert runner.invoke(users, ["unlock", "--data-dir", data_dir], env={}).exit_code != 0  # nothing named
    result = runner.invoke(users, ["unlock", "--data-dir", data_dir, "--client", ATTACKER, "staff"], env={})
    assert result.exit_code == 0 and "counter(s) cleared" in result.output, result.output
    assert attempt(attacker, "staff", STAFF_PIN, "pin").status_code == 302


def test_pin_guessing_is_bounded_across_all_clients(app: Any, clock: Clock, scrypt_calls: list[int]) -> None:
    db = app.extensions["appliance_db"]
    checked = 0
    for i in range(60):  # a new address for every guess
        before = len(scrypt_calls)
        answer = attempt(client_at(app, f"10.0.4.{i}"), "staff", f"{9000 + i}", "pin")
        checked += len(scrypt_calls) - before
        assert answer.status_code in (401, 429)
        clock.advance(30)
    assert checked == login_throttle.PIN_MAX_FAILURES
    assert login_throttle.lock_state(db, "staff").pin_blocked
    # The right PIN is refused from anywhere; the password still signs the nurse in.
    assert attempt(client_at(app, "10.0.5.1"), "staff", STAFF_PIN, "pin").status_code == 429
    assert attempt(client_at(app, "10.0.5.2"), "staff", PASSWORDS["staff"]).status_code == 302
    assert attempt(client_at(app, "10.0.5.3"), "staff", STAFF_PIN, "pin").status_code == 429
    # A new PIN lifts the block (the old one is what was guessed at).
    accounts.set_pin(db, accounts.find_user(db, "staff").id, "8642")
    assert attempt(client_at(app, "10.0.5.4"), "staff", "8642", "pin").status_code == 302


def test_rate_limit_per_client(app: Any, clock: Clock, scrypt_calls: list[int]) -> None:
    kiosk = client_at(app, KIOSK)
    for _ in range(login_throttle.LOGIN_RATE_MAX):  # right or wrong, every checked attempt counts
        assert attempt(kiosk, "staff", PASSWORDS["staff"]).status_code == 302
    clock.advance(10)
    before = len(scrypt_calls)
    limited = attempt(kiosk, "viewer", PASSWORDS["viewer"])
    assert limited.status_code == 429 and len(scrypt_calls) == before
    assert int(limited.headers["Retry-After"]) == login_throttle.LOGIN_RATE_WINDOW_S - 10
    assert "from this device" in limited.text
    assert attempt(client_at(app, OFFICE), "viewer", PASSWORDS["viewer"]).status_code == 302  # others unaffected
    clock.advance(login_throttle.LOGIN_RATE_WINDOW_S - 10)
    assert attempt(kiosk, "viewer", PASSWORDS["viewer"]).status_code == 302


def test_failing_terminal_is_slowed_for_every_name(app: Any, clock: Clock) -> None:
    sprayer = client_at(app, ATTACKER)
    for i in range(login_throttle.CLIENT_FREE_FAILURES - 1):
        assert attempt(sprayer, f"name{i}", "password-1").status_code == 401
    answer = attempt(sprayer, "another-name", "password-1")
    assert answer.status_code == 429 and "from this device" in answer.text
    assert attempt(sprayer, "staff", PASSWORDS["staff"]).status_code == 429
    assert attempt(client_at(app, KIOSK), "staff", PASSWORDS["staff"]).status_code == 302
    clock.advance(login_throttle.FAILURE_MEMORY_S)  # forgotten an hour after the last failure
    assert attempt(sprayer, "staff", PASSWORDS["staff"]).status_code == 302


def test_ipv6_clients_are_counted_by_their_64() -> None:
    assert login_throttle.client_key("2001:db8:1:2:aaaa::1") == login_throttle.client_key("2001:db8:1:2:bbbb::9") == \
        "2001:db8:1:2::/64"
    assert login_throttle.client_key("::ffff:10.0.0.66") == ATTACKER
    assert login_throttle.client_key("fe80::1%eth0") == "fe80::/64"
    assert login_throttle.client_key("") == "local"


# -- page= -----------------------------------------------------------------------------------


BAD_PAGES = ["abc", "-1", "0", "1e3", " 2", "+2", "2.0", "٣", "0x10"]


def test_page_parameter_never_500(study_app: Any) -> None:
    study_app.config["WORKLIST_PAGE_SIZE"] = 1  # three studies: three pages
    client = study_app.test_client()
    login(client, "admin")
    db = study_app.extensions["appliance_db"]
    for i in range(120):
        audit.record(db, "admin", "view_study", study_uid=f"1.2.{i}")
    for path in ("/", "/api/worklist", "/admin/audit"):
        for bad in BAD_PAGES:
            assert client.get(path, query_string={"page": bad}).status_code == 400, (path, bad)
        for huge in (str(10**30), "9" * 5000, "9223372036854775808", "0" * 40 + "2"):
            assert client.get(path, query_string={"page": huge}).status_code == 200, (path, huge[:30])
    assert client.get("/api/worklist", query_string={"page": str(10**30)}).json["page"] == 3
    assert client.get("/api/worklist", query_string={"page": "0002"}).json["page"] == 2
    assert "Page 3 of 3" in client.get("/", query_string={"page": str(10**30)}).text
    entries = db.query("SELECT COUNT(*) AS n FROM audit_log")[0]["n"]
    last = -(-entries // 50)
    assert f"Page {last} of {last}" in client.get("/admin/audit", query_string={"page": str(10**30)}).text
    assert client.get("/api/worklist", query_string={"page": "abc"}).json["status"] == 400


def test_no_get_screen_answers_500_to_a_bad_page(study_app: Any) -> None:
    client = study_app.test_client()
    login(client, "admin")
    uid = study_app.config["STUDY_UIDS"]["RG1_UNCR.dcm"]
    checked = 0
    for rule in study_app.url_map.iter_rules():
        if "GET" not in rule.methods or rule.endpoint in ("static", "core.static"):
            continue
        url = re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", lambda m: "1" if m.group(1) != "study_uid" else uid, rule.rule)
        for value in ("abc", "-1", str(10**30)):
            status = client.get(url, query_string={"page": value}).status_code
            assert status < 500, (rule.rule, value, status)
            checked += 1
    assert checked > 30


def test_page_number_rules() -> None:
    from web.clinic.queries import MAX_PAGE, page_number

    assert page_number("") == 1 and page_number("7") == 7 and page_number("007") == 7
    assert page_number(str(10**30)) == MAX_PAGE == page_number(str(MAX_PAGE + 1))
    for bad in BAD_PAGES:
        with pytest.raises(ValueError):
            page_number(bad)


# -- search wildcards ------------------------------------------------------------------------


def _store_patients(app: Any, tmp_path: Path, patients: list[tuple[str, str, str]]) -> dict[str, str]:
    """One study per (name, patient id, accession), stored through the real store."""
    db = app.extensions["appliance_db"]
    store = InstanceStore(Path(app.config["APPLIANCE"].data_dir), db, 0)
    by_name = {}
    for name, patient_id, accession in patients:
        ds = pydicom.dcmread(sample("CT_small.dcm"))
        ds.PatientName, ds.PatientID, ds.AccessionNumber = name, patient_id, accession
        ds.StudyInstanceUID = f"2.25.{uuid.uuid4().int}"
        ds.SeriesInstanceUID = f"2.25.{uuid.uuid4().int}"
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = f"2.25.{uuid.uuid4().int}"
        path = tmp_path / f"{patient_id}.dcm"
        ds.save_as(path)
        store.store(path.read_bytes(), calling_ae="TEST", source="import")
        by_name[name] = ds.StudyInstanceUID
    return by_name


def _found(client: Any, query: str) -> set[str]:
    response = client.get("/api/worklist", query_string={"q": query})
    assert response.status_code == 200
    return {row["patient_id"] for row in response.json["rows"]}


def test_search_wildcards_match_themselves(app: Any, tmp_path: Path) -> None:
    _store_patients(app, tmp_path, [("ANN^PERCENT%", "P100", "ACC1"), ("SMITH_JONES^BOB", "P200", "ACC2"),
                                    ("SMITHXJONES^CARL", "P300", "ACC3"), ("PLAIN^DORA", "ID_7", "A%9"),
                                    ("OTHER^EVE", "ID17", "AB9")])
    client = app.test_client()
    login(client, "staff")
    assert _found(client, "") == {"P100", "P200", "P300", "ID_7", "ID17"}
    assert _found(client, "%") == {"P100"}
    assert _found(client, "_") == {"P200"}                  # IDs and accessions match from their start
    assert _found(client, "ID_") == {"ID_7"}                # not ID17
    assert _found(client, "smith_jones") == {"P200"}        # not SMITHXJONES
    assert _found(client, "A%") == {"ID_7"}                 # accession prefix, literal %
    # The escape character itself: "T\\" is a T and a backslash, not a name ending in "T%".
    assert _found(client, "\\") == set() and _found(client, "\\%") == set() and _found(client, "T\\") == set()
    assert _found(client, "smith jones") == {"P200", "P300"}  # a space still stands for the ^ or anything
    assert _found(client, "smith,") == {"P200", "P300"}


def test_like_literal() -> None:
    from web.clinic.queries import like_literal

    assert like_literal("a%b_c\\d") == "a\\%b\\_c\\\\d"
    assert like_literal("plain") == "plain"



def test_parallel_attempts_are_counted_before_they_are_checked(app: Any, clock: Clock,
                                                               scrypt_calls: list[int]) -> None:
    """Twenty simultaneous guesses from one terminal: each is charged before its secret is
    checked, so no more than the free failures are ever checked."""
    from concurrent.futures import ThreadPoolExecutor

    db = app.extensions["appliance_db"]

    def guess(i: int) -> str:
        try:
            return "none" if accounts.authenticate(db, "staff", f"guess-{i}", client=ATTACKER) is None else "user"
        except login_throttle.LockedError as exc:
            return exc.scope

    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(guess, range(20)))
    assert len(scrypt_calls) == login_throttle.ACCOUNT_FREE_FAILURES
    # Refused or wrong, never signed in; which of the five checked ones say "wrong" (401) rather
    # than "locked" (429) depends on how they interleave.
    assert set(answers) <= {"none", "account"} and answers.count("account") >= 20 - login_throttle.ACCOUNT_FREE_FAILURES
    assert login_throttle.lock_state(db, "staff").failures == login_throttle.ACCOUNT_FREE_FAILURES
