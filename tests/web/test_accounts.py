"""Accounts: KDF hashes, lockout timing, and the `appliance users` click group."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from click.testing import CliRunner

from appliance import accounts, login_throttle
from appliance.cli_users import users
from appliance.db import open_database


@pytest.fixture
def db(tmp_path: Path):
    return open_database(tmp_path / "data")


def test_hashes_are_salted_scrypt_and_verify(db) -> None:
    first, second = accounts.hash_secret("same-secret"), accounts.hash_secret("same-secret")
    assert first.startswith("scrypt$") and first != second
    assert accounts.verify_secret("same-secret", first) and not accounts.verify_secret("other", first)
    assert not accounts.verify_secret("x", "garbage") and not accounts.verify_secret("x", "md5$1$2$3$4$5")
    user = accounts.create_user(db, "nurse", "nurse-password", "staff")
    stored = db.query("SELECT password_hash FROM users WHERE id = ?", (user.id,))[0]["password_hash"]
    assert "nurse-password" not in stored and stored.startswith("scrypt$")


def test_validation(db) -> None:
    with pytest.raises(accounts.AccountError):
        accounts.create_user(db, "x", "short", "staff")
    with pytest.raises(accounts.AccountError):
        accounts.create_user(db, "bad name!", "long-enough-1", "staff")
    with pytest.raises(accounts.AccountError):
        accounts.create_user(db, "ok", "long-enough-1", "superuser")
    accounts.create_user(db, "ok", "long-enough-1", "viewer")
    with pytest.raises(accounts.AccountError):
        accounts.create_user(db, "OK", "long-enough-1", "viewer")  # names are case-insensitive
    with pytest.raises(accounts.AccountError):
        accounts.set_pin(db, accounts.find_user(db, "ok").id, "12ab")
    with pytest.raises(accounts.AccountError):
        accounts.create_user(db, "second", "long-enough-1", "admin", only_if_first=True)


def test_lockout_window(db) -> None:
    user = accounts.create_user(db, "nurse", "nurse-password", "staff")
    accounts.set_pin(db, user.id, "1234")
    now = datetime.now(timezone.utc)
    kiosk, desk = "10.1.1.1", "10.1.1.2"
    for _ in range(login_throttle.ACCOUNT_FREE_FAILURES - 1):
        assert accounts.authenticate(db, "nurse", "9999", "pin", now=now, client=kiosk) is None
    with pytest.raises(login_throttle.LockedError) as locked:  # PIN and password failures share the counter
        accounts.authenticate(db, "nurse", "wrong-password", "password", now=now, client=kiosk)
    assert locked.value.attempted and locked.value.scope == "account" and locked.value.retry_after == 1
    with pytest.raises(login_throttle.LockedError) as refused:
        accounts.authenticate(db, "nurse", "1234", "pin", now=now + timedelta(seconds=0.5), client=kiosk)
    assert not refused.value.attempted
    # A terminal that has not been failing is not held back...
    assert accounts.authenticate(db, "nurse", "1234", "pin", now=now, client=desk) is not None
    # ...and the failing one is let in once its delay has run.
    later = now + timedelta(seconds=1)
    assert accounts.authenticate(db, "nurse", "1234", "pin", now=later, client=kiosk) is not None
    state = login_throttle.lock_state(db, "nurse", now=later)
    assert state == login_throttle.LockState(failures=login_throttle.ACCOUNT_FREE_FAILURES, wait_s=0, pin_blocked=False)
    assert login_throttle.unlock(db, "NURSE") == 1  # names are case-insensitive
    assert login_throttle.lock_state(db, "nurse").failures == 0
    assert accounts.authenticate(db, "nobody", "x") is None  # unknown users do not raise


def test_password_reset_unlocks(db) -> None:
    user = accounts.create_user(db, "nurse", "nurse-password", "staff")
    for _ in range(login_throttle.ACCOUNT_FREE_FAILURES + 3):
        try:
            accounts.authenticate(db, "nurse", "wrong-password", client="10.1.1.1")
        except login_throttle.LockedError:
            pass
    assert login_throttle.lock_state(db, "nurse").wait_s > 0
    accounts.set_password(db, user.id, "another-password")
    assert login_throttle.lock_state(db, "nurse") == login_throttle.LockState(0, 0, False)
    assert accounts.authenticate(db, "nurse", "another-password", client="10.1.1.1") is not None


def test_disabled_user_cannot_sign_in(db) -> None:
    user = accounts.create_user(db, "temp", "temp-password", "staff")
    accounts.set_disabled(db, user.id, True)
    assert accounts.authenticate(db, "temp", "temp-password") is None
    assert accounts.find_user(db, "temp").session_version == user.session_version + 1


def test_refusals_carry_their_reason(db) -> None:
    accounts.create_user(db, "ok", "long-enough-1", "viewer")
    for call, code in ((lambda: accounts.create_user(db, "x", "short", "staff"), "short_password"),
                       (lambda: accounts.create_user(db, "bad name!", "long-enough-1", "staff"), "bad_name"),
                       (lambda: accounts.create_user(db, "OK", "long-enough-1", "viewer"), "name_taken"),
                       (lambda: accounts.create_user(db, "fine", "long-enough-1", "root"), "bad_role"),
                       (lambda: accounts.set_language(db, accounts.find_user(db, "ok").id, "de"), "bad_language"),
                       (lambda: accounts.set_pin(db, accounts.find_user(db, "ok").id, "12"), "bad_pin"),
                       (lambda: accounts.set_disabled(db, 4242, True), "no_user")):
        with pytest.raises(accounts.AccountError) as refused:
            call()
        assert refused.value.code == code, code


def test_the_last_active_administrator_stays(db) -> None:
    first = accounts.create_user(db, "first", "first-password", "admin")
    second = accounts.create_user(db, "second", "second-password", "admin")
    accounts.set_role(db, second.id, "staff")  # another administrator is left: allowed
    for change in (lambda: accounts.set_role(db, first.id, "viewer"),
                   lambda: accounts.set_disabled(db, first.id, True)):
        with pytest.raises(accounts.AccountError) as refused:
            change()
        assert refused.value.code == "last_admin"
    after = accounts.find_user(db, "first")
    assert after.role == "admin" and not after.disabled and after.session_version == first.session_version
    accounts.set_role(db, second.id, "admin")
    accounts.set_disabled(db, first.id, True)  # now the second one administers the box
    with pytest.raises(accounts.AccountError):
        accounts.set_disabled(db, second.id, True)
    accounts.set_role(db, first.id, "staff")  # a disabled administrator is not an active one
    assert accounts.find_user(db, "first").role == "staff"


def test_users_cli_add_list_set_pin(tmp_path: Path) -> None:
    runner = CliRunner()
    data_dir = str(tmp_path / "data")
    env = {"APPLIANCE_STORAGE_DATA_DIR": data_dir}
    result = runner.invoke(users, ["list", "--data-dir", data_dir], env=env)
    assert result.exit_code == 0 and "no users" in result.output
    result = runner.invoke(users, ["add", "--role", "admin", "--data-dir", data_dir, "boss"],
                           input="boss-password-1\nboss-password-1\n", env=env)
    assert result.exit_code == 0, result.output
    assert "boss-password-1" not in result.output.replace("Password: \n", "")  # hidden input, never echoed
    mismatch = runner.invoke(users, ["add", "--role", "staff", "--data-dir", data_dir, "nurse"],
                             input="nurse-password-1\nsomething-else\nnurse-password-1\nnurse-password-1\n", env=env)
    assert mismatch.exit_code == 0 and "do not match" in mismatch.output
    weak = runner.invoke(users, ["add", "--role", "viewer", "--data-dir", data_dir, "v"], input="short\nshort\n", env=env)
    assert weak.exit_code != 0 and "at least" in weak.output
    pin = runner.invoke(users, ["set-pin", "--data-dir", data_dir, "nurse"], input="2468\n2468\n", env=env)
    assert pin.exit_code == 0, pin.output
    admin_pin = runner.invoke(users, ["set-pin", "--data-dir", data_dir, "boss"], input="2468\n2468\n", env=env)
    assert admin_pin.exit_code != 0 and "password only" in admin_pin.output
    listing = runner.invoke(users, ["list", "--data-dir", data_dir], env=env).output
    assert "boss" in listing and "admin" in listing and "nurse" in listing and "pin=yes" in listing
    db = open_database(Path(data_dir))
    assert accounts.authenticate(db, "boss", "boss-password-1").role == "admin"
    assert accounts.authenticate(db, "nurse", "2468", "pin") is not None
