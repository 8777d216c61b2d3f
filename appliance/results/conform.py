"""Make a dataset's text values conform to their VR, so strict DICOM builders accept them.

The AI objects copy the patient and study attributes from the source image, and the builders
they are handed to check what they get: highdicom refuses a Person Name that is several values
(a backslash in a name is the value delimiter, so ``Doe\\John`` reads as two names), a date or
time that does not parse, a Patient's Sex other than M, F or O; pydicom, when strict, refuses
over-long strings.  Modalities send all of these.  One such value must not cost an image its AI
objects, so :func:`conform_values` rewrites them in a copy the caller owns -- as close to the
original as the rules allow, or empty (Type 2: "unknown") when nothing valid is left.  The stored
source is never touched, and what is changed is reported by keyword only (never the value).

Covered: the VRs those builders check (PN, LO, SH, CS, AS, DA, TM, DT, IS, DS, ST, LT); other VRs
pass through unchanged.
"""
from __future__ import annotations

import math
import re
from typing import Any, Optional

from pydicom.datadict import dictionary_VM, dictionary_VR, keyword_for_tag
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.valuerep import DA, DT, TM, format_number_as_ds

# Maximum length in characters (PS3.5 table 6.2-1); PN's limit is per component group.
MAX_CHARS = {"LO": 64, "SH": 16, "CS": 16, "ST": 1024, "LT": 10240, "PN": 64, "AS": 4, "DS": 16, "IS": 12,
             "DA": 8, "TM": 14, "DT": 26}
FREE_TEXT = ("ST", "LT")  # may hold CR, LF, FF, TAB (and ESC for character-set switching)
TEXT_VRS = ("PN", "LO", "SH") + FREE_TEXT
# Enumerated values a builder insists on (highdicom's PatientSexValues); anything else is unknown.
ENUMERATED = {"PatientSex": ("M", "F", "O")}
PN_GROUPS, PN_COMPONENTS = 3, 5
IS_RANGE = (-(2**31), 2**31 - 1)

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_CONTROL_FREE_TEXT = re.compile(r"[\x00-\x08\x0b\x0e-\x1a\x1c-\x1f\x7f]")
_CS_OUTSIDE = re.compile(r"[^A-Z0-9 _]")
_AS = re.compile(r"\d{3}[DWMY]")
_LEGACY_DATE = re.compile(r"\d{4}([.-])\d{2}\1\d{2}")
_LEGACY_TIME = re.compile(r"\d{2}(:\d{2}){1,2}(\.\d{1,6})?")
_IS = re.compile(r"\s*([+-]?\d+)(\.0*)?\s*")
_DS = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def _fit(parts: list[str], limit: int) -> str:
    """Components joined by '^' in at most ``limit`` characters, shortening the longest first
    (a long family name should not cost the given name)."""
    parts = list(parts)
    while len("^".join(parts)) > limit:
        longest = max(range(len(parts)), key=lambda i: len(parts[i]))
        excess = len("^".join(parts)) - limit
        parts[longest] = parts[longest][:max(0, len(parts[longest]) - excess)]
    return "^".join(parts)


def _person_name(text: str) -> str:
    """At most 3 component groups of at most 5 components, each group at most 64 characters."""
    groups = _CONTROL.sub("", text).split("=")
    if len(groups) > PN_GROUPS:  # surplus '=' were text, not group separators
        groups = groups[:PN_GROUPS - 1] + [" ".join(groups[PN_GROUPS - 1:])]
    out = []
    for group in groups:
        parts = group.split("^")
        if len(parts) > PN_COMPONENTS:  # surplus components join the last one (the suffix)
            parts = parts[:PN_COMPONENTS - 1] + [" ".join(p for p in parts[PN_COMPONENTS - 1:] if p)]
        out.append(_fit(parts, MAX_CHARS["PN"]))
    return "=".join(out).rstrip("=")


def _parses(constructor: Any, text: str) -> str:
    """``text`` if pydicom's constructor (the one highdicom calls) accepts it, else empty."""
    try:
        constructor(text)
    except (ValueError, TypeError, OverflowError):
        return ""
    return text


def _date(text: str) -> str:
    text = text.strip()
    if _LEGACY_DATE.fullmatch(text):  # ACR-NEMA's YYYY.MM.DD, or ISO YYYY-MM-DD
        text = text.replace(".", "").replace("-", "")
    return _parses(DA, text) if len(text) == 8 else ""


def _time(text: str) -> str:
    text = text.strip()
    if _LEGACY_TIME.fullmatch(text):  # ACR-NEMA's HH:MM:SS
        text = text.replace(":", "")
    # A leap second is valid DICOM but not a Python time: pydicom warns and still accepts it.
    return _parses(TM, text) if len(text) <= MAX_CHARS["TM"] else ""


def _integer(text: str) -> str:
    match = _IS.fullmatch(text)
    number = int(match[1]) if match else None
    return str(number) if number is not None and IS_RANGE[0] <= number <= IS_RANGE[1] else ""


def _decimal(text: str) -> str:
    try:
        number = float(text)
    except ValueError:
        return ""
    if not math.isfinite(number):
        return ""
    text = text.strip()
    return text if len(text) <= MAX_CHARS["DS"] and _DS.fullmatch(text) else str(format_number_as_ds(number))


def conform_value(vr: str, text: str, keyword: str = "") -> str:
    """One value of ``vr`` made to conform (``keyword`` selects enumerated values)."""
    if vr == "PN":
        return _person_name(text)
    if vr in ("LO", "SH"):
        return _CONTROL.sub("", text)[:MAX_CHARS[vr]]
    if vr in FREE_TEXT:
        return _CONTROL_FREE_TEXT.sub("", text)[:MAX_CHARS[vr]]
    if vr == "CS":
        code = _CS_OUTSIDE.sub("", text.strip().upper())[:MAX_CHARS["CS"]]
        allowed = ENUMERATED.get(keyword)
        return code if allowed is None or code in allowed else ""
    if vr == "AS":
        return text.strip() if _AS.fullmatch(text.strip()) else ""
    if vr == "DA":
        return _date(text)
    if vr == "TM":
        return _time(text)
    if vr == "DT":
        return _parses(DT, text.strip())
    if vr == "IS":
        return _integer(text)
    if vr == "DS":
        return _decimal(text)
    return text


def _dictionary_vr(tag: int) -> str:
    try:
        return str(dictionary_VR(tag))
    except KeyError:
        return "UN"


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


def _conformed(element: DataElement) -> Optional[Any]:
    """The element's conforming value, or None when it already conforms."""
    values = _values(element.value)
    if not values:
        return None
    keyword = keyword_for_tag(element.tag)
    if len(values) > 1 and _single_valued(element.tag):
        # Several values where the dictionary allows one: for text the backslash was part of
        # the value; for a date, a time or a number the first one is the value meant.
        values = [" ".join(values)] if element.VR in TEXT_VRS else values[:1]
    fixed = [conform_value(element.VR, v, keyword) for v in values]
    if fixed == _values(element.value):
        return None
    return fixed[0] if len(fixed) == 1 else fixed


def conform_values(ds: Dataset) -> list[str]:
    """Make every covered text value of ``ds`` (and of its sequences' items) conform, in place.

    Returns the keywords (or tags) of the elements changed.  Call it on a copy: it is for the
    values handed to a builder, never for a stored dataset.
    """
    changed: list[str] = []
    for tag in list(ds.keys()):
        try:
            element = ds[tag]
        except (ValueError, TypeError, KeyError, OverflowError):
            # A raw value pydicom cannot even convert: nothing of it can be kept.
            raw = ds.get_item(tag)
            ds[tag] = DataElement(tag, (raw.VR if raw is not None else None) or _dictionary_vr(tag), None)
            changed.append(keyword_for_tag(tag) or str(tag))
            continue
        if element.VR == "SQ":
            for item in element.value or ():
                changed += conform_values(item)
            continue
        if element.VR not in MAX_CHARS:
            continue
        try:
            value = _conformed(element)
        except (ValueError, TypeError):
            value = ""
        if value is not None:
            element.value = value
            changed.append(element.keyword or str(element.tag))
    return changed
