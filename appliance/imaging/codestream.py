"""Check a compressed frame's own header against the DICOM header before decoding it.

A decoder allocates the image its codestream header describes.  One flipped bit in a JPEG 2000
SIZ marker (Xsiz 1,760 -> 2,098,912) made a 200 kB chest film ask for 7 GB, and the analysis
worker took the box down with it.  The DICOM header (Rows, Columns, Samples per Pixel) is
checked when the image is received; the frame must describe the same image, so the decoder is
never asked for more.  Frames whose header is not found are left to the decoder (it fails on
them without allocating an image).
"""
from __future__ import annotations

import struct
from typing import Optional

from pydicom.dataset import Dataset

from ..errors import DecodeError

HEAD_BYTES = 64 * 1024  # the headers sit at a frame's start; JP2 boxes before the codestream are small
JPEG2000_SYNTAXES = {
    "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.4.92",
    "1.2.840.10008.1.2.4.93", "1.2.840.10008.1.2.4.201", "1.2.840.10008.1.2.4.202",
    "1.2.840.10008.1.2.4.203",
}
JPEG_SYNTAXES = {  # the JPEG family (ISO 10918, and JPEG-LS whose SOF55 has the same layout)
    "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.57",
    "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81",
}
# Start-of-frame markers: SOF0-3, 5-7, 9-11, 13-15, and JPEG-LS SOF55 (0xF7).
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF, 0xF7}
_SIZ = struct.Struct(">HHIIIIIIIIH")


def jpeg2000_size(head: bytes) -> Optional[tuple[int, int, int]]:
    """(columns, rows, components) from the SIZ marker of the codestream in ``head``."""
    start = head.find(b"\xff\x4f\xff\x51")
    if start < 0 or start + 4 + _SIZ.size > len(head):
        return None
    _lsiz, _rsiz, xsiz, ysiz, xosiz, yosiz, *_tiles, csiz = _SIZ.unpack_from(head, start + 4)
    return xsiz - xosiz, ysiz - yosiz, csiz


def jpeg_size(head: bytes) -> Optional[tuple[int, int, int]]:
    """(columns, rows, components) from the first start-of-frame marker of a JPEG stream."""
    if not head.startswith(b"\xff\xd8"):
        return None
    pos = 2
    while pos + 4 <= len(head):
        if head[pos] != 0xFF:
            return None
        marker = head[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in _SOF:
            if pos + 10 > len(head):
                return None
            rows, columns, components = struct.unpack_from(">HHB", head, pos + 5)
            return columns, rows, components
        (length,) = struct.unpack_from(">H", head, pos + 2)
        pos += 2 + length
    return None


def check_frame_header(ds: Dataset, syntax: str, head: bytes) -> None:
    """Raise :class:`DecodeError` when the frame's header describes another image than the
    DICOM header (a larger one would be allocated by the decoder)."""
    if syntax in JPEG2000_SYNTAXES:
        found = jpeg2000_size(head)
    elif syntax in JPEG_SYNTAXES:
        found = jpeg_size(head)
    else:
        return
    if found is None:
        return
    expected = (int(ds.get("Columns", 0) or 0), int(ds.get("Rows", 0) or 0), int(ds.get("SamplesPerPixel", 1) or 1))
    columns, rows, components = found
    # JPEG rows may be 0 (given by a DNL marker later); the decoder then stops at the DICOM size.
    if columns != expected[0] or rows not in (0, expected[1]) or components != expected[2]:
        raise DecodeError(
            f"the compressed frame describes a {columns}x{rows} image with {components} component(s), "
            f"the DICOM header a {expected[0]}x{expected[1]} image with {expected[2]}: not decoded")
