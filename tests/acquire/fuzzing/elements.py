"""Encoded datasets as records of where each element lies, for mutations that know the structure."""
from __future__ import annotations

import random
import struct
import zlib
from dataclasses import dataclass

import pydicom
from pydicom.datadict import dictionary_VR
from pydicom.uid import DeflatedExplicitVRLittleEndian

from tests.acquire.test_scp_bad_input import split_part10
from tests.helpers import sample

MIB = 1024 * 1024
ITEM, ITEM_END, SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
UNDEFINED = 0xFFFFFFFF
PIXEL_DATA = 0x7FE00010
LONG_VRS = frozenset(b"OB OD OF OL OV OW SQ UC UN UR UT".split())
ALL_VRS = [vr.encode() for vr in (
    "AE", "AS", "AT", "CS", "DA", "DS", "DT", "FD", "FL", "IS", "LO", "LT", "OB", "OD", "OF", "OL", "OV",
    "OW", "PN", "SH", "SL", "SQ", "SS", "ST", "SV", "TM", "UC", "UI", "UL", "UN", "UR", "US", "UT", "UV",
)]

MAX_WALK_DEPTH = 128  # deeper (the nesting mutation) is walked as bytes only: no recursion limit here


@dataclass
class Element:
    """Where one encoded element lies in a dataset byte string."""

    start: int          # offset of the tag
    value: int          # offset of the value
    end: int            # offset after the value (after the delimiter for an undefined length)
    tag: int
    vr: bytes | None  # None in implicit VR, and for items and delimiters
    length_at: int
    length_size: int    # 2 or 4
    length: int         # as declared
    depth: int          # 0 for the top level; items and their elements are deeper


def walk(data: bytes, implicit: bool, little: bool) -> list[Element]:
    """Every element of an encoded dataset, nested ones and pixel data fragments included;
    ValueError if the bytes do not hold together."""
    out: list[Element] = []
    _walk_elements(data, 0, len(data), implicit, "<" if little else ">", 0, out, in_item=False)
    return out


def _header(data: bytes, off: int, implicit: bool, endian: str) -> tuple[int, bytes | None, int, int, int]:
    """(tag, vr, length offset, length size, value offset) of the element at ``off``."""
    if off + 8 > len(data):
        raise ValueError(f"element header truncated at {off}")
    group, elem = struct.unpack_from(endian + "HH", data, off)
    tag = group << 16 | elem
    if implicit or group == 0xFFFE:
        return tag, None, off + 4, 4, off + 8
    vr = data[off + 4:off + 6]
    if vr in LONG_VRS:
        return tag, vr, off + 8, 4, off + 12
    return tag, vr, off + 6, 2, off + 8


def _length(data: bytes, at: int, size: int, endian: str) -> int:
    if at + size > len(data):
        raise ValueError(f"length truncated at {at}")
    return struct.unpack_from(endian + ("H" if size == 2 else "I"), data, at)[0]


def _walk_elements(data: bytes, off: int, end: int, implicit: bool, endian: str, depth: int,
                   out: list[Element], in_item: bool) -> int:
    if depth > MAX_WALK_DEPTH:
        raise ValueError("nested too deep to walk")
    while off < end:
        tag, vr, length_at, length_size, value = _header(data, off, implicit, endian)
        length = _length(data, length_at, length_size, endian)
        if tag == ITEM_END and in_item:
            return off + 8
        if length == UNDEFINED:
            encapsulated = tag == PIXEL_DATA and not implicit
            stop = _walk_items(data, value, end, implicit, endian, depth + 1, out, encapsulated)
        else:
            stop = value + length
            if stop > end:
                raise ValueError(f"element {tag:08X} runs past its container")
            is_sequence = vr == b"SQ" or (vr is None and dictionary_vr(tag) == "SQ")
            if is_sequence:
                _walk_items(data, value, stop, implicit, endian, depth + 1, out, False)
        out.append(Element(off, value, stop, tag, vr, length_at, length_size, length, depth))
        off = stop
    if in_item:
        raise ValueError("item without its delimiter")
    return off


def _walk_items(data: bytes, off: int, end: int, implicit: bool, endian: str, depth: int,
                out: list[Element], fragments: bool) -> int:
    """Items of a sequence (or fragments of encapsulated pixel data) up to ``end`` or the
    sequence delimiter; returns the offset after them."""
    while off < end:
        tag, _vr, length_at, _size, value = _header(data, off, True, endian)
        length = _length(data, length_at, 4, endian)
        if tag == SEQUENCE_END:
            return off + 8
        if tag != ITEM:
            raise ValueError(f"expected an item at {off}, found {tag:08X}")
        if length == UNDEFINED and not fragments:
            stop = _walk_elements(data, value, end, implicit, endian, depth + 1, out, in_item=True)
        else:
            stop = value + length
            if stop > end:
                raise ValueError(f"item at {off} runs past its sequence")
            if not fragments:
                _walk_elements(data, value, stop, implicit, endian, depth + 1, out, in_item=False)
        out.append(Element(off, value, stop, tag, None, length_at, 4, length, depth))
        off = stop
    return off


def dictionary_vr(tag: int) -> str:
    try:
        return dictionary_VR(tag)
    except KeyError:
        return ""


@dataclass
class Source:
    """A real DICOM file, split for mutation."""

    name: str
    sop_class: str
    syntax: str
    body: bytes          # the dataset as DIMSE carries it (inflated, for the deflated syntax)
    implicit: bool
    little: bool
    deflated: bool
    encapsulated: bool
    elements: list[Element]


def load_source(name: str) -> Source:
    path = sample(name)
    meta = pydicom.dcmread(path, stop_before_pixels=True).file_meta
    syntax = pydicom.uid.UID(meta.TransferSyntaxUID)
    _meta, body = split_part10(path)
    deflated = syntax == DeflatedExplicitVRLittleEndian
    if deflated:
        body = zlib.decompress(body, -zlib.MAX_WBITS)
    implicit, little = syntax.is_implicit_VR, syntax.is_little_endian
    return Source(name, str(meta.MediaStorageSOPClassUID), str(syntax), body, implicit, little, deflated,
                  syntax.is_compressed and not deflated, walk(body, implicit, little))


def load_corpus(names: tuple[str, ...]) -> list[Source]:
    return [load_source(name) for name in names]


def fresh_uid(rng: random.Random) -> str:
    """A UUID-derived UID (PS3.5 B.2), from the case's own generator."""
    return f"2.25.{rng.getrandbits(126)}"


def pack_length(value: int, size: int, endian: str) -> bytes:
    return struct.pack(endian + ("H" if size == 2 else "I"), value & (0xFFFF if size == 2 else 0xFFFFFFFF))


def replace_value(data: bytes, el: Element, value: bytes, endian: str) -> bytes:
    """``data`` with ``el``'s value replaced (padded to even length, its length field rewritten;
    a value too long for a 2-byte length is cut)."""
    if len(value) % 2:
        value += b"\0" if el.vr == b"UI" else b" "
    if el.length_size == 2:
        value = value[:0xFFFE]
    head = data[el.start:el.length_at] + pack_length(len(value), el.length_size, endian)
    return data[:el.start] + head + value + data[el.end:]


def top_element(elements: list[Element], tag: int) -> Element | None:
    return next((e for e in elements if e.depth == 0 and e.tag == tag), None)
