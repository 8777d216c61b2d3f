"""Web UI accounts: users and roles, scrypt password/PIN hashes, and sign-in.

There is no default account.  The first administrator is created either on the web UI's
set-up page (reachable only while the users table is empty) or with
``appliance users add --role admin NAME`` (:mod:`appliance.cli_users`).

Passwords and PINs are hashed with scrypt (memory-hard, in the standard library, so no native
dependency on the device).  :func:`authenticate` is throttled by :mod:`appliance.login_throttle`:
an unknown user name costs the same scrypt check and counts against the same limits as a real
one, so neither answers nor timing tell which names exist.

The rules that keep the box administrable are checked inside the write transaction: the first
administrator is created only while there is no user, and the last active administrator cannot
be disabled or demoted.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import os
import sqlite3
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable, Optional

import sqlite_utils

from . import login_throttle
from .db import Database
from .errors import ApplianceError

ROLES = ("admin", "staff", "viewer")
LANGUAGES = ("en", "fr")
MIN_PASSWORD = 10
PIN_LENGTH = (4, 8)
# scrypt cost: 16 MiB and ~50 ms per hash on a Jetson-class CPU core.
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1


class AccountError(ApplianceError):
    """An account operation was refused.  ``code`` says why, for callers that word it in the
    user's language; the message is English, for the command line:

    ``bad_name``, ``name_taken``, ``short_password``, ``bad_pin``, ``admin_pin`` (administrators
    have no PIN), ``bad_role``, ``bad_language``, ``no_user``, ``admin_exists`` (set-up after the
    first administrator), ``last_admin`` (disabling or demoting the last active administrator).
    """

    code = "account_refused"

    def __init__(self, code: str, message: str):
        self.code = code
        super().__init__(message)


@dataclass(frozen=True)
class User:
    id: int
    username: str
    role: str
    language: str
    disabled: bool
    has_pin: bool
    session_version: int
    last_login_at: str
    alert_ack_event_id: int = 0

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> "User":
        return cls(id=row["id"], username=row["username"], role=row["role"], language=row["language"],
                   disabled=bool(row["disabled"]), has_pin=bool(row["pin_hash"]),
                   session_version=row["session_version"], last_login_at=row["last_login_at"],
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
        raise AccountError("bad_name", "user names are 1-32 letters, digits, '.', '_' or '-'")
    return name


def check_password(password: str) -> None:
    if len(password) < MIN_PASSWORD:
        raise AccountError("short_password", f"passwords need at least {MIN_PASSWORD} characters")


def check_pin(pin: str) -> None:
    if not pin.isdigit() or not PIN_LENGTH[0] <= len(pin) <= PIN_LENGTH[1]:
        raise AccountError("bad_pin", f"a PIN is {PIN_LENGTH[0]} to {PIN_LENGTH[1]} digits")


def _row(database: Database, username: str) -> Optional[dict[str, Any]]:
    rows = database.query("SELECT * FROM users WHERE username = ?", (username.strip(),))
    return rows[0] if rows else None


def get_user(database: Database, user_id: int) -> Optional[User]:
    rows = database.query("SELECT * FROM users WHERE id = ?", (user_id,))
    return User.from_row(rows[0]) if rows else None


def find_user(database: Database, username: str) -> Optional[User]:
    row = _row(database, username)
    return User.from_row(row) if row else None


def list_users(database: Database) -> list[User]:
    return [User.from_row(r) for r in database.query("SELECT * FROM users ORDER BY username COLLATE NOCASE")]


def user_count(database: Database) -> int:
    return int(database.query("SELECT COUNT(*) AS n FROM users")[0]["n"])


def create_user(database: Database, username: str, password: str, role: str, language: str = "en",
                only_if_first: bool = False) -> User:
    """Add a user.  ``only_if_first`` refuses unless the table is empty, checked inside the
    write transaction so two simultaneous set-up submissions cannot both create an admin."""
    username = check_username(username)
    if role not in ROLES:
        raise AccountError("bad_role", f"role must be one of {', '.join(ROLES)}")
    if language not in LANGUAGES:
        raise AccountError("bad_language", f"language must be one of {', '.join(LANGUAGES)}")
    check_password(password)
    hashed = hash_secret(password)
    with database.atomic() as tx:
        if only_if_first and tx.execute("SELECT COUNT(*) FROM users").fetchone()[0]:
            raise AccountError("admin_exists", "an administrator already exists")
        try:
            tx.execute("INSERT INTO users (username, role, password_hash, language, created_at) VALUES (?, ?, ?, ?, ?)",
                       (username, role, hashed, language, _ts(_now())))
        except sqlite3.IntegrityError as exc:
            raise AccountError("name_taken", f"user {username!r} already exists") from exc
    user = find_user(database, username)
    if user is None:  # only if deleted concurrently; keeps the return type honest
        raise AccountError("no_user", f"user {username!r} vanished after creation")
    return user


def _update(database: Database, user_id: int, sql: str, params: tuple[object, ...], bump_session: bool = False,
            check: Optional[Callable[[Any, int], None]] = None) -> None:
    bump = ", session_version = session_version + 1" if bump_session else ""
    with database.atomic() as tx:
        if check is not None:
            check(tx, user_id)
        cur = tx.execute(f"UPDATE users SET {sql}{bump} WHERE id = ?", (*params, user_id))
        if cur.rowcount != 1:
            raise AccountError("no_user", f"no user with id {user_id}")


def _keeps_an_admin(tx: sqlite_utils.Database, user_id: int) -> None:
    """Refuse a change that takes away the last active administrator (nobody could administer
    the box from its screen any more)."""
    row = tx.execute("SELECT role, disabled FROM users WHERE id = ?", (user_id,)).fetchone()
    if row is None or row[0] != "admin" or row[1]:
        return
    others = tx.execute("SELECT COUNT(*) FROM users WHERE role = 'admin' AND disabled = 0 AND id != ?",
                        (user_id,)).fetchone()[0]
    if not others:
        raise AccountError("last_admin", "the last active administrator cannot be disabled or demoted")


def set_password(database: Database, user_id: int, password: str) -> None:
    """New password; also unlocks the account and ends the user's other sessions."""
    check_password(password)
    _update(database, user_id, "password_hash = ?", (hash_secret(password),), bump_session=True)
    user = get_user(database, user_id)
    if user is not None:
        login_throttle.unlock(database, user.username)


def set_pin(database: Database, user_id: int, pin: Optional[str]) -> None:
    """Set (or, with ``None``, remove) a user's touchscreen PIN.  Admins cannot use PINs."""
    user = get_user(database, user_id)
    if user is None:
        raise AccountError("no_user", f"no user with id {user_id}")
    if pin is None:
        _update(database, user_id, "pin_hash = ''", (), bump_session=True)
        return
    if user.role == "admin":
        raise AccountError("admin_pin", "administrators sign in with their password only")
    check_pin(pin)
    _update(database, user_id, "pin_hash = ?", (hash_secret(pin),), bump_session=True)
    login_throttle.clear_pin_block(database, user.username)


def set_role(database: Database, user_id: int, role: str) -> None:
    if role not in ROLES:
        raise AccountError("bad_role", f"role must be one of {', '.join(ROLES)}")
    # An administrator has no PIN: drop it when promoting.
    extra = ", pin_hash = ''" if role == "admin" else ""
    _update(database, user_id, f"role = ?{extra}", (role,), bump_session=True,
            check=None if role == "admin" else _keeps_an_admin)


def set_disabled(database: Database, user_id: int, disabled: bool) -> None:
    _update(database, user_id, "disabled = ?", (int(disabled),), bump_session=True,
            check=_keeps_an_admin if disabled else None)


def set_language(database: Database, user_id: int, language: str) -> None:
    if language not in LANGUAGES:
        raise AccountError("bad_language", f"language must be one of {', '.join(LANGUAGES)}")
    _update(database, user_id, "language = ?", (language,))


def authenticate(database: Database, username: str, secret: str, method: str = "password",
                 now: Optional[datetime] = None, client: str = "") -> Optional[User]:
    """The user if ``secret`` is right, else None; :class:`~appliance.login_throttle.LockedError`
    when a sign-in limit applies to ``client`` (the remote address; "" for local callers).

    An unknown user, a disabled one, a wrong secret and a PIN for an administrator all answer
    None after one scrypt verification, and all count against the same limits: neither answers
    nor timing tell which user names exist.
    """
    t = (now or login_throttle.clock()).timestamp()
    attempt = login_throttle.charge(database, client, username, method, t)
    row = _row(database, username)
    encoded = (row["pin_hash"] if method == "pin" else row["password_hash"]) if row else ""
    right = verify_secret(secret, encoded or _DUMMY_HASH) and bool(encoded)
    if right and row is not None and not row["disabled"] and not (method == "pin" and row["role"] == "admin"):
        signed_in = _ts(datetime.fromtimestamp(t, timezone.utc))
        with database.atomic() as tx:
            login_throttle.refund(tx, attempt)
            tx.execute("UPDATE users SET last_login_at = ? WHERE id = ?", (signed_in, row["id"]))
        return User.from_row({**row, "last_login_at": signed_in})
    login_throttle.raise_if_locked(database, attempt)
    return None
