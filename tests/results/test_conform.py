"""Values a modality sends that the SR/SC builders refuse: made to conform in the copy the
builders get, with the source's bytes untouched and both objects valid per dciodvfy."""
from __future__ import annotations

import copy
import io
from pathlib import Path

import pydicom
import pytest
from pydicom import config as pydicom_config
from pydicom.datadict import tag_for_keyword, dictionary_VR
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from appliance.results import build_ai_sr, build_heatmap_sc, write_part10
from appliance.results.common import source_metadata
from appliance.results.conform import conform_value, conform_values
from tests.results.conftest import analyzed
from tests.results.dciodvfy import dciodvfy

# keyword -> the raw value a careless modality wrote (what a file on the wire carries)
HOSTILE = {
    "PatientName": b"Quimby\\Zebedee",
    "ReferringPhysicianName": b"A^B^C^D^E^F^G",
    "OtherPatientNames": b"X" * 80 + b"^Given",
    "PatientID": b"P" * 80,
    "AccessionNumber": b"A" * 30,
    "StudyID": b"S1\\S2",
    "PatientBirthDate": b"1945-01-02",
    "StudyDate": b"20041345",
    "StudyTime": b"12:30:00",
    "PatientSex": b"q",
    "PatientAge": b"45 years",
    "PatientWeight": b"seventy",
    "StudyDescription": b"D" * 300,
}


def with_raw_values(source: Dataset, values: dict[str, bytes]) -> Dataset:
    """``source`` re-read from bytes in which ``values`` were written as they are."""
    ds = copy.deepcopy(source)  # Dataset.copy() would share the elements with the session fixture
    for keyword, value in values.items():
        tag = tag_for_keyword(keyword)
        value = value + b" " if len(value) % 2 else value
        ds[tag] = RawDataElement(tag, dictionary_VR(tag), len(value), value, 0, False, True)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    buffer = io.BytesIO()
    ds.save_as(buffer, implicit_vr=False, little_endian=True)
    return pydicom.dcmread(io.BytesIO(buffer.getvalue()))


def encoded(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, implicit_vr=False, little_endian=True)
    return buffer.getvalue()


@pytest.mark.parametrize("vr, text, keyword, expected", [
    ("PN", "Doe^John", "", "Doe^John"),
    ("PN", "A^B^C^D^E^F^G", "", "A^B^C^D^E F G"),
    ("PN", "a=b=c=d", "", "a=b=c d"),
    ("PN", "F" * 70 + "^Given", "", "F" * 58 + "^Given"),
    ("PN", "Tab\tName", "", "TabName"),
    ("LO", "x" * 70, "", "x" * 64),
    ("SH", "y" * 20, "", "y" * 16),
    ("CS", "m", "PatientSex", "M"),
    ("CS", "Q", "PatientSex", ""),
    ("CS", "abc-1", "", "ABC1"),
    ("AS", "045Y", "", "045Y"),
    ("AS", "45 years", "", ""),
    ("DA", "20040826", "", "20040826"),
    ("DA", "2004.08.26", "", "20040826"),
    ("DA", "2004-08-26", "", "20040826"),
    ("DA", "20041345", "", ""),
    ("DA", "2004", "", ""),
    ("TM", "123000.25", "", "123000.25"),
    ("TM", "12:30:00", "", "123000"),
    ("TM", "256100", "", ""),
    ("DT", "20040826123000", "", "20040826123000"),
    ("DT", "yesterday", "", ""),
    ("IS", "12", "", "12"),
    ("IS", "", "", ""),
    ("IS", "abc", "", ""),
    ("IS", "99999999999", "", ""),
    ("DS", "1.25", "", "1.25"),
    ("DS", "seventy", "", ""),
    ("DS", "nan", "", ""),
    ("DS", "1.70000000000000000001", "", "1.7"),
])
def test_conform_value(vr: str, text: str, keyword: str, expected: str) -> None:
    assert conform_value(vr, text, keyword) == expected


def test_conforming_values_are_kept_as_they_are(chest_cr: Dataset) -> None:
    meta = source_metadata(chest_cr)
    assert str(meta.PatientName) == str(chest_cr.PatientName)
    assert conform_values(source_metadata(chest_cr)) == []  # the real CR needs nothing


def test_hostile_values_conformed_in_the_copy_only(chest_cr: Dataset) -> None:
    source = with_raw_values(chest_cr, HOSTILE)
    before = encoded(source)
    meta = source_metadata(source)
    assert encoded(source) == before  # the source stays as the modality sent it
    assert str(meta.PatientName) == "Quimby Zebedee"  # the backslash was part of the name
    assert str(meta.ReferringPhysicianName) == "A^B^C^D^E F G"
    assert len(str(meta.OtherPatientNames)) == 64 and str(meta.OtherPatientNames).endswith("^Given")
    assert meta.PatientID == "P" * 64 and meta.AccessionNumber == "A" * 16 and meta.StudyID == "S1 S2"
    assert (meta.PatientBirthDate, meta.StudyDate, meta.StudyTime) == ("19450102", "", "123000")
    assert (meta.PatientSex, meta.PatientAge, meta.PatientWeight) == ("", "", "")
    assert len(meta.StudyDescription) == 64
    again = conform_values(meta)
    assert again == []  # conforming is idempotent


def test_conform_reaches_into_sequences() -> None:
    item = Dataset()
    item.PatientID = "I" * 100
    ds = Dataset()
    ds.OtherPatientIDsSequence = [item]
    assert conform_values(ds) == ["PatientID"]
    assert ds.OtherPatientIDsSequence[0].PatientID == "I" * 64


@pytest.fixture
def strict_writing(monkeypatch: pytest.MonkeyPatch) -> None:
    """pydicom refusing non-conforming values on assignment, as its future default will."""
    monkeypatch.setattr(pydicom_config.settings, "_writing_validation_mode", pydicom_config.RAISE)


def test_builders_accept_hostile_source_and_write_valid_objects(chest_cr: Dataset, tmp_path: Path,
                                                                strict_writing: None) -> None:
    source = with_raw_values(chest_cr, HOSTILE)
    result = analyzed(chest_cr)
    sr = build_ai_sr(source, result, sop_instance_uid=generate_uid(), series_instance_uid=generate_uid())
    sc = build_heatmap_sc(source, result, sop_instance_uid=generate_uid(), series_instance_uid=generate_uid())
    for name, obj in (("sr", sr), ("sc", sc)):
        path = tmp_path / f"{name}.dcm"
        path.write_bytes(write_part10(obj))
        written = pydicom.dcmread(path)
        assert str(written.PatientName) == "Quimby Zebedee" and written.PatientID == "P" * 64
        assert written.StudyInstanceUID == source.StudyInstanceUID
        assert dciodvfy(path).errors == [], name


def test_without_conforming_the_builder_refuses_the_name(chest_cr: Dataset) -> None:
    # The failure the sanitiser exists for: highdicom takes a two-valued PN for no name at all.
    import highdicom as hd

    source = with_raw_values(chest_cr, {"PatientName": HOSTILE["PatientName"]})
    with pytest.raises(TypeError, match="person name"):
        hd.valuerep.check_person_name(source.PatientName)


def test_a_value_pydicom_cannot_convert_is_emptied(monkeypatch: pytest.MonkeyPatch) -> None:
    # Strict reading makes conversion itself fail on "seventy" as a Decimal String.
    monkeypatch.setattr(pydicom_config.settings, "_reading_validation_mode", pydicom_config.RAISE)
    ds = Dataset()
    weight, name = tag_for_keyword("PatientWeight"), tag_for_keyword("PatientName")
    ds[weight] = RawDataElement(weight, None, 8, b"seventy ", 0, True, True)  # implicit VR: no VR on the wire
    ds[name] = RawDataElement(name, None, 8, b"Doe\\Jon ", 0, True, True)
    assert conform_values(ds) == ["PatientWeight", "PatientName"]
    assert ds["PatientWeight"].VR == "DS" and ds.PatientWeight is None and str(ds.PatientName) == "Doe Jon"
