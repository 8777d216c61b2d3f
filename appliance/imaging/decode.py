"""DICOM (and PNG/JPEG) pixels -> a calibrated float32 display image.

Output convention, relied on by ``preprocess.py``, ``gate.py`` and ``heatmap.py``:

* ``DecodedImage.pixels`` is float32 in **display values 0..255** (0 = black), i.e. what a
  viewer would show after the modality LUT / rescale, the VOI LUT or window, MONOCHROME1
  inversion and the Presentation LUT shape.  The models were trained on 8-bit PNG-like images
  (MedMNIST), so the display domain is the one that matches training.
* Grey images are H×W; colour images (RGB, YBR_* converted to RGB by pydicom, PALETTE COLOR
  expanded through its LUT) are H×W×3 RGB.  ``to_grey`` converts with ITU-R BT.601 luma, the
  same weights as OpenCV's ``COLOR_RGB2GRAY``.
* Without a VOI LUT or window, grey images are scaled min..max over the non-padding pixels,
  which is what the PNG exports behind the training data did.
* Pixel Padding Value (and Pixel Padding Range Limit) pixels are excluded from that range and
  set to black; ``DecodedImage.padding`` holds the mask.
* Multi-frame images: one frame is analysed.  The rule is ``frame=None`` -> the **middle frame**
  (``frames // 2``), because the first frames of ultrasound clips are often the probe settling;
  an explicit ``frame`` index (0-based, negative counts from the end) overrides it.
* An empty or invalid Number of Frames (absent is a single-frame image) is a broken header: the
  image is read as one frame only when its pixel data holds exactly one (by length, or by the
  fragments of encapsulated data); otherwise it is refused with the count it does hold.

Every failure to produce pixels becomes a :class:`DecodeError` whose message says why.
"""
from __future__ import annotations

import io
import logging
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.encaps import generate_fragments, parse_basic_offsets
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut, apply_windowing
from pydicom.pixels import pixel_array as pydicom_pixel_array
from pydicom.uid import UID

from ..errors import DecodeError
from .codestream import HEAD_BYTES, check_frame_header

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
LUMA_WEIGHTS = np.array([0.299, 0.587, 0.114], dtype=np.float32)
# A colour image whose channels differ by more than CHROMA_LEVEL display levels in more than
# CHROMA_FRACTION of its pixels is "really" colour; RGB-encoded grey images are not.
CHROMA_LEVEL = 16.0
CHROMA_FRACTION = 0.01
# What begins a frame's first fragment, per encapsulated transfer syntax family (PS3.5 A.4):
# a JPEG / JPEG-LS SOI marker, a JPEG 2000 codestream (SOC + SIZ) or JP2 file signature.
JPEG_SOI = b"\xff\xd8"
J2K_STARTS = (b"\xff\x4f\xff\x51", b"\x00\x00\x00\x0cjP  ")
RLE_LOSSLESS = "1.2.840.10008.1.2.5"


@dataclass
class DecodedImage:
    """A decoded frame in display values 0..255 plus the metadata the input gate needs."""

    pixels: np.ndarray
    source_kind: str  # "dicom" or "image" (PNG/JPEG: no acquisition metadata)
    modality: str = ""
    body_part: str = ""
    view: str = ""
    photometric: str = ""
    rows: int = 0
    columns: int = 0
    frames: int = 1
    frame_index: int = 0
    is_colour: bool = False
    padding: Optional[np.ndarray] = field(default=None, repr=False)
    # The DICOM header the image came from (None for PNG/JPEG): the population gate reads it.
    header: Optional[Dataset] = field(default=None, repr=False, compare=False)

    @property
    def grey(self) -> np.ndarray:
        """The image as H×W float32 grey (a no-op for grey images)."""
        return to_grey(self.pixels)


def to_grey(pixels: np.ndarray) -> np.ndarray:
    """H×W×3 RGB -> H×W grey with BT.601 luma; H×W passes through (as float32)."""
    if pixels.ndim == 2:
        return pixels.astype(np.float32, copy=False)
    if pixels.ndim == 3 and pixels.shape[2] == 3:
        return (pixels.astype(np.float32) @ LUMA_WEIGHTS).astype(np.float32)
    raise DecodeError(f"cannot convert an array of shape {pixels.shape} to grey")


def chroma_present(rgb: np.ndarray) -> bool:
    """True when an RGB image carries real colour, not grey stored in three channels."""
    if rgb.ndim != 3:
        return False
    spread = rgb.max(axis=2) - rgb.min(axis=2)
    return float(np.mean(spread > CHROMA_LEVEL)) > CHROMA_FRACTION


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword, "")
    return str(value).strip().upper() if value is not None else ""


def _select_frame(frames: int, frame: Optional[int]) -> int:
    if frame is None:
        return frames // 2
    index = frame + frames if frame < 0 else frame
    if not 0 <= index < frames:
        raise DecodeError(f"frame {frame} requested but the image has {frames} frame(s)")
    return index


def _native_frames(ds: Dataset, length: int) -> Optional[int]:
    """Whole frames in ``length`` bytes of native pixel data, None if it is not a whole number."""
    try:
        rows, columns = int(ds.Rows), int(ds.Columns)
        samples, bits = int(ds.get("SamplesPerPixel", 1)), int(ds.BitsAllocated)
    except (AttributeError, TypeError, ValueError):
        return None
    if _text(ds, "PhotometricInterpretation") == "YBR_FULL_422":
        samples = 2  # two chroma samples shared by each pair of pixels
    frame_bits = rows * columns * samples * bits
    if frame_bits <= 0:
        return None
    count, rest = divmod(length * 8, frame_bits)
    # Pixel data is padded to an even length: a byte or so over whole frames is padding.
    return count if count >= 1 and rest < 16 else None


def _encapsulated_frames(ds: Dataset, syntax: str) -> Optional[int]:
    """Frames in encapsulated pixel data, from its offset tables or its fragments' first bytes."""
    if ds.get("ExtendedOffsetTable"):
        return len(ds.ExtendedOffsetTable) // 8
    buffer = io.BytesIO(ds.PixelData)
    try:
        offsets = parse_basic_offsets(buffer)
        if offsets:
            return len(offsets)
        fragments = list(generate_fragments(buffer))
    except (ValueError, EOFError, struct.error) as exc:
        raise DecodeError(f"encapsulated pixel data is malformed: {exc}") from exc
    if len(fragments) <= 1:
        return len(fragments) or None
    if syntax == RLE_LOSSLESS:
        return len(fragments)  # one fragment per frame (PS3.5 A.4.2)
    starts = sum(1 for f in fragments if f.startswith(JPEG_SOI) or f.startswith(J2K_STARTS))
    return starts or None


def _check_frame_headers(ds: Dataset) -> None:
    """Every compressed frame must describe the image the DICOM header does (see codestream)."""
    syntax = str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "") or "")
    if "PixelData" not in ds or not syntax or not UID(syntax).is_compressed:
        return
    try:
        for fragment in generate_fragments(io.BytesIO(ds.PixelData)):
            if fragment.startswith(JPEG_SOI) or fragment.startswith(J2K_STARTS):
                check_frame_header(ds, syntax, fragment[:HEAD_BYTES])
    except (ValueError, EOFError, struct.error) as exc:
        raise DecodeError(f"encapsulated pixel data is malformed: {exc}") from exc


def frame_count(ds: Dataset) -> int:
    """The frames the image has by its header: Number of Frames, 1 when the attribute is absent.

    An empty, zero, negative or non-numeric value cannot be trusted: the image is one frame
    only when its pixel data holds exactly one, otherwise DecodeError says what it holds.
    """
    if "NumberOfFrames" not in ds:
        return 1
    try:
        value = ds.NumberOfFrames
    except (TypeError, ValueError, OverflowError):  # a raw value pydicom cannot even convert
        value = "?"
    try:
        declared = int(value) if value not in (None, "") else 0
    except (TypeError, ValueError, OverflowError):
        declared = 0
    if declared >= 1:
        return declared
    shown = "empty" if value in (None, "") else f"invalid ({str(value)[:16]!r})"
    syntax = str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "") or "")
    element = "PixelData" if "PixelData" in ds else "FloatPixelData" if "FloatPixelData" in ds \
        else "DoubleFloatPixelData"
    try:
        encapsulated = element == "PixelData" and UID(syntax).is_encapsulated
    except ValueError:  # not a transfer syntax pydicom knows
        encapsulated = False
    held = _encapsulated_frames(ds, syntax) if encapsulated else _native_frames(ds, len(ds[element].value or b""))
    if held == 1:
        log.warning("Number of Frames is %s; the pixel data holds one frame, read as a single frame", shown)
        return 1
    if held is None:
        raise DecodeError(f"Number of Frames is {shown} and the pixel data does not show how many frames it holds")
    raise DecodeError(f"Number of Frames is {shown} but the pixel data holds {held} frames")


def _padding_mask(stored: np.ndarray, ds: Dataset) -> Optional[np.ndarray]:
    """Mask of Pixel Padding Value pixels, computed on stored values (before any LUT)."""
    if "PixelPaddingValue" not in ds:
        return None
    low = int(ds.PixelPaddingValue)
    high = int(ds.get("PixelPaddingRangeLimit", low))
    low, high = min(low, high), max(low, high)
    mask = (stored >= low) & (stored <= high)
    return mask if mask.any() else None


def _voi_to_display(values: np.ndarray, ds: Dataset, valid: np.ndarray) -> np.ndarray:
    """Modality-LUT output -> 0..255 through the VOI LUT, the window, or min..max."""
    if ds.get("VOILUTSequence"):
        # LUT input is an index: integral modality output values, rounded when rescale made floats.
        indices = np.rint(values).astype(np.int64) if values.dtype.kind == "f" else values
        out = apply_voi_lut(indices, ds, index=0, prefer_lut=True).astype(np.float32)
        lut_data = np.asarray(ds.VOILUTSequence[0].LUTData, dtype=np.float32)
        # The descriptor's bit depth is unreliable in the wild; the LUT's own maximum is the
        # output's full scale.
        top = float(lut_data.max()) if lut_data.size else 0.0
        return out * (255.0 / top) if top > 0 else out
    if "WindowCenter" in ds and "WindowWidth" in ds:
        # pydicom scales a window to [y_min, y_max] of the stored range; handing it a dataset
        # that describes an unsigned 8-bit, un-rescaled image makes that range exactly 0..255.
        window = Dataset()
        window.PhotometricInterpretation = "MONOCHROME2"
        window.BitsStored = 8
        window.PixelRepresentation = 0
        window.WindowCenter = ds.WindowCenter
        window.WindowWidth = ds.WindowWidth
        if "VOILUTFunction" in ds:
            window.VOILUTFunction = ds.VOILUTFunction
        try:
            return apply_windowing(values, window, index=0).astype(np.float32)
        except ValueError as exc:
            raise DecodeError(f"invalid window: {exc}") from exc
    finite = values[valid] if valid.any() else values
    low, high = float(finite.min()), float(finite.max())
    if high <= low:
        return np.zeros(values.shape, dtype=np.float32)
    return ((values.astype(np.float64) - low) * (255.0 / (high - low))).astype(np.float32)


def _grey_to_display(stored: np.ndarray, ds: Dataset) -> tuple[np.ndarray, Optional[np.ndarray]]:
    padding = _padding_mask(stored, ds)
    valid = ~padding if padding is not None else np.ones(stored.shape, dtype=bool)
    values = np.asarray(apply_modality_lut(stored, ds))
    display = np.clip(_voi_to_display(values, ds, valid), 0.0, 255.0)
    invert = _text(ds, "PhotometricInterpretation") == "MONOCHROME1"
    if _text(ds, "PresentationLUTShape") == "INVERSE":
        invert = not invert
    if invert:
        display = 255.0 - display
    if padding is not None:
        display[padding] = 0.0  # padding is "no patient here": show it black
    return display.astype(np.float32), padding


def _colour_to_display(arr: np.ndarray, ds: Dataset) -> np.ndarray:
    photometric = _text(ds, "PhotometricInterpretation")
    if photometric == "PALETTE COLOR":
        rgb = apply_color_lut(arr, ds).astype(np.float32)
        descriptor = ds.get("RedPaletteColorLookupTableDescriptor")
        bits = int(descriptor[2]) if descriptor is not None else 8
        if bits == 16 and float(rgb.max()) <= 255.0:
            # 8-bit entries written into a 16-bit LUT (seen in big-endian files): scaling them
            # as 16-bit would turn the image black.
            bits = 8
        return rgb * (255.0 / (2.0**bits - 1))
    bits = int(ds.get("BitsStored", 8))
    return arr.astype(np.float32) * (255.0 / (2.0**bits - 1))


def decode_dataset(ds: Dataset, frame: Optional[int] = None) -> DecodedImage:
    """Decode one frame of a DICOM dataset (see the module docstring for the conventions)."""
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise DecodeError("the dataset has no pixel data")
    frames = frame_count(ds)
    index = _select_frame(frames, frame)
    _check_frame_headers(ds)
    try:
        # index= decodes a single frame, so a 120-frame clip costs one frame of work.
        arr = pydicom_pixel_array(ds, index=index if frames > 1 else None)
    except Exception as exc:  # pydicom raises many types for bad/unsupported pixel data
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        name = getattr(syntax, "name", str(syntax))
        raise DecodeError(f"pixel data cannot be decoded (transfer syntax {name}): {exc}") from exc
    photometric = _text(ds, "PhotometricInterpretation")
    samples = int(ds.get("SamplesPerPixel", 1))
    padding = None
    try:
        if (samples == 3 and arr.ndim == 3 and arr.shape[2] == 3) or (photometric == "PALETTE COLOR"
                                                                      and arr.ndim == 2):
            pixels = _colour_to_display(arr, ds)
            colour = chroma_present(pixels)
        elif samples == 1 and arr.ndim == 2:
            pixels, padding = _grey_to_display(arr, ds)
            colour = False
        else:
            raise DecodeError(f"unsupported pixel layout: {samples} samples, array {arr.shape}")
    except (ValueError, KeyError, AttributeError, TypeError) as exc:
        raise DecodeError(f"pixel data cannot be calibrated ({photometric}): {exc}") from exc
    if not np.all(np.isfinite(pixels)):
        raise DecodeError("pixel data contains NaN or infinite values")
    return DecodedImage(
        pixels=np.ascontiguousarray(pixels, dtype=np.float32),
        source_kind="dicom",
        modality=_text(ds, "Modality"),
        body_part=_text(ds, "BodyPartExamined"),
        view=_text(ds, "ViewPosition"),
        photometric=photometric,
        rows=int(ds.get("Rows", pixels.shape[0])),
        columns=int(ds.get("Columns", pixels.shape[1])),
        frames=frames,
        frame_index=index,
        is_colour=colour,
        padding=padding,
        header=ds,
    )


def decode_image_file(path: Union[str, Path]) -> DecodedImage:
    """PNG/JPEG (validation sets) -> DecodedImage with no acquisition metadata."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.load()
            mode = img.mode
            if mode in ("I;16", "I;16B", "I;16L", "I"):
                raw = np.asarray(img, dtype=np.float32)
                # 16-bit PNGs are full-range scaled; 32-bit "I" is treated the same way.
                pixels = raw * (255.0 / 65535.0)
            elif mode in ("L", "1"):
                pixels = np.asarray(img.convert("L"), dtype=np.float32)
            else:
                pixels = np.asarray(img.convert("RGB"), dtype=np.float32)
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise DecodeError(f"{path}: not a readable PNG/JPEG image: {exc}") from exc
    colour = pixels.ndim == 3 and chroma_present(pixels)
    return DecodedImage(
        pixels=np.ascontiguousarray(pixels),
        source_kind="image",
        photometric="RGB" if pixels.ndim == 3 else "MONOCHROME2",
        rows=int(pixels.shape[0]),
        columns=int(pixels.shape[1]),
        is_colour=bool(colour),
    )


def _looks_like_dicom(head: bytes) -> bool:
    return len(head) >= 132 and head[128:132] == b"DICM"


def decode_file(path: Union[str, Path], frame: Optional[int] = None) -> DecodedImage:
    """Decode a DICOM file (by content, any extension) or a PNG/JPEG file."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError as exc:
        raise DecodeError(f"{path}: cannot be read: {exc}") from exc
    if path.suffix.lower() in IMAGE_SUFFIXES and not _looks_like_dicom(head):
        return decode_image_file(path)
    try:
        # force=True accepts preamble-less files; a non-DICOM file then fails on pixel access.
        ds = pydicom.dcmread(path, force=not _looks_like_dicom(head))
    except (InvalidDicomError, OSError, EOFError, ValueError, KeyError, TypeError) as exc:
        raise DecodeError(f"{path}: not a readable DICOM file: {exc}") from exc
    return decode_dataset(ds, frame=frame)


def decode(source: Any, frame: Optional[int] = None) -> DecodedImage:
    """Decode a path, a pydicom Dataset, raw DICOM bytes, or pass a DecodedImage through."""
    if isinstance(source, DecodedImage):
        return source
    if isinstance(source, Dataset):
        return decode_dataset(source, frame=frame)
    if isinstance(source, (bytes, bytearray)):
        try:
            ds = pydicom.dcmread(io.BytesIO(bytes(source)), force=True)
        except Exception as exc:
            raise DecodeError(f"bytes are not a readable DICOM stream: {exc}") from exc
        return decode_dataset(ds, frame=frame)
    return decode_file(source, frame=frame)
