"""Class activation maps -> a colour overlay on the source image, at the source's resolution.

The model saw only the centred square that ``preprocess`` cropped (``CropBox``), so the map is
resized to that square and placed there; outside the crop there is no evidence and the source
shows through unchanged.  The blend weight follows the map (``alpha * m`` with ``m`` in 0..1),
so regions the model did not use stay readable instead of being tinted blue everywhere.

The map comes from the model's one run on the image (``result.HeatmapEvidence``, recorded with
the result), so the results stage draws the overlay without running the model again.
"""
from __future__ import annotations

from typing import Optional

import cv2
import numpy as np

from ..imaging.decode import DecodedImage
from ..imaging.preprocess import CropBox
from .result import HeatmapEvidence

DEFAULT_ALPHA = 0.45
COLORMAP = cv2.COLORMAP_JET


def normalise_cam(cam: np.ndarray) -> np.ndarray:
    """Scale a map to 0..1 by its own maximum (CAMs are >= 0; negatives are clipped)."""
    cam = np.nan_to_num(np.asarray(cam, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    cam = np.clip(cam, 0.0, None)
    peak = float(cam.max()) if cam.size else 0.0
    return cam / peak if peak > 0 else np.zeros_like(cam)


def cam_to_source(cam: np.ndarray, crop: CropBox, source_shape: tuple[int, int]) -> np.ndarray:
    """An h×w map -> H×W float32 (0..1) aligned with the source image (the crop's inverse)."""
    if cam.ndim != 2:
        raise ValueError(f"expected an h×w map, got shape {cam.shape}")
    height, width = source_shape
    full = np.zeros((height, width), dtype=np.float32)
    if crop.width <= 0 or crop.height <= 0:
        return full
    # Bilinear upsampling: smooth enough to read, and faithful to the coarse 7×7 evidence grid.
    square = cv2.resize(normalise_cam(cam), (crop.width, crop.height), interpolation=cv2.INTER_LINEAR)
    y1 = min(crop.y + crop.height, height)
    x1 = min(crop.x + crop.width, width)
    full[crop.y:y1, crop.x:x1] = square[: y1 - crop.y, : x1 - crop.x]
    return full


def _as_rgb_u8(source: np.ndarray) -> np.ndarray:
    image: np.ndarray = np.clip(np.rint(source), 0, 255).astype(np.uint8)
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    return image


def overlay(source: np.ndarray, cam: np.ndarray, crop: Optional[CropBox] = None,
            alpha: float = DEFAULT_ALPHA) -> np.ndarray:
    """Blend a CAM over the source (H×W grey or H×W×3 RGB, 0..255) -> H×W×3 uint8 RGB."""
    height, width = source.shape[:2]
    crop = crop or CropBox(0, 0, width, height)
    weight = cam_to_source(cam, crop, (height, width))
    colour_bgr = cv2.applyColorMap(np.rint(weight * 255).astype(np.uint8), COLORMAP)
    colour = cv2.cvtColor(colour_bgr, cv2.COLOR_BGR2RGB).astype(np.float32)
    base = _as_rgb_u8(source).astype(np.float32)
    blend = (alpha * weight)[:, :, None]
    blended: np.ndarray = np.clip(np.rint(base * (1.0 - blend) + colour * blend), 0, 255).astype(np.uint8)
    return blended


def evidence_overlay(image: DecodedImage, evidence: HeatmapEvidence, alpha: float = DEFAULT_ALPHA) -> np.ndarray:
    """The overlay of ``evidence`` on the decoded source it came from (colour sources keep their
    colour, others are drawn from their grey, as the model saw them)."""
    return overlay(image.pixels if image.pixels.ndim == 3 else image.grey, evidence.cam, evidence.crop, alpha)
