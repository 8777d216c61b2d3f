"""What makes a received byte string an acceptable DICOM instance.

Parsing is complete and strict on purpose: pydicom parses lazily and tolerates truncation at the
end of a stream, so a truncated or garbled transfer must be caught here, at the door, not later
in the analysis worker.
"""
from __future__ import annotations

import io
import re
import struct

import pydicom
import pydicom.config
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.valuerep import VR

from .errors import InvalidDatasetError, UnparsableDatasetError

# Real modalities send slightly non-conformant values all the time; we store bytes as received
# and must not flood the log with per-element warnings (which could also quote patient data).
pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE

# UIDs become path components, so only accept what a UID may contain (PS3.5 9.1) -- this also
# rules out path traversal from a hostile dataset.
UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")


def text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword, "")
    return "" if value is None else str(value).strip()


def parse_part10(data: bytes) -> Dataset:
    """Parse a DICOM Part 10 byte string completely; raise UnparsableDatasetError if it is not one.

    pydicom parses lazily, so every element is checked here (see :func:`_check_elements`): a
    garbled element must fail now, at the door, not later in the analysis worker.
    """
    try:
        ds = pydicom.dcmread(io.BytesIO(data))
        _check_lengths(ds)
        _check_elements(ds)
        ds.file_meta.TransferSyntaxUID  # noqa: B018 - must be present
        _check_pixel_data(ds)
    except InvalidDatasetError:
        raise
    except Exception as exc:  # pydicom raises many types on garbage
        raise UnparsableDatasetError(f"cannot parse dataset: {type(exc).__name__}: {exc}") from exc
    return ds


UNDEFINED_LENGTH = 0xFFFFFFFF


def _check_lengths(ds: Dataset) -> None:
    """pydicom accepts a value shorter than its declared length at the end of a stream; a
    truncated transfer must not pass for a complete dataset."""
    for tag in ds.keys():
        raw = ds.get_item(tag)
        length = getattr(raw, "length", None)
        value = getattr(raw, "value", None)
        if length not in (None, UNDEFINED_LENGTH) and isinstance(value, bytes) and len(value) != length:
            raise UnparsableDatasetError(f"cannot parse dataset: element {tag} truncated ({len(value)} of {length} bytes)")


# Binary number VRs: pydicom cannot convert a value whose length is not a multiple of the size.
_NUMBER_SIZES = {"US": 2, "SS": 2, "UL": 4, "SL": 4, "FL": 4, "FD": 8, "SV": 8, "UV": 8}
_KNOWN_VRS = frozenset(vr.value for vr in VR)


def _check_elements(ds: Dataset, code_extensions: bool = False) -> None:
    """Every element of ``ds``, nested ones included, can be read as pydicom reads it later.

    Touching every element (``iterall``) converts every value, about half the cost of a parse.
    An explicit VR is checked without the conversion where the conversion cannot fail in any
    other way (text is decoded leniently under IGNORE; only an unknown VR or a number of the
    wrong length fails); sequences, and elements whose VR comes from the dictionary (implicit VR,
    UN), are converted as before.
    """
    # Code extensions (ISO 2022 escape sequences) are decoded by code that can fail on garbled
    # text (pydicom raises IndexError on some): there every element is converted, which such a
    # dataset, rare and never a hot path, can afford.
    convert_all = code_extensions or _uses_code_extensions(ds)
    for tag in list(ds.keys()):
        raw = ds.get_item(tag)
        vr = raw.VR
        if convert_all or isinstance(raw, DataElement) or vr in (None, "UN", "SQ"):
            elem = ds[tag]
            if elem.VR == "SQ":
                for item in elem.value:
                    _check_elements(item, convert_all)
            continue
        if vr not in _KNOWN_VRS:
            raise UnparsableDatasetError(f"cannot parse dataset: element {tag} has an unknown VR {vr!r}")
        size = _NUMBER_SIZES.get(vr)
        if size and raw.value is not None and len(raw.value) % size:
            raise UnparsableDatasetError(f"cannot parse dataset: element {tag} ({vr}) is {len(raw.value)} bytes long")


def _uses_code_extensions(ds: Dataset) -> bool:
    raw = ds.get_item("SpecificCharacterSet") if "SpecificCharacterSet" in ds else None
    value = getattr(raw, "value", None)
    if isinstance(value, (bytes, bytearray)):
        return b"2022" in value
    return "2022" in str(value or "")


def _check_pixel_data(ds: Dataset) -> None:
    """Native pixel data must hold every frame; encapsulated fragments must be complete."""
    if "PixelData" not in ds or "Rows" not in ds:
        return
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if ds.file_meta.TransferSyntaxUID.is_compressed:
        try:
            items = count_encapsulated_items(ds.PixelData)
        except ValueError as exc:
            raise UnparsableDatasetError(f"cannot parse dataset: encapsulated pixel data is malformed: {exc}") from exc
        if items < 2:
            raise UnparsableDatasetError("cannot parse dataset: encapsulated pixel data has no fragments")
        return
    bits = int(ds.get("BitsAllocated", 8) or 8)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    pixels = int(ds.Rows) * int(ds.Columns) * samples * frames
    expected = (pixels * bits + 7) // 8
    if len(ds.PixelData) < expected:
        raise UnparsableDatasetError(f"cannot parse dataset: pixel data truncated ({len(ds.PixelData)} of {expected} bytes)")


_ITEM_HEADER = struct.Struct("<HHI")
_ITEM, _SEQUENCE_DELIMITER, _UNDEFINED = 0xFFFEE000, 0xFFFEE0DD, 0xFFFFFFFF


def count_encapsulated_items(value: bytes) -> int:
    """The items of encapsulated pixel data (the Basic Offset Table, then the fragments); raises
    ValueError if one is not an item, has an undefined length or runs past the end.

    Only the 8-byte item headers are read (pydicom's ``generate_fragments`` copies every
    fragment out, a copy of the whole image per C-STORE), and a truncated last fragment, which
    pydicom returns short without a word, is an error here."""
    view = memoryview(value)
    end, offset, count = len(view), 0, 0
    while offset < end:
        if offset + 8 > end:
            raise ValueError(f"item header truncated at offset {offset}")
        group, element, length = _ITEM_HEADER.unpack_from(view, offset)
        tag = group << 16 | element
        if tag == _SEQUENCE_DELIMITER:
            break
        if tag != _ITEM:
            raise ValueError(f"unexpected tag ({group:04X},{element:04X}) at offset {offset}")
        if length == _UNDEFINED:
            raise ValueError(f"undefined item length at offset {offset}")
        offset += 8 + length
        if offset > end:
            raise ValueError(f"item {count} runs {offset - end} bytes past the end of the pixel data")
        count += 1
    return count


def identify(ds: Dataset) -> dict[str, str]:
    """The identifiers needed to file an instance; InvalidDatasetError if any is missing or bad."""
    ids: dict[str, str] = {}
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"):
        value = text(ds, keyword).rstrip("\0")
        if not value:
            raise InvalidDatasetError(f"missing {keyword}")
        if len(value) > 64 or not UID_RE.match(value):
            raise InvalidDatasetError(f"{keyword} is not a valid UID")
        ids[keyword] = value
    return ids
