"""The analysis result's data: the acquisition fingerprint and the recorded heatmap evidence."""
from __future__ import annotations

import numpy as np
import pydicom
import pytest
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag

from appliance.analyze.result import AnalysisResult, FindingResult, HeatmapEvidence, acquisition_fingerprint
from appliance.imaging.preprocess import CropBox
from tests.helpers import sample


def test_fingerprint_of_a_real_chest_cr() -> None:
    ds = pydicom.dcmread(sample("RG1_UNCR.dcm"), stop_before_pixels=True)
    assert acquisition_fingerprint(ds) == {
        "manufacturer": "Philips Medical Systems", "model_name": "Cassette Holder Type 9840 500 70201",
        "software_versions": ["Version 3.3.1"], "photometric_interpretation": "MONOCHROME1",
        "rows": 1955, "columns": 1841,
        "pixel_spacing": None, "pixel_spacing_attribute": None,  # RG1's Pixel Spacing is 0\0: unusable
        "view_position": "PA", "laterality": None,
    }


def test_fingerprint_of_sloppy_values_records_what_is_usable() -> None:
    ds = Dataset()
    ds.Manufacturer = "  ACME  "
    ds.SoftwareVersions = ["1.0", " ", "2.b"]
    # As read from a file whose Pixel Spacing is not numbers: not a spacing (pydicom cannot convert it).
    ds[0x00280030] = RawDataElement(Tag(0x00280030), "DS", 8, b"abc\\0.2 ", 0, True, True)
    ds.ImagerPixelSpacing = [0.15, 0.15]
    ds.add_new("Rows", "US", 512)
    ds.Laterality = "L"
    print_ = acquisition_fingerprint(ds)
    assert print_["manufacturer"] == "ACME" and print_["software_versions"] == ["1.0", "2.b"]
    assert (print_["pixel_spacing"], print_["pixel_spacing_attribute"]) == ([0.15, 0.15], "ImagerPixelSpacing")
    assert (print_["rows"], print_["columns"]) == (512, None)
    assert print_["laterality"] == "L" and print_["model_name"] is None and print_["view_position"] is None
    ds.ImageLaterality = "R"  # the image's own laterality wins over the series'
    assert acquisition_fingerprint(ds)["laterality"] == "R"


def test_heatmap_evidence_round_trips_exactly() -> None:
    cam = np.random.default_rng(3).random((7, 7)).astype(np.float32)
    evidence = HeatmapEvidence("ptx", cam, CropBox(3, 0, 500, 500))
    back = HeatmapEvidence.from_json(evidence.to_json())
    assert back.finding == "ptx" and back.crop == evidence.crop
    np.testing.assert_array_equal(back.cam, cam)
    for broken in ("", "{}", '{"finding": "x", "cam": [1, 2], "crop": [0, 0, 1, 1]}', '{"cam": [[1]]}'):
        with pytest.raises(ValueError, match="not a recorded heatmap evidence"):
            HeatmapEvidence.from_json(broken)


def test_record_and_from_record() -> None:
    result = AnalysisResult("m", "1.0", "onnxruntime 1.20", "fp32", "Research only",
                            findings=[FindingResult("ptx", "Pneumothorax", 0.8, True, 0.5, "urgent")],
                            ood_distance=2.5, source={"frame_index": 4}, fingerprint={"manufacturer": "ACME"},
                            heatmap_evidence=HeatmapEvidence("ptx", np.ones((2, 2), np.float32), CropBox(0, 0, 8, 8)))
    row = {**result.record(), "id": 7}
    assert row["status"] == "analyzed" and row["frame_index"] == 4 and row["ood_distance"] == 2.5
    back = AnalysisResult.from_record(row)
    assert (back.findings, back.frame_index, back.fingerprint, back.disclaimer, back.heatmap_finding) == \
        (result.findings, 4, {"manufacturer": "ACME"}, "Research only", "ptx")
    # A row recorded before the evidence was kept: objects without a heatmap.
    assert AnalysisResult.from_record({**row, "heatmap_json": "", "frame_index": None}).heatmap_evidence is None
    with pytest.raises(ValueError, match="only analysed or abstained results have objects"):
        AnalysisResult.from_record({**row, "status": "failed"})
