"""The AI result SR: valid per dciodvfy, in the source's study, and saying what the model said."""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ComprehensiveSRStorage, ExplicitVRLittleEndian, generate_uid

from appliance.analyze.result import AI_NOTICE, AnalysisResult
from appliance.results import build_ai_sr, write_part10
from appliance.results.common import PATIENT_STUDY_KEYWORDS
from tests.results.conftest import US_FRAME, abstained, analyzed
from tests.results.dciodvfy import dciodvfy


def walk(node: Dataset) -> Iterator[Dataset]:
    """Every content item below ``node``, depth first."""
    for item in node.get("ContentSequence", []):
        yield item
        yield from walk(item)


def code_value(concept: Dataset) -> str:
    # Codes longer than 16 characters travel in Long Code Value (UC) instead of Code Value (SH).
    return concept.get("CodeValue") or concept.LongCodeValue


def name_of(item: Dataset) -> tuple[str, str]:
    concept = item.ConceptNameCodeSequence[0]
    return concept.CodingSchemeDesignator, code_value(concept)


def items_named(root: Dataset, scheme: str, value: str) -> list[Dataset]:
    return [item for item in walk(root) if name_of(item) == (scheme, value)]


def groups(root: Dataset) -> list[Dataset]:
    return items_named(root, "DCM", "125007")


def text_of(group: Dataset, scheme: str, value: str) -> list[str]:
    return [item.TextValue for item in items_named(group, scheme, value)]


def new_uids() -> dict[str, str]:
    return {"sop_instance_uid": str(generate_uid()), "series_instance_uid": str(generate_uid())}


def build_and_save(source: Dataset, result: AnalysisResult, tmp_path: Path) -> tuple[Dataset, Path, dict[str, str]]:
    uids = new_uids()
    ds = build_ai_sr(source, result, sop_instance_uid=uids["sop_instance_uid"],
                     series_instance_uid=uids["series_instance_uid"])
    path = tmp_path / "sr.dcm"
    ds.save_as(path, enforce_file_format=True)
    return pydicom.dcmread(path), path, uids


def test_positive_finding_sr_on_chest_cr(chest_cr: Dataset, tmp_path: Path) -> None:
    sr, path, uids = build_and_save(chest_cr, analyzed(chest_cr), tmp_path)
    report = dciodvfy(path)
    assert "ComprehensiveSR" in report.output, report.output  # the right IOD was checked
    assert report.errors == [], report.output

    # Same study, same patient; our own series and instance.
    assert sr.SOPClassUID == ComprehensiveSRStorage and sr.Modality == "SR"
    assert sr.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    for keyword in PATIENT_STUDY_KEYWORDS:
        assert str(sr.get(keyword, "")) == str(chest_cr.get(keyword, "")), keyword
    assert sr.SOPInstanceUID == uids["sop_instance_uid"] and sr.SeriesInstanceUID == uids["series_instance_uid"]
    assert sr.SeriesInstanceUID != chest_cr.SeriesInstanceUID and sr.SeriesNumber == 990
    assert sr.Manufacturer == "Clinic Edge Appliance" and sr.ManufacturerModelName == "Clinic Edge Appliance"
    assert sr.VerificationFlag == "UNVERIFIED" and sr.CompletionFlag == "COMPLETE"
    assert sr.PreliminaryFlag == "PRELIMINARY" and sr.ContentDate and sr.ContentTime
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    assert AI_NOTICE in sr.SeriesDescription

    # The source image: in the evidence, the image library and every measurement group.
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0]
    assert evidence.StudyInstanceUID == chest_cr.StudyInstanceUID
    referenced = [ref.ReferencedSOPInstanceUID for item in walk(sr) for ref in item.get("ReferencedSOPSequence", [])]
    assert referenced.count(chest_cr.SOPInstanceUID) == 3  # library + two groups
    assert evidence.ReferencedSeriesSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID \
        == chest_cr.SOPInstanceUID

    # The notice as a TEXT item, with the em dash intact (UTF-8).
    assert sr.SpecificCharacterSet == "ISO_IR 192"
    assert AI_NOTICE in [item.get("TextValue") for item in walk(sr)]

    found = {}
    for group in groups(sr):
        assert text_of(group, "DCM", "111001") == ["cxr-reference"]  # Algorithm Name
        assert text_of(group, "DCM", "111003") == ["1.4.2"]          # Algorithm Version
        finding = items_named(group, "DCM", "121071")[0].ConceptCodeSequence[0]
        assert finding.CodingSchemeDesignator == "99EDGEAI"
        probability = items_named(group, "DCM", "122157")[0].MeasuredValueSequence[0]
        threshold = items_named(group, "DCM", "122411")[0].MeasuredValueSequence[0]
        assert probability.MeasurementUnitsCodeSequence[0].CodingSchemeDesignator == "UCUM"
        state = items_named(group, "99EDGEAI", code_value(finding))[0].ConceptCodeSequence[0]
        found[code_value(finding)] = (float(probability.NumericValue), float(threshold.NumericValue),
                                    (state.CodingSchemeDesignator, code_value(state), state.CodeMeaning))
    assert found == {
        "ptx": (pytest.approx(0.8731), pytest.approx(0.42), ("SCT", "10828004", "Positive")),
        "tb": (pytest.approx(0.0625), pytest.approx(0.35), ("SCT", "260385009", "Negative")),
    }
    assert sr.CodingSchemeIdentificationSequence[0].CodingSchemeDesignator == "99EDGEAI"


def test_abstention_sr_on_ultrasound_frame(us_clip: Dataset, tmp_path: Path) -> None:
    sr, path, _ = build_and_save(us_clip, abstained(frame=US_FRAME), tmp_path)
    report = dciodvfy(path)
    assert "ComprehensiveSR" in report.output, report.output
    assert report.errors == [], report.output
    assert sr.StudyInstanceUID == us_clip.StudyInstanceUID

    (group,) = groups(sr)
    assert text_of(group, "DCM", "111001") == ["cxr-reference"] and text_of(group, "DCM", "111003") == ["1.4.2"]
    coded = items_named(group, "99EDGEAI", "ABSTAINED")[0].ConceptCodeSequence[0]
    assert code_value(coded) == "NOT_APPLICABLE_MODALITY" and coded.CodeMeaning == "Not applicable modality"
    assert text_of(group, "99EDGEAI", "ABSTAINREASON") == ["modality 'US' is not one of CR, DX for this model"]
    assert items_named(sr, "DCM", "122157") == []  # no probability when the model did not look
    # The frame the model would have read, 1-based in DICOM.
    (source,) = items_named(group, "DCM", "121112")
    ref = source.ReferencedSOPSequence[0]
    assert ref.ReferencedSOPInstanceUID == us_clip.SOPInstanceUID and ref.ReferencedFrameNumber == US_FRAME + 1
    assert AI_NOTICE in [item.get("TextValue") for item in walk(sr)]


def test_rebuild_is_deterministic_and_part10_bytes_round_trip(chest_cr: Dataset) -> None:
    uids = new_uids()
    first = build_ai_sr(chest_cr, analyzed(chest_cr), sop_instance_uid=uids["sop_instance_uid"],
                        series_instance_uid=uids["series_instance_uid"])
    second = build_ai_sr(chest_cr, analyzed(chest_cr), sop_instance_uid=uids["sop_instance_uid"],
                         series_instance_uid=uids["series_instance_uid"])

    def tracking(ds: Dataset) -> list[str]:
        return [item.UID for item in items_named(ds, "DCM", "112040")]

    assert len(tracking(first)) == 2 and tracking(first) == tracking(second)
    data = write_part10(first)
    assert data[128:132] == b"DICM"
    back = pydicom.dcmread(pydicom.filebase.DicomBytesIO(data))
    assert back.SOPInstanceUID == uids["sop_instance_uid"]
    assert back.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert back.file_meta.MediaStorageSOPInstanceUID == uids["sop_instance_uid"]
    # The caller's dataset is untouched (no pixels dropped, no attributes added).
    assert "PixelData" in chest_cr and "Laterality" not in chest_cr


def test_source_without_uids_is_refused(chest_cr: Dataset) -> None:
    broken = pydicom.Dataset()
    broken.PatientID, broken.StudyInstanceUID, broken.Modality = chest_cr.PatientID, chest_cr.StudyInstanceUID, "CR"
    with pytest.raises(ValueError, match="SOPInstanceUID"):
        build_ai_sr(broken, abstained(), sop_instance_uid=generate_uid(), series_instance_uid=generate_uid())
