"""Manifest-driven preprocessing: a display image (0..255 float) -> the model's NCHW tensor.

The steps come from the package's ``[[preprocess]]`` list and run in order.  The reference
models were trained on MedMNIST, whose images were made by centre-cropping the source image to
its short edge and resizing the square to 28×28; running ``center_crop_square`` then
``resize`` (area interpolation) on a full-resolution radiograph reproduces that transform, and
on an already 28×28 image both steps are exact no-ops, so validation PNGs made from the
training arrays reach the model bit-identical.

Known ops and their parameters:

* ``center_crop_square`` — crop the centred square whose side is the short edge.
* ``resize`` — ``size = [height, width]``, ``interpolation`` one of area (default), linear,
  cubic, nearest.
* ``clahe`` — ``clip_limit`` (default 2.0), ``tile_grid = [rows, cols]`` (default [8, 8]);
  OpenCV CLAHE on the 8-bit rounded image.
* ``normalize`` — ``scale`` (default 255.0), ``mean`` and ``std`` (scalars): ``(x/scale - mean)/std``.

The crop is remembered in :class:`CropBox` so ``heatmap.py`` can place the class activation map
back over the exact region of the source image the model saw.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import cv2
import numpy as np

from ..errors import ManifestError

INTERPOLATIONS = {
    "area": cv2.INTER_AREA,
    "linear": cv2.INTER_LINEAR,
    "cubic": cv2.INTER_CUBIC,
    "nearest": cv2.INTER_NEAREST,
}
KNOWN_OPS = ("center_crop_square", "resize", "clahe", "normalize")


@dataclass(frozen=True)
class CropBox:
    """The region of the source image (pixels) that was fed to the model."""

    x: int
    y: int
    width: int
    height: int


@dataclass
class Preprocessed:
    tensor: np.ndarray  # (1, C, H, W) float32
    crop: CropBox


def _crop_square(img: np.ndarray) -> tuple[np.ndarray, CropBox]:
    height, width = img.shape[:2]
    side = min(height, width)
    y = (height - side) // 2
    x = (width - side) // 2
    return img[y:y + side, x:x + side], CropBox(x, y, side, side)


def _size(params: Mapping[str, Any]) -> tuple[int, int]:
    size = params.get("size")
    if (not isinstance(size, (list, tuple)) or len(size) != 2
            or not all(isinstance(v, int) and v > 0 for v in size)):
        raise ManifestError(f"preprocess resize: size must be [height, width] integers, got {size!r}")
    return int(size[0]), int(size[1])


def _resize(img: np.ndarray, params: Mapping[str, Any]) -> np.ndarray:
    height, width = _size(params)
    name = params.get("interpolation", "area")
    if name not in INTERPOLATIONS:
        raise ManifestError(f"preprocess resize: unknown interpolation {name!r}; known: {', '.join(INTERPOLATIONS)}")
    if img.shape[:2] == (height, width):
        return img  # exact no-op, so already-sized images are untouched
    return cv2.resize(img, (width, height), interpolation=INTERPOLATIONS[name])


def _clahe(img: np.ndarray, params: Mapping[str, Any]) -> np.ndarray:
    clip = float(params.get("clip_limit", 2.0))
    grid = params.get("tile_grid", [8, 8])
    if not isinstance(grid, (list, tuple)) or len(grid) != 2:
        raise ManifestError(f"preprocess clahe: tile_grid must be [rows, cols], got {grid!r}")
    clahe = cv2.createCLAHE(clipLimit=clip, tileGridSize=(int(grid[1]), int(grid[0])))
    # CLAHE works on integer histograms; the display image is 0..255 so 8 bits lose nothing.
    as_u8 = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    return np.asarray(clahe.apply(as_u8), dtype=np.float32)


def _normalize(img: np.ndarray, params: Mapping[str, Any]) -> np.ndarray:
    scale = float(params.get("scale", 255.0))
    mean = float(params.get("mean", 0.0))
    std = float(params.get("std", 1.0))
    if scale == 0 or std == 0:
        raise ManifestError("preprocess normalize: scale and std must be non-zero")
    return ((img / scale) - mean) / std


def validate_steps(steps: Sequence[Mapping[str, Any]]) -> None:
    """Refuse unknown ops or malformed parameters when a manifest is loaded, not at run time."""
    for number, step in enumerate(steps, 1):
        op = step.get("op")
        if op not in KNOWN_OPS:
            raise ManifestError(f"preprocess step {number}: unknown op {op!r}; known: {', '.join(KNOWN_OPS)}")
        if op == "resize":
            _size(step)
            if step.get("interpolation", "area") not in INTERPOLATIONS:
                raise ManifestError(f"preprocess step {number}: unknown interpolation {step.get('interpolation')!r}")


def preprocess(
    image: np.ndarray,
    steps: Sequence[Mapping[str, Any]],
    input_shape: Sequence[int],
) -> Preprocessed:
    """Run the manifest's steps on an H×W grey display image; return (1, C, H, W) float32.

    ``input_shape`` is the manifest's ``[input] shape``; a 3-channel input gets the grey image
    replicated (the reference models are single-channel).
    """
    if image.ndim != 2:
        raise ValueError(f"preprocess expects an H×W grey image, got shape {image.shape}")
    img = image.astype(np.float32, copy=False)
    crop = CropBox(0, 0, img.shape[1], img.shape[0])
    for step in steps:
        op = step.get("op")
        if op == "center_crop_square":
            img, inner = _crop_square(img)
            # Crops compose: offsets are relative to the previous crop.
            crop = CropBox(crop.x + inner.x, crop.y + inner.y, inner.width, inner.height)
        elif op == "resize":
            img = _resize(img, step)
        elif op == "clahe":
            img = _clahe(img, step)
        elif op == "normalize":
            img = _normalize(img, step)
        else:
            raise ManifestError(f"unknown preprocess op {op!r}")
    channels, height, width = (int(v) for v in input_shape[1:4])
    if img.shape != (height, width):
        raise ManifestError(
            f"preprocessing produced {img.shape[0]}×{img.shape[1]} but the model input is {height}×{width}")
    tensor = np.repeat(img[None, None, :, :], channels, axis=1).astype(np.float32)
    return Preprocessed(tensor=np.ascontiguousarray(tensor), crop=crop)
