"""The population gate end to end: dcmsend -> `appliance serve` -> `appliance studies --json`.

The reference pneumonia model is for children aged 1–5 years. RG1 (the real chest CR) is a
64-year-old by its birth date (1940) at its study date (2004): as shipped, and with Patient's
Age 064Y, the model must abstain with a population reason and never a score; with 003Y it
analyses; with no age at all, or the invalid "62", its declared policy (abstain) applies.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import pydicom

from tests.helpers import dcmsend, resized_copy, sample, write_fresh_copies
from tests.pipeline.test_pipeline_e2e import clinic_instances, wait_until_analyzed

MADE_FOR = "made for children aged 1–5 years"
# Patient's Age per variant (None: removed). Only "064Y" keeps RG1's birth date, so the others'
# age comes from Patient's Age alone.
VARIANTS = {"064Y": "064Y", "003Y": "003Y", "absent": None, "62": "62"}


def _variant(age: str | None, keep_birth_date: bool) -> pydicom.Dataset:
    ds = pydicom.dcmread(sample("RG1_UNCR.dcm"))
    assert "PatientAge" not in ds
    if age is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom warns on the invalid AS "62", as sent by a modality
            ds.PatientAge = age
    if not keep_birth_date:
        del ds.PatientBirthDate
    # Area-resized so the run is quick; still above the model's 256×256 minimum.
    return resized_copy(ds, 512)


def _only_abstention(image: dict, model: str) -> dict:
    assert image["state"] == "abstained", image
    assert image["findings"] == [] and image["heatmaps"] == [], image  # never a score
    (abstention,) = image["abstentions"]
    assert abstention["model"] == model and abstention["model_version"]
    return abstention


def test_population_gate_end_to_end(server_factory, tmp_path: Path) -> None:
    server = server_factory().start()
    files = write_fresh_copies([_variant(age, keep_birth_date=name == "064Y") for name, age in VARIANTS.items()],
                               tmp_path / "send")
    # RG1 as shipped (no Patient's Age, born 1940) and US1 (a male patient): the sample files.
    files += [sample("RG1_UNCR.dcm"), sample("US1_UNCR.dcm")]
    names = [*VARIANTS, "as shipped", "US1"]
    headers = {name: pydicom.dcmread(f, stop_before_pixels=True) for name, f in zip(names, files)}
    assert headers["absent"].get("PatientAge") is None and headers["absent"].get("PatientBirthDate") is None
    assert headers["62"].PatientAge == "62" and headers["064Y"].PatientBirthDate == "19400305"
    result = dcmsend(server.dicom_port, files)
    assert result.returncode == 0, result.stderr
    report = wait_until_analyzed(server.data_dir, len(files), timeout=120)
    instances = clinic_instances(report)
    images = {name: instances[str(h.SOPInstanceUID)] for name, h in headers.items()}
    priority = {s["study_uid"]: s["priority"] for s in report}

    # Adult by Patient's Age, or by the birth date at the study date: abstained, with the reason.
    adult = _only_abstention(images["064Y"], "cxr-pneumonia")
    assert (adult["code"], adult["reason"]) == ("OUTSIDE_POPULATION", f"{MADE_FOR}; this patient is 64 years")
    shipped = _only_abstention(images["as shipped"], "cxr-pneumonia")
    assert (shipped["code"], shipped["reason"]) == (
        "OUTSIDE_POPULATION", f"{MADE_FOR}; this patient is 64 years (from the birth date and study date)")

    # A 3-year-old: analysed, a probability on the finding.
    child = images["003Y"]
    assert child["state"] == "analyzed" and child["abstentions"] == [], child
    assert [(f["model"], f["finding"]) for f in child["findings"]] == [("cxr-pneumonia", "pneumonia")]
    assert 0.0 <= child["findings"][0]["probability"] <= 1.0
    assert priority[str(headers["003Y"].StudyInstanceUID)] in ("urgent", "routine")

    # Unknown age: the chest model's declared policy is to abstain, saying why the age is unknown.
    unknown = _only_abstention(images["absent"], "cxr-pneumonia")
    assert (unknown["code"], unknown["reason"]) == (
        "POPULATION_UNKNOWN", f"{MADE_FOR}; this patient's age is unknown: no Patient's Age, and no birth date")
    invalid = _only_abstention(images["62"], "cxr-pneumonia")
    assert (invalid["code"], invalid["reason"]) == (
        "POPULATION_UNKNOWN",
        f"{MADE_FOR}; this patient's age is unknown: Patient's Age '62' has no unit (D, W, M or Y), and no birth date")

    # The breast model is for women aged 25–75: US1's patient is recorded as male.
    us = _only_abstention(images["US1"], "us-breast-lesion")
    assert (us["code"], us["reason"]) == (
        "OUTSIDE_POPULATION", "made for women aged 25–75 years; this patient's sex is recorded as male")

    # No abstained image puts its study on the worklist with a finding.
    for name in ("064Y", "as shipped", "absent", "62", "US1"):
        assert priority[str(headers[name].StudyInstanceUID)] == "not_analyzed", name

    # The SR of an abstention carries the code and the reason, and no probability.
    abstained_sr, child_sr = (_sr_values(images[name]) for name in ("064Y", "003Y"))
    assert {"OUTSIDE_POPULATION", f"{MADE_FOR}; this patient is 64 years"} <= abstained_sr
    assert "Probability" not in abstained_sr and "Probability" in child_sr


def _sr_values(image: dict) -> set[str]:
    """Codes, code meanings and texts anywhere in the image's one SR."""
    (ref,) = image["sr"]
    keywords = ("CodeValue", "LongCodeValue", "CodeMeaning", "TextValue")
    return {str(e.value) for e in pydicom.dcmread(ref["path"]).iterall() if e.keyword in keywords}
