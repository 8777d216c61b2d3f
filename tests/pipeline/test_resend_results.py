"""Results belong to the bytes: a modality resends an image under the same SOP Instance UID.

Against `appliance serve` with real dcmtk sends of RG1 chest CR copies: different pixels give
exactly one current result per model on the new sha256, the old one superseded (with its SR and
SC), and triage, `studies --json`, the SR/SC and the forwarding selection use the current one;
identical bytes change nothing; a SIGKILL between the store and the re-analysis changes nothing
either.
"""
from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import numpy as np
import pydicom

from appliance.results.worker import result_uid
from appliance.db import Database
from appliance.forward import outbox
from tests.helpers import dcmsend, resized_copy, run_cli, sample, write_fresh_copies
from tests.pipeline.test_pipeline_e2e import clinic_instances, studies

MODEL = "cxr-pneumonia"
PROBABILITY = "122157"  # DCM "Probability", the NUM of each finding in the box's TID 1500 SR
DEADLINE_S = 90


def chest_pair(tmp_path: Path) -> tuple[Path, Path]:
    """An analysable chest CR and a copy with the same UIDs whose pixels are mirrored (the model
    still analyses it, with a different probability)."""
    original = write_fresh_copies([resized_copy(pydicom.dcmread(sample("RG1_UNCR.dcm")), 512)], tmp_path / "v1")[0]
    ds = pydicom.dcmread(original)
    ds.PixelData = np.ascontiguousarray(ds.pixel_array[:, ::-1]).tobytes()
    corrected = tmp_path / "v2" / original.name
    corrected.parent.mkdir()
    ds.save_as(corrected)
    return original, corrected


def wait_for(data_dir: Path, sop: str, sha: str, timeout: float = DEADLINE_S) -> list[dict]:
    """`studies --json` once the image has the bytes ``sha`` and their analysis and objects are done."""
    deadline = time.monotonic() + timeout
    while True:
        report = studies(data_dir)
        image = clinic_instances(report).get(sop)
        if image and image["sha256"] == sha and image["state"] == "analyzed" and not image["objects_pending"] \
                and image["sr"] and all(f["sha256"] == sha for f in image["findings"]):
            return report
        if time.monotonic() > deadline:
            raise AssertionError(f"image not analysed on {sha[:12]} in {timeout}s: {image}")
        time.sleep(0.3)


def sr_probabilities(path: str) -> list[float]:
    found: list[float] = []

    def walk(items) -> None:
        for item in items:
            name = item.get("ConceptNameCodeSequence")
            if name and name[0].CodeValue == PROBABILITY and "MeasuredValueSequence" in item:
                found.append(float(item.MeasuredValueSequence[0].NumericValue))
            walk(item.get("ContentSequence", []))

    walk(pydicom.dcmread(path).ContentSequence)
    return found


def first_result(data_dir: Path, sop: str) -> dict:
    report = wait_for(data_dir, sop, stored_sha256(data_dir, sop))
    image = clinic_instances(report)[sop]
    assert [(f["model"], f["sha256"]) for f in image["findings"]] == [(MODEL, image["sha256"])]
    assert image["superseded_results"] == []
    return image


def stored_sha256(data_dir: Path, sop: str, other_than: str = "") -> str:
    """The sha256 of the image's stored bytes (the box writes its own file meta, so not the
    sent file's), once it is other than ``other_than``."""
    conn = sqlite3.connect(data_dir / "appliance.db")
    try:
        deadline = time.monotonic() + DEADLINE_S
        while True:
            row = conn.execute("SELECT sha256 FROM instances WHERE sop_instance_uid = ?", (sop,)).fetchone()
            if row and row[0] != other_than:
                return str(row[0])
            if time.monotonic() > deadline:
                raise AssertionError(f"no stored bytes other than {other_than[:12]}")
            time.sleep(0.2)
    finally:
        conn.close()


def assert_current(data_dir: Path, sop: str, new_sha: str, old: dict) -> None:
    """Exactly one current result, on ``new_sha``; ``old`` (the image's entry before the resend)
    superseded with its SR and SC; triage, SR, SC and forwarding selection from the new result."""
    report = wait_for(data_dir, sop, new_sha)
    image = clinic_instances(report)[sop]
    study = next(s for s in report if any(i["sop_instance_uid"] == sop for se in s["series"]
                                          for i in se["instances"]))
    # studies --json: one current finding on the new bytes, the old result in the history.
    assert [(f["model"], f["sha256"]) for f in image["findings"]] == [(MODEL, new_sha)]
    new_p, old_p = image["findings"][0]["probability"], old["findings"][0]["probability"]
    assert abs(new_p - old_p) > 1e-3, "the corrected pixels must give another probability"
    history = image["superseded_results"]
    assert [(h["model"], h["sha256"], h["superseded_by_sha256"]) for h in history] == \
        [(MODEL, old["sha256"], new_sha)]
    assert history[0]["findings"][0]["probability"] == old_p
    assert history[0]["sr_sop_instance_uid"] == old["sr"][0]["sop_instance_uid"]
    # Triage: priority and score come from the new result.
    assert study["priority"] == "urgent" and image["findings"][0]["positive"]
    assert study["score"] == round(new_p, 6)
    # The AI objects: only the current result's SR and SC are instances of the study.
    ai = {i["sop_instance_uid"]: i for se in study["series"] for i in se["instances"] if i["source"] == "ai"}
    sr_uid, hm_uid = image["sr"][0]["sop_instance_uid"], image["heatmaps"][0]["sop_instance_uid"]
    assert set(ai) == {sr_uid, hm_uid}
    assert sr_uid == result_uid(sop, MODEL, image["findings"][0]["model_version"], "sr", new_sha)
    assert hm_uid == result_uid(sop, MODEL, image["findings"][0]["model_version"], "heatmap", new_sha)
    assert old["sr"][0]["sop_instance_uid"] not in ai and old["heatmaps"][0]["sop_instance_uid"] not in ai
    probabilities = sr_probabilities(ai[sr_uid]["file_path"])
    assert len(probabilities) == 1 and abs(probabilities[0] - new_p) < 1e-5, probabilities
    sc = pydicom.dcmread(ai[hm_uid]["file_path"], stop_before_pixels=True)
    assert [r.ReferencedSOPInstanceUID for s in sc.SourceImageSequence for r in [s]] == [sop]
    # The superseded objects are kept for audit under superseded/, not under instances/.
    assert not Path(old["sr"][0]["path"]).exists()
    kept = list((data_dir / "superseded").rglob(f"{old['sr'][0]['sop_instance_uid']}.*.dcm"))
    assert len(kept) == 1 and abs(sr_probabilities(str(kept[0]))[0] - old_p) < 1e-5
    # Database: one current row per model, the old one in superseded_results.
    conn = sqlite3.connect(data_dir / "appliance.db")
    try:
        assert conn.execute("SELECT model_id, sha256 FROM analysis_results WHERE sop_instance_uid = ?",
                            (sop,)).fetchall() == [(MODEL, new_sha)]
        assert conn.execute("SELECT model_id, sha256 FROM superseded_results WHERE sop_instance_uid = ?",
                            (sop,)).fetchall() == [(MODEL, old["sha256"])]
        item_id = conn.execute(
            "INSERT INTO outbox_items (study_uid, destination, requested_by, created_at, updated_at) "
            "VALUES (?, ?, 'test', '', '') RETURNING id", (study["study_uid"], f"check-{time.monotonic_ns()}")
        ).fetchone()[0]
        conn.commit()
    finally:
        conn.close()
    # Forwarding: what an item for a destination taking the AI results would send.
    database = Database(data_dir / "appliance.db")
    outbox.refresh_instances(database, {"id": item_id, "study_uid": study["study_uid"]}, attach_ai_results=True)
    assert {r["sop_instance_uid"] for r in outbox.instances(database, item_id)} == {sop, sr_uid, hm_uid}
    database.close()


def test_resend_different_then_identical_bytes(server_factory, tmp_path):
    original, corrected = chest_pair(tmp_path)
    sop = str(pydicom.dcmread(original, stop_before_pixels=True).SOPInstanceUID)
    server = server_factory().start()
    assert dcmsend(server.dicom_port, [original]).returncode == 0
    before = first_result(server.data_dir, sop)
    # The same bytes again: nothing changes.
    assert dcmsend(server.dicom_port, [original]).returncode == 0
    time.sleep(2)
    assert first_result(server.data_dir, sop) == before

    assert dcmsend(server.dicom_port, [corrected]).returncode == 0
    new_sha = stored_sha256(server.data_dir, sop, other_than=before["sha256"])
    assert_current(server.data_dir, sop, new_sha, before)

    # The same corrected bytes again: still one result, one superseded.
    assert dcmsend(server.dicom_port, [corrected]).returncode == 0
    time.sleep(2)
    server.stop()
    assert stored_sha256(server.data_dir, sop) == new_sha
    assert_current(server.data_dir, sop, new_sha, before)


def test_sigkill_right_after_the_resend(server_factory, tmp_path):
    original, corrected = chest_pair(tmp_path)
    sop = str(pydicom.dcmread(original, stop_before_pixels=True).SOPInstanceUID)
    server = server_factory().start()
    assert dcmsend(server.dicom_port, [original]).returncode == 0
    before = first_result(server.data_dir, sop)
    assert dcmsend(server.dicom_port, [corrected]).returncode == 0
    server.kill()
    server.start()
    assert_current(server.data_dir, sop, stored_sha256(server.data_dir, sop, other_than=before["sha256"]), before)


def test_replaced_while_the_box_was_down(server_factory, tmp_path):
    """The state a SIGKILL after the store's commit leaves, every time: the new bytes and their
    job committed, the old result and its SR/SC still current.  Start-up must supersede them."""
    original, corrected = chest_pair(tmp_path)
    sop = str(pydicom.dcmread(original, stop_before_pixels=True).SOPInstanceUID)
    server = server_factory().start()
    assert dcmsend(server.dicom_port, [original]).returncode == 0
    before = first_result(server.data_dir, sop)
    server.kill()
    imported = run_cli("import", "--data-dir", str(server.data_dir), str(corrected))
    assert imported.returncode == 0, imported.stderr
    new_sha = stored_sha256(server.data_dir, sop, other_than=before["sha256"])
    report = studies(server.data_dir)  # not yet re-analysed: the old result is not current
    image = clinic_instances(report)[sop]
    assert image["findings"] == [] and image["sr"] == [] and image["heatmaps"] == []
    server.start()
    assert_current(server.data_dir, sop, new_sha, before)
