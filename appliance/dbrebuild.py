"""`appliance db check` and `appliance db rebuild`: the explicit way back from a lost database.

A rebuild re-indexes the instance files under the data directory into a new, empty database
with the store's own recovery code (:meth:`~appliance.store.InstanceStore.recover`), after
moving the old database file (and its ``-wal``/``-shm``) aside under a dated name: it never
deletes it, so a backup-less expert can still try to salvage it (``sqlite3 OLD .recover``).

What is only in the database is gone with it, and the summary says so: user accounts, the audit
log, reviews, analysis results, the forwarding outbox and the de-identification secret and map.
The rebuilt index queues no analysis (re-running the models would also re-forward, under new
de-identified UIDs, every study the box ever received).  The web set-up page stays closed after
a rebuild (``box-history.json`` records it): the first administrator is created on the box with
``appliance users add --role admin NAME``.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import click

from . import audit
from .cli_common import DatabaseRefused, config_option, setup
from .db import DB_FILENAME, Database, open_database
from .dbguard import (DatabaseUnusableError, History, contents, hold_in_use, open_checked, read_history,
                      write_history)
from .store import INSTANCES_DIRNAME, InstanceStore

log = logging.getLogger(__name__)

ASIDE_INFIX = ".before-rebuild-"
SQLITE_SIDE_FILES = ("", "-wal", "-shm")  # the database and the files SQLite keeps beside it


class RebuildRefusedError(DatabaseUnusableError):
    """A rebuild was not started (the database is usable and --force was not given)."""

    code = "rebuild_refused"


@dataclass
class RebuildSummary:
    data_dir: Path
    problem: str
    database_id: str = ""
    moved_aside: list[tuple[Path, Path]] = field(default_factory=list)
    recovery: dict[str, int] = field(default_factory=dict)
    studies: int = 0
    instances: int = 0

    def text(self) -> str:
        db = self.data_dir / DB_FILENAME
        kept = "\n".join(f"  kept: {src.name} -> {dst}" for src, dst in self.moved_aside) or \
            "  kept: nothing (there was no database file)"
        r = self.recovery
        return (
            f"database rebuilt: {db} (new database id {self.database_id})\n"
            f"  was: {self.problem}\n{kept}\n"
            f"  re-indexed: {self.instances} instances in {self.studies} studies from "
            f"{self.data_dir / INSTANCES_DIRNAME}\n"
            f"  quarantined (not DICOM): {r.get('quarantined', 0)}, unreadable (left in place): "
            f"{r.get('unreadable', 0)}, temp files removed: {r.get('temp_removed', 0)}\n"
            "  lost with the old database (not in the image files): user accounts, the audit log, reviews, "
            "analysis results (studies show as not analysed; `appliance analyze --study UID` runs the models "
            "again), the forwarding outbox and its history, and the de-identification secret and "
            "re-identification map (a study sent again gets new de-identified UIDs at the hub, and reports "
            "coming back for studies sent before cannot be matched to them)\n"
            "  next: create the first administrator on the box: appliance users add --role admin NAME "
            "(the web set-up page stays closed after a rebuild)")


def diagnose(data_dir: Path) -> str:
    """What is wrong with the database ("" if it is usable), checked as `appliance serve` does."""
    try:
        database = open_checked(data_dir, check_integrity=True)
    except DatabaseUnusableError as exc:
        return exc.problem
    database.close()
    return ""


def _move_aside(data_dir: Path) -> list[tuple[Path, Path]]:
    """Rename the database and its side files to one dated name (SQLite finds a WAL by the
    database's name, so they stay a usable set); durable before the new database is created."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    base = data_dir / f"{DB_FILENAME}{ASIDE_INFIX}{stamp}"
    n = 1
    while any(Path(f"{base}{suffix}").exists() for suffix in SQLITE_SIDE_FILES):
        base = data_dir / f"{DB_FILENAME}{ASIDE_INFIX}{stamp}.{n}"
        n += 1
    moved = []
    for suffix in SQLITE_SIDE_FILES:
        src = data_dir / f"{DB_FILENAME}{suffix}"
        if src.exists():
            dst = Path(f"{base}{suffix}")
            os.rename(src, dst)
            moved.append((src, dst))
    fd = os.open(data_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return moved


def rebuild(data_dir: Path, force: bool = False) -> RebuildSummary:
    """Move the database aside and re-index the instance files into a new one (module docstring).

    Raises :class:`DatabaseUnusableError` when another process has the database open, and
    :class:`RebuildRefusedError` when the database is usable and ``force`` is False.
    """

    data_dir = data_dir.absolute()
    data_dir.mkdir(parents=True, exist_ok=True)
    lock = hold_in_use(data_dir, exclusive=True)
    try:
        problem = diagnose(data_dir)
        if not problem and not force:
            raise RebuildRefusedError(
                f"the database {data_dir / DB_FILENAME} is usable: nothing to rebuild.  A rebuild would set aside "
                "its users, audit log, reviews, outbox and de-identification map; use --force to rebuild anyway.")
        before = read_history(data_dir)
        summary = RebuildSummary(data_dir, problem or "usable (rebuilt with --force)")
        summary.moved_aside = _move_aside(data_dir)
        database = Database(data_dir / DB_FILENAME)
        database.migrate()
        summary.database_id = contents(database).database_id
        event: dict[str, Any] = {"at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                                 "was": summary.problem, "kept": [dst.name for _src, dst in summary.moved_aside]}
        history = History(
            database_id=summary.database_id,
            # Unknown without a history: assume the lost database had users.
            had_users=before.had_users if before is not None else True,
            had_instances=before is not None and before.had_instances,
            rebuilds=(before.rebuilds if before is not None else []) + [event])
        # Recorded before the re-index: after a power cut half-way, this is the box's database
        # (set-up closed) and the next start's recovery indexes the files not yet done.
        with database.write_lock():
            write_history(data_dir, history)
        summary.recovery = InstanceStore(data_dir, database).recover(queue_analysis=False)
        row = database.query("SELECT (SELECT COUNT(*) FROM instances) AS i, (SELECT COUNT(*) FROM studies) AS s")[0]
        summary.instances, summary.studies = row["i"], row["s"]
        event["instances_indexed"] = summary.instances
        history.had_instances = history.had_instances or bool(summary.instances)
        with database.write_lock():
            write_history(data_dir, history)
        audit.record(database, "system", "database_rebuilt", detail=event)
        database.close()
    finally:
        lock.close()
    log.info("database rebuilt: %d instances in %d studies", summary.instances, summary.studies)
    return summary


@click.group("db")
def db() -> None:
    """The database (appliance.db): check it, or rebuild its index from the stored images."""


@db.command("check")
@config_option
def check_command(config_file: str | None, data_dir: str | None) -> None:
    """Check the database as `appliance serve` does (PRAGMA quick_check); exit status 3 if unusable."""
    config = setup(config_file, {"storage.data_dir": data_dir})
    database = open_database(config.data_dir, check_integrity=True)
    row = database.query("SELECT (SELECT COUNT(*) FROM instances) AS i, (SELECT COUNT(*) FROM studies) AS s, "
                         "(SELECT COUNT(*) FROM users) AS u")[0]
    click.echo(f"ok: {database.path} ({row['i']} instances in {row['s']} studies, {row['u']} users)")


@db.command("rebuild")
@config_option
@click.option("--force", is_flag=True, help="Rebuild even though the database is usable.")
def rebuild_command(config_file: str | None, data_dir: str | None, force: bool) -> None:
    """Re-index the stored images into a new database; the old file is kept aside, never deleted.

    Stop `appliance serve` first.  Users, audit log, reviews, analysis results, the outbox and the
    de-identification map are lost; create the first administrator afterwards with
    `appliance users add --role admin NAME` (the web set-up page stays closed).
    """
    config = setup(config_file, {"storage.data_dir": data_dir})
    try:
        summary = rebuild(Path(config.data_dir), force=force)
    except RebuildRefusedError as exc:
        raise click.ClickException(str(exc)) from exc
    except DatabaseUnusableError as exc:
        raise DatabaseRefused(str(exc)) from exc
    click.echo(summary.text())
