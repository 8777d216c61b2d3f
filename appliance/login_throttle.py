"""Sign-in throttling: guessing is slow, and nobody can lock a user out from their own terminal.

Counters live in the ``login_throttle`` table and are keyed by the *typed* user name, whether or
not it exists, so an unknown name gets the same answers, delays and timing as a real one
(:func:`appliance.accounts.authenticate` checks a dummy hash for it):

- per client address (an IPv6 client by its /64): at most ``LOGIN_RATE_MAX`` attempts per
  ``LOGIN_RATE_WINDOW_S``, and after ``CLIENT_FREE_FAILURES`` failures (any user name) a delay
  that doubles with every further failure, up to ``DELAY_MAX_S``;
- per user name: after ``ACCOUNT_FREE_FAILURES`` failures (from anywhere) the same doubling
  delay, but only for clients that have themselves failed on that name: a terminal that has not
  been failing signs in at once, so an attacker cannot keep the real user out;
- PIN (4 digits, so few guesses may be allowed in total): after ``PIN_MAX_FAILURES`` wrong PINs
  in a row for a name, from anywhere, PIN sign-in for that name is refused until an administrator
  unlocks it, the PIN is changed, or ``PIN_BLOCK_S`` pass; the password still works.

An attempt is counted as a failure before its secret is checked (:func:`charge`) and refunded
when the secret was right (:func:`refund`), so parallel attempts cannot all pass the check
before any of them is counted.  Counters are forgotten ``FAILURE_MEMORY_S`` after their last
failure; ``appliance users unlock`` and the admin users page clear them (:func:`unlock`).
"""
from __future__ import annotations

import ipaddress
import math
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import sqlite_utils

from .db import Database
from .errors import ApplianceError

# See the module docstring and docs/SECURITY.md.
LOGIN_RATE_MAX = 10             # attempts (right or wrong) per client address...
LOGIN_RATE_WINDOW_S = 60        # ...in this many seconds
CLIENT_FREE_FAILURES = 10       # failures from one address (a shared touchscreen) before delays
ACCOUNT_FREE_FAILURES = 5       # failures for one user name before delays
DELAY_BASE_S = 1                # the first delay; it doubles with every further failure...
DELAY_MAX_S = 15 * 60           # ...up to this
FAILURE_MEMORY_S = 3600         # a counter is forgotten this long after its last failure
PIN_MAX_FAILURES = 10           # wrong PINs in a row for a user name: PIN sign-in blocked...
PIN_BLOCK_S = 30 * 86400        # ...until unlocked, a new PIN, or this long without a PIN failure

Counters = dict[str, dict[str, Any]]


class LockedError(ApplianceError):
    """Sign-in refused for a while: too many attempts or failures (``scope`` says which limit:
    ``client``, ``account`` or ``pin``).  ``attempted`` is true when this very attempt was checked
    (and failed) before the limit applied."""

    code = "sign_in_locked"

    def __init__(self, retry_after: float, scope: str, attempted: bool = False):
        self.retry_after = max(1, math.ceil(retry_after))
        self.scope = scope
        self.attempted = attempted
        super().__init__(f"sign-in refused ({scope} limit) for {self.retry_after} s")


@dataclass(frozen=True)
class LockState:
    """A user name's throttling state as an administrator sees it."""

    failures: int       # failed sign-ins counted for the name (all clients)
    wait_s: int         # how long clients that failed on the name must still wait
    pin_blocked: bool


@dataclass(frozen=True)
class Attempt:
    """A charged sign-in attempt: its counter keys, time, and the counters before the charge."""

    keys: dict[str, str]
    method: str
    t: float
    before: Counters

    @property
    def per_secret(self) -> tuple[str, ...]:
        """The counters a right secret clears (a right password does not lift a PIN block)."""
        return ("pair", "pin") if self.method == "pin" else ("pair",)


def clock() -> datetime:
    """The time the sign-in limits see (tests replace it to walk through delays)."""
    return datetime.now(timezone.utc)


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


def _counters(database: Database | sqlite_utils.Database, keys: dict[str, str], t: float) -> Counters:
    """The counters for ``keys`` as of ``t``: forgotten ones read as zero, and the rate window
    restarts once it has passed."""
    marks = ", ".join("?" * len(keys))
    stored = {r["key"]: r for r in database.query(f"SELECT * FROM login_throttle WHERE key IN ({marks})",
                                                  tuple(keys.values()))}
    out = {}
    for name, key in keys.items():
        if name == "rate":  # a window from its first attempt
            since, memory_s = "first_at", LOGIN_RATE_WINDOW_S
        else:  # failures, remembered for a while after the last one
            since, memory_s = "last_at", (PIN_BLOCK_S if name == "pin" else FAILURE_MEMORY_S)
        row = stored.get(key)
        if row is not None and t - row[since] < memory_s:
            out[name] = dict(row)
        else:
            out[name] = {"key": key, "failures": 0, "first_at": t, "last_at": 0.0}
    return out


def _save(tx: sqlite_utils.Database, counter: dict[str, Any]) -> None:
    if counter["failures"] <= 0:
        tx.execute("DELETE FROM login_throttle WHERE key = ?", (counter["key"],))
    else:
        tx.execute("INSERT OR REPLACE INTO login_throttle (key, failures, first_at, last_at) VALUES (?, ?, ?, ?)",
                   (counter["key"], counter["failures"], counter["first_at"], counter["last_at"]))


def _longest_wait(counters: Counters, t: float, method: str) -> tuple[float, str]:
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


def charge(database: Database, client: str, username: str, method: str, t: float) -> Attempt:
    """Admit an attempt of ``client`` on ``username`` at time ``t`` and count it as a failure,
    or raise :class:`LockedError` (not counted) while a limit applies."""
    keys = _keys(client, username)
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
        attempt = Attempt(keys=keys, method=method, t=t, before=counters)
        for name in ("rate", "client", "account", *attempt.per_secret):
            _save(tx, {**counters[name], "failures": counters[name]["failures"] + 1, "last_at": t})
    return attempt


def refund(tx: sqlite_utils.Database, attempt: Attempt) -> None:
    """The secret was right: take the charge back, inside the caller's sign-in transaction.  The
    client's and the name's failure counts lose this attempt, the name's failures from this
    client (and, for a PIN, the PIN's run of failures) are cleared; the rate counter keeps it
    (every checked attempt counts)."""
    current = _counters(tx, attempt.keys, attempt.t)
    for name in ("client", "account"):
        refunded = {**current[name], "failures": current[name]["failures"] - 1}
        if refunded["last_at"] == attempt.t:  # no failure since the charge: its time goes too
            refunded["last_at"] = attempt.before[name]["last_at"]
        _save(tx, refunded)
    for name in attempt.per_secret:
        _save(tx, {**current[name], "failures": 0})


def raise_if_locked(database: Database, attempt: Attempt) -> None:
    """After a failed attempt: :class:`LockedError` (``attempted``) if it brought on a limit."""
    wait, scope = _longest_wait(_counters(database, attempt.keys, attempt.t), attempt.t, attempt.method)
    if wait:
        raise LockedError(wait, scope, attempted=True)


def lock_state(database: Database, username: str, now: datetime | None = None) -> LockState:
    """What the admin users page and ``appliance users list`` show for a user name."""
    t = (now or clock()).timestamp()
    counters = _counters(database, _keys("", username), t)
    account = counters["account"]
    wait = account["last_at"] + _delay(account["failures"], ACCOUNT_FREE_FAILURES) - t
    return LockState(failures=account["failures"], wait_s=max(0, math.ceil(wait)),
                     pin_blocked=counters["pin"]["failures"] >= PIN_MAX_FAILURES)


def unlock(database: Database, username: str) -> int:
    """Forget a user name's failures everywhere (its delays and PIN block); returns the number
    of counters cleared."""
    name = _name_key(username)
    prefix = f"pair:{name}|"
    with database.atomic() as tx:
        return int(tx.execute("DELETE FROM login_throttle WHERE key IN (?, ?) OR substr(key, 1, ?) = ?",
                              (f"account:{name}", f"pin:{name}", len(prefix), prefix)).rowcount)


def unlock_client(database: Database, address: str) -> int:
    """Forget a client's attempts and failures (a shared terminal after a fumbling session)."""
    key = client_key(address)
    suffix = f"|{key}"
    with database.atomic() as tx:
        return int(tx.execute("DELETE FROM login_throttle WHERE key IN (?, ?) OR (substr(key, 1, 5) = 'pair:' "
                              "AND substr(key, -?) = ?)", (f"client:{key}", f"rate:{key}", len(suffix),
                                                           suffix)).rowcount)


def clear_pin_block(database: Database, username: str) -> None:
    """A new PIN lifts a PIN block: the old one was what was guessed at."""
    with database.atomic() as tx:
        tx.execute("DELETE FROM login_throttle WHERE key = ?", (f"pin:{_name_key(username)}",))
