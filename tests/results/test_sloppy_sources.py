"""Issue 12.3: the box's own DICOM objects are valid whatever the source sends.

A corpus of real chest CRs and ultrasound images (pydicom-data), each carrying values their VR
does not allow -- written into the file as a careless modality writes them -- is stored through
the box's store, read back as the objects worker reads it, and handed to the SR and SC builders.
Every SR and SC must pass dciodvfy without an error, the SR must say what it left out, and the
stored source must still be the exact bytes the modality sent.
"""
from __future__ import annotations

import copy
import io
import uuid
import warnings
from pathlib import Path
from typing import Iterator, Optional

import pydicom
import pytest
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from appliance.db import open_database
from appliance.errors import InvalidDatasetError
from appliance.results import build_ai_sr, build_heatmap_sc, write_part10
from appliance.results.common import SC_KEYWORDS
from appliance.errors import InvalidSourceUID
from appliance.results.sr import LOCAL_SCHEME
from appliance.store import InstanceStore
from tests.helpers import resized_copy, sample
from tests.results.conftest import US_FRAME, analyzed
from tests.results.dciodvfy import dciodvfy

NOTE = (LOCAL_SCHEME, "SRCNOTCOPIED")
MALFORMED_UID = "1.2.840.abc.7"  # letters
LONG_UID = "1." + "2" * 70       # over 64 characters
ZERO_LED_UID = "1.02.3"          # a component with a leading zero

# profile -> keyword -> (raw value, what the box's objects carry: a str, or None for left out).
# Every profile is applied to every source.
PROFILES: dict[str, dict[str, tuple[bytes, object]]] = {
    "bare-age-dashed-date-colon-time": {
        "PatientAge": (b"62", None),                 # RG1 is 64 at its study date: not confirmed
        "StudyDate": (b"2026-13-45", None),          # month 13
        "StudyTime": (b"25:61", None),               # hour 25
        "PatientName": (b"Quimby\\Zebedee", "Quimby Zebedee"),  # a backslash in a one-valued name
        "PatientSex": (b"f", "F"),                   # lower case: only one code it can be
        "PatientID": (b"P" * 70, None),              # over-long LO identifier: never truncated
        "StudyDescription": (b"D" * 100, None),      # over-long LO
        "AccessionNumber": (b"A" * 20, None),        # over-long SH
        "PatientWeight": (b"seventy", None),         # DS
    },
    "word-age-compact-bad-date-six-components": {
        "PatientAge": (b"abc", None),
        "PatientBirthDate": (b"20261345", None),
        "ReferringPhysicianName": (b"A^B^C^D^E^F", None),  # six components
        "PatientSex": (b"UNKNOWN_OR_UNSTATED", None),      # CS over 16 characters
        "InstitutionName": (b"I" * 80, None),              # over-long LO, copied as equipment
        "StudyID": (b"S1\\S2", None),                      # two values in a one-valued identifier
        "PatientSize": (b"1.70000000000000000001", "1.7"),  # DS re-formatted to 16 characters
        "Modality": None,  # set per source below: lower case
    },
    "four-digit-age-long-name-zero-led-uid": {
        "PatientAge": (b"1000Y", None),
        "PatientName": (b"N" * 70 + b"^Given", None),      # a component group over 64 characters
        "StationName": (b"s" * 20, None),                  # over-long SH, copied as equipment
        "OtherPatientNames": (b"x=y=z=w", None),           # four component groups
        "PatientBirthDate": (b"1940.03.05", "19400305"),   # ACR-NEMA date
    },
    "age-confirmed-by-dates": {
        "PatientAge": (b"64", "064Y"),               # bare number, and the dates say 64 years
        "PatientBirthDate": (b"19400305", "19400305"),
        "StudyDate": (b"20040826", "20040826"),
        "StudyTime": (b"10:15:30", "101530"),
    },
}
# Invalid UIDs in the references the SR copies from the Patient and General Study modules:
# profile -> (sequence, UID written into its one item's Referenced SOP Instance UID).
REFERENCE_ITEMS = {"bare-age-dashed-date-colon-time": ("ReferencedStudySequence", MALFORMED_UID),
                   "word-age-compact-bad-date-six-components": ("ReferencedPatientSequence", LONG_UID),
                   "four-digit-age-long-name-zero-led-uid": ("ReferencedStudySequence", ZERO_LED_UID)}
# What the SR must say for each left-out attribute of the profile.
NOTE_NAMES = {"PatientAge": "Patient's Age", "StudyDate": "Study Date", "StudyTime": "Study Time",
              "PatientName": "Patient's Name",
              "PatientID": "Patient ID", "StudyDescription": "Study Description",
              "AccessionNumber": "Accession Number", "PatientWeight": "Patient's Weight",
              "PatientBirthDate": "Patient's Birth Date", "ReferringPhysicianName": "Referring Physician's Name",
              "PatientSex": "Patient's Sex",
              "InstitutionName": "Institution Name", "StudyID": "Study ID",
              "StationName": "Station Name", "OtherPatientNames": "Other Patient Names",
              "ReferencedStudySequence": "Referenced Study Sequence",
              "ReferencedPatientSequence": "Referenced Patient Sequence"}
SOURCES = {"chest-cr": ("RG1_UNCR.dcm", None), "us": ("US1_J2KR.dcm", None),
           "us-clip": ("color3d_jpeg_baseline.dcm", US_FRAME)}


def _template(name: str) -> Dataset:
    ds = pydicom.dcmread(sample(name))
    if name.startswith("RG1"):  # 64×64: the values are under test, not the pixels
        ds = resized_copy(copy.deepcopy(ds), 64)
        del ds.PatientAge  # resized_copy gives chest films an age; the profiles set their own
    else:
        ds.PatientBirthDate = "19400305"  # so a bare age can be confirmed, as on the CR
        ds.StudyDate = "20040826"
    return ds


def sloppy_bytes(template: Dataset, values: dict[str, bytes], reference: Optional[tuple[str, str]] = None) -> bytes:
    """``template`` as Part 10 bytes in which ``values`` are written exactly as given, and
    ``reference`` (sequence, UID) as a one-item reference to that UID."""
    ds = copy.deepcopy(template)
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    for keyword, value in values.items():
        tag = tag_for_keyword(keyword)
        value = value + b" " if len(value) % 2 else value
        ds[tag] = RawDataElement(tag, dictionary_VR(tag), len(value), value, 0, False, True)
    if reference is not None:
        item = Dataset()
        item.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"  # Detached Study Management (retired)
        with warnings.catch_warnings():  # pydicom warns about the invalid UID it is asked to write
            warnings.simplefilter("ignore")
            item.ReferencedSOPInstanceUID = reference[1]
        setattr(ds, reference[0], [item])
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = values.get("SOPInstanceUID") or generate_uid()
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def walk(node: Dataset) -> Iterator[Dataset]:
    for item in node.get("ContentSequence", []):
        yield item
        yield from walk(item)


def source_notes(sr: Dataset) -> list[str]:
    out = []
    for item in walk(sr):
        concept = item.ConceptNameCodeSequence[0]
        if (concept.CodingSchemeDesignator, concept.CodeValue) == NOTE:
            out.append(str(item.TextValue))
    return out


def profile_values(profile: str, source: str) -> dict[str, tuple[bytes, object]]:
    values = {k: v for k, v in PROFILES[profile].items() if v is not None}
    if "Modality" in PROFILES[profile]:
        modality = "CR" if source == "chest-cr" else "US"
        values["Modality"] = (modality.lower().encode(), modality)
    return values


@pytest.fixture(scope="module")
def templates() -> dict[str, Dataset]:
    return {source: _template(name) for source, (name, _) in SOURCES.items()}


CASES = [(profile, source) for profile in PROFILES for source in SOURCES]


@pytest.mark.parametrize("profile, source", CASES, ids=[f"{p}-{s}" for p, s in CASES])
def test_sloppy_source_gives_valid_sr_and_sc(profile: str, source: str, templates: dict[str, Dataset],
                                             tmp_path: Path) -> None:
    values = profile_values(profile, source)
    reference = REFERENCE_ITEMS.get(profile)
    sent = sloppy_bytes(templates[source], {k: raw for k, (raw, _) in values.items()}, reference)
    data_dir = tmp_path / "data"
    store = InstanceStore(data_dir, open_database(data_dir), 0)
    stored = store.store(sent, source="dicom").path

    # As the objects worker reads it (results/worker.py), with the model's result.
    header = pydicom.dcmread(stored, stop_before_pixels=True)
    result = analyzed(templates[source], frame=SOURCES[source][1])
    sr = build_ai_sr(header, result, sop_instance_uid=generate_uid(), series_instance_uid=generate_uid())
    sc = build_heatmap_sc(header, result, sop_instance_uid=generate_uid(), series_instance_uid=generate_uid())

    written = {}
    for name, obj in (("sr", sr), ("sc", sc)):
        path = tmp_path / f"{name}.dcm"
        path.write_bytes(write_part10(obj))
        report = dciodvfy(path)
        assert ("ComprehensiveSR" if name == "sr" else "SCImage") in report.output, report.output
        assert report.errors == [], f"{name}:\n{report.output}"
        written[name] = pydicom.dcmread(path)
    assert stored.read_bytes() == sent  # the source is kept exactly as the modality sent it

    sr, sc = written["sr"], written["sc"]
    notes = source_notes(sr)
    for keyword, (raw, expected) in values.items():
        carried = {"sr": str(sr.get(keyword, "") or ""), "sc": str(sc.get(keyword, "") or "")}
        if keyword == "Modality":  # the SR's own is "SR": the source's is in the image library
            carried = {"sr": next(str(item.ConceptCodeSequence[0].CodeValue) for item in walk(sr)
                                  if item.ConceptNameCodeSequence[0].CodeValue == "121139")}
        elif keyword in ("PatientAge", "PatientWeight", "PatientSize", "StudyDescription", "InstitutionName",
                         "StationName", "OtherPatientNames"):
            carried.pop("sc")  # the SC copies only its patient and study identification
            if keyword in ("InstitutionName", "StationName"):  # copied as contributing equipment
                carried = {"sr": str(sr.ContributingEquipmentSequence[0].get(keyword, "") or "")}
        for name, value in carried.items():
            if expected is None:
                assert value == "", (keyword, name, value)  # left out: never a guess
            else:
                assert value == expected, (keyword, name, value)
        mentioned = [n for n in notes if n.startswith(NOTE_NAMES.get(keyword, keyword) + " ")]
        if expected is None or keyword == "PatientName":
            assert len(mentioned) == 1, (keyword, notes)
            assert raw.decode() not in mentioned[0]  # the note never carries the value
        else:
            assert mentioned == [], (keyword, notes)  # a change of spelling only: nothing to say
        if expected is None and keyword in SC_KEYWORDS:
            assert mentioned[0] in sc.ImageComments, keyword  # the SC says it too
    if reference is not None:  # a reference to an invalid UID references nothing: it goes
        assert not sr.get(reference[0]), reference
        assert f"{NOTE_NAMES[reference[0]]} left out: an item of it references an invalid UID" in notes
    # The objects stay in the source's study and point at the source image.
    assert sr.StudyInstanceUID == sc.StudyInstanceUID == header.StudyInstanceUID
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == header.SOPInstanceUID
    if profile == "bare-age-dashed-date-colon-time":
        assert "Patient's Age left out: the source's value is a number without a unit" in " ".join(notes)


def test_clean_source_has_no_notes(templates: dict[str, Dataset], tmp_path: Path) -> None:
    ds = templates["chest-cr"]
    sr = build_ai_sr(ds, analyzed(ds), sop_instance_uid=generate_uid(), series_instance_uid=generate_uid())
    assert source_notes(sr) == []
    assert sr.StudyInstanceUID == ds.StudyInstanceUID


FILING_UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")


@pytest.mark.parametrize("keyword", FILING_UIDS)
def test_zero_led_filing_uid_is_stored_but_gets_no_invalid_objects(keyword: str, templates: dict[str, Dataset],
                                                                    tmp_path: Path) -> None:
    # The store accepts a leading zero (it files by any digits-and-dots UID); an object that sits in
    # the source's study and points at it cannot be valid, so the builders refuse with the reason
    # the objects worker records (and never the value).
    invalid = f"1.2.826.0.1.3680043.8.498.0{uuid_digits()}"
    sent = sloppy_bytes(templates["chest-cr"], {keyword: invalid.encode()})
    data_dir = tmp_path / "data"
    stored = InstanceStore(data_dir, open_database(data_dir), 0).store(sent, source="dicom").path
    header = pydicom.dcmread(stored, stop_before_pixels=True)
    result = analyzed(templates["chest-cr"])
    name = {"StudyInstanceUID": "Study Instance UID", "SeriesInstanceUID": "Series Instance UID",
            "SOPInstanceUID": "SOP Instance UID"}[keyword]
    for build in (build_ai_sr, build_heatmap_sc):
        with pytest.raises(InvalidSourceUID, match=f"source's {name} is not a valid UID") as refused:
            build(header, result, sop_instance_uid=generate_uid(), series_instance_uid=generate_uid())
        assert invalid not in str(refused.value)
    assert stored.read_bytes() == sent


@pytest.mark.parametrize("keyword", FILING_UIDS)
@pytest.mark.parametrize("invalid", [MALFORMED_UID, LONG_UID], ids=["letters", "over-64"])
def test_malformed_filing_uid_is_refused_by_the_store_and_the_builders(keyword: str, invalid: str,
                                                                        templates: dict[str, Dataset],
                                                                        tmp_path: Path) -> None:
    sent = sloppy_bytes(templates["us"], {keyword: invalid.encode()})
    data_dir = tmp_path / "data"
    with pytest.raises(InvalidDatasetError, match=f"{keyword} is not a valid UID"):
        InstanceStore(data_dir, open_database(data_dir), 0).store(sent, source="dicom")
    # Handed over directly (appliance analyze reads files too), the builders refuse as well.
    header = pydicom.dcmread(io.BytesIO(sent), stop_before_pixels=True)
    with pytest.raises(InvalidSourceUID):
        build_ai_sr(header, analyzed(templates["us"]), sop_instance_uid=generate_uid(),
                    series_instance_uid=generate_uid())


def uuid_digits() -> str:
    return str(uuid.uuid4().int)[:20]
