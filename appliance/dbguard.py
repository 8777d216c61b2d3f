"""No silent loss of the database: refuse a missing, empty, damaged or foreign ``appliance.db``.

A bad SD card or a careless technician can leave the database missing, empty (0 bytes),
truncated or with a damaged page.  Opening it as if nothing had happened would start the box as
new (users gone, the first-administrator set-up open to the network, the audit log, reviews,
outbox and de-identification secret lost without a word) or serve from a corrupt file.

What the box knows of its own past lives where the database cannot take it down with it:

- the instance files under ``instances/``: if there are any, the box has stored images;
- ``box-history.json`` beside the database, written atomically and fsynced when the database is
  created and when it first holds a user and an instance: the database's id (the
  ``database_identity`` table), whether the box ever had users and instances, and its rebuilds.

Every open (every command) checks that the database is this box's: present and non-empty when
the history or the files say the box has a past; readable; and, unless it is the very database
the history describes (same id: the original or a backup of it), holding what the box had.
Otherwise :class:`DatabaseUnusableError` says what is wrong and how to restore a backup or
rebuild the index (``appliance db rebuild``, :mod:`appliance.dbrebuild`).
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import sqlite3
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any, Optional

from .atomicfile import write_atomic
from .db import DB_FILENAME, Database
from .errors import ApplianceError
from .store import INSTANCES_DIRNAME

log = logging.getLogger(__name__)

HISTORY_FILENAME = "box-history.json"
# Held shared by every process that has the database open, exclusively by `appliance db rebuild`.
IN_USE_FILENAME = "appliance.db.inuse"
DETAIL_CHARS = 200  # of SQLite's own words about the damage

_last_opened: list[Path] = []  # for the CLI's message about an error met after the open


class DatabaseUnusableError(ApplianceError):
    """The database cannot be used as it is: ``problem`` (one line) says why, the message adds
    what to do (``remedy``)."""

    code = "database_unusable"

    def __init__(self, problem: str, remedy: str = ""):
        self.problem = problem
        self.remedy = remedy
        super().__init__(f"{problem}\n{remedy}" if remedy else problem)


class DatabaseMissingError(DatabaseUnusableError):
    """The database file is missing or empty although the box has a past."""

    code = "database_missing"


class DatabaseCorruptError(DatabaseUnusableError):
    """The database file is not a database, is truncated, or has a damaged page."""

    code = "database_corrupt"


class DatabaseMismatchError(DatabaseUnusableError):
    """The database is readable but is not this box's: it lacks the users or images the box had."""

    code = "database_mismatch"


class DatabaseInUseError(DatabaseUnusableError):
    """Another appliance process has the database open (or a rebuild is running)."""

    code = "database_in_use"


@dataclass
class History:
    """What ``box-history.json`` records (see the module docstring)."""

    database_id: str = ""
    had_users: bool = False
    had_instances: bool = False
    rebuilds: list[dict[str, Any]] = field(default_factory=list)

    @property
    def setup_closed(self) -> bool:
        """The web set-up page never opens again: the box had users, or its index was rebuilt
        (whose lost database may have had users)."""
        return self.had_users or bool(self.rebuilds)


def history_path(data_dir: Path) -> Path:
    return data_dir / HISTORY_FILENAME


def read_history(data_dir: Path) -> Optional[History]:
    """The recorded history; None on a box that has none yet.  An unreadable file counts as a
    box that had everything (the safe reading) but matches no database."""
    path = history_path(data_dir)
    try:
        raw = json.loads(path.read_bytes())
        return History(database_id=str(raw["database_id"]), had_users=bool(raw["had_users"]),
                       had_instances=bool(raw["had_instances"]), rebuilds=list(raw.get("rebuilds", [])))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.error("%s is unreadable (%s): assuming the box had users and images", path, exc)
        return History(had_users=True, had_instances=True)


def write_history(data_dir: Path, history: History) -> None:
    """Replace the history file atomically and make its directory entry durable.  Callers hold
    the database's write lock, so processes sharing the database do not lose each other's news."""
    body = {"note": "Written by the appliance (appliance/dbguard.py): it tells the box that it has a "
                    "past when its database is lost. Do not delete or edit it.",
            "format": 1, "updated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), **asdict(history)}
    path = history_path(data_dir)
    write_atomic(path, (json.dumps(body, indent=2) + "\n").encode())
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def has_instance_files(data_dir: Path) -> bool:
    """Whether any instance file is stored (stops at the first one found)."""
    root = data_dir / INSTANCES_DIRNAME
    return root.is_dir() and next(root.rglob("*.dcm"), None) is not None


def remedy(data_dir: Path) -> str:
    """How to get a usable database back: the second half of every refusal."""
    db = data_dir / DB_FILENAME
    return (f"To restore a backup: stop the box (systemctl stop appliance), copy the backup to {db}, "
            f"move away any {db.name}-wal and {db.name}-shm beside it, and start again.\n"
            f"To rebuild the index from the stored images instead: appliance db rebuild --data-dir {data_dir}\n"
            "(the old file is kept; users, audit log, reviews, analysis results, the forwarding outbox and the "
            "de-identification map are not in the image files and are lost; then create the first administrator "
            "with: appliance users add --role admin NAME).")


def translate(exc: sqlite3.Error, path: Path) -> DatabaseUnusableError:
    """SQLite's error as ours: damage (not a database, malformed, I/O error) with the remedy,
    anything else (locked, permissions) as a plain one-line message."""
    message = " ".join(str(exc).split())[:DETAIL_CHARS]
    damaged = type(exc) is sqlite3.DatabaseError or any(
        words in message for words in ("malformed", "not a database", "disk I/O error"))
    if damaged:
        return DatabaseCorruptError(f"the database {path} is damaged ({message}).", remedy(path.parent))
    return DatabaseUnusableError(f"cannot use the database {path}: {message}")


def quick_check(database: Database) -> None:
    """``PRAGMA quick_check``: every page of every b-tree read and checked (not the indexes
    against their tables), so a damaged page is found before the box serves from it."""
    started = time.monotonic()
    rows = [row[0] for row in database.db.execute("PRAGMA quick_check").fetchall()]
    if rows != ["ok"]:
        detail = "; ".join(rows[:3]) + (f" (and {len(rows) - 3} more problems)" if len(rows) > 3 else "")
        raise DatabaseCorruptError(f"the database {database.path} is damaged (quick_check: "
                                   f"{' '.join(detail.split())[:DETAIL_CHARS]}).", remedy(database.path.parent))
    elapsed = time.monotonic() - started
    log.log(logging.INFO if elapsed >= 1.0 else logging.DEBUG, "database quick_check: ok in %.2f s", elapsed)


@dataclass(frozen=True)
class Contents:
    database_id: str
    has_users: bool
    has_instances: bool


def contents(database: Database) -> Contents:
    row = database.db.execute(
        "SELECT (SELECT database_id FROM database_identity WHERE id = 1), EXISTS (SELECT 1 FROM users), "
        "EXISTS (SELECT 1 FROM instances)").fetchone()
    return Contents(str(row[0] or ""), bool(row[1]), bool(row[2]))


def _is_blank(path: Path) -> bool:
    try:
        return path.stat().st_size == 0
    except FileNotFoundError:
        return True


def _refuse_blank(data_dir: Path, path: Path, history: Optional[History]) -> None:
    """A missing or 0-byte file is a new box only if neither the history nor the disk say otherwise."""
    past = []
    if has_instance_files(data_dir):
        past.append(f"stored images (in {data_dir / INSTANCES_DIRNAME})")
    if history is not None and history.had_users:
        past.append(f"had user accounts (recorded in {history_path(data_dir)})")
    elif history is not None and history.had_instances and not past:
        past.append(f"stored images (recorded in {history_path(data_dir)})")
    if not past:
        return
    state = "is missing" if not path.exists() else "is empty (0 bytes)"
    raise DatabaseMissingError(
        f"the database {path} {state}, although this box has {' and '.join(past)}.",
        "The box does not start on a new, empty database: that would silently lose its users, audit log, "
        "reviews, forwarding outbox and de-identification secret, and open the first-administrator set-up "
        f"to the network.\n{remedy(data_dir)}")


def _refuse_foreign(data_dir: Path, path: Path, history: Optional[History], found: Contents) -> None:
    """A readable database that is not the one the history describes must hold what the box had."""
    if history is not None and history.database_id == found.database_id:
        return  # the box's own database (or a backup of it); orphan files are the store's to index
    lacks = []
    if not found.has_instances and has_instance_files(data_dir):
        lacks.append(f"no images although image files are stored in {data_dir / INSTANCES_DIRNAME}")
    if not found.has_users and history is not None and history.had_users:
        lacks.append(f"no user accounts although the box has had users (recorded in {history_path(data_dir)})")
    if lacks:
        raise DatabaseMismatchError(
            f"the database {path} is not this box's database: it holds {' and '.join(lacks)} "
            "(an empty database created after the real one was lost?).", remedy(data_dir))
    if history is not None and history.database_id:
        log.warning("the database %s is not the one recorded in %s (restored from an older backup?); "
                    "recording it as the box's database", path, history_path(data_dir))


def _record(database: Database, data_dir: Path, found: Contents) -> None:
    """Bring the history up to date with this database, then watch commits for the first user
    and the first instance until both are recorded."""

    def merged(has_users: bool, has_instances: bool) -> tuple[Optional[History], History]:
        current = read_history(data_dir)
        return current, History(database_id=found.database_id,
                                had_users=has_users or (current is not None and current.had_users),
                                had_instances=has_instances or (current is not None and current.had_instances),
                                rebuilds=current.rebuilds if current is not None else [])

    def update(has_users: bool, has_instances: bool) -> History:  # under the write lock
        current, new = merged(has_users, has_instances)
        if new != current:
            write_history(data_dir, new)
        return new

    current, recorded = merged(found.has_users, found.has_instances)
    if recorded != current:  # usually not: then no need to queue behind the writers
        with database.write_lock():
            recorded = update(found.has_users, found.has_instances)
    if recorded.had_users and recorded.had_instances:
        return

    def on_commit() -> None:  # under the write lock (Database.atomic); must not raise
        try:
            now = contents(database)
            if (now.has_users and not recorded.had_users) or (now.has_instances and not recorded.had_instances):
                latest = update(now.has_users, now.has_instances)
                recorded.had_users, recorded.had_instances = latest.had_users, latest.had_instances
                if latest.had_users and latest.had_instances:
                    database.on_commit = None
        except (OSError, sqlite3.Error) as exc:  # the next commit tries again
            log.error("cannot update %s: %s", history_path(data_dir), exc)

    database.on_commit = on_commit


def hold_in_use(data_dir: Path, exclusive: bool = False) -> IO[bytes]:
    """Lock ``appliance.db.inuse`` (shared: an open database; exclusive: a rebuild) without
    waiting; the lock lasts as long as the returned file object."""
    handle = os.fdopen(os.open(data_dir / IN_USE_FILENAME, os.O_RDWR | os.O_CREAT, 0o600), "r+b")
    try:
        fcntl.flock(handle.fileno(), (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
    except BlockingIOError as exc:
        handle.close()
        raise DatabaseInUseError(
            f"the database in {data_dir} is in use: " + (
                "stop `appliance serve` (systemctl stop appliance) and any other appliance command first"
                if exclusive else "`appliance db rebuild` is running; wait for it to finish")) from exc
    return handle


def open_guarded(data_dir: Path, check_integrity: bool = False) -> Database:
    """Open, check and migrate the database under ``data_dir``, creating it only on a new box;
    see the module docstring.  Raises :class:`DatabaseUnusableError`."""
    data_dir = data_dir.absolute()  # the messages name the files to restore
    data_dir.mkdir(parents=True, exist_ok=True)
    in_use = hold_in_use(data_dir)
    try:
        database = open_checked(data_dir, check_integrity)
    except BaseException:
        in_use.close()
        raise
    database.in_use_lock = in_use
    return database


def open_checked(data_dir: Path, check_integrity: bool = False) -> Database:
    """:func:`open_guarded` for a caller that holds the in-use lock itself (a rebuild)."""
    path = data_dir / DB_FILENAME
    _last_opened[:] = [path]
    database = Database(path)
    try:
        history = read_history(data_dir)
        if _is_blank(path):
            _refuse_blank(data_dir, path, history)
        try:
            # The first statements read the header: "file is not a database" surfaces here.
            database.db.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
            if check_integrity:
                quick_check(database)
            database.migrate()
            found = contents(database)
        except sqlite3.Error as exc:
            raise translate(exc, path) from exc
        _refuse_foreign(data_dir, path, history, found)
        _record(database, data_dir, found)
    except BaseException:
        database.close()
        raise
    return database


def last_opened() -> Optional[Path]:
    """The database this process opened last (the CLI names it when SQLite fails later on)."""
    return _last_opened[0] if _last_opened else None


def first_admin_setup(database: Database) -> str:
    """Whether the web set-up page may create the first administrator: ``"open"`` on a truly new
    box (no history of users, no images), ``"local"`` (from the box's own screen only) when it
    already holds images, ``"closed"`` when it has had users or was rebuilt (the administrator is
    then created with ``appliance users add --role admin NAME``)."""
    data_dir = database.path.parent
    history = read_history(data_dir)
    if history is not None and history.setup_closed:
        return "closed"
    if (history is not None and history.had_instances) or contents(database).has_instances \
            or has_instance_files(data_dir):
        return "local"
    return "open"
