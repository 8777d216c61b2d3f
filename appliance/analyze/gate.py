"""The input gate: analyse only what the model was made for, abstain with a reason otherwise.

Abstention codes, grouped like CAD4TB's negative scores into three categories so a worklist can
show a short class and a specific reason:

====  ========================  =============================================================
cat.  code                      meaning
====  ========================  =============================================================
 -1   UNREADABLE_PIXELS         pixels cannot be decoded, contain NaN/inf, or are blank/constant
 -2   NOT_APPLICABLE_MODALITY   DICOM Modality not in ``[applicability] modalities``
 -2   WRONG_BODY_PART           BodyPartExamined not in ``body_parts``
 -2   WRONG_VIEW                ViewPosition not in ``views``
 -2   WRONG_PHOTOMETRIC         PhotometricInterpretation not in ``photometric``
 -2   COLOUR_IMAGE              real colour content while the model's policy is ``reject``
 -2   TOO_SMALL                 Rows/Columns below ``min_rows``/``min_columns`` (DICOM), or
                                any image smaller than the model input
 -3   OUT_OF_DISTRIBUTION       Mahalanobis distance of the embedding above ``[ood] threshold``
====  ========================  =============================================================

Category -1 means "could not look", -2 "not the kind of image this model is for" (decided from
metadata before inference), -3 "looks unlike the training data" (decided from the model's own
embedding after inference).

Metadata checks (modality, body part, view, photometric, DICOM minimum size) apply to DICOM
input only: PNG/JPEG files carry no acquisition metadata and are accepted as the operator's
validation set; the pixel and OOD checks apply to every input.  The colour policy compares the
*content* (``DecodedImage.is_colour``), so grey images stored as RGB are not colour.

OOD distance: ``d = sqrt((e - mean)^T P (e - mean))`` with ``mean`` and ``P`` (precision,
shrinkage-regularised inverse covariance) from ``ood.npz``; ``d > threshold`` abstains.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from ..errors import ManifestError
from ..imaging.decode import DecodedImage
from .manifest import Manifest

CATEGORY = {
    "UNREADABLE_PIXELS": -1,
    "NOT_APPLICABLE_MODALITY": -2,
    "WRONG_BODY_PART": -2,
    "WRONG_VIEW": -2,
    "WRONG_PHOTOMETRIC": -2,
    "COLOUR_IMAGE": -2,
    "TOO_SMALL": -2,
    "OUT_OF_DISTRIBUTION": -3,
}
# A display image (0..255) whose spread is below this is blank: nothing for a model to read.
BLANK_STD = 1.0


@dataclass(frozen=True)
class Abstention:
    """Why the model did not analyse an image."""

    code: str
    reason: str

    @property
    def category(self) -> int:
        return CATEGORY[self.code]

    def as_dict(self) -> dict[str, object]:
        return {"code": self.code, "category": self.category, "reason": self.reason}


def _allowed(value: str, allowed: list[str]) -> bool:
    # An empty list allows anything; "" in the list allows a missing value.
    return not allowed or value.strip().upper() in allowed


def _shown(values: list[str]) -> str:
    return ", ".join(v if v else "(missing)" for v in values)


def check_metadata(image: DecodedImage, manifest: Manifest) -> Optional[Abstention]:
    """Applicability checks that need no inference; the first failing one is returned."""
    app = manifest.applicability
    dicom = image.source_kind == "dicom"
    if dicom:
        if not _allowed(image.modality, app.modalities):
            return Abstention("NOT_APPLICABLE_MODALITY",
                              f"modality {image.modality or '(missing)'} is not one this model is for "
                              f"({_shown(app.modalities)})")
        if not _allowed(image.body_part, app.body_parts):
            return Abstention("WRONG_BODY_PART",
                              f"body part {image.body_part or '(missing)'} is not one this model is for "
                              f"({_shown(app.body_parts)})")
        if not _allowed(image.view, app.views):
            return Abstention("WRONG_VIEW", f"view {image.view or '(missing)'} is not one this model is for "
                                            f"({_shown(app.views)})")
    # Colour before photometric: "colour image" is the reason a person can act on.
    if image.is_colour and app.colour == "reject":
        return Abstention("COLOUR_IMAGE", "colour image; this model reads greyscale images only")
    if dicom:
        # Under "to_grey" any colour encoding is acceptable input: it is converted to grey.
        if not _allowed(image.photometric, app.photometric) and not (
                app.colour == "to_grey" and image.pixels.ndim == 3):
            return Abstention("WRONG_PHOTOMETRIC",
                              f"photometric interpretation {image.photometric} is not accepted "
                              f"({_shown(app.photometric)})")
        if image.rows < app.min_rows or image.columns < app.min_columns:
            return Abstention("TOO_SMALL", f"image is {image.rows}×{image.columns}, the model needs at "
                                           f"least {app.min_rows}×{app.min_columns}")
    return None


def check_pixels(image: DecodedImage, manifest: Manifest) -> Optional[Abstention]:
    """Content checks on the decoded pixels: NaN, blank, smaller than the model input."""
    pixels = image.pixels
    if not np.all(np.isfinite(pixels)):
        return Abstention("UNREADABLE_PIXELS", "pixel values include NaN or infinity")
    height, width = pixels.shape[:2]
    _, _, in_h, in_w = manifest.input.shape
    if min(height, width) < min(in_h, in_w):
        return Abstention("TOO_SMALL", f"image is {height}×{width}, smaller than the model input {in_h}×{in_w}")
    region = pixels if image.padding is None else pixels[~image.padding]
    if region.size == 0 or float(region.std()) < BLANK_STD:
        return Abstention("UNREADABLE_PIXELS", "blank or constant image: nothing to analyse")
    return None


@dataclass(frozen=True)
class OodStats:
    mean: np.ndarray
    precision: np.ndarray
    threshold: float

    @classmethod
    def load(cls, manifest: Manifest) -> Optional["OodStats"]:
        if manifest.ood is None:
            return None
        path: Path = manifest.path(manifest.ood.stats)
        try:
            with np.load(path) as data:
                mean = np.asarray(data["mean"], dtype=np.float64)
                precision = np.asarray(data["precision"], dtype=np.float64)
        except (OSError, KeyError, ValueError) as exc:
            raise ManifestError(f"{path}: cannot read OOD statistics (needs 'mean' and 'precision'): {exc}") from exc
        if mean.ndim != 1 or precision.shape != (mean.size, mean.size):
            raise ManifestError(f"{path}: mean {mean.shape} and precision {precision.shape} do not fit together")
        return cls(mean=mean, precision=precision, threshold=manifest.ood.threshold)

    def distance(self, embedding: np.ndarray) -> float:
        vector = np.asarray(embedding, dtype=np.float64).reshape(-1)
        if vector.size != self.mean.size:
            raise ManifestError(f"embedding has {vector.size} values, OOD statistics expect {self.mean.size}")
        diff = vector - self.mean
        return float(np.sqrt(max(float(diff @ self.precision @ diff), 0.0)))


def check_ood(embedding: np.ndarray, stats: Optional[OodStats]) -> tuple[Optional[float], Optional[Abstention]]:
    """Distance of one embedding to the training distribution, and an abstention if too far."""
    if stats is None:
        return None, None
    distance = stats.distance(embedding)
    if not np.isfinite(distance) or distance > stats.threshold:
        return distance, Abstention(
            "OUT_OF_DISTRIBUTION",
            f"image looks unlike the model's training data (distance {distance:.1f} > {stats.threshold:.1f})")
    return distance, None
