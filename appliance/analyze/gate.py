"""The input gate: analyse only what the model was made for, abstain with a reason otherwise.

Abstention codes, grouped like CAD4TB's negative scores into three categories so a worklist can
show a short class and a specific reason:

====  ========================  =============================================================
cat.  code                      meaning
====  ========================  =============================================================
 -1   UNREADABLE_PIXELS         pixels cannot be decoded, contain NaN/inf, or are blank/constant
 -2   NOT_APPLICABLE_MODALITY   DICOM Modality not in ``[applicability] modalities``
 -2   WRONG_BODY_PART           BodyPartExamined not in ``body_parts``
 -2   WRONG_VIEW                ViewPosition not in ``views``
 -2   WRONG_PHOTOMETRIC         PhotometricInterpretation not in ``photometric``
 -2   COLOUR_IMAGE              real colour content while the model's policy is ``reject``
 -2   TOO_SMALL                 Rows/Columns below ``min_rows``/``min_columns`` (DICOM), or
                                any image smaller than the model input
 -2   OUTSIDE_POPULATION        the patient's age or sex is outside the population the model
                                was made and validated for (``min_age_years`` .. ``sexes``)
 -2   POPULATION_UNKNOWN        the patient's age (or sex) is unknown and the model's
                                ``unknown_age`` (``unknown_sex``) policy is ``abstain``
 -3   OUT_OF_DISTRIBUTION       Mahalanobis distance of the embedding above ``[ood] threshold``
====  ========================  =============================================================

Category -1 means "could not look", -2 "not the kind of image this model is for" (decided from
metadata before inference), -3 "looks unlike the training data" (decided from the model's own
embedding after inference).

Metadata checks (modality, body part, view, photometric, DICOM minimum size) apply to DICOM
input only: PNG/JPEG files carry no acquisition metadata and are accepted as the operator's
validation set; the pixel and OOD checks apply to every input.  The colour policy compares the
*content* (``DecodedImage.is_colour``), so grey images stored as RGB are not colour.

The population check (:func:`read_patient`, :func:`check_population`) reads the patient's age
from Patient's Age (AS ``nnnD/W/M/Y``) or, when that is missing or unusable, from Patient's Birth
Date at the Study Date (else the Acquisition, else the Content Date), and never guesses: a value
whose meaning is not certain ("62": years? months?) makes the age unknown, with the reason.
Accepted as certain beyond the standard: a lower-case unit and 1–2 digits ("62Y"), and dates
written ``YYYY.MM.DD`` (the retired ACR-NEMA form) or ``YYYY-MM-DD``.  Ages are compared in
completed years, bounds inclusive.  When a model analyses under an ``analyse`` policy, the
check returns a note saying what was not known, for the result to carry.

OOD distance: ``d = sqrt((e - mean)^T P (e - mean))`` with ``mean`` and ``P`` (precision,
shrinkage-regularised inverse covariance) from ``ood.npz``; ``d > threshold`` abstains.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import numpy as np
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from ..errors import ManifestError
from ..imaging.decode import DecodedImage
from .manifest import Applicability, Manifest

CATEGORY = {
    "UNREADABLE_PIXELS": -1,
    "NOT_APPLICABLE_MODALITY": -2,
    "WRONG_BODY_PART": -2,
    "WRONG_VIEW": -2,
    "WRONG_PHOTOMETRIC": -2,
    "COLOUR_IMAGE": -2,
    "TOO_SMALL": -2,
    "OUTSIDE_POPULATION": -2,
    "POPULATION_UNKNOWN": -2,
    "OUT_OF_DISTRIBUTION": -3,
}
# A display image (0..255) whose spread is below this is blank: nothing for a model to read.
BLANK_STD = 1.0


@dataclass(frozen=True)
class Abstention:
    """Why the model did not analyse an image."""

    code: str
    reason: str

    @property
    def category(self) -> int:
        return CATEGORY[self.code]

    def as_dict(self) -> dict[str, object]:
        return {"code": self.code, "category": self.category, "reason": self.reason}


def _allowed(value: str, allowed: list[str]) -> bool:
    # An empty list allows anything; "" in the list allows a missing value.
    return not allowed or value.strip().upper() in allowed


def _shown(values: list[str]) -> str:
    return ", ".join(v if v else "(missing)" for v in values)


def check_metadata(image: DecodedImage, manifest: Manifest) -> Optional[Abstention]:
    """Applicability checks that need no inference; the first failing one is returned."""
    app = manifest.applicability
    dicom = image.source_kind == "dicom"
    if dicom:
        if not _allowed(image.modality, app.modalities):
            return Abstention("NOT_APPLICABLE_MODALITY",
                              f"modality {image.modality or '(missing)'} is not one this model is for "
                              f"({_shown(app.modalities)})")
        if not _allowed(image.body_part, app.body_parts):
            return Abstention("WRONG_BODY_PART",
                              f"body part {image.body_part or '(missing)'} is not one this model is for "
                              f"({_shown(app.body_parts)})")
        if not _allowed(image.view, app.views):
            return Abstention("WRONG_VIEW", f"view {image.view or '(missing)'} is not one this model is for "
                                            f"({_shown(app.views)})")
    # Colour before photometric: "colour image" is the reason a person can act on.
    if image.is_colour and app.colour == "reject":
        return Abstention("COLOUR_IMAGE", "colour image; this model reads greyscale images only")
    if dicom:
        # Under "to_grey" any colour encoding is acceptable input: it is converted to grey.
        if not _allowed(image.photometric, app.photometric) and not (
                app.colour == "to_grey" and image.pixels.ndim == 3):
            return Abstention("WRONG_PHOTOMETRIC",
                              f"photometric interpretation {image.photometric} is not accepted "
                              f"({_shown(app.photometric)})")
        if image.rows < app.min_rows or image.columns < app.min_columns:
            return Abstention("TOO_SMALL", f"image is {image.rows}×{image.columns}, the model needs at "
                                           f"least {app.min_rows}×{app.min_columns}")
    return None


# -- the population the model is for -----------------------------------------------------------

# Everything the population check reads from a header: a caller that keeps only these attributes
# (a mapping of keyword -> value) gets the same verdict as from the whole data set.
PATIENT_KEYWORDS = ("PatientAge", "PatientBirthDate", "PatientSex", "StudyDate", "AcquisitionDate", "ContentDate")
# The dates a birth date is measured against, in order: Patient's Age is the age at the study.
AGE_DATES = (("StudyDate", "study date"), ("AcquisitionDate", "acquisition date"), ("ContentDate", "content date"))
KEYWORD_WORDS = {"PatientAge": "Patient's Age", "PatientBirthDate": "the birth date", "PatientSex": "Patient's Sex",
                 "StudyDate": "the study date", "AcquisitionDate": "the acquisition date",
                 "ContentDate": "the content date"}
AGE_UNITS = {"D": "day", "W": "week", "M": "month", "Y": "year"}
DAYS_PER_YEAR = 365.25  # Patient's Age in days or weeks has no calendar to count birthdays on
SEX_WORDS = {"M": "male", "F": "female", "O": "other"}
SHOWN_MAX = 16  # characters of an invalid source value quoted in a reason
_AGE = re.compile(r"(\d{1,3})([DWMY])")  # the standard is exactly 3 digits; fewer is still certain
_DATE = re.compile(r"(\d{4})(\d{2})(\d{2})|(\d{4})([.-])(\d{2})\5(\d{2})")


# A pydicom Dataset, or a mapping of keyword -> value (what the header said).
Header = Union[Dataset, Mapping[str, Any]]


@dataclass(frozen=True)
class PatientAge:
    years: int  # completed years
    text: str   # "64 years", "3 months": as a person would say it
    derived: str = ""  # "" from Patient's Age, else "from the birth date and study date" (etc.)


@dataclass(frozen=True)
class Patient:
    """What a header says of the patient's population; ``*_unknown`` says why a value is missing."""

    age: Optional[PatientAge]
    age_unknown: str = ""
    sex: str = ""  # "M", "F", "O" or "" (unknown)
    sex_unknown: str = ""


def _plural(n: int, unit: str) -> str:
    return f"{n} {unit}" if n == 1 else f"{n} {unit}s"


def _quoted(value: str) -> str:
    return repr(value if len(value) <= SHOWN_MAX else value[:SHOWN_MAX] + "…")


def _value(header: Header, keyword: str) -> tuple[str, str]:
    """The attribute as one text value, or ("", why it is not one) for an unusable value."""
    name = KEYWORD_WORDS[keyword]
    try:
        value = header.get(keyword, None)
    except Exception:  # noqa: BLE001 - pydicom raises many types for a malformed raw value
        return "", f"{name} cannot be read"
    if value is None:
        return "", ""
    if isinstance(value, date):  # pydicom's DA when datetime conversion is on
        return value.strftime("%Y%m%d"), ""
    if isinstance(value, (bytes, bytearray)):
        return "", f"{name} cannot be read"
    if isinstance(value, (list, tuple, MultiValue)):
        return "", f"{name} has more than one value"
    return str(value).strip(), ""


def parse_age_string(value: str) -> tuple[Optional[PatientAge], str]:
    """Patient's Age (AS) -> (age, "") or (None, why it cannot be used)."""
    text = value.strip()
    if not text:
        return None, "no Patient's Age"
    match = _AGE.fullmatch(text.upper())
    if match is None:
        if text.isdigit():
            return None, f"Patient's Age {_quoted(text)} has no unit (D, W, M or Y)"
        return None, f"Patient's Age {_quoted(text)} is not an age (nnnD, nnnW, nnnM or nnnY)"
    number, unit = int(match.group(1)), match.group(2)
    if unit == "Y":
        years = number
    elif unit == "M":
        years = number // 12
    else:
        years = int(number * (7 if unit == "W" else 1) / DAYS_PER_YEAR)
    return PatientAge(years, _plural(number, AGE_UNITS[unit])), ""


def parse_date(value: str) -> Optional[date]:
    """DICOM DA (YYYYMMDD, or YYYY.MM.DD / YYYY-MM-DD) -> date, None if it is not a real date."""
    match = _DATE.fullmatch(value.strip())
    if match is None:
        return None
    year, month, day = match.group(1, 2, 3) if match.group(1) else match.group(4, 6, 7)
    try:
        return date(int(year), int(month), int(day))
    except ValueError:  # 19400230, month 13, year 0
        return None


def age_between(born: date, on: date, derived: str) -> PatientAge:
    """Age in completed years on ``on``; under a year, shown in months (under a month, days)."""
    years = on.year - born.year - int((on.month, on.day) < (born.month, born.day))
    if years >= 1:
        return PatientAge(years, _plural(years, "year"), derived)
    months = (on.year - born.year) * 12 + on.month - born.month - int(on.day < born.day)
    if months >= 1:
        return PatientAge(0, _plural(months, "month"), derived)
    return PatientAge(0, _plural((on - born).days, "day"), derived)


def _age_from_birth_date(header: Header) -> tuple[Optional[PatientAge], str]:
    text, problem = _value(header, "PatientBirthDate")
    if not text and not problem:
        return None, "no birth date"
    born = parse_date(text)
    if born is None:
        # The value itself is not quoted: a birth date is identifying.
        return None, "the birth date is not a valid date"
    for keyword, words in AGE_DATES:
        on = parse_date(_value(header, keyword)[0])
        if on is None:
            continue
        if on < born:
            return None, f"the birth date is after the {words}"
        return age_between(born, on, f"from the birth date and {words}"), ""
    return None, "no valid study, acquisition or content date to measure the birth date against"


def read_patient(header: Header) -> Patient:
    """The patient's age and sex from a DICOM header; never raises for bad values."""
    text, problem = _value(header, "PatientAge")
    age, why = (None, problem) if problem else parse_age_string(text)
    if age is None:
        # Patient's Age missing or unusable: the birth date, if it gives a certain age, decides.
        age, birth_why = _age_from_birth_date(header)
        why = "" if age else f"{why}, and {birth_why}"
    sex, problem = _value(header, "PatientSex")
    sex = sex.upper()
    if sex in SEX_WORDS:
        return Patient(age, why, sex)
    sex_why = problem or (f"Patient's Sex {_quoted(sex)} is not M, F or O" if sex else "no Patient's Sex")
    return Patient(age, why, "", sex_why)


def _outside_age(age: PatientAge, app: Applicability) -> bool:
    return (app.min_age_years is not None and age.years < app.min_age_years) or \
        (app.max_age_years is not None and age.years > app.max_age_years)


def check_population(patient: Optional[Patient], manifest: Manifest) -> tuple[Optional[Abstention], list[str]]:
    """The patient against ``[applicability]``'s population: (abstention, notes).

    ``patient`` is None for inputs with no patient metadata (PNG/JPEG validation sets), which are
    not checked, as for the other metadata checks.  Notes are returned only when the image is to
    be analysed although something the population depends on is unknown (an ``analyse`` policy):
    the result must carry them.
    """
    app = manifest.applicability
    if patient is None or not (app.limits_age or app.sexes):
        return None, []
    made_for = f"made for {app.population}"
    notes = []
    if app.limits_age:
        if patient.age is None:
            if app.unknown_age == "abstain":
                return Abstention("POPULATION_UNKNOWN",
                                  f"{made_for}; this patient's age is unknown: {patient.age_unknown}"), []
            notes.append(f"analysed although the patient's age is unknown ({patient.age_unknown}); "
                         f"the model was made for {app.population}")
        elif _outside_age(patient.age, app):
            derived = f" ({patient.age.derived})" if patient.age.derived else ""
            return Abstention("OUTSIDE_POPULATION", f"{made_for}; this patient is {patient.age.text}{derived}"), []
    if app.sexes:
        if not patient.sex:
            if app.unknown_sex == "abstain":
                return Abstention("POPULATION_UNKNOWN",
                                  f"{made_for}; this patient's sex is unknown: {patient.sex_unknown}"), []
            notes.append(f"analysed although the patient's sex is unknown ({patient.sex_unknown}); "
                         f"the model was made for {app.population}")
        elif patient.sex not in app.sexes:
            return Abstention("OUTSIDE_POPULATION",
                              f"{made_for}; this patient's sex is recorded as {SEX_WORDS[patient.sex]}"), []
    return None, notes


def check_pixels(image: DecodedImage, manifest: Manifest) -> Optional[Abstention]:
    """Content checks on the decoded pixels: NaN, blank, smaller than the model input."""
    pixels = image.pixels
    if not np.all(np.isfinite(pixels)):
        return Abstention("UNREADABLE_PIXELS", "pixel values include NaN or infinity")
    height, width = pixels.shape[:2]
    _, _, in_h, in_w = manifest.input.shape
    if min(height, width) < min(in_h, in_w):
        return Abstention("TOO_SMALL", f"image is {height}×{width}, smaller than the model input {in_h}×{in_w}")
    region = pixels if image.padding is None else pixels[~image.padding]
    if region.size == 0 or float(region.std()) < BLANK_STD:
        return Abstention("UNREADABLE_PIXELS", "blank or constant image: nothing to analyse")
    return None


@dataclass(frozen=True)
class OodStats:
    mean: np.ndarray
    precision: np.ndarray
    threshold: float

    @classmethod
    def load(cls, manifest: Manifest) -> Optional["OodStats"]:
        if manifest.ood is None:
            return None
        path: Path = manifest.path(manifest.ood.stats)
        try:
            with np.load(path) as data:
                mean = np.asarray(data["mean"], dtype=np.float64)
                precision = np.asarray(data["precision"], dtype=np.float64)
        except (OSError, KeyError, ValueError) as exc:
            raise ManifestError(f"{path}: cannot read OOD statistics (needs 'mean' and 'precision'): {exc}") from exc
        if mean.ndim != 1 or precision.shape != (mean.size, mean.size):
            raise ManifestError(f"{path}: mean {mean.shape} and precision {precision.shape} do not fit together")
        return cls(mean=mean, precision=precision, threshold=manifest.ood.threshold)

    def distance(self, embedding: np.ndarray) -> float:
        vector = np.asarray(embedding, dtype=np.float64).reshape(-1)
        if vector.size != self.mean.size:
            raise ManifestError(f"embedding has {vector.size} values, OOD statistics expect {self.mean.size}")
        diff = vector - self.mean
        return float(np.sqrt(max(float(diff @ self.precision @ diff), 0.0)))


def check_ood(embedding: np.ndarray, stats: Optional[OodStats]) -> tuple[Optional[float], Optional[Abstention]]:
    """Distance of one embedding to the training distribution, and an abstention if too far."""
    if stats is None:
        return None, None
    distance = stats.distance(embedding)
    if not np.isfinite(distance) or distance > stats.threshold:
        return distance, Abstention(
            "OUT_OF_DISTRIBUTION",
            f"image looks unlike the model's training data (distance {distance:.1f} > {stats.threshold:.1f})")
    return distance, None
