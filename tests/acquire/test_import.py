"""`appliance import`: folders, DICOMDIR, duplicates and broken files, exit codes."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from pydicom.data import get_testdata_file

from tests.helpers import run_cli, sample


def test_import_mixed_folder(tmp_path):
    src = tmp_path / "usb"
    (src / "sub").mkdir(parents=True)
    shutil.copy(sample("CT_small.dcm"), src / "a.dcm")
    shutil.copy(sample("CT_small.dcm"), src / "sub" / "a-copy.dcm")  # duplicate
    shutil.copy(sample("RG1_UNCR.dcm"), src / "chest.dcm")
    (src / "notes.txt").write_text("not an image")
    raw = sample("MR_small.dcm").read_bytes()
    (src / "truncated.dcm").write_bytes(raw[: len(raw) // 2])
    shutil.copy(sample("no_meta.dcm"), src / "no_meta.dcm")
    data = tmp_path / "data"
    result = run_cli("import", "--data-dir", str(data), "--json", str(src))
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["imported"] == 2 and summary["duplicate"] == 1
    reasons = {Path(r["file"]).name: r["reason"] for r in summary["rejected"]}
    assert set(reasons) == {"notes.txt", "truncated.dcm", "no_meta.dcm"}
    assert "not a DICOM Part 10 file" in reasons["notes.txt"]
    assert "truncated" in reasons["truncated.dcm"]
    studies = json.loads(run_cli("studies", "--json", "--data-dir", str(data)).stdout)["studies"]
    assert sum(s["instance_count"] for s in studies) == 2
    assert all(i["source"] == "import" for s in studies for se in s["series"] for i in se["instances"])

    # Human summary and a second run: everything is now a duplicate, still exit 0.
    again = run_cli("import", "--data-dir", str(data), str(src))
    assert again.returncode == 0
    assert "imported: 0  replaced: 0  duplicate: 3  rejected: 3" in again.stdout


def test_import_dicomdir(tmp_path):
    dicomdir = Path(get_testdata_file("DICOMDIR"))
    data = tmp_path / "data"
    result = run_cli("import", "--data-dir", str(data), "--json", str(dicomdir.parent))
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["imported"] > 0
    assert summary["imported"] + summary["duplicate"] + summary["replaced"] + len(summary["rejected"]) == 31


def test_import_missing_path_fails_clearly(tmp_path):
    result = run_cli("import", "--data-dir", str(tmp_path / "data"), str(tmp_path / "nope"))
    assert result.returncode != 0
    assert "no such file or directory" in result.stderr


def test_import_nothing_valid_is_an_error(tmp_path):
    (tmp_path / "junk.dcm").write_bytes(b"junk")
    result = run_cli("import", "--data-dir", str(tmp_path / "data"), str(tmp_path / "junk.dcm"))
    assert result.returncode != 0 and "nothing imported" in result.stderr
