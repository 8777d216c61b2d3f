"""The heatmap overlay as a Secondary Capture image with the AI notice burned into the pixels.

A remote specialist may open the heatmap in any viewer, including ones that ignore overlays,
presentation states and SR; so the warning, the model and the score are drawn into the image
itself (BurnedInAnnotation YES), not carried only in attributes a viewer might not show.
"""
from __future__ import annotations

import unicodedata
from typing import Optional

import cv2
import highdicom as hd
import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from ..analyze.result import AI_NOTICE, AnalysisResult, FindingResult
from .common import (CHARACTER_SET, MANUFACTURER, MODEL_NAME, SC_KEYWORDS, frame_number, lo, notices,
                     software_versions, source_copy)

BURNED_NOTICE = "AI ASSIST — NOT FOR DIAGNOSIS"
FONT = cv2.FONT_HERSHEY_SIMPLEX
# Text cap height as a fraction of the image's shorter side: ~50 px on a 1841-wide chest film,
# ~13 px on a 480-line ultrasound frame, never below 12 px on smaller images.
TEXT_FRACTION = 0.028
MIN_TEXT_PX = 12
BANNER_ALPHA = 0.65  # dark backing so white text reads over any colour of the heatmap


def ascii_text(text: str) -> str:
    """What OpenCV's Hershey fonts can draw: dashes become '-', accents are dropped."""
    text = text.replace("—", "-").replace("–", "-")
    return unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")


def shown_finding(result: AnalysisResult) -> Optional[FindingResult]:
    """The finding the heatmap explains (the runner records its code), else the most likely one."""
    for finding in result.findings:
        if finding.code == result.heatmap_finding:
            return finding
    return max(result.findings, key=lambda f: f.probability, default=None)


def annotation_lines(result: AnalysisResult) -> list[str]:
    lines = [ascii_text(BURNED_NOTICE), ascii_text(f"Model: {result.model} {result.model_version}")]
    finding = shown_finding(result)
    if finding is not None:
        state = "positive" if finding.positive else "negative"
        lines.append(ascii_text(f"{finding.label or finding.code}: p={finding.probability:.2f} "
                                f"({state} at threshold {finding.threshold:.2f})"))
    return lines


def _width(text: str, scale: float, thickness: int) -> int:
    return int(cv2.getTextSize(text, FONT, scale, thickness)[0][0])


def _wrap(line: str, scale: float, thickness: int, max_width: int) -> list[str]:
    """Break a line at spaces (or, for one overlong word, anywhere) to fit ``max_width``."""
    pieces: list[str] = []
    current = ""
    for word in line.split(" "):
        candidate = f"{current} {word}".strip()
        if current and _width(candidate, scale, thickness) > max_width:
            pieces.append(current)
            candidate = word
        current = candidate
    pieces.append(current)
    out: list[str] = []
    for piece in pieces:
        while len(piece) > 1 and _width(piece, scale, thickness) > max_width:
            cut = len(piece) - 1
            while cut > 1 and _width(piece[:cut], scale, thickness) > max_width:
                cut -= 1
            out.append(piece[:cut])
            piece = piece[cut:]
        out.append(piece)
    return out


def burn_in(image: np.ndarray, lines: list[str]) -> np.ndarray:
    """Draw ``lines`` top-left on a dark box, scaled to the image; returns a new array."""
    out: npt.NDArray[np.uint8] = np.ascontiguousarray(image, dtype=np.uint8).copy()
    height, width = out.shape[:2]
    (_, base_h), _ = cv2.getTextSize("Ag", FONT, 1.0, 1)
    floor = MIN_TEXT_PX / base_h
    scale = max(MIN_TEXT_PX, TEXT_FRACTION * min(height, width)) / base_h
    # A line wider than the image first shrinks the text, but never below the legible floor;
    # what still does not fit is wrapped onto further lines instead.
    max_width = int(0.94 * width)
    widest = max(_width(line, scale, 1) for line in lines)
    scale = max(floor, scale * min(1.0, max_width / max(widest, 1)))
    thickness = max(1, int(round(scale * 1.6)))
    lines = [piece for line in lines for piece in _wrap(line, scale, thickness, max_width)]
    sizes = [cv2.getTextSize(line, FONT, scale, thickness) for line in lines]
    line_h = max(h + baseline for (_, h), baseline in sizes)
    gap, pad = max(2, line_h // 3), max(3, line_h // 2)
    box_w = min(width, max(w for (w, _), _ in sizes) + 2 * pad)
    box_h = min(height, len(lines) * line_h + (len(lines) - 1) * gap + 2 * pad)
    region = out[:box_h, :box_w].astype(np.float32)
    out[:box_h, :box_w] = np.rint(region * (1.0 - BANNER_ALPHA)).astype(np.uint8)
    y = pad
    for line, ((_, h), _) in zip(lines, sizes):
        y += h
        cv2.putText(out, line, (pad, y), FONT, scale, (255, 255, 255), thickness, cv2.LINE_AA)
        y += line_h - h + gap
    return out


def _orientation(meta: Dataset) -> Optional[tuple[str, str]]:
    value = meta.get("PatientOrientation")
    if not value or len(value) != 2:
        return None
    try:
        return (hd.PatientOrientationValuesBiped(value[0]).value,
                hd.PatientOrientationValuesBiped(value[1]).value)
    except ValueError:  # compound values such as "AL" are valid DICOM but not highdicom enums
        return None


def _source_reference(meta: Dataset, result: AnalysisResult) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = meta.SOPClassUID
    item.ReferencedSOPInstanceUID = meta.SOPInstanceUID
    frame = frame_number(meta, result)
    if frame is not None:
        item.ReferencedFrameNumber = frame
    item.PurposeOfReferenceCodeSequence = [
        hd.sr.CodedConcept.from_code(codes.cid7202.SourceImageForImageProcessingOperation)]
    return item


def build_heatmap_sc(source: Dataset, result: AnalysisResult, *, sop_instance_uid: str,
                     series_instance_uid: str, series_number: int = 991, instance_number: int = 1) -> Dataset:
    """An RGB Secondary Capture of ``result.heatmap`` in the source's study, notice burned in."""
    if result.heatmap is None:
        raise ValueError(f"model {result.model} produced no heatmap for this image")
    heatmap = np.asarray(result.heatmap)
    if heatmap.ndim != 3 or heatmap.shape[2] != 3 or heatmap.dtype != np.uint8:
        raise ValueError(f"heatmap must be H×W×3 uint8 RGB, got {heatmap.shape} {heatmap.dtype}")
    copied = source_copy(source)
    meta = copied.meta
    orientation = _orientation(meta)
    finding = shown_finding(result)
    ds = hd.sc.SCImage(
        pixel_array=burn_in(heatmap, annotation_lines(result)),
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        study_instance_uid=meta.StudyInstanceUID,
        series_instance_uid=series_instance_uid,
        series_number=series_number,
        sop_instance_uid=sop_instance_uid,
        instance_number=instance_number,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=MODEL_NAME,
        software_versions=software_versions(result),
        patient_id=meta.PatientID,
        patient_name=meta.PatientName,
        patient_birth_date=meta.PatientBirthDate,
        patient_sex=meta.PatientSex,
        accession_number=meta.AccessionNumber,
        study_id=meta.StudyID,
        study_date=meta.StudyDate,
        study_time=meta.StudyTime,
        referring_physician_name=meta.ReferringPhysicianName,
        # highdicom wants an orientation for patient images; ("L", "F") is only a stand-in for
        # sources without one and is blanked below, never stored.
        patient_orientation=orientation or ("L", "F"),
        series_description=lo(f"AI heatmap: {AI_NOTICE}"),
        specific_character_set=CHARACTER_SET,
    )
    # PatientOrientation is Type 2: empty (unknown) rather than a guessed orientation.
    ds.PatientOrientation = list(orientation) if orientation else []
    # General Series Laterality is Type 2C; a paired organ's side must survive, else empty.
    laterality = str(meta.get("Laterality", "") or "").upper()
    ds.Laterality = laterality if laterality in ("R", "L") else ""
    ds.ConversionType = "WSD"  # workstation: a rendered derivative, not a digitised film
    ds.BurnedInAnnotation = "YES"
    # Image Comments is what a viewer shows of an SC: the notice, then what of the source's
    # values this image does not carry as sent (the SR says the same).
    ds.ImageComments = " ".join(notices(result) + [f"{note}." for note in copied.notes(SC_KEYWORDS)])
    what = "heatmap"
    if finding is not None:
        state = "positive" if finding.positive else "negative"
        what = (f"heatmap for {finding.label or finding.code} (p={finding.probability:.2f}, {state} "
                f"at threshold {finding.threshold:.2f})")
    ds.DerivationDescription = (f"{AI_NOTICE}. AI {what} by {result.model} {result.model_version}, "
                                f"blended over the source image")
    ds.SourceImageSequence = [_source_reference(meta, result)]
    # Lossy compression of the source is inherited by everything derived from it (PS3.3 C.7.6.1.1.5).
    if str(meta.get("LossyImageCompression", "")) == "01":
        ds.LossyImageCompression = "01"
        for keyword in ("LossyImageCompressionRatio", "LossyImageCompressionMethod"):
            if keyword in meta:
                setattr(ds, keyword, meta.get(keyword))
    return ds
