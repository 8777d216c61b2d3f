"""Lossless compression for sending, per destination (``compress`` = jpeg2000-lossless or
jpegls-lossless).

Only native (uncompressed) pixel data is compressed; an image the modality already compressed is
sent as it is (re-encoding a lossy image would not make it smaller or better).  Every encoded
image is decoded again and compared with the original pixels before it is used: a clinical image
must arrive bit-identical, and an encoder bug must cost bytes, not pixels.
"""
from __future__ import annotations

import copy
import logging
from typing import Optional

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import JPEG2000Lossless, JPEGLSLossless, UID

log = logging.getLogger(__name__)

# compress setting -> (transfer syntax, pydicom encoding plugin)
METHODS: dict[str, tuple[UID, str]] = {
    "jpeg2000-lossless": (JPEG2000Lossless, "pylibjpeg"),
    "jpegls-lossless": (JPEGLSLossless, "pyjpegls"),
}


def target_syntax(method: str) -> Optional[UID]:
    """The transfer syntax a ``compress`` setting produces; None for ``none``."""
    entry = METHODS.get(method)
    return entry[0] if entry else None


def compressible(ds: Dataset) -> bool:
    """Native pixel data in a layout the lossless encoders take (1 or 3 samples, <= 16 bits)."""
    if "PixelData" not in ds or ds.file_meta.TransferSyntaxUID.is_compressed:
        return False
    if int(ds.get("BitsAllocated", 0) or 0) not in (8, 16):
        return False
    return int(ds.get("SamplesPerPixel", 1) or 1) in (1, 3)


def compress(ds: Dataset, method: str) -> Optional[Dataset]:
    """A losslessly compressed copy of ``ds``, or None when it cannot be (sent as is, then).

    The copy's pixels are verified to decode identical to the original's.
    """
    entry = METHODS.get(method)
    if entry is None or not compressible(ds):
        return None
    syntax, plugin = entry
    out = copy.deepcopy(ds)  # compress() rewrites elements in place; the original must stay intact
    try:
        original = ds.pixel_array
        # Same instance, different encoding: the SOP Instance UID must not change (pydicom would).
        if int(ds.get("SamplesPerPixel", 1) or 1) == 3 and syntax == JPEG2000Lossless:
            # The reversible colour transform is part of JPEG 2000 lossless and exact.
            out.compress(syntax, encoding_plugin=plugin, generate_instance_uid=False,
                         photometric_interpretation="YBR_RCT")
        else:
            out.compress(syntax, encoding_plugin=plugin, generate_instance_uid=False)
        decoded = out.pixel_array
    except Exception as exc:  # noqa: BLE001 - any encoder failure means "send uncompressed"
        log.warning("lossless %s compression not possible (%s: %s); sending uncompressed", method, type(exc).__name__, exc)
        return None
    if decoded.shape != original.shape or not np.array_equal(decoded, original):
        log.error("lossless %s compression did not round-trip; sending uncompressed", method)
        return None
    return out
