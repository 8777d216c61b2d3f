"""What the box kept: every stored file read completely, and the exceptions in its log."""
from __future__ import annotations

import hashlib
import io
import logging
import re
import struct
import warnings
from collections import Counter
from pathlib import Path

import pydicom
from pydicom.encaps import generate_fragments


def _dataset_bytes(raw: bytes) -> bytes:
    """What follows the file meta group, found by its group length (pydicom's meta reader would
    also swallow a stray delimiter that begins the dataset, as sent)."""
    group, element, vr, _length, group_length = struct.unpack_from("<HH2sHI", raw, 132)
    if raw[128:132] != b"DICM" or (group, element, vr) != (2, 0, b"UL"):
        raise ValueError("no file meta group length")
    return raw[144 + group_length:]


def _read_completely(path: Path) -> pydicom.Dataset:
    """The Part 10 file at ``path`` with every value converted, nested ones too."""
    ds = pydicom.dcmread(io.BytesIO(path.read_bytes()))
    for _element in ds.iterall():
        pass
    return ds


def _check_pixels(ds: pydicom.Dataset) -> str:
    """'none', 'native' or 'encapsulated'; raises if the pixel data is not all there."""
    if "PixelData" not in ds:
        return "none"
    if ds.file_meta.TransferSyntaxUID.is_encapsulated:
        if sum(1 for _ in generate_fragments(ds.PixelData)) == 0:
            raise ValueError("encapsulated pixel data without fragments")
        return "encapsulated"
    if "Rows" in ds:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        expected = int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1) or 1) * frames
        expected = (expected * int(ds.get("BitsAllocated", 8) or 8) + 7) // 8
        if len(ds.PixelData) < expected:
            raise ValueError(f"native pixel data {len(ds.PixelData)} bytes, {expected} needed")
    return "native"


def check_stored_files(data_dir: Path, accepted: dict[str, str]) -> tuple[list[str], Counter]:
    """Every file the box stored, read completely: (problems, counts).

    A file must parse with pydicom as a Part 10 file with every value converted (nested ones
    too), hold its pixel data whole, lie at the path its UIDs give, and, for a dataset the box
    answered with success, hold exactly the bytes sent; every such dataset must be there.
    """
    problems: list[str] = []
    counts: Counter = Counter()
    stored: set[str] = set()
    # Non-conformant values are stored as received, by design: read them as the box does
    # (pydicom told not to validate), without a log line per value.
    mode = pydicom.config.settings.reading_validation_mode
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    pydicom_log = logging.getLogger("pydicom")
    level = pydicom_log.level
    pydicom_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _check_files(data_dir, accepted, problems, counts, stored)
    finally:
        pydicom.config.settings.reading_validation_mode = mode
        pydicom_log.setLevel(level)
    lost = sorted(set(accepted) - stored)
    if lost:
        problems.append(f"{len(lost)} datasets answered with success are not stored, e.g. {lost[:3]}")
    leftovers = [p.name for p in (data_dir / "tmp").iterdir()] if (data_dir / "tmp").is_dir() else []
    if leftovers:
        problems.append(f"{len(leftovers)} staged files left in tmp/, e.g. {leftovers[:3]}")
    return problems, counts


def _check_files(data_dir: Path, accepted: dict[str, str], problems: list[str], counts: Counter,
                 stored: set[str]) -> None:
    for path in sorted(p for p in (data_dir / "superseded").rglob("*") if p.is_file()):
        counts["superseded files"] += 1
        try:
            _read_completely(path)
        except Exception as exc:  # noqa: BLE001 - any failure to read is what this looks for
            where = str(path.relative_to(data_dir))[:120]
            problems.append(f"{where}: does not read: {type(exc).__name__}: {str(exc)[:160]}")
    for path in sorted(p for p in (data_dir / "instances").rglob("*") if p.is_file()):
        counts["files"] += 1
        where = str(path.relative_to(data_dir))[:120]
        try:
            ds = _read_completely(path)
            counts[f"pixel data: {_check_pixels(ds)}"] += 1
            if "Rows" in ds and "PixelData" not in ds:
                counts["images without pixel data"] += 1
            ids = [str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), f"{ds.SOPInstanceUID}.dcm"]
            body = _dataset_bytes(path.read_bytes())
        except Exception as exc:  # noqa: BLE001 - any failure to read is what this looks for
            problems.append(f"{where}: does not read: {type(exc).__name__}: {str(exc)[:160]}")
            continue
        if list(path.relative_to(data_dir / "instances").parts) != ids:
            problems.append(f"{where}: stored under a path its UIDs do not give")
        sop = ids[2][:-4]
        stored.add(sop)
        if sop in accepted and hashlib.sha256(body).hexdigest() != accepted[sop]:
            problems.append(f"{where}: differs from the dataset answered with success")


EXCEPTION_LINE = re.compile(r"^([A-Za-z_]\w*\.)*[A-Za-z_]\w*(Error|Exception|Exit|Interrupt)\b")


def log_exceptions(log_text: str) -> Counter:
    """Exceptions nobody handled (or that were logged with their traceback), by the line that
    names the exception."""
    found: Counter = Counter()
    lines = log_text.splitlines()
    for n, line in enumerate(lines):
        if line.startswith("Traceback (most recent call last)"):
            # Threads interleave their lines: the exception's own line is the first that names one.
            tail = next((x for x in lines[n + 1:n + 200] if EXCEPTION_LINE.match(x)), "?")
            found[tail[:160]] += 1
    return found
