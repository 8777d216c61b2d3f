"""No silent loss of the database (issue 11, point 6), against `appliance serve` and the CLI.

A box with stored images and an administrator (created on the web set-up page) is built once;
each test copies it and deletes, empties, truncates or damages its database.  The box must then
refuse to start (exit status 3, the restore/rebuild message, no traceback) and never answer the
set-up page; `appliance db rebuild` must bring the studies back, keep the old file, and leave the
set-up page closed; a backup copied back must be accepted; a new data directory starts as new.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import pydicom
import pytest
import requests

from tests.helpers import PROJECT_ROOT, ServerProcess, dcmsend, run_cli, sample

SAMPLES = ("CT_small.dcm", "MR_small.dcm", "JPEG-LL.dcm", "SC_rgb_rle.dcm")
ADMIN, PASSWORD = "boss", "long-enough-password"
EXIT_DATABASE = 3
REFUSAL_TIMEOUT_S = 60


def _env(tmp: Path) -> dict[str, str]:
    # No models: analysis is not what is tested, and it would only load the machine.
    engines = tmp / "no-engines"
    engines.mkdir(exist_ok=True)
    return {"APPLIANCE_ANALYZE_ENGINES_DIR": str(engines), "APPLIANCE_STORAGE_MIN_FREE_MB": "0"}


def _server(data_dir: Path, **kwargs: Any) -> ServerProcess:
    return ServerProcess(data_dir, extra_env=_env(data_dir.parent), **kwargs)


def _cli(data_dir: Path, *args: str, stdin: str = "") -> subprocess.CompletedProcess:
    """`appliance ARGS --data-dir D`, with ``stdin`` for commands that prompt."""
    env = {**os.environ, **_env(data_dir.parent)}
    return subprocess.run([sys.executable, "-m", "appliance.cli", *args, "--data-dir", str(data_dir)],
                          input=stdin, capture_output=True, text=True, env=env, timeout=120, cwd=PROJECT_ROOT)


def _csrf(html: str) -> str:
    match = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert match, html[:2000]
    return match.group(1)


def _csrf_meta(html: str) -> str:
    match = re.search(r'name="csrf-token" content="([^"]+)"', html)
    assert match, html[:2000]
    return match.group(1)


def _instance_count(data_dir: Path) -> int:
    conn = sqlite3.connect(data_dir / "appliance.db")
    try:
        return conn.execute("SELECT COUNT(*) FROM instances").fetchone()[0]
    finally:
        conn.close()


def _checkpoint(db_path: Path) -> None:
    """Fold the WAL into the file, so damage done to the file is what SQLite reads (the last
    connection to close removes the WAL; the file stays in WAL mode, as the box keeps it)."""
    conn = sqlite3.connect(db_path)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    assert not Path(f"{db_path}-wal").exists()


@pytest.fixture(scope="module")
def past_box(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, int]]:
    """A data directory whose box received images over DICOM and had its administrator created
    on the web set-up page (the way a new box is set up), then was stopped cleanly."""
    data_dir = tmp_path_factory.mktemp("past") / "data"
    server = _server(data_dir).start()
    try:
        sent = dcmsend(server.dicom_port, [sample(name) for name in SAMPLES])
        assert sent.returncode == 0, sent.stderr
        base = f"http://127.0.0.1:{server.http_port}"
        with requests.Session() as web:
            page = web.get(base + "/setup", timeout=10)
            assert page.status_code == 200  # a new box, from the box itself
            created = web.post(base + "/setup", data={"csrf_token": _csrf(page.text), "username": ADMIN,
                                                      "password": PASSWORD, "confirm": PASSWORD, "language": "en"},
                               timeout=30, allow_redirects=False)
            assert created.status_code == 302, created.text[:2000]
            assert web.get(base + "/setup", timeout=10).status_code == 404
    finally:
        assert server.stop() == 0
    _checkpoint(data_dir / "appliance.db")
    count = _instance_count(data_dir)
    assert count == len(SAMPLES)
    history = json.loads((data_dir / "box-history.json").read_text())
    assert history["had_users"] and history["had_instances"]
    yield data_dir, count


def _copy(past_box: tuple[Path, int], tmp_path: Path) -> Path:
    data_dir = tmp_path / "data"
    shutil.copytree(past_box[0], data_dir)
    return data_dir


def _damage_page(db_path: Path) -> int:
    """Overwrite one b-tree page holding rows in the middle of the file, of a table that opening
    the database does not read (so the header and a plain open are fine; only a check finds it)."""
    conn = sqlite3.connect(db_path)
    pages = conn.execute("SELECT name, pageno FROM dbstat WHERE ncell > 0 AND name NOT IN "
                         "('sqlite_schema', 'users', 'instances', 'database_identity')").fetchall()
    page_size, page_count = conn.execute("PRAGMA page_size").fetchone()[0], conn.execute("PRAGMA page_count").fetchone()[0]
    conn.close()
    assert pages
    _name, pageno = min(pages, key=lambda row: abs(row[1] - page_count / 2))
    with open(db_path, "r+b") as fh:
        fh.seek((pageno - 1) * page_size)
        fh.write(random.Random(pageno).randbytes(page_size))
    return pageno


def _break(data_dir: Path, how: str) -> None:
    db_path = data_dir / "appliance.db"
    if how == "deleted":
        db_path.unlink()
    elif how == "empty":
        db_path.write_bytes(b"")
    elif how == "truncated":
        os.truncate(db_path, db_path.stat().st_size // 2)
    elif how == "page-damaged":
        _damage_page(db_path)
        conn = sqlite3.connect(db_path)  # the header and the tables the guard reads are fine
        assert conn.execute("SELECT COUNT(*) FROM instances").fetchone()[0] == len(SAMPLES)
        conn.close()
    elif how == "not-a-database":
        db_path.write_bytes(random.Random(7).randbytes(64 * 1024))
    else:
        raise ValueError(how)


def _assert_refused(output: str, code: int, data_dir: Path) -> None:
    assert code == EXIT_DATABASE, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    assert f"the database {data_dir / 'appliance.db'}" in output, output[-3000:]
    assert f"copy the backup to {data_dir / 'appliance.db'}" in output
    assert f"appliance db rebuild --data-dir {data_dir}" in output
    assert "appliance users add --role admin NAME" in output


def _serve_refuses(data_dir: Path) -> str:
    server = _server(data_dir)
    server.start(wait=False)
    assert server.proc is not None
    code = server.proc.wait(timeout=REFUSAL_TIMEOUT_S)
    server.stop()
    output = server.log_path.read_text()
    _assert_refused(output, code, data_dir)
    # Nothing answers on the web port: the set-up page is not there for anyone.
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://127.0.0.1:{server.http_port}/setup", timeout=5)
    return output


BREAKS = ("deleted", "empty", "truncated", "page-damaged", "not-a-database")


@pytest.mark.parametrize("how", BREAKS)
def test_broken_database_refused_then_rebuilt(past_box: tuple[Path, int], tmp_path: Path, how: str) -> None:
    data_dir = _copy(past_box, tmp_path)
    _break(data_dir, how)
    db_path = data_dir / "appliance.db"
    broken = db_path.read_bytes() if db_path.exists() else None

    output = _serve_refuses(data_dir)
    if how == "page-damaged":
        assert "quick_check" in output  # found by the check at start, not by chance
    # The other commands refuse too, and none creates a new database beside the images or
    # writes to the broken one.  `studies` and `import` run quick_check as serve does; the
    # others find a missing, empty or unreadable file (a damaged page elsewhere may not matter).
    commands = [("studies",), ("import", str(sample("CT_small.dcm")))]
    if how in ("deleted", "empty", "not-a-database"):
        commands.append(("users", "list"))
    for args in commands:
        result = _cli(data_dir, *args)
        _assert_refused(result.stdout + result.stderr, result.returncode, data_dir)
    assert (db_path.read_bytes() if db_path.exists() else None) == broken

    rebuilt = _cli(data_dir, "db", "rebuild")
    assert rebuilt.returncode == 0, rebuilt.stdout + rebuilt.stderr
    assert f"re-indexed: {past_box[1]} instances in {past_box[1]} studies" in rebuilt.stdout
    assert "de-identification secret and re-identification map" in rebuilt.stdout
    kept = sorted(data_dir.glob("appliance.db.before-rebuild-*"))
    kept_db = [p for p in kept if not p.name.endswith(("-wal", "-shm"))]
    if broken is None:
        assert kept_db == [] and "kept: nothing" in rebuilt.stdout
    else:  # moved aside byte for byte, never deleted
        assert len(kept_db) == 1 and kept_db[0].read_bytes() == broken
        assert f"kept: appliance.db -> {kept_db[0]}" in rebuilt.stdout
    assert _instance_count(data_dir) == past_box[1]
    conn = sqlite3.connect(db_path)
    assert conn.execute("SELECT COUNT(*) FROM analysis_jobs").fetchone()[0] == 0  # no re-analysis, no re-forward
    assert conn.execute("SELECT COUNT(*) FROM users").fetchone()[0] == 0
    conn.close()

    # The rebuilt box starts, lists its studies, and keeps the set-up page shut.
    server = _server(data_dir).start()
    try:
        base = f"http://127.0.0.1:{server.http_port}"
        with requests.Session() as web:
            home = web.get(base + "/", timeout=10)
            assert home.url == base + "/setup" and home.status_code == 403
            assert "appliance users add --role admin NAME" in home.text
            assert "create-admin" not in home.text  # no form
            attempt = web.post(base + "/setup", data={"csrf_token": _csrf_meta(home.text), "username": "mallory",
                                                      "password": PASSWORD, "confirm": PASSWORD}, timeout=30)
            assert attempt.status_code == 403
        added = _cli(data_dir, "users", "add", "--role", "admin", ADMIN, stdin=f"{PASSWORD}\n{PASSWORD}\n")
        assert added.returncode == 0, added.stderr
        users = _cli(data_dir, "users", "list")
        assert users.stdout.split()[0] == ADMIN and "mallory" not in users.stdout
        assert requests.get(base + "/setup", timeout=10).status_code == 404
        studies = json.loads(_cli(data_dir, "studies", "--json").stdout)["studies"]
        assert sum(s["instance_count"] for s in studies) == past_box[1]
    finally:
        assert server.stop() == 0


def test_backup_copied_back_is_accepted(past_box: tuple[Path, int], tmp_path: Path) -> None:
    data_dir = _copy(past_box, tmp_path)
    backup = tmp_path / "backup.db"
    shutil.copy2(data_dir / "appliance.db", backup)
    (data_dir / "appliance.db").unlink()
    _serve_refuses(data_dir)
    shutil.copy2(backup, data_dir / "appliance.db")  # the restore the message describes
    server = _server(data_dir).start()
    try:
        assert requests.get(f"http://127.0.0.1:{server.http_port}/setup", timeout=10).status_code == 404
        assert _cli(data_dir, "users", "list").stdout.split()[0] == ADMIN
    finally:
        assert server.stop() == 0
    assert _instance_count(data_dir) == past_box[1]


def test_history_lost_too_images_still_refuse(past_box: tuple[Path, int], tmp_path: Path) -> None:
    """The technician removed the database and the history file: the images on disk still say
    the box has a past."""
    data_dir = _copy(past_box, tmp_path)
    (data_dir / "appliance.db").unlink()
    (data_dir / "box-history.json").unlink()
    output = _serve_refuses(data_dir)
    assert f"stored images (in {data_dir / 'instances'})" in output
    assert not (data_dir / "appliance.db").exists()


def test_empty_database_from_elsewhere_refused(past_box: tuple[Path, int], tmp_path: Path) -> None:
    """A valid but empty appliance database (created after the real one was lost) is not this box's."""
    data_dir = _copy(past_box, tmp_path)
    other = tmp_path / "other"
    assert _cli(other, "studies").stdout.strip() == "no studies"
    _checkpoint(other / "appliance.db")
    shutil.copy2(other / "appliance.db", data_dir / "appliance.db")
    output = _serve_refuses(data_dir)
    assert "is not this box's database" in output
    assert "no user accounts although the box has had users" in output


def test_rebuild_refuses_while_serving_and_on_a_usable_database(past_box: tuple[Path, int], tmp_path: Path) -> None:
    data_dir = _copy(past_box, tmp_path)
    server = _server(data_dir).start()
    try:
        busy = _cli(data_dir, "db", "rebuild", "--force")
        assert busy.returncode == EXIT_DATABASE and "is in use" in busy.stderr, busy.stderr
        assert "Traceback" not in busy.stderr
    finally:
        assert server.stop() == 0
    usable = _cli(data_dir, "db", "rebuild")
    assert usable.returncode == 1 and "nothing to rebuild" in usable.stderr, usable.stderr
    assert not list(data_dir.glob("appliance.db.before-rebuild-*"))
    _checkpoint(data_dir / "appliance.db")
    conn = sqlite3.connect(data_dir / "appliance.db")
    assert conn.execute("SELECT username FROM users").fetchall() == [(ADMIN,)]
    conn.close()
    check = _cli(data_dir, "db", "check")
    assert check.returncode == 0 and f"{past_box[1]} instances" in check.stdout, check.stderr


def test_rebuild_quarantines_junk_and_keeps_counting(past_box: tuple[Path, int], tmp_path: Path) -> None:
    data_dir = _copy(past_box, tmp_path)
    junk = data_dir / "instances" / "1.2.3" / "4.5.6" / "7.8.9.dcm"
    junk.parent.mkdir(parents=True)
    junk.write_bytes(b"not DICOM at all" * 64)
    (data_dir / "appliance.db").write_bytes(b"")
    rebuilt = _cli(data_dir, "db", "rebuild")
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert "quarantined (not DICOM): 1," in rebuilt.stdout
    assert (data_dir / "quarantine" / "7.8.9.dcm").read_bytes() == b"not DICOM at all" * 64
    assert _instance_count(data_dir) == past_box[1]


def test_orphan_of_a_first_store_is_indexed_not_refused(tmp_path: Path) -> None:
    """A power cut during a new box's very first C-STORE leaves a file without a row: that is
    the box's own database (same id as recorded), so it starts and indexes the file."""
    data_dir = tmp_path / "data"
    assert _cli(data_dir, "studies").stdout.strip() == "no studies"
    ds_path = sample("CT_small.dcm")
    ds = pydicom.dcmread(ds_path, stop_before_pixels=True)
    orphan = data_dir / "instances" / ds.StudyInstanceUID / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm"
    orphan.parent.mkdir(parents=True)
    shutil.copy(ds_path, orphan)
    server = _server(data_dir).start()
    try:
        assert _instance_count(data_dir) == 1
    finally:
        assert server.stop() == 0


def test_new_data_dir_starts_as_new(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    server = _server(data_dir).start()
    try:
        base = f"http://127.0.0.1:{server.http_port}"
        assert requests.get(base + "/setup", timeout=10).status_code == 200
        history = json.loads((data_dir / "box-history.json").read_text())
        assert not history["had_users"] and not history["had_instances"] and history["database_id"]
    finally:
        assert server.stop() == 0
    result = run_cli("db", "check", "--data-dir", str(data_dir))
    assert result.returncode == 0 and "0 instances in 0 studies, 0 users" in result.stdout


def test_setup_from_the_network_only_on_a_truly_new_box(tmp_path: Path) -> None:
    """Flask's test client with a non-loopback REMOTE_ADDR (no traffic leaves the machine)."""
    from appliance.dbrebuild import rebuild
    from appliance.store import InstanceStore
    from tests.web.conftest import make_app

    network = {"REMOTE_ADDR": "192.0.2.10"}
    data_dir = tmp_path / "data"
    app = make_app(data_dir)
    client = app.test_client()
    assert client.get("/setup", environ_base=network).status_code == 200  # nothing on it yet
    database = app.extensions["appliance_db"]
    InstanceStore(data_dir, database, 0).store(sample("CT_small.dcm").read_bytes(), source="import")
    refused = client.get("/setup", environ_base=network)
    assert refused.status_code == 403 and "on its own screen" in refused.text
    token = _csrf(client.get("/setup").text)  # loopback still may
    assert client.get("/setup", environ_base={"REMOTE_ADDR": "::ffff:127.0.0.1"}).status_code == 200
    posted = client.post("/setup", environ_base=network, data={"csrf_token": token, "username": "mallory",
                                                               "password": PASSWORD, "confirm": PASSWORD})
    assert posted.status_code == 403
    assert database.query("SELECT COUNT(*) AS n FROM users")[0]["n"] == 0

    # After a rebuild the page is shut for everyone, the box's own screen included.
    del app, client
    database.close()
    assert database.in_use_lock is not None
    database.in_use_lock.close()
    (data_dir / "appliance.db").write_bytes(b"")
    rebuild(data_dir)
    app = make_app(data_dir)
    closed = app.test_client().get("/setup")
    assert closed.status_code == 403 and "its database was rebuilt" in closed.text
    assert "create-admin" not in closed.text
