"""Source values made valid for the box's own DICOM objects: normalised where the meaning is
certain, else left out, and every change reported so the SR can say what it did not copy.

The AI objects copy the patient, study and equipment attributes of the source image, and
modalities send values their VR does not allow (PS3.5 §6.2).  The box's own objects must be valid
whatever the source sends, and must never say something the source did not: so a value is
rewritten only where one reading is certain, and is otherwise *left out* (emptied: Type 2
"unknown"; or removed).  This runs on a copy the caller owns; the stored source is never touched.
Validity is checked with pydicom's own VR validators (``pydicom.valuerep.VALIDATORS``) plus
pydicom's date and time parsers for what a regular expression cannot see (30 February).

Rules, per VR (leading and trailing spaces are padding everywhere and are dropped silently):

- AS  ``nnnD|W|M|Y``.  A number with an explicit unit (``62Y``, ``62 years``, ``6m``) is padded
  to ``062Y`` / ``006M``: the unit says what it means.  A bare number (``62``) has no unit, so it
  could be days, weeks, months or years; it becomes ``062Y`` only when the source's own birth
  date and study date (both valid) give exactly that many whole years.  Everything else (``abc``,
  ``1000Y``, an unconfirmed bare number) is left out.
- DA  ``YYYYMMDD`` and a real calendar date.  ``YYYY-MM-DD`` and ACR-NEMA's ``YYYY.MM.DD`` are
  rewritten (only the separators differ); anything else is left out.
- TM  ``HHMMSS.FFFFFF`` (any prefix).  ``HH:MM[:SS[.F]]`` is rewritten; anything else (``25:61``)
  is left out.  DT: valid or left out.
- CS  upper-case letters, digits, space, underscore, at most 16.  Lower case is upper-cased (no
  defined term is lower case, so ``m`` can only be ``M``); other characters or over-long codes
  are left out, as are values outside an enumeration a builder checks (Patient's Sex: M, F, O).
- PN  at most 3 component groups of at most 5 components, each group at most 64 characters,
  no control characters.  A backslash in a single-valued name is text, not a delimiter, and
  becomes a space (the characters are kept); a name breaking any other rule is left out --
  truncating a name or moving its components would make it someone else's.
- LO, SH, ST, LT  at most 64 / 16 / 1024 / 10240 characters, no control characters (ST and LT
  allow CR, LF, FF, TAB).  Over-long values are left out, not truncated.  A backslash in a
  single-valued description becomes a space; in an identifier (Patient ID, Accession Number,
  Study ID, any ``...ID``, ``...Number``, ``IssuerOf...``) it leaves the value out: a changed
  identifier could be another patient's.
- IS, DS  pydicom's syntax and range.  ``12.0`` as IS is ``12``; a decimal longer than 16
  characters is re-formatted to 16 (the same number to the precision DS can carry); anything
  else (``seventy``, ``nan``) is left out.
- UI  digits and dots, at most 64, no empty components or leading zeros (``1.02.3``).  A UID is
  compared as a string, so it is never "repaired": ``1.2.3`` is another UID than ``1.02.3``.
  The AI objects exist to sit in the source's study and point at the source image, so they use
  its SOP Class, Study, Series and SOP Instance UIDs.  When one of those is invalid, no valid
  object can do that: a substitute UID would file the objects in a study of their own (in the
  box's store and at the PACS) and point at an image that does not exist, and the invalid UID
  itself would make the objects invalid.  So the builders refuse (:class:`~appliance.errors.InvalidSourceUID`,
  naming the attribute and the rule); the objects worker records that as the reason the
  image's AI objects failed, while the result itself is shown and triaged as usual.  (The box's
  store already refuses letters and over-long values in these four; a leading zero it accepts.)
  Any other invalid UID is left out; in a sequence item, the item (a reference to nothing) is
  removed, and a sequence with no item left is removed.

Notes never carry the source's value (a name, a date of birth, a UID): the SR may be forwarded
through a de-identification profile that does not read TEXT content items.  Logs carry keywords.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from datetime import date
from typing import Any, Callable, Optional, cast

from pydicom.datadict import dictionary_description, dictionary_VM, dictionary_VR, keyword_for_tag
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.valuerep import DA, DT, MAX_VALUE_LEN, TM, VALIDATORS, format_number_as_ds

from ..errors import InvalidSourceUID

NORMALISED = "normalised"   # same meaning, another spelling: not noted in the SR
CHANGED = "changed"         # a backslash in a name or description became a space: noted
LEFT_OUT = "left out"       # noted

FREE_TEXT = ("ST", "LT")
TEXT_VRS = ("PN", "LO", "SH") + FREE_TEXT
COVERED = TEXT_VRS + ("CS", "AS", "DA", "TM", "DT", "IS", "DS", "UI")
# Enumerated values a builder insists on (highdicom's PatientSexValues).
ENUMERATED = {"PatientSex": ("M", "F", "O")}
# The UIDs the AI objects file themselves under and reference the source image by.
REFERENCE_UIDS = ("SOPClassUID", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
PN_COMPONENTS = 5
AS_UNITS = {"d": "D", "day": "D", "days": "D", "w": "W", "wk": "W", "wks": "W", "week": "W", "weeks": "W",
            "m": "M", "mo": "M", "month": "M", "months": "M",
            "y": "Y", "yr": "Y", "yrs": "Y", "year": "Y", "years": "Y"}
MAX_AGE_YEARS = 150  # a bare number above this is no age in years, whatever the dates say

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_CONTROL_FREE_TEXT = re.compile(r"[\x00-\x08\x0b\x0e-\x1f\x7f]")
_AGE = re.compile(r"(\d{1,3})\s*([A-Za-z]*)\.?")
_SEPARATED_DATE = re.compile(r"(\d{4})([.-])(\d{2})\2(\d{2})")
_COLON_TIME = re.compile(r"(\d{2}):(\d{2})(?::(\d{2})(\.\d{1,6})?)?")
_INTEGER_WITH_ZERO_FRACTION = re.compile(r"([+-]?\d+)\.0*")
_DS_UNLIMITED = re.compile(r"[+-]?(\d+|\d+\.\d*|\.\d+)([eE][+-]?\d+)?")  # DS syntax, no length limit

REASONS = {
    "AS": "the source's value is not a valid Age String (three digits and D, W, M or Y)",
    "DA": "the source's value is not a valid date",
    "TM": "the source's value is not a valid time",
    "DT": "the source's value is not a valid date and time",
    "CS": "the source's value is not a valid Code String",
    "PN": "the source's value is not a valid Person Name (at most 5 components, 64 characters a group)",
    "UI": "the source's value is not a valid UID (digits and dots, at most 64, no leading zeros)",
    "IS": "the source's value is not a valid Integer String",
    "DS": "the source's value is not a valid Decimal String",
}


@dataclass(frozen=True)
class Change:
    """What was done to one copied attribute, and why (never its value)."""

    keyword: str  # the top-level attribute (a sequence for a change inside one of its items)
    action: str
    reason: str

    @property
    def name(self) -> str:
        try:
            return str(dictionary_description(self.keyword))
        except (KeyError, ValueError):
            return self.keyword

    @property
    def noted(self) -> bool:
        """Whether a reader of the SR needs to know (a change of spelling only: no)."""
        return self.action != NORMALISED

    def note(self) -> str:
        return f"{self.name} {self.action}: {self.reason}"


# pydicom's table mixes functions and lambdas, which mypy joins to an untyped callable; each is
# (vr, value) -> (valid, message), the validator type of pydicom's own validate_value.
_VALIDATORS = cast(dict[str, Callable[[str, Any], tuple[bool, str]]], VALIDATORS)


def _valid(vr: str, text: str) -> bool:
    return _VALIDATORS[vr](vr, text)[0]


def _parses(constructor: Any, text: str) -> bool:
    try:
        constructor(text)
    except (ValueError, TypeError, OverflowError):
        return False
    return True


def whole_years(birth: str, on: str) -> Optional[int]:
    """Age in whole years on date ``on`` of someone born on ``birth`` (both DA), else None."""
    if not all(len(d) == 8 and _valid("DA", d) and _parses(DA, d) for d in (birth, on)):
        return None
    b, d = date(int(birth[:4]), int(birth[4:6]), int(birth[6:8])), date(int(on[:4]), int(on[4:6]), int(on[6:8]))
    years = d.year - b.year - ((d.month, d.day) < (b.month, b.day))
    return years if years >= 0 else None


# Each rule returns (value, action, reason); value None means left out.
Outcome = tuple[Optional[str], str, str]


def _age(text: str, years: Optional[int]) -> Outcome:
    if _valid("AS", text):
        return text, "", ""
    match = _AGE.fullmatch(text)
    if match is None:
        return None, LEFT_OUT, REASONS["AS"]
    number, unit = int(match[1]), match[2].lower()
    if unit:
        if unit not in AS_UNITS:
            return None, LEFT_OUT, REASONS["AS"]
        return f"{number:03d}{AS_UNITS[unit]}", NORMALISED, "a unit spelled out or a number not padded"
    if years is not None and number == years and number <= MAX_AGE_YEARS:
        return f"{number:03d}Y", NORMALISED, "a bare number the birth and study dates confirm as years"
    return None, LEFT_OUT, ("the source's value is a number without a unit (days, weeks, months or years?) "
                            "that the birth and study dates do not confirm")


def _date(text: str) -> Outcome:
    match = _SEPARATED_DATE.fullmatch(text)
    candidate = match[1] + match[3] + match[4] if match else text
    if len(candidate) == 8 and _valid("DA", candidate) and _parses(DA, candidate):
        return candidate, (NORMALISED if candidate != text else ""), "date separators removed"
    return None, LEFT_OUT, REASONS["DA"]


def _time(text: str) -> Outcome:
    match = _COLON_TIME.fullmatch(text)
    candidate = "".join(part or "" for part in match.groups()) if match else text
    if _valid("TM", candidate) and _parses(TM, candidate):
        return candidate, (NORMALISED if candidate != text else ""), "time separators removed"
    return None, LEFT_OUT, REASONS["TM"]


def _code(text: str, keyword: str) -> Outcome:
    code = text.upper()
    allowed = ENUMERATED.get(keyword)
    if not _valid("CS", code):
        return None, LEFT_OUT, REASONS["CS"] + " (upper-case letters, digits, space, underscore, at most 16)"
    if allowed is not None and code and code not in allowed:
        return None, LEFT_OUT, f"the source's value is not one of {', '.join(allowed)}"
    return code, (NORMALISED if code != text else ""), "upper-cased"


def _person_name(text: str) -> Outcome:
    if _CONTROL.search(text):
        return None, LEFT_OUT, REASONS["PN"]
    if not _valid("PN", text) or any(len(group.split("^")) > PN_COMPONENTS for group in text.split("=")):
        return None, LEFT_OUT, REASONS["PN"]
    return text, "", ""


def is_identifier(keyword: str) -> bool:
    """Whether a text attribute identifies something (then it is kept exactly or left out)."""
    return keyword.endswith(("ID", "IDs", "Number", "Numbers", "UID")) or keyword.startswith("IssuerOf")


def _text(vr: str, text: str) -> Outcome:
    control = _CONTROL_FREE_TEXT if vr in FREE_TEXT else _CONTROL
    if control.search(text):
        return None, LEFT_OUT, "the source's value holds control characters"
    if len(text) > MAX_VALUE_LEN[vr]:
        return None, LEFT_OUT, f"the source's value is longer than the {MAX_VALUE_LEN[vr]} characters {vr} allows"
    return text, "", ""


def _integer(text: str) -> Outcome:
    match = _INTEGER_WITH_ZERO_FRACTION.fullmatch(text)
    candidate = match[1] if match else text
    if _valid("IS", candidate) and -(2**31) <= int(candidate) < 2**31:
        return candidate, (NORMALISED if candidate != text else ""), "a zero fraction dropped"
    return None, LEFT_OUT, REASONS["IS"]


def _decimal(text: str) -> Outcome:
    if _valid("DS", text):
        return text, "", ""
    if _DS_UNLIMITED.fullmatch(text):
        number = float(text)
        if math.isfinite(number):
            return str(format_number_as_ds(number)), NORMALISED, "re-formatted to the 16 characters DS allows"
    return None, LEFT_OUT, REASONS["DS"]


def _uid(text: str) -> Outcome:
    return (text, "", "") if _valid("UI", text) else (None, LEFT_OUT, REASONS["UI"])


def conform(vr: str, text: str, keyword: str = "", years: Optional[int] = None) -> Outcome:
    """One value of ``vr`` (padding already stripped): (value or None if left out, action, reason).

    ``years`` is the patient's age in whole years from the source's own dates, if known.
    """
    if not text:
        return text, "", ""
    if vr == "AS":
        return _age(text, years)
    if vr == "DA":
        return _date(text)
    if vr == "TM":
        return _time(text)
    if vr == "DT":
        return (text, "", "") if _valid("DT", text) and _parses(DT, text) else (None, LEFT_OUT, REASONS["DT"])
    if vr == "CS":
        return _code(text, keyword)
    if vr == "PN":
        return _person_name(text)
    if vr in ("LO", "SH") + FREE_TEXT:
        return _text(vr, text)
    if vr == "IS":
        return _integer(text)
    if vr == "DS":
        return _decimal(text)
    if vr == "UI":
        return _uid(text)
    return text, "", ""


def conform_value(vr: str, text: str, keyword: str = "", years: Optional[int] = None) -> str:
    """The conforming spelling of one value, or "" when it is left out."""
    value, _, _ = conform(vr, text.strip(" \x00") if vr not in FREE_TEXT else text.rstrip(" \x00"), keyword, years)
    return value or ""


def _single_valued(tag: int) -> bool:
    try:
        return dictionary_VM(tag) == "1"
    except KeyError:  # private or unknown: no dictionary VM to hold it to
        return False


def _values(value: Any) -> list[str]:
    if value is None:
        return []
    items = list(value) if isinstance(value, (MultiValue, list, tuple)) else [value]
    return [str(v) if v is not None else "" for v in items]


def _strip(vr: str, text: str) -> str:
    # Padding: trailing spaces (NUL for UI) everywhere; leading spaces are insignificant too,
    # except in ST/LT where indentation is text.
    return text.rstrip(" \x00") if vr in FREE_TEXT else text.strip(" \x00")


def _conform_element(element: DataElement, years: Optional[int]) -> tuple[Optional[list[str]], str, str]:
    """(new values or None if unchanged, action, reason) for one element; [] = left out."""
    original = _values(element.value)
    values = [_strip(element.VR, v) for v in original]
    keyword = element.keyword or ""
    action, reason = "", ""
    if len(values) > 1 and _single_valued(element.tag):
        # A backslash where one value belongs: in a name or a description it was text.
        if element.VR in TEXT_VRS and not is_identifier(keyword):
            values, action, reason = [" ".join(values)], CHANGED, "a backslash in the source's value became a space"
        else:
            return [], LEFT_OUT, "the source's value holds several values where one belongs"
    fixed: list[str] = []
    for text in values:
        value, act, why = conform(element.VR, text, keyword, years)
        if value is None:
            return [], act, why
        if act and not action:
            action, reason = act, why
        fixed.append(value)
    if fixed == original:
        return None, "", ""
    return fixed, action or NORMALISED, reason or "padding removed"


def _raw_vr(ds: Dataset, tag: int) -> str:
    raw = ds.get_item(tag)
    if raw is not None and raw.VR:
        return str(raw.VR)
    try:
        return str(dictionary_VR(tag))
    except KeyError:
        return "UN"


def conform_dataset(ds: Dataset, _top: str = "") -> list[Change]:
    """Make every covered value of ``ds`` (and of its sequences' items) valid, in place.

    Returns what was changed.  Call it on a copy, never on a stored dataset.  Raises
    :class:`~appliance.errors.InvalidSourceUID` when one of the top-level REFERENCE_UIDS is invalid.
    """
    changes: list[Change] = []
    birth, on = (_strip("DA", str(ds.get(k, "") or "")) for k in ("PatientBirthDate", "StudyDate"))
    years = whole_years(birth, on) if not _top else None
    for tag in list(ds.keys()):
        try:
            element = ds[tag]
        except (ValueError, TypeError, KeyError, OverflowError):
            # A raw value pydicom cannot even convert: nothing of it can be kept.
            ds[tag] = DataElement(tag, _raw_vr(ds, tag), None)
            changes.append(Change(_top or keyword_for_tag(tag) or str(tag), LEFT_OUT,
                                  "the source's value cannot be read as its VR"))
            continue
        keyword = element.keyword or str(element.tag)
        if element.VR == "SQ":
            kept = []
            for item in element.value or ():
                inner = conform_dataset(item, _top=_top or keyword)
                if any(c.reason == REASONS["UI"] for c in inner):
                    # A reference to an invalid UID references nothing: the item goes.
                    changes.append(Change(_top or keyword, LEFT_OUT, "an item of it references an invalid UID"))
                    continue
                changes += inner
                kept.append(item)
            if not kept and element.value:
                del ds[tag]  # no items left: an empty sequence would be "present, no value", not absent
            elif len(kept) != len(element.value or ()):
                element.value = kept
            continue
        if element.VR not in COVERED:
            continue
        values, action, reason = _conform_element(element, years)
        if values is None:
            continue
        if element.VR == "UI" and not values and not _top and keyword in REFERENCE_UIDS:
            raise InvalidSourceUID(f"the source's {Change(keyword, '', '').name} is not a valid UID (PS3.5 "
                                   f"9.1: digits and dots, at most 64, no leading zeros): the AI objects "
                                   f"cannot be filed in its study and reference it validly")
        element.value = (values[0] if len(values) == 1 else values) if values else None
        changes.append(Change(_top or keyword, action, reason))
    return changes
