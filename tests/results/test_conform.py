"""Values a modality sends that their VR does not allow: normalised where the meaning is certain,
else left out, in the copy the builders get, with the source's bytes untouched and both objects
valid per dciodvfy (the corpus test is test_sloppy_sources.py)."""
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
from appliance.results.common import source_copy, source_metadata
from appliance.results.conform import LEFT_OUT, NORMALISED, conform_dataset, conform_value, whole_years
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


@pytest.mark.parametrize("vr, text, keyword, years, expected", [
    ("PN", "Doe^John", "", None, "Doe^John"),
    ("PN", "A^B^C^D^E^F^G", "", None, ""),          # which component is which: not certain
    ("PN", "a=b=c=d", "", None, ""),
    ("PN", "F" * 70 + "^Given", "", None, ""),      # truncated, it would be someone else's name
    ("PN", "Tab\tName", "", None, ""),
    ("LO", "x" * 64, "", None, "x" * 64),
    ("LO", "x" * 70, "", None, ""),
    ("SH", "y" * 20, "", None, ""),
    ("LO", "Line\nbreak", "", None, ""),
    ("LT", "Line\nbreak", "", None, "Line\nbreak"),
    ("CS", "m", "PatientSex", None, "M"),
    ("CS", "Q", "PatientSex", None, ""),
    ("CS", "chest", "", None, "CHEST"),
    ("CS", "abc-1", "", None, ""),
    ("CS", "X" * 17, "", None, ""),
    ("AS", "045Y", "", None, "045Y"),
    ("AS", "45 years", "", None, "045Y"),
    ("AS", "6m", "", None, "006M"),
    ("AS", "62Y", "", None, "062Y"),
    ("AS", "62", "", None, ""),                     # no unit, no dates to confirm it
    ("AS", "62", "", 64, ""),                       # the dates say otherwise
    ("AS", "62", "", 62, "062Y"),                   # the dates confirm years
    ("AS", "abc", "", None, ""),
    ("AS", "1000Y", "", None, ""),
    ("AS", "62 parsecs", "", None, ""),
    ("DA", "20040826", "", None, "20040826"),
    ("DA", "2004.08.26", "", None, "20040826"),
    ("DA", "2004-08-26", "", None, "20040826"),
    ("DA", "2026-13-45", "", None, ""),
    ("DA", "20261345", "", None, ""),
    ("DA", "20260230", "", None, ""),               # the regular expression allows it, the calendar not
    ("DA", "2004", "", None, ""),
    ("TM", "123000.25", "", None, "123000.25"),
    ("TM", "12:30:00", "", None, "123000"),
    ("TM", "25:61", "", None, ""),
    ("TM", "256100", "", None, ""),
    ("DT", "20040826123000", "", None, "20040826123000"),
    ("DT", "yesterday", "", None, ""),
    ("IS", "12", "", None, "12"),
    ("IS", "12.0", "", None, "12"),
    ("IS", "", "", None, ""),
    ("IS", "abc", "", None, ""),
    ("IS", "99999999999", "", None, ""),
    ("DS", "1.25", "", None, "1.25"),
    ("DS", "seventy", "", None, ""),
    ("DS", "nan", "", None, ""),
    ("DS", "1.70000000000000000001", "", None, "1.7"),
    ("UI", "1.2.840.10008.1.2.1", "", None, "1.2.840.10008.1.2.1"),
    ("UI", "1.02.3", "", None, ""),                 # never "repaired" into another UID
    ("UI", "1.2.abc", "", None, ""),
    ("UI", "1." + "2" * 70, "", None, ""),
])
def test_conform_value(vr: str, text: str, keyword: str, years: int | None, expected: str) -> None:
    assert conform_value(vr, text, keyword, years) == expected


def test_whole_years() -> None:
    assert whole_years("19400305", "20040826") == 64
    assert whole_years("19400827", "20040826") == 63  # the day before the birthday
    assert whole_years("20261345", "20040826") is None
    assert whole_years("20050101", "20040826") is None  # born after the study


def test_conforming_values_are_kept_as_they_are(chest_cr: Dataset) -> None:
    meta = source_metadata(chest_cr)
    assert str(meta.PatientName) == str(chest_cr.PatientName)
    assert conform_dataset(source_metadata(chest_cr)) == []  # the real CR needs nothing


def test_hostile_values_conformed_in_the_copy_only(chest_cr: Dataset) -> None:
    source = with_raw_values(chest_cr, HOSTILE)
    before = encoded(source)
    copied = source_copy(source)
    meta = copied.meta
    assert encoded(source) == before  # the source stays as the modality sent it
    assert str(meta.PatientName) == "Quimby Zebedee"  # the backslash was part of the name
    # Left out: a name whose components cannot be told apart, identifiers too long or holding
    # two values (a shortened ID could be another patient's), an impossible date, an unknown sex.
    for keyword in ("ReferringPhysicianName", "OtherPatientNames", "PatientID", "AccessionNumber", "StudyID",
                    "StudyDate", "PatientSex", "PatientWeight", "StudyDescription"):
        assert str(meta.get(keyword) or "") == "", keyword
    assert (meta.PatientBirthDate, meta.StudyTime, meta.PatientAge) == ("19450102", "123000", "045Y")
    changes = {c.keyword: c for c in copied.changes}
    assert changes["PatientAge"].action == NORMALISED and not changes["PatientAge"].noted
    assert changes["PatientID"].action == LEFT_OUT
    assert changes["PatientID"].note() == "Patient ID left out: the source's value is longer than the 64 " \
        "characters LO allows"
    assert all("P" * 20 not in c.note() and "Quimby" not in c.note() for c in copied.changes)
    assert conform_dataset(meta) == []  # conforming is idempotent


def test_conform_reaches_into_sequences() -> None:
    item = Dataset()
    item.PatientID = "I" * 100
    ds = Dataset()
    ds.OtherPatientIDsSequence = [item]
    assert [(c.keyword, c.action) for c in conform_dataset(ds)] == [("OtherPatientIDsSequence", LEFT_OUT)]
    assert ds.OtherPatientIDsSequence[0].PatientID is None


def test_an_item_referencing_an_invalid_uid_is_removed() -> None:
    good, bad = Dataset(), Dataset()
    good.ReferencedSOPClassUID = bad.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"
    good.ReferencedSOPInstanceUID = "1.2.3"
    bad.ReferencedSOPInstanceUID = "1.02.3"
    ds = Dataset()
    ds.ReferencedStudySequence = [good, bad]
    ds.ReferencedPatientSequence = [copy.deepcopy(bad)]
    changes = conform_dataset(ds)
    assert [item.ReferencedSOPInstanceUID for item in ds.ReferencedStudySequence] == ["1.2.3"]
    assert "ReferencedPatientSequence" not in ds  # no item left: no empty sequence either
    assert {c.keyword for c in changes} == {"ReferencedStudySequence", "ReferencedPatientSequence"}


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
        assert str(written.PatientName) == "Quimby Zebedee" and written.PatientID == ""
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
    assert [c.keyword for c in conform_dataset(ds)] == ["PatientWeight", "PatientName"]
    assert ds["PatientWeight"].VR == "DS" and ds.PatientWeight is None and str(ds.PatientName) == "Doe Jon"
