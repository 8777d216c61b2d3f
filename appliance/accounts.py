"""Web UI accounts: users and roles, scrypt password/PIN hashes, lockout, and `appliance users`.

There is no default account.  The first administrator is created either on the web UI's
set-up page (reachable only while the users table is empty) or with
``appliance users add --role admin NAME``.

Passwords and PINs are hashed with scrypt (memory-hard, in the standard library, so no native
dependency on the device).  Password and PIN failures share one counter per user: after
``MAX_FAILURES`` consecutive failures the account is locked for ``LOCKOUT_S`` seconds, and
while locked even the right secret is refused, so guessing a 4-digit PIN online is hopeless.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import os
import sqlite3
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, Optional

import click

from .cli_common import config_option

from .errors import ApplianceError

ROLES = ("admin", "staff", "viewer")
LANGUAGES = ("en", "fr")
MIN_PASSWORD = 10
PIN_LENGTH = (4, 8)
MAX_FAILURES = 5
LOCKOUT_S = 300
# scrypt cost: 16 MiB and ~50 ms per hash on a Jetson-class CPU core.
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1


class AccountError(ApplianceError):
    """An account operation was refused (bad name, weak password, unknown user...)."""


class LockedError(AccountError):
    """Too many failed logins: the account is temporarily locked."""

    def __init__(self, until: datetime):
        super().__init__(f"account locked until {until.isoformat(timespec='seconds')}")
        self.until = until


@dataclass(frozen=True)
class User:
    id: int
    username: str
    role: str
    language: str
    disabled: bool
    has_pin: bool
    session_version: int
    locked_until: str
    failed_logins: int
    last_login_at: str
    alert_ack_event_id: int = 0

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> "User":
        return cls(id=row["id"], username=row["username"], role=row["role"], language=row["language"],
                   disabled=bool(row["disabled"]), has_pin=bool(row["pin_hash"]),
                   session_version=row["session_version"], locked_until=row["locked_until"],
                   failed_logins=row["failed_logins"], last_login_at=row["last_login_at"],
                   alert_ack_event_id=row["alert_ack_event_id"])


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _ts(dt: datetime) -> str:
    return dt.isoformat(timespec="milliseconds")


def hash_secret(secret: str) -> str:
    """``scrypt$n$r$p$salt$hash`` (base64); parameters stored so they can be raised later."""
    salt = os.urandom(16)
    digest = hashlib.scrypt(secret.encode("utf-8"), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P, dklen=32)
    b64 = base64.b64encode
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${b64(salt).decode()}${b64(digest).decode()}"


def verify_secret(secret: str, encoded: str) -> bool:
    try:
        scheme, n, r, p, salt, digest = encoded.split("$")
        if scheme != "scrypt":
            return False
        expected = base64.b64decode(digest)
        actual = hashlib.scrypt(secret.encode("utf-8"), salt=base64.b64decode(salt), n=int(n), r=int(r),
                                p=int(p), dklen=len(expected))
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(actual, expected)


# Verified against when the user does not exist, so response time does not reveal valid names.
_DUMMY_HASH = hash_secret("not-a-real-account")


def check_username(name: str) -> str:
    name = name.strip()
    if not 1 <= len(name) <= 32 or not all(c.isalnum() or c in "._-" for c in name):
        raise AccountError("user names are 1-32 letters, digits, '.', '_' or '-'")
    return name


def check_password(password: str) -> None:
    if len(password) < MIN_PASSWORD:
        raise AccountError(f"passwords need at least {MIN_PASSWORD} characters")


def check_pin(pin: str) -> None:
    if not pin.isdigit() or not PIN_LENGTH[0] <= len(pin) <= PIN_LENGTH[1]:
        raise AccountError(f"a PIN is {PIN_LENGTH[0]} to {PIN_LENGTH[1]} digits")


def _row(database: Any, username: str) -> Optional[dict[str, Any]]:
    rows = database.query("SELECT * FROM users WHERE username = ?", (username.strip(),))
    return rows[0] if rows else None


def get_user(database: Any, user_id: int) -> Optional[User]:
    rows = database.query("SELECT * FROM users WHERE id = ?", (user_id,))
    return User.from_row(rows[0]) if rows else None


def find_user(database: Any, username: str) -> Optional[User]:
    row = _row(database, username)
    return User.from_row(row) if row else None


def list_users(database: Any) -> list[User]:
    return [User.from_row(r) for r in database.query("SELECT * FROM users ORDER BY username COLLATE NOCASE")]


def user_count(database: Any) -> int:
    return int(database.query("SELECT COUNT(*) AS n FROM users")[0]["n"])


def create_user(database: Any, username: str, password: str, role: str, language: str = "en",
                only_if_first: bool = False) -> User:
    """Add a user.  ``only_if_first`` refuses unless the table is empty, checked inside the
    write transaction so two simultaneous set-up submissions cannot both create an admin."""
    username = check_username(username)
    if role not in ROLES:
        raise AccountError(f"role must be one of {', '.join(ROLES)}")
    if language not in LANGUAGES:
        raise AccountError(f"language must be one of {', '.join(LANGUAGES)}")
    check_password(password)
    hashed = hash_secret(password)
    with database.atomic() as tx:
        if only_if_first and tx.execute("SELECT COUNT(*) FROM users").fetchone()[0]:
            raise AccountError("an administrator already exists")
        try:
            tx.execute("INSERT INTO users (username, role, password_hash, language, created_at) VALUES (?, ?, ?, ?, ?)",
                       (username, role, hashed, language, _ts(_now())))
        except sqlite3.IntegrityError as exc:
            raise AccountError(f"user {username!r} already exists") from exc
    user = find_user(database, username)
    if user is None:  # only if deleted concurrently; keeps the return type honest
        raise AccountError(f"user {username!r} vanished after creation")
    return user


def _update(database: Any, user_id: int, sql: str, params: tuple, bump_session: bool = False) -> None:
    bump = ", session_version = session_version + 1" if bump_session else ""
    with database.atomic() as tx:
        cur = tx.execute(f"UPDATE users SET {sql}{bump} WHERE id = ?", (*params, user_id))
        if cur.rowcount != 1:
            raise AccountError(f"no user with id {user_id}")


def set_password(database: Any, user_id: int, password: str) -> None:
    """New password; also unlocks the account and ends the user's other sessions."""
    check_password(password)
    _update(database, user_id, "password_hash = ?, failed_logins = 0, locked_until = ''",
            (hash_secret(password),), bump_session=True)


def set_pin(database: Any, user_id: int, pin: Optional[str]) -> None:
    """Set (or, with ``None``, remove) a user's touchscreen PIN.  Admins cannot use PINs."""
    user = get_user(database, user_id)
    if user is None:
        raise AccountError(f"no user with id {user_id}")
    if pin is None:
        _update(database, user_id, "pin_hash = ''", (), bump_session=True)
        return
    if user.role == "admin":
        raise AccountError("administrators sign in with their password only")
    check_pin(pin)
    _update(database, user_id, "pin_hash = ?, failed_logins = 0, locked_until = ''", (hash_secret(pin),),
            bump_session=True)


def set_role(database: Any, user_id: int, role: str) -> None:
    if role not in ROLES:
        raise AccountError(f"role must be one of {', '.join(ROLES)}")
    # An administrator has no PIN: drop it when promoting.
    extra = ", pin_hash = ''" if role == "admin" else ""
    _update(database, user_id, f"role = ?{extra}", (role,), bump_session=True)


def set_disabled(database: Any, user_id: int, disabled: bool) -> None:
    _update(database, user_id, "disabled = ?", (int(disabled),), bump_session=True)


def set_language(database: Any, user_id: int, language: str) -> None:
    if language not in LANGUAGES:
        raise AccountError(f"language must be one of {', '.join(LANGUAGES)}")
    _update(database, user_id, "language = ?", (language,))


def active_admins(database: Any) -> int:
    return int(database.query("SELECT COUNT(*) AS n FROM users WHERE role = 'admin' AND disabled = 0")[0]["n"])


def authenticate(database: Any, username: str, secret: str, method: str = "password",
                 now: Optional[datetime] = None) -> Optional[User]:
    """The user if ``secret`` is right, else None.  Raises :class:`LockedError` while locked.

    A disabled user, an unknown user and a wrong secret all answer None (the caller shows one
    message), but only known users accumulate failures.
    """
    now = now or _now()
    row = _row(database, username)
    if row is None:
        verify_secret(secret, _DUMMY_HASH)
        return None
    if row["locked_until"] and datetime.fromisoformat(row["locked_until"]) > now:
        raise LockedError(datetime.fromisoformat(row["locked_until"]))
    encoded = row["pin_hash"] if method == "pin" else row["password_hash"]
    ok = bool(encoded) and verify_secret(secret, encoded) and not row["disabled"]
    if method == "pin" and row["role"] == "admin":
        ok = False
    with database.atomic() as tx:
        if ok:
            tx.execute("UPDATE users SET failed_logins = 0, locked_until = '', last_login_at = ? WHERE id = ?",
                       (_ts(now), row["id"]))
            return User.from_row({**row, "failed_logins": 0, "locked_until": "", "last_login_at": _ts(now)})
        failures = row["failed_logins"] + 1
        locked = _ts(now + timedelta(seconds=LOCKOUT_S)) if failures >= MAX_FAILURES else ""
        # The counter restarts once a lock is set, so the next lock needs MAX_FAILURES more.
        tx.execute("UPDATE users SET failed_logins = ?, locked_until = ? WHERE id = ?",
                   (0 if locked else failures, locked, row["id"]))
    if locked:
        raise LockedError(datetime.fromisoformat(locked))
    return None


# -- `appliance users` -----------------------------------------------------------------------


def _open(config_file: Optional[str], data_dir: Optional[str]) -> Any:
    from .cli_common import setup
    from .db import open_database

    return open_database(setup(config_file, {"storage.data_dir": data_dir}).data_dir)


@click.group("users")
def users() -> None:
    """Web UI accounts (there is no default password)."""


@users.command("add")
@config_option
@click.option("--role", type=click.Choice(ROLES), required=True)
@click.option("--language", type=click.Choice(LANGUAGES), default="en", show_default=True)
@click.argument("name")
def add_command(config_file: Optional[str], data_dir: Optional[str], role: str, language: str, name: str) -> None:
    """Add a user; asks for the password twice (never on the command line)."""
    database = _open(config_file, data_dir)
    password = click.prompt("Password", hide_input=True, confirmation_prompt=True)
    try:
        user = create_user(database, name, password, role, language)
    except AccountError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"added {user.username} ({user.role})")


@users.command("list")
@config_option
def list_command(config_file: Optional[str], data_dir: Optional[str]) -> None:
    """List users with their role and state."""
    database = _open(config_file, data_dir)
    rows = list_users(database)
    if not rows:
        click.echo("no users (the web UI asks for the first administrator)")
    for u in rows:
        state = "disabled" if u.disabled else "locked" if u.locked_until and \
            datetime.fromisoformat(u.locked_until) > _now() else "active"
        click.echo(f"{u.username:<24} {u.role:<7} {state:<9} pin={'yes' if u.has_pin else 'no'} "
                   f"lang={u.language} last_login={u.last_login_at or '-'}")


@users.command("set-pin")
@config_option
@click.option("--remove", is_flag=True, help="Remove the PIN instead of setting one.")
@click.argument("name")
def set_pin_command(config_file: Optional[str], data_dir: Optional[str], remove: bool, name: str) -> None:
    """Set a touchscreen PIN (4-8 digits) for a staff or viewer user; asks for it twice."""
    database = _open(config_file, data_dir)
    user = find_user(database, name)
    if user is None:
        raise click.ClickException(f"no user {name!r}")
    try:
        if remove:
            set_pin(database, user.id, None)
            click.echo(f"PIN removed for {user.username}")
            return
        pin = click.prompt("PIN", hide_input=True, confirmation_prompt=True)
        set_pin(database, user.id, pin)
    except AccountError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"PIN set for {user.username}")
