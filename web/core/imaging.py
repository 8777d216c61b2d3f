"""Stored DICOM frames and heatmap Secondary Captures -> PNG for the viewer.

Rendering happens on the box (the browser gets plain PNGs, no DICOM parser in JavaScript) with
``appliance.imaging.decode``, so every transfer syntax the box accepts is viewable.  Window
presets act on the decoded display values (0..255, after the image's own VOI/window), which is
what the radiographer saw on the modality; a preset re-maps that range to bring out dark
(lung) or bright (bone) detail.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path
from typing import Optional

import cv2
import numpy as np
import pydicom

from appliance.imaging.decode import decode

MAX_SIDE = 2048  # plenty for a 1024-px screen at 2x zoom; keeps PNGs small and fast
# name -> (centre, width) in display values; None = the image's own display mapping.
PRESETS: dict[str, Optional[tuple[float, float]]] = {
    "standard": None,
    "lungs": (90.0, 170.0),
    "bone": (175.0, 140.0),
    "contrast": (128.0, 120.0),
    "invert": None,
}
CACHE_ITEMS = 24
CacheKey = tuple[str, int, Optional[int], str]  # (file, its mtime_ns, frame, preset)


class _LRU:
    """A small thread-safe cache of rendered PNGs: scrubbing back and forth through a clip and
    toggling presets should not decode the same frame again."""

    def __init__(self, size: int):
        self.size = size
        self._items: OrderedDict[CacheKey, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: CacheKey) -> Optional[bytes]:
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key: CacheKey, value: bytes) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.size:
                self._items.popitem(last=False)


_cache = _LRU(CACHE_ITEMS)


def frame_count(path: Path) -> int:
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except (pydicom.errors.InvalidDicomError, OSError, ValueError):
        return 1
    try:
        return max(1, int(ds.get("NumberOfFrames", 1) or 1))
    except (TypeError, ValueError):
        return 1


def apply_preset(pixels: np.ndarray, preset: str) -> np.ndarray:
    """Display values 0..255 -> 0..255 through a preset window (or inversion)."""
    if preset == "invert":
        return 255.0 - pixels
    window = PRESETS.get(preset)
    if window is None:
        return pixels
    centre, width = window
    low = centre - width / 2.0
    return np.clip((pixels - low) * (255.0 / width), 0.0, 255.0)


def _encode(pixels: np.ndarray) -> bytes:
    image = np.clip(np.rint(pixels), 0, 255).astype(np.uint8)
    height, width = image.shape[:2]
    scale = MAX_SIDE / max(height, width)
    if scale < 1.0:
        image = cv2.resize(image, (max(1, int(width * scale)), max(1, int(height * scale))),
                           interpolation=cv2.INTER_AREA)
    if image.ndim == 3:
        image = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    ok, buffer = cv2.imencode(".png", image, [cv2.IMWRITE_PNG_COMPRESSION, 1])
    if not ok:
        raise ValueError("PNG encoding failed")
    return buffer.tobytes()


def render_png(path: Path, frame: Optional[int] = None, preset: str = "standard") -> bytes:
    """One frame of a stored image as PNG (raises DecodeError if the pixels cannot be read)."""
    path = Path(path)
    key = (str(path), path.stat().st_mtime_ns, frame, preset)
    cached = _cache.get(key)
    if cached is not None:
        return cached
    image = decode(path, frame=frame)
    pixels = image.pixels
    if preset != "standard":
        pixels = apply_preset(pixels, preset)
    png = _encode(pixels)
    _cache.put(key, png)
    return png
