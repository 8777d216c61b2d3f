"""The Part 10 file (preamble, file meta group, dataset) of a received C-STORE, written directly.

Equal, byte for byte, to pynetdicom's ``Event.encoded_dataset(include_meta=True)``, which builds
a pydicom FileMetaDataset and runs pydicom's writer for seven elements on every C-STORE, and
copies the dataset twice; here the group is packed with ``struct`` and the dataset copied once.
"""
from __future__ import annotations

import struct
from typing import Any

from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION

PREAMBLE = b"\x00" * 128 + b"DICM"


def _element(element: int, vr: bytes, value: bytes) -> bytes:
    """One group 0002 element, explicit VR little endian."""
    if vr == b"OB":
        return struct.pack("<HH2s2xI", 0x0002, element, vr, len(value)) + value
    return struct.pack("<HH2sH", 0x0002, element, vr, len(value)) + value


def _padded(text: str, pad: bytes) -> bytes:
    raw = text.encode("ascii")
    return raw + pad if len(raw) % 2 else raw


def file_meta(sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str) -> bytes:
    """The file meta group as pynetdicom's ``create_file_meta`` + ``encode_file_meta`` write it."""
    body = b"".join((
        _element(0x0001, b"OB", b"\x00\x01"),
        _element(0x0002, b"UI", _padded(sop_class_uid, b"\x00")),
        _element(0x0003, b"UI", _padded(sop_instance_uid, b"\x00")),
        _element(0x0010, b"UI", _padded(transfer_syntax, b"\x00")),
        _element(0x0012, b"UI", _padded(PYNETDICOM_IMPLEMENTATION_UID, b"\x00")),
        _element(0x0013, b"SH", _padded(PYNETDICOM_IMPLEMENTATION_VERSION, b" ")),
    ))
    return _element(0x0000, b"UL", struct.pack("<I", len(body))) + body


def encoded_part10(event: Any) -> bytes:
    """Preamble, file meta and the dataset exactly as the peer sent it."""
    request = event.request
    meta = file_meta(str(request.AffectedSOPClassUID), str(request.AffectedSOPInstanceUID),
                     str(event.context.transfer_syntax))
    with request.DataSet.getbuffer() as dataset:
        return b"".join((PREAMBLE, meta, dataset))
