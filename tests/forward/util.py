"""Helpers for the forwarding tests: sample studies, box configuration, waiting on the outbox."""
from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import Any

import pydicom
from pydicom.uid import generate_uid

from tests.helpers import resized_copy, run_cli, sample


def small_chest(size: int = 384) -> pydicom.Dataset:
    """The real chest CR, area-resized so it analyzes and sends quickly."""
    return resized_copy(pydicom.dcmread(sample("RG1_UNCR.dcm")), size)


def new_study(template: pydicom.Dataset, out: Path, study_uid: str | None = None, **attrs: Any) -> Path:
    """Save ``template`` as a new instance (new UIDs unless given) with attributes changed."""
    ds = template.copy()
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    for keyword, value in attrs.items():
        setattr(ds, keyword, value)
    out.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(out, enforce_file_format=True)
    return out


def destination_toml(name: str, kind: str, hub: Any, **options: Any) -> str:
    lines = ["[[destinations]]", f'name = "{name}"', f'kind = "{kind}"']
    if kind == "dicom":
        lines += ['host = "127.0.0.1"', f"port = {hub.dicom_port}", 'called_ae = "HUB"']
    else:
        lines += [f'url = "{hub.dicomweb_url}"', f'username = "{hub.auth[0]}"']
    for key, value in options.items():
        lines.append(f"{key} = {json.dumps(value)}")
    return "\n".join(lines) + "\n"


def write_config(path: Path, *tables: str) -> Path:
    path.write_text("\n".join(tables))
    return path


def box_env(hub_password: str, names: tuple[str, ...] = ()) -> dict[str, str]:
    """Secrets from the environment, as on a real box; fast retries and settling for the tests."""
    env = {"APPLIANCE_ANALYZE_STUDY_QUIET_S": "1"}
    for name in names:
        env[f"APPLIANCE_DESTINATIONS_{name.upper()}_PASSWORD"] = hub_password
    return env


def items(data_dir: Path) -> list[dict[str, Any]]:
    conn = sqlite3.connect(data_dir / "appliance.db", timeout=30)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute("SELECT * FROM outbox_items ORDER BY id")]
    except sqlite3.OperationalError:
        return []  # not migrated yet
    finally:
        conn.close()


def wait_confirmed(data_dir: Path, expected_items: int, timeout: float = 120) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        rows = items(data_dir)
        confirmed = [r for r in rows if r["state"] == "confirmed"]
        if len(confirmed) >= expected_items and all(r["state"] in ("confirmed", "failed") for r in rows):
            return rows
        if time.monotonic() > deadline:
            states = {r["id"]: (r["state"], r["last_error"]) for r in rows if r["state"] != "confirmed"}
            raise AssertionError(f"{len(confirmed)} of {expected_items} items confirmed in {timeout}s: {states}")
        time.sleep(0.5)


def outbox_json(data_dir: Path, config: Path, *extra: str) -> dict[str, Any]:
    result = run_cli("outbox", "--json", *extra, "--data-dir", str(data_dir), "--config", str(config))
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def forward_cli(data_dir: Path, config: Path, study_uid: str, to: str, *extra: str) -> int:
    result = run_cli("forward", study_uid, "--to", to, *extra, "--data-dir", str(data_dir), "--config", str(config))
    assert result.returncode == 0, result.stderr
    return int(result.stdout.strip())


def study_uid_of(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)
