"""Web UI accounts: users and roles, scrypt password/PIN hashes, lockout, and `appliance users`.

There is no default account.  The first administrator is created either on the web UI's
set-up page (reachable only while the users table is empty) or with
``appliance users add --role admin NAME``.

Passwords and PINs are hashed with scrypt (memory-hard, in the standard library, so no native
dependency on the device).

Sign-in throttling (:func:`authenticate`) keeps two promises: guessing is slow, and nobody can
lock a user out from their own terminal.  Counters live in the ``login_throttle`` table and are
keyed by the *typed* user name, whether or not it exists, so an unknown name gets the same
answers, delays and timing (a dummy scrypt hash is checked) as a real one:

- per client address (an IPv6 client by its /64): at most ``LOGIN_RATE_MAX`` attempts per
  ``LOGIN_RATE_WINDOW_S``, and after ``CLIENT_FREE_FAILURES`` failures (any user name) a delay
  that doubles with every further failure, up to ``DELAY_MAX_S``;
- per user name: after ``ACCOUNT_FREE_FAILURES`` failures (from anywhere) the same doubling
  delay, but only for clients that have themselves failed on that name: a terminal that has not
  been failing signs in at once, so an attacker cannot keep the real user out;
- PIN (4 digits, so few guesses may be allowed in total): after ``PIN_MAX_FAILURES`` wrong PINs
  in a row for a name, from anywhere, PIN sign-in for that name is refused until an administrator
  unlocks it, the PIN is changed, or ``PIN_BLOCK_S`` pass; the password still works.

Counters are forgotten ``FAILURE_MEMORY_S`` after their last failure.  ``appliance users unlock``
and the admin users page clear them.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import math
import os
import sqlite3
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Optional

import click

from .cli_common import config_option

from .errors import ApplianceError

ROLES = ("admin", "staff", "viewer")
LANGUAGES = ("en", "fr")
MIN_PASSWORD = 10
PIN_LENGTH = (4, 8)
# Sign-in throttling (see the module docstring and docs/SECURITY.md).
LOGIN_RATE_MAX = 10             # attempts (right or wrong) per client address...
LOGIN_RATE_WINDOW_S = 60        # ...in this many seconds
CLIENT_FREE_FAILURES = 10       # failures from one address (a shared touchscreen) before delays
ACCOUNT_FREE_FAILURES = 5       # failures for one user name before delays
DELAY_BASE_S = 1                # the first delay; it doubles with every further failure...
DELAY_MAX_S = 15 * 60           # ...up to this
FAILURE_MEMORY_S = 3600         # a counter is forgotten this long after its last failure
PIN_MAX_FAILURES = 10           # wrong PINs in a row for a user name: PIN sign-in blocked...
PIN_BLOCK_S = 30 * 86400        # ...until unlocked, a new PIN, or this long without a PIN failure
# scrypt cost: 16 MiB and ~50 ms per hash on a Jetson-class CPU core.
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1


class AccountError(ApplianceError):
    """An account operation was refused (bad name, weak password, unknown user...)."""


class LockedError(AccountError):
    """Sign-in refused for a while: too many attempts or failures (``scope`` says which limit:
    ``client``, ``account`` or ``pin``).  ``attempted`` is true when this very attempt was checked
    (and failed) before the limit applied."""

    def __init__(self, retry_after: float, scope: str, attempted: bool = False):
        self.retry_after = max(1, math.ceil(retry_after))
        self.scope = scope
        self.attempted = attempted
        super().__init__(f"sign-in refused ({scope} limit) for {self.retry_after} s")


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
    _update(database, user_id, "password_hash = ?", (hash_secret(password),), bump_session=True)
    user = get_user(database, user_id)
    if user is not None:
        unlock(database, user.username)


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
    _update(database, user_id, "pin_hash = ?", (hash_secret(pin),), bump_session=True)
    with database.atomic() as tx:  # a new PIN lifts a PIN block: the old one was what was guessed at
        tx.execute("DELETE FROM login_throttle WHERE key = ?", (f"pin:{_name_key(user.username)}",))


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


# -- sign-in throttling ----------------------------------------------------------------------


@dataclass(frozen=True)
class LockState:
    """A user name's throttling state as an administrator sees it."""

    failures: int       # failed sign-ins counted for the name (all clients)
    wait_s: int         # how long clients that failed on the name must still wait
    pin_blocked: bool


def client_key(address: str) -> str:
    """The throttled identity of a client: its IPv4 address, or its IPv6 /64 (a host picks any
    address in its /64 at will, so single IPv6 addresses would be no limit at all)."""
    try:
        ip = ipaddress.ip_address(address.split("%")[0])
    except ValueError:
        return address[:64] or "local"
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


def _name_key(username: str) -> str:
    return username.strip().casefold()[:64]


def _keys(client: str, username: str) -> dict[str, str]:
    address, name = client_key(client), _name_key(username)
    return {"rate": f"rate:{address}", "client": f"client:{address}", "account": f"account:{name}",
            "pair": f"pair:{name}|{address}", "pin": f"pin:{name}"}


def _delay(failures: int, free: int) -> float:
    if failures < free:
        return 0.0
    return float(min(DELAY_MAX_S, DELAY_BASE_S * 2 ** min(failures - free, 32)))


def _counters(database: Any, keys: dict[str, str], t: float) -> dict[str, dict[str, Any]]:
    """The counters for ``keys`` as of ``t``: forgotten ones read as zero, and the rate window
    restarts once it has passed."""
    marks = ", ".join("?" * len(keys))
    stored = {r["key"]: r for r in database.query(f"SELECT * FROM login_throttle WHERE key IN ({marks})",
                                                  tuple(keys.values()))}
    out = {}
    for name, key in keys.items():
        row = stored.get(key)
        if name == "rate":  # a window from its first attempt
            alive = row is not None and t - row["first_at"] < LOGIN_RATE_WINDOW_S
        else:  # failures, remembered for a while after the last one
            alive = row is not None and t - row["last_at"] < (PIN_BLOCK_S if name == "pin" else FAILURE_MEMORY_S)
        out[name] = dict(row) if alive else {"key": key, "failures": 0, "first_at": t, "last_at": 0.0}
    return out


def _save(tx: Any, counter: dict[str, Any]) -> None:
    if counter["failures"] <= 0:
        tx.execute("DELETE FROM login_throttle WHERE key = ?", (counter["key"],))
    else:
        tx.execute("INSERT OR REPLACE INTO login_throttle (key, failures, first_at, last_at) VALUES (?, ?, ?, ?)",
                   (counter["key"], counter["failures"], counter["first_at"], counter["last_at"]))


def _longest_wait(counters: dict[str, dict[str, Any]], t: float, method: str) -> tuple[float, str]:
    """(seconds, scope) this client must wait before a failure-limited attempt; (0, "") if none."""
    client, account = counters["client"], counters["account"]
    waits = [(client["last_at"] + _delay(client["failures"], CLIENT_FREE_FAILURES) - t, "client")]
    if counters["pair"]["failures"]:
        # The per-name delay binds only clients that failed on the name themselves.
        waits.append((account["last_at"] + _delay(account["failures"], ACCOUNT_FREE_FAILURES) - t, "account"))
    pin = counters["pin"]
    if method == "pin" and pin["failures"] >= PIN_MAX_FAILURES:
        waits.append((pin["last_at"] + PIN_BLOCK_S - t, "pin"))
    wait = max(waits)
    return wait if wait[0] > 0 else (0.0, "")


def authenticate(database: Any, username: str, secret: str, method: str = "password",
                 now: Optional[datetime] = None, client: str = "") -> Optional[User]:
    """The user if ``secret`` is right, else None; :class:`LockedError` when a sign-in limit
    applies to ``client`` (the remote address; "" for local callers).

    An unknown user, a disabled one, a wrong secret and a PIN for an administrator all answer
    None after one scrypt verification, and all count against the same limits: neither answers
    nor timing tell which user names exist.
    """
    t = (now or _now()).timestamp()
    keys = _keys(client, username)
    per_secret = ("pair", "pin") if method == "pin" else ("pair",)  # what a right secret clears
    with database.atomic() as tx:
        tx.execute("DELETE FROM login_throttle WHERE last_at < ? AND (key NOT LIKE 'pin:%' OR last_at < ?)",
                   (t - FAILURE_MEMORY_S, t - PIN_BLOCK_S))
        counters = _counters(tx, keys, t)
        wait, scope = _longest_wait(counters, t, method)
        rate = counters["rate"]
        if rate["failures"] >= LOGIN_RATE_MAX:
            wait, scope = max((wait, scope), (rate["first_at"] + LOGIN_RATE_WINDOW_S - t, "client"))
        if wait > 0:
            raise LockedError(wait, scope)
        # Counted as a failure before the secret is checked and refunded if it is right, so
        # parallel attempts cannot all pass the check before any of them is counted.
        for name in ("rate", "client", "account", *per_secret):
            _save(tx, {**counters[name], "failures": counters[name]["failures"] + 1, "last_at": t})
    row = _row(database, username)
    encoded = (row["pin_hash"] if method == "pin" else row["password_hash"]) if row else ""
    right = verify_secret(secret, encoded or _DUMMY_HASH) and bool(encoded)
    if right and row is not None and not row["disabled"] and not (method == "pin" and row["role"] == "admin"):
        signed_in = _ts(datetime.fromtimestamp(t, timezone.utc))
        with database.atomic() as tx:
            current = _counters(tx, keys, t)
            for name in ("client", "account"):
                refunded = {**current[name], "failures": current[name]["failures"] - 1}
                if refunded["last_at"] == t:  # no failure since the charge: its time goes too
                    refunded["last_at"] = counters[name]["last_at"]
                _save(tx, refunded)
            for name in per_secret:
                _save(tx, {**current[name], "failures": 0})
            tx.execute("UPDATE users SET last_login_at = ? WHERE id = ?", (signed_in, row["id"]))
        return User.from_row({**row, "last_login_at": signed_in})
    wait, scope = _longest_wait(_counters(database, keys, t), t, method)
    if wait:
        raise LockedError(wait, scope, attempted=True)
    return None


def lock_state(database: Any, username: str, now: Optional[datetime] = None) -> LockState:
    """What the admin users page and ``appliance users list`` show for a user name."""
    t = (now or _now()).timestamp()
    counters = _counters(database, _keys("", username), t)
    account = counters["account"]
    wait = account["last_at"] + _delay(account["failures"], ACCOUNT_FREE_FAILURES) - t
    return LockState(failures=account["failures"], wait_s=max(0, math.ceil(wait)),
                     pin_blocked=counters["pin"]["failures"] >= PIN_MAX_FAILURES)


def unlock(database: Any, username: str) -> int:
    """Forget a user name's failures everywhere (its delays and PIN block); returns the number
    of counters cleared."""
    name = _name_key(username)
    prefix = f"pair:{name}|"
    with database.atomic() as tx:
        return int(tx.execute("DELETE FROM login_throttle WHERE key IN (?, ?) OR substr(key, 1, ?) = ?",
                              (f"account:{name}", f"pin:{name}", len(prefix), prefix)).rowcount)


def unlock_client(database: Any, address: str) -> int:
    """Forget a client's attempts and failures (a shared terminal after a fumbling session)."""
    key = client_key(address)
    suffix = f"|{key}"
    with database.atomic() as tx:
        return int(tx.execute("DELETE FROM login_throttle WHERE key IN (?, ?) OR (substr(key, 1, 5) = 'pair:' "
                              "AND substr(key, -?) = ?)", (f"client:{key}", f"rate:{key}", len(suffix),
                                                           suffix)).rowcount)


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
        lock = lock_state(database, u.username)
        state = "disabled" if u.disabled else "locked" if lock.wait_s else "active"
        pin = "blocked" if lock.pin_blocked else "yes" if u.has_pin else "no"
        click.echo(f"{u.username:<24} {u.role:<7} {state:<9} pin={pin} "
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


@users.command("unlock")
@config_option
@click.option("--client", "client", metavar="ADDRESS", help="Also clear this client address's attempts.")
@click.argument("name", required=False)
def unlock_command(config_file: Optional[str], data_dir: Optional[str], client: Optional[str],
                   name: Optional[str]) -> None:
    """Clear sign-in delays and the PIN block of user NAME (known or not), and/or of a client."""
    if not name and not client:
        raise click.UsageError("give a user NAME, --client ADDRESS, or both")
    database = _open(config_file, data_dir)
    if name:
        click.echo(f"{name}: {unlock(database, name)} counter(s) cleared")
    if client:
        click.echo(f"client {client_key(client)}: {unlock_client(database, client)} counter(s) cleared")
