"""The input gate: abstain on what the model was not made for, analyse the chest CR.

RG1's birth date (1940) makes it a 64-year-old at its study date, outside the reference
pneumonia model's population; tests that need the chest film analysed read it as a child's
(:func:`child_chest`)."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from appliance.analyze.gate import (
    CATEGORY, PATIENT_KEYWORDS, Abstention, OodStats, Patient, check_ood, check_population, parse_age_string,
    parse_date, read_patient,
)
from appliance.analyze.manifest import Manifest, load_manifest
from appliance.analyze.runner import ModelRunner
from appliance.config import PROJECT_ROOT
from tests.analyze.samples import colour_photo, write_png, write_secondary_capture
from tests.analyze.toy_package import MODEL_ID, US_MODEL_ID, toy_engines, write_manifest  # noqa: F401

warnings.filterwarnings("ignore", category=UserWarning, module="pydicom")
REAL_CXR = PROJECT_ROOT / "engines" / "cxr-pneumonia"
REAL_US = PROJECT_ROOT / "engines" / "us-breast-lesion"


@pytest.fixture(scope="module", params=["toy", "cxr-pneumonia"])
def chest_runner(request: pytest.FixtureRequest, toy_engines: Path) -> ModelRunner:  # noqa: F811
    if request.param == "toy":
        return ModelRunner.load(load_manifest(toy_engines / MODEL_ID), backend="onnxruntime")
    assert (REAL_CXR / "manifest.toml").is_file(), "engines/cxr-pneumonia is missing"
    return ModelRunner.load(load_manifest(REAL_CXR), backend="onnxruntime")


def dicom(name: str) -> str:
    path = get_testdata_file(name)
    assert path is not None
    return str(path)


def child_chest(name: str = "RG1_UNCR.dcm") -> pydicom.Dataset:
    """The real chest CR as a 3-year-old's: inside the reference pneumonia model's population."""
    ds = pydicom.dcmread(dicom(name))
    ds.PatientAge = "003Y"
    return ds


@pytest.mark.parametrize("name,code", [
    ("CT_small.dcm", "NOT_APPLICABLE_MODALITY"),
    ("RG3_UNCR.dcm", "WRONG_BODY_PART"),
    ("RG3_J2KR.dcm", "WRONG_BODY_PART"),
    ("US1_UNCR.dcm", "NOT_APPLICABLE_MODALITY"),
    ("MR_truncated.dcm", "UNREADABLE_PIXELS"),
])
def test_abstains_on_inputs_outside_intended_use(chest_runner: ModelRunner, name: str, code: str) -> None:
    result = chest_runner.analyze(dicom(name))
    assert result.abstention is not None and result.abstention.code == code, result.abstention
    assert result.findings == [] and result.heatmap is None
    assert result.to_dict()["status"] == "abstained"


@pytest.mark.parametrize("name", ["RG1_UNCR.dcm", "RG1_J2KR.dcm"])
def test_analyzes_the_chest_cr(chest_runner: ModelRunner, name: str) -> None:
    result = chest_runner.analyze(child_chest(name))
    assert result.abstention is None, result.abstention
    assert len(result.findings) >= 1 and 0.0 <= result.findings[0].probability <= 1.0
    assert result.heatmap is not None and result.heatmap.shape == (1955, 1841, 3)
    assert result.ood_distance is not None


def test_colour_photograph_png_and_dicom(chest_runner: ModelRunner, tmp_path: Path) -> None:
    photo = colour_photo()
    for path in (write_png(tmp_path / "photo.png", photo),
                 write_secondary_capture(tmp_path / "photo.dcm", photo)):
        result = chest_runner.analyze(path)
        assert result.abstention is not None and result.abstention.code == "COLOUR_IMAGE", path


def test_blank_images(chest_runner: ModelRunner, tmp_path: Path) -> None:
    blank = write_png(tmp_path / "blank.png", np.full((512, 512), 128, dtype=np.uint8))
    assert chest_runner.analyze(blank).abstention.code == "UNREADABLE_PIXELS"
    ds = child_chest()
    ds.PixelData = np.zeros((ds.Rows, ds.Columns), dtype=np.uint16).tobytes()
    result = chest_runner.analyze(ds)
    assert result.abstention.code == "UNREADABLE_PIXELS" and "blank" in result.abstention.reason


def test_view_size_and_missing_values(chest_runner: ModelRunner) -> None:
    ds = child_chest()
    ds.ViewPosition = "LL"
    assert chest_runner.analyze(ds).abstention.code == "WRONG_VIEW"
    del ds.ViewPosition  # "" is allowed: a missing view does not refuse
    del ds.BodyPartExamined
    assert chest_runner.analyze(ds).abstention is None
    small = child_chest()
    arr = small.pixel_array[::10, ::10].copy()
    small.Rows, small.Columns = arr.shape
    small.PixelData = arr.tobytes()
    result = chest_runner.analyze(small)
    assert result.abstention.code == "TOO_SMALL" and "196×185" in result.abstention.reason


def test_image_smaller_than_the_model_input(chest_runner: ModelRunner, tmp_path: Path) -> None:
    tiny = write_png(tmp_path / "tiny.png", np.random.default_rng(0).integers(0, 255, (20, 20), dtype=np.uint8))
    assert chest_runner.analyze(tiny).abstention.code == "TOO_SMALL"


def test_out_of_distribution(toy_engines: Path, tmp_path: Path) -> None:  # noqa: F811
    import shutil

    package = tmp_path / MODEL_ID
    shutil.copytree(toy_engines / MODEL_ID, package)
    write_manifest(package, ood_threshold=0.5)
    runner = ModelRunner.load(load_manifest(package), backend="onnxruntime")
    result = runner.analyze(dicom("RG1_UNCR.dcm"))
    assert result.abstention.code == "OUT_OF_DISTRIBUTION" and result.abstention.category == -3
    assert result.ood_distance > 0.5


def test_ood_distance_formula() -> None:
    stats = OodStats(mean=np.array([1.0, 2.0]), precision=np.diag([4.0, 1.0]), threshold=3.0)
    assert stats.distance(np.array([2.0, 2.0])) == pytest.approx(2.0)  # sqrt(4 * 1^2)
    assert check_ood(np.array([1.0, 6.0]), stats)[1].code == "OUT_OF_DISTRIBUTION"  # sqrt(16) = 4 > 3
    assert check_ood(np.array([1.0, 4.0]), stats)[1] is None  # 2 <= 3
    assert set(CATEGORY.values()) == {-1, -2, -3}


def test_ultrasound_model_converts_colour_to_grey(toy_engines: Path) -> None:  # noqa: F811
    runner = ModelRunner.load(load_manifest(toy_engines / US_MODEL_ID), backend="onnxruntime")
    result = runner.analyze(dicom("color3d_jpeg_baseline.dcm"))
    assert result.abstention is None, result.abstention
    assert result.source["frame_index"] == 60 and result.heatmap.shape == (480, 640, 3)
    assert runner.analyze(dicom("RG1_UNCR.dcm")).abstention.code == "NOT_APPLICABLE_MODALITY"


# -- the intended population ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def cxr() -> Manifest:
    return load_manifest(REAL_CXR, verify=False)


@pytest.fixture(scope="module")
def breast() -> Manifest:
    return load_manifest(REAL_US, verify=False)


@pytest.mark.parametrize("value,years,text", [
    ("064Y", 64, "64 years"), ("001Y", 1, "1 year"), ("000Y", 0, "0 years"), ("999Y", 999, "999 years"),
    ("012M", 1, "12 months"), ("071M", 5, "71 months"), ("072M", 6, "72 months"), ("011M", 0, "11 months"),
    ("052W", 0, "52 weeks"), ("053W", 1, "53 weeks"), ("001W", 0, "1 week"),
    ("365D", 0, "365 days"), ("366D", 1, "366 days"), ("000D", 0, "0 days"),
    # Not the standard's form, but certain: a lower-case unit, fewer than three digits, AS padding.
    ("064y", 64, "64 years"), ("62Y", 62, "62 years"), ("3m", 0, "3 months"), (" 003Y ", 3, "3 years"),
])
def test_age_string(value: str, years: int, text: str) -> None:
    age, why = parse_age_string(value)
    assert age is not None and (age.years, age.text, age.derived) == (years, text, "") and why == ""


@pytest.mark.parametrize("value,why", [
    ("62", "Patient's Age '62' has no unit (D, W, M or Y)"),  # years? months? not guessed
    ("062", "Patient's Age '062' has no unit (D, W, M or Y)"),
    ("62 years", "Patient's Age '62 years' is not an age (nnnD, nnnW, nnnM or nnnY)"),
    ("1000Y", "Patient's Age '1000Y' is not an age"),
    ("-05Y", "Patient's Age '-05Y' is not an age"),
    ("064X", "Patient's Age '064X' is not an age"),
    ("Y064", "Patient's Age 'Y064' is not an age"),
    ("6 4Y", "Patient's Age '6 4Y' is not an age"),
    ("", "no Patient's Age"),
    ("x" * 40, "Patient's Age 'xxxxxxxxxxxxxxxx…' is not an age"),  # long garbage is not quoted whole
])
def test_invalid_age_string_is_unknown(value: str, why: str) -> None:
    age, reason = parse_age_string(value)
    assert age is None and reason.startswith(why), reason


@pytest.mark.parametrize("value,expected", [
    ("19400305", (1940, 3, 5)), ("1940.03.05", (1940, 3, 5)), ("1940-03-05", (1940, 3, 5)),
    ("20000229", (2000, 2, 29)), ("19000229", None), ("19401305", None), ("19400230", None),
    ("00000101", None), ("1940.03-05", None), ("194003", None), ("19400305120000", None), ("", None),
    ("05.03.1940", None),  # day first or month first? not guessed
])
def test_dates(value: str, expected: tuple[int, int, int] | None) -> None:
    parsed = parse_date(value)
    assert (parsed.timetuple()[:3] if parsed else None) == expected


@pytest.mark.parametrize("birth,study,years,text", [
    ("19400305", "20040826", 64, "64 years"),     # RG1: the birthday has passed
    ("19400827", "20040826", 63, "63 years"),     # the day before the 64th birthday
    ("19400826", "20040826", 64, "64 years"),     # on the birthday
    ("20000229", "20030228", 2, "2 years"),       # a leap-day birthday is not reached on 28 February
    ("20000229", "20030301", 3, "3 years"),
    ("20040315", "20040826", 0, "5 months"),      # under a year: months
    ("20040820", "20040826", 0, "6 days"),        # under a month: days
    ("20040826", "20040826", 0, "0 days"),
])
def test_age_from_birth_date_and_study_date(birth: str, study: str, years: int, text: str) -> None:
    patient = read_patient({"PatientBirthDate": birth, "StudyDate": study})
    assert patient.age is not None and (patient.age.years, patient.age.text) == (years, text)
    assert patient.age.derived == "from the birth date and study date" and patient.age_unknown == ""


def test_birth_date_falls_back_to_acquisition_then_content_date() -> None:
    acquisition = read_patient({"PatientBirthDate": "20010101", "StudyDate": "", "AcquisitionDate": "20040601",
                                "ContentDate": "20090601"})
    assert (acquisition.age.years, acquisition.age.derived) == (3, "from the birth date and acquisition date")
    content = read_patient({"PatientBirthDate": "20010101", "StudyDate": "2004", "ContentDate": "20090601"})
    assert (content.age.years, content.age.derived) == (8, "from the birth date and content date")


@pytest.mark.parametrize("header,why", [
    ({}, "no Patient's Age, and no birth date"),
    ({"PatientAge": "62"}, "Patient's Age '62' has no unit (D, W, M or Y), and no birth date"),
    ({"PatientBirthDate": "19400305"},
     "no Patient's Age, and no valid study, acquisition or content date to measure the birth date against"),
    ({"PatientBirthDate": "19400305", "StudyDate": "2004"},
     "no Patient's Age, and no valid study, acquisition or content date to measure the birth date against"),
    ({"PatientBirthDate": "20050101", "StudyDate": "20040826"}, "no Patient's Age, and the birth date is after the study date"),
    # The invalid birth date itself is not quoted: it identifies the patient.
    ({"PatientBirthDate": "1940-13-05", "StudyDate": "20040826"}, "no Patient's Age, and the birth date is not a valid date"),
    ({"PatientAge": "064Y\\065Y"}, "Patient's Age '064Y\\\\065Y' is not an age (nnnD, nnnW, nnnM or nnnY), and no birth date"),
])
def test_unknown_age_says_why(header: dict, why: str) -> None:
    patient = read_patient(header)
    assert patient.age is None and patient.age_unknown == why


def test_several_values_are_not_one_age() -> None:
    ds = pydicom.Dataset()
    ds.PatientAge = ["064Y", "065Y"]
    ds.PatientBirthDate = ["19400305", "19410305"]
    ds.StudyDate = "20040826"
    ds.PatientSex = ["F", "M"]
    patient = read_patient(ds)
    assert patient.age is None and patient.age_unknown == ("Patient's Age has more than one value, "
                                                           "and the birth date is not a valid date")
    assert (patient.sex, patient.sex_unknown) == ("", "Patient's Sex has more than one value")


def test_patients_age_wins_over_the_birth_date_and_an_invalid_one_falls_back_to_it() -> None:
    ds = pydicom.dcmread(dicom("RG1_UNCR.dcm"), stop_before_pixels=True)
    assert (ds.PatientBirthDate, ds.StudyDate, "PatientAge" in ds) == ("19400305", "20040826", False)
    as_sent = read_patient(ds)
    assert (as_sent.age.years, as_sent.age.derived, as_sent.sex) == (64, "from the birth date and study date", "F")
    ds.PatientAge = "003Y"
    assert read_patient(ds).age == parse_age_string("003Y")[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns on the invalid AS, as a modality would send it
        ds.PatientAge = "62"
    assert (read_patient(ds).age.years, read_patient(ds).age.derived) == (64, "from the birth date and study date")


def test_the_keywords_read_are_all_the_check_needs() -> None:
    ds = pydicom.dcmread(dicom("RG1_UNCR.dcm"), stop_before_pixels=True)
    for age in (None, "064Y", "62", "011M"):
        if age is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds.PatientAge = age
        subset = {k: ds.get(k) for k in PATIENT_KEYWORDS if k in ds}
        assert read_patient(subset) == read_patient(ds)


@pytest.mark.parametrize("value,sex,why", [
    ("F", "F", ""), ("m", "M", ""), (" O ", "O", ""), ("", "", "no Patient's Sex"),
    ("W", "", "Patient's Sex 'W' is not M, F or O"), ("FEMALE", "", "Patient's Sex 'FEMALE' is not M, F or O"),
])
def test_sex(value: str, sex: str, why: str) -> None:
    patient = read_patient({"PatientSex": value})
    assert (patient.sex, patient.sex_unknown) == (sex, why)


def test_bad_raw_values_never_raise() -> None:
    from pydicom.dataelem import RawDataElement
    from pydicom.tag import Tag

    ds = pydicom.dcmread(dicom("RG1_UNCR.dcm"), stop_before_pixels=True)
    # Raw elements as a sloppy source puts them on the wire. Patient's Age and Sex with VR US and
    # an odd length make pydicom raise when it converts them; the birth date is not ASCII.
    ds._dict[Tag("PatientAge")] = RawDataElement(Tag("PatientAge"), "US", 3, b"\x06Y\x00", 0, False, True)
    ds._dict[Tag("PatientBirthDate")] = RawDataElement(Tag("PatientBirthDate"), "DA", 8, b"\xff\xfe\xfd\xfc1940",
                                                       0, False, True)
    ds._dict[Tag("PatientSex")] = RawDataElement(Tag("PatientSex"), "US", 1, b"F", 0, False, True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        patient = read_patient(ds)
    assert patient == Patient(None, "Patient's Age cannot be read, and the birth date is not a valid date",
                              "", "Patient's Sex cannot be read")


def _patient(age: str = "", sex: str = "") -> Patient:
    return read_patient({"PatientAge": age, "PatientSex": sex})


@pytest.mark.parametrize("age", ["001Y", "003Y", "005Y", "012M", "071M", "053W", "366D"])
def test_inside_the_paediatric_range_bounds_inclusive(cxr: Manifest, age: str) -> None:
    assert check_population(_patient(age), cxr) == (None, [])


@pytest.mark.parametrize("age,shown", [
    ("064Y", "64 years"), ("006Y", "6 years"), ("072M", "72 months"), ("000Y", "0 years"), ("011M", "11 months"),
    ("052W", "52 weeks"), ("365D", "365 days"),
])
def test_outside_the_paediatric_range(cxr: Manifest, age: str, shown: str) -> None:
    abstention, notes = check_population(_patient(age), cxr)
    assert abstention == Abstention("OUTSIDE_POPULATION", f"made for children aged 1–5 years; this patient is {shown}")
    assert abstention.category == -2 and notes == []


def test_outside_by_birth_date_says_where_the_age_came_from(cxr: Manifest) -> None:
    abstention, _ = check_population(read_patient(pydicom.dcmread(dicom("RG1_UNCR.dcm"), stop_before_pixels=True)), cxr)
    assert abstention.reason == ("made for children aged 1–5 years; this patient is 64 years "
                                 "(from the birth date and study date)")


def test_unknown_age_abstains_under_the_chest_models_policy(cxr: Manifest) -> None:
    abstention, notes = check_population(_patient("62"), cxr)
    assert abstention == Abstention("POPULATION_UNKNOWN", "made for children aged 1–5 years; this patient's age is "
                                    "unknown: Patient's Age '62' has no unit (D, W, M or Y), and no birth date")
    assert abstention.category == -2 and notes == []


def test_unknown_age_and_sex_are_analysed_with_notes_under_the_breast_models_policy(breast: Manifest) -> None:
    abstention, notes = check_population(_patient(), breast)
    assert abstention is None
    assert notes == [
        "analysed although the patient's age is unknown (no Patient's Age, and no birth date); "
        "the model was made for women aged 25–75 years",
        "analysed although the patient's sex is unknown (no Patient's Sex); the model was made for women aged 25–75 years",
    ]
    assert check_population(_patient("040Y", "F"), breast) == (None, [])
    assert check_population(_patient("040Y"), breast)[1] == [notes[1]]


@pytest.mark.parametrize("age,sex,reason", [
    ("024Y", "F", "this patient is 24 years"), ("076Y", "F", "this patient is 76 years"),
    ("050Y", "M", "this patient's sex is recorded as male"), ("050Y", "O", "this patient's sex is recorded as other"),
    ("", "M", "this patient's sex is recorded as male"),  # a known sex outside decides, whatever the age
])
def test_outside_the_breast_models_population(breast: Manifest, age: str, sex: str, reason: str) -> None:
    assert check_population(_patient(age, sex), breast) == (
        Abstention("OUTSIDE_POPULATION", f"made for women aged 25–75 years; {reason}"), [])
    assert check_population(_patient("025Y", "F"), breast) == (None, [])
    assert check_population(_patient("075Y", "F"), breast) == (None, [])


def test_abstain_policy_for_unknown_sex(toy_engines: Path, tmp_path: Path) -> None:  # noqa: F811
    import shutil

    package = tmp_path / MODEL_ID
    shutil.copytree(toy_engines / MODEL_ID, package)
    path = package / "manifest.toml"
    path.write_text(path.read_text().replace(
        "\n[input]", '\npopulation = "women"\nsexes = ["F"]\nunknown_sex = "abstain"\n\n[input]', 1))
    manifest = load_manifest(package)
    assert check_population(_patient("030Y", "W"), manifest) == (Abstention(
        "POPULATION_UNKNOWN", "made for women; this patient's sex is unknown: Patient's Sex 'W' is not M, F or O"), [])
    assert check_population(_patient("", "F"), manifest) == (None, [])  # no age limit: the age is not needed


def test_no_patient_metadata_or_no_population_limit_is_not_checked(cxr: Manifest, toy_engines: Path) -> None:  # noqa: F811
    assert check_population(None, cxr) == (None, [])  # PNG/JPEG validation images
    toy = load_manifest(toy_engines / MODEL_ID)
    assert check_population(_patient("064Y", "M"), toy) == (None, [])
    assert CATEGORY["OUTSIDE_POPULATION"] == CATEGORY["POPULATION_UNKNOWN"] == -2
