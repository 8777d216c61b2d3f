"""What a site-QA monitor reads per result, end to end: dcmtk's dcmsend -> `appliance serve` ->
`appliance studies --json`.

Per finding (and per abstention) ``ood_distance``, ``frame_index`` and the acquisition
``fingerprint`` of the image analysed; the same in the database's ``analysis_results``, and kept
in ``superseded_results`` when the image is replaced by different pixels.
"""
from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import numpy as np
import pydicom

from tests.helpers import dcmsend, paediatric_sample, sample
from tests.pipeline.test_pipeline_e2e import clinic_instances, wait_until_analyzed
from tests.pipeline.test_resend_results import stored_sha256, wait_for

CHEST_FINGERPRINT = {
    "manufacturer": "Philips Medical Systems", "model_name": "Cassette Holder Type 9840 500 70201",
    "software_versions": ["Version 3.3.1"], "photometric_interpretation": "MONOCHROME1",
    "rows": 1955, "columns": 1841, "pixel_spacing": [0.139, 0.14], "pixel_spacing_attribute": "ImagerPixelSpacing",
    "view_position": "PA", "laterality": "R",
}
CLIP_FINGERPRINT = {
    "manufacturer": "SonoSite, Inc.", "model_name": "Turbo", "software_versions": ["51.80.108.010"],
    "photometric_interpretation": "YBR_FULL_422", "rows": 480, "columns": 640, "pixel_spacing": None,
    "pixel_spacing_attribute": None, "view_position": None, "laterality": None,
}


def chest_film(directory: Path, flipped: bool = False) -> Path:
    """RG1 as a 3-year-old's film, its spacing given as Imager Pixel Spacing (RG1's own Pixel
    Spacing is 0\\0, which no monitor can use) and an Image Laterality; ``flipped``: the same
    UIDs with mirrored pixels (a corrected re-send)."""
    path = paediatric_sample(directory)
    ds = pydicom.dcmread(path)
    del ds.PixelSpacing
    ds.ImagerPixelSpacing = [0.139, 0.14]
    ds.ImageLaterality = "R"
    if flipped:
        ds.PixelData = np.ascontiguousarray(ds.pixel_array[:, ::-1]).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def database_rows(data_dir: Path, table: str, sop: str) -> list[dict]:
    conn = sqlite3.connect(data_dir / "appliance.db")
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute(f"SELECT model_id, ood_distance, frame_index, fingerprint_json "
                                              f"FROM {table} WHERE sop_instance_uid = ?", (sop,))]
    finally:
        conn.close()


def test_ood_distance_frame_and_fingerprint_per_result(server_factory, tmp_path):
    server = server_factory().start()
    chest, clip = chest_film(tmp_path / "v1"), sample("color3d_jpeg_baseline.dcm")
    assert dcmsend(server.dicom_port, [chest, clip]).returncode == 0
    report = wait_until_analyzed(server.data_dir, 2, timeout=120)
    images = clinic_instances(report)
    chest_sop = str(pydicom.dcmread(chest, stop_before_pixels=True).SOPInstanceUID)
    clip_sop = str(pydicom.dcmread(clip, stop_before_pixels=True).SOPInstanceUID)

    # The chest CR, analysed by the pneumonia model (which has OOD statistics).
    (finding,) = images[chest_sop]["findings"]
    assert finding["model"] == "cxr-pneumonia"
    assert isinstance(finding["ood_distance"], float) and finding["ood_distance"] >= 0
    assert finding["frame_index"] == 0
    assert finding["fingerprint"] == CHEST_FINGERPRINT
    (row,) = database_rows(server.data_dir, "analysis_results", chest_sop)
    assert (row["ood_distance"], row["frame_index"]) == (finding["ood_distance"], 0)
    assert json.loads(row["fingerprint_json"]) == CHEST_FINGERPRINT

    # The ultrasound clip: the middle of its 120 frames analysed, and that is the frame its SR
    # and heatmap SC reference (1-based there).
    clip_image = images[clip_sop]
    entries = clip_image["findings"] + clip_image["abstentions"]
    assert entries and {e["frame_index"] for e in entries} == {60}
    assert all(e["fingerprint"] == CLIP_FINGERPRINT for e in entries)
    for heatmap in clip_image["heatmaps"]:
        sc = pydicom.dcmread(heatmap["path"], stop_before_pixels=True)
        assert [int(r.ReferencedFrameNumber) for r in sc.SourceImageSequence] == [61]

    # A corrected re-send (same UIDs, other pixels): the old result, with what the monitor
    # reads, is kept in superseded_results; the new one has its own.
    old_sha = images[chest_sop]["sha256"]
    assert dcmsend(server.dicom_port, [chest_film(tmp_path / "v2", flipped=True)]).returncode == 0
    new_sha = stored_sha256(server.data_dir, chest_sop, other_than=old_sha)
    image = clinic_instances(wait_for(server.data_dir, chest_sop, new_sha))[chest_sop]
    (old,) = image["superseded_results"]
    (old_finding,) = old["findings"]
    assert (old_finding["ood_distance"], old_finding["frame_index"], old_finding["fingerprint"]) == \
        (finding["ood_distance"], 0, CHEST_FINGERPRINT)
    (superseded,) = database_rows(server.data_dir, "superseded_results", chest_sop)
    assert (superseded["ood_distance"], superseded["frame_index"]) == (finding["ood_distance"], 0)
    assert json.loads(superseded["fingerprint_json"]) == CHEST_FINGERPRINT
    (new_finding,) = image["findings"]
    assert new_finding["fingerprint"] == CHEST_FINGERPRINT and new_finding["frame_index"] == 0
    assert new_finding["ood_distance"] != finding["ood_distance"]  # computed on the new pixels
