"""The heatmap Secondary Capture: valid per dciodvfy, same study, and the notice really burned in."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from appliance.analyze.result import AI_NOTICE, AnalysisResult
from appliance.results import build_heatmap_sc
from appliance.results.common import PATIENT_STUDY_KEYWORDS
from appliance.results.secondary_capture import annotation_lines, ascii_text, burn_in
from tests.results.conftest import US_FRAME, abstained, analyzed
from tests.results.dciodvfy import dciodvfy


def build_and_save(source: Dataset, result: AnalysisResult, tmp_path: Path) -> tuple[Dataset, Path]:
    ds = build_heatmap_sc(source, result, sop_instance_uid=generate_uid(), series_instance_uid=generate_uid())
    path = tmp_path / "sc.dcm"
    ds.save_as(path, enforce_file_format=True)
    return pydicom.dcmread(path), path


def changed_box(before: np.ndarray, after: np.ndarray) -> tuple[int, int]:
    """Height and width of the region the annotation changed (it is anchored top-left)."""
    rows, cols = np.nonzero(np.any(before != after, axis=2))
    assert rows.size, "no pixel changed: nothing was burned in"
    assert rows.min() == 0 and cols.min() == 0
    return int(rows.max()) + 1, int(cols.max()) + 1


def test_chest_cr_heatmap_sc(chest_cr: Dataset, tmp_path: Path) -> None:
    result = analyzed(chest_cr)
    overlay = result.heatmap
    assert overlay is not None
    sc, path = build_and_save(chest_cr, result, tmp_path)
    report = dciodvfy(path)
    assert "SCImage" in report.output, report.output  # validated as a Secondary Capture Image
    assert report.errors == [], report.output

    assert sc.SOPClassUID == SecondaryCaptureImageStorage
    assert sc.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    for keyword in PATIENT_STUDY_KEYWORDS:
        assert str(sc.get(keyword, "")) == str(chest_cr.get(keyword, "")), keyword
    assert sc.SeriesNumber == 991 and sc.SeriesInstanceUID != chest_cr.SeriesInstanceUID
    assert (sc.Rows, sc.Columns) == (chest_cr.Rows, chest_cr.Columns) == (1955, 1841)
    assert (sc.SamplesPerPixel, sc.PhotometricInterpretation, sc.BitsAllocated) == (3, "RGB", 8)
    assert sc.BurnedInAnnotation == "YES" and sc.ConversionType == "WSD"
    assert AI_NOTICE in sc.ImageComments and AI_NOTICE in sc.DerivationDescription
    assert "—" in sc.ImageComments  # the em dash survives in the attributes (UTF-8)
    assert "cxr-reference 1.4.2" in sc.DerivationDescription and "cxr-reference 1.4.2" in sc.SoftwareVersions
    assert "p=0.87" in sc.DerivationDescription
    assert sc.Manufacturer == "Clinic Edge Appliance"
    assert list(sc.PatientOrientation) == list(chest_cr.PatientOrientation)
    (ref,) = sc.SourceImageSequence
    assert (ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID) == (chest_cr.SOPClassUID, chest_cr.SOPInstanceUID)
    assert ref.PurposeOfReferenceCodeSequence[0].CodeValue == "121322"
    assert "ReferencedFrameNumber" not in ref  # single-frame source

    pixels = sc.pixel_array
    height, width = changed_box(overlay, pixels)
    # Scaled to the film: three lines of text ≥ ~40 px each on a 1955-row radiograph, box inside
    # the image, and everything below the box is the overlay exactly as the runner made it.
    assert 150 <= height <= 0.2 * sc.Rows and width <= sc.Columns
    np.testing.assert_array_equal(pixels[height:], overlay[height:])
    box = pixels[:height, :width]
    assert np.count_nonzero(box.min(axis=2) > 200) > 2000  # white glyphs on the dark backing


def test_ultrasound_frame_heatmap_sc(us_clip: Dataset, tmp_path: Path) -> None:
    result = analyzed(us_clip, frame=US_FRAME)
    assert result.heatmap is not None
    sc, path = build_and_save(us_clip, result, tmp_path)
    report = dciodvfy(path)
    assert "SCImage" in report.output and report.errors == [], report.output
    assert sc.StudyInstanceUID == us_clip.StudyInstanceUID
    assert (sc.Rows, sc.Columns) == (us_clip.Rows, us_clip.Columns) == (480, 640)
    (ref,) = sc.SourceImageSequence
    assert ref.ReferencedSOPInstanceUID == us_clip.SOPInstanceUID and ref.ReferencedFrameNumber == US_FRAME + 1
    assert sc.LossyImageCompression == "01"  # a JPEG-baseline source stays marked lossy downstream
    assert sc.PatientOrientation == ""       # unknown in the source: left empty, not guessed
    height, width = changed_box(result.heatmap, sc.pixel_array)
    assert 3 * 12 <= height <= 0.3 * sc.Rows and width <= sc.Columns  # legible, not swamping


def test_annotation_text_and_ascii_fallback(chest_cr: Dataset) -> None:
    lines = annotation_lines(analyzed(chest_cr))
    assert lines == ["AI ASSIST - NOT FOR DIAGNOSIS", "Model: cxr-reference 1.4.2",
                     "Pneumothorax: p=0.87 (positive at threshold 0.42)"]
    assert ascii_text("Épanchement — pleural") == "Epanchement - pleural"
    # On a small image the notice wraps at the legible floor instead of shrinking to specks
    # or running off the edge: more rows of text, crisp white glyphs, right margin untouched.
    small = np.zeros((128, 128, 3), dtype=np.uint8)
    one_line = burn_in(np.zeros((128, 1024, 3), dtype=np.uint8), lines[:1])
    wrapped = burn_in(small, lines[:1])
    assert wrapped.shape == small.shape and wrapped[:, -3:].max() == 0
    assert np.count_nonzero(wrapped.min(axis=2) > 200) > 40

    def text_height(img: np.ndarray) -> int:
        rows = np.nonzero(img.max(axis=(1, 2)) > 200)[0]
        return int(rows.max() - rows.min())

    assert text_height(wrapped) > 2 * text_height(one_line)


def test_abstention_has_no_heatmap_to_capture(us_clip: Dataset) -> None:
    with pytest.raises(ValueError, match="no heatmap"):
        build_heatmap_sc(us_clip, abstained(), sop_instance_uid=generate_uid(), series_instance_uid=generate_uid())
