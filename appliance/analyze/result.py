"""What one model said about one image: the data the results stage (``appliance.results``) consumes.

The inference operator (``runner.ModelRunner``) makes an :class:`AnalysisResult`; the analysis
worker records it as a row of ``analysis_results`` (:meth:`AnalysisResult.record`), and the
results stage rebuilds it from that row (:meth:`AnalysisResult.from_record`) to write the SR and
the heatmap SC, as MONAI Deploy's writer operators consume an inference operator's output.
The model runs once per image: what the heatmap needs from that run (the class activation map
of the finding shown and the crop the model saw, :class:`HeatmapEvidence`) is part of the record.

Per result the record also keeps what a site-QA monitor needs: the OOD distance, the index of
the frame analysed and the acquisition fingerprint (:func:`acquisition_fingerprint`).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

import numpy as np
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from ..imaging.preprocess import CropBox
from ..lifecycle import ResultStatus
from .gate import Abstention

AI_NOTICE = "AI assist — not a diagnosis"


@dataclass
class FindingResult:
    code: str
    label: str
    probability: float
    positive: bool
    threshold: float
    severity: str


@dataclass(frozen=True)
class HeatmapEvidence:
    """What the heatmap overlay is drawn from: the model's class activation map for ``finding``
    (h×w, as the model output it) and the region of the source the model saw (``crop``)."""

    finding: str
    cam: np.ndarray = field(repr=False, compare=False)
    crop: CropBox

    def to_json(self) -> str:
        # float32 -> float -> JSON -> float32 is exact, so the overlay drawn from the record is
        # the one the run itself would have drawn.
        return json.dumps({"finding": self.finding, "cam": np.asarray(self.cam, dtype=np.float32).tolist(),
                           "crop": [self.crop.x, self.crop.y, self.crop.width, self.crop.height]})

    @classmethod
    def from_json(cls, text: str) -> "HeatmapEvidence":
        """The evidence recorded by :meth:`to_json`; ValueError if ``text`` is not such a record."""
        try:
            data = json.loads(text)
            cam = np.asarray(data["cam"], dtype=np.float32)
            x, y, width, height = (int(v) for v in data["crop"])
            finding = str(data["finding"])
        except (ValueError, TypeError, KeyError) as exc:
            raise ValueError(f"not a recorded heatmap evidence: {exc}") from exc
        if cam.ndim != 2:
            raise ValueError(f"not a recorded heatmap evidence: the map has shape {cam.shape}, not h×w")
        return cls(finding, cam, CropBox(x, y, width, height))


def _value(ds: Dataset, keyword: str) -> Any:
    try:
        return ds.get(keyword)
    except (ValueError, TypeError, OverflowError):  # a value pydicom cannot convert: not recorded
        return None


def _text(ds: Dataset, keyword: str) -> Optional[str]:
    value = _value(ds, keyword)
    if value is None:
        return None
    text = "\\".join(str(v) for v in value) if isinstance(value, MultiValue) else str(value)
    return text.strip() or None


def _texts(ds: Dataset, keyword: str) -> Optional[list[str]]:
    value = _value(ds, keyword)
    if value is None:
        return None
    items = [str(v).strip() for v in (value if isinstance(value, MultiValue) else [value])]
    return [i for i in items if i] or None


def _int(ds: Dataset, keyword: str) -> Optional[int]:
    value = _value(ds, keyword)
    try:
        return int(value) if value is not None and not isinstance(value, MultiValue) else None
    except (ValueError, TypeError):
        return None


def _spacing(ds: Dataset, keyword: str) -> Optional[list[float]]:
    value = _value(ds, keyword)
    if value is None:
        return None
    try:
        numbers = [float(v) for v in (value if isinstance(value, MultiValue) else [value])]
    except (ValueError, TypeError):
        return None
    return numbers if len(numbers) == 2 and all(math.isfinite(n) and n > 0 for n in numbers) else None


def acquisition_fingerprint(ds: Dataset) -> dict[str, Any]:
    """How the analysed image was acquired, as a site-QA monitor compares it between results.

    Keys are always present (None where the source does not say, or says it unusably):
    ``manufacturer``, ``model_name``, ``software_versions`` (list), ``photometric_interpretation``,
    ``rows``, ``columns``, ``pixel_spacing`` ([row, column] mm), ``pixel_spacing_attribute``
    (``PixelSpacing`` or, without one, ``ImagerPixelSpacing``), ``view_position``, ``laterality``
    (Image Laterality, else the series' Laterality).  Values as sent (stripped); never patient data.
    """
    spacing_attribute, spacing = None, None
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        spacing = _spacing(ds, keyword)
        if spacing is not None:
            spacing_attribute = keyword
            break
    return {
        "manufacturer": _text(ds, "Manufacturer"),
        "model_name": _text(ds, "ManufacturerModelName"),
        "software_versions": _texts(ds, "SoftwareVersions"),
        "photometric_interpretation": _text(ds, "PhotometricInterpretation"),
        "rows": _int(ds, "Rows"),
        "columns": _int(ds, "Columns"),
        "pixel_spacing": spacing,
        "pixel_spacing_attribute": spacing_attribute,
        "view_position": _text(ds, "ViewPosition"),
        "laterality": _text(ds, "ImageLaterality") or _text(ds, "Laterality"),
    }


@dataclass
class AnalysisResult:
    """What one model said about one image (or why it said nothing)."""

    model: str
    model_version: str
    backend: str
    precision: str
    disclaimer: str
    findings: list[FindingResult] = field(default_factory=list)
    abstention: Optional[Abstention] = None
    heatmap: Optional[np.ndarray] = field(default=None, repr=False)  # H×W×3 uint8 RGB overlay
    heatmap_finding: Optional[str] = None
    heatmap_evidence: Optional[HeatmapEvidence] = None  # what ``heatmap`` is drawn from
    ood_distance: Optional[float] = None
    source: dict[str, Any] = field(default_factory=dict)  # modality, view, rows, frame_index, ...
    fingerprint: dict[str, Any] = field(default_factory=dict)  # acquisition_fingerprint() of the source
    notes: list[str] = field(default_factory=list)  # e.g. analysed although the patient's age is unknown

    @property
    def analyzed(self) -> bool:
        return self.abstention is None

    @property
    def status(self) -> ResultStatus:
        return ResultStatus.ANALYZED if self.analyzed else ResultStatus.ABSTAINED

    @property
    def frame_index(self) -> Optional[int]:
        """The 0-based index of the frame analysed (None if no frame was decoded)."""
        index = self.source.get("frame_index")
        return None if index is None else int(index)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe summary (the heatmap array is stored separately by the caller)."""
        return {
            "model": self.model,
            "model_version": self.model_version,
            "backend": self.backend,
            "precision": self.precision,
            "disclaimer": self.disclaimer,
            "status": str(self.status),
            "findings": [vars(f).copy() for f in self.findings],
            "abstention": self.abstention.as_dict() if self.abstention else None,
            "heatmap_finding": self.heatmap_finding,
            "ood_distance": self.ood_distance,
            "frame_index": self.frame_index,
            "fingerprint": dict(self.fingerprint),
            "source": dict(self.source),
            "notes": list(self.notes),
        }

    def record(self) -> dict[str, Any]:
        """The ``analysis_results`` columns this result fills (the worker adds its identity)."""
        return {
            "model_id": self.model, "model_version": self.model_version,
            "status": self.status,
            "findings_json": json.dumps([vars(f) for f in self.findings]),
            "abstention_code": self.abstention.code if self.abstention else "",
            "abstention_reason": self.abstention.reason if self.abstention else "",
            "backend": self.backend, "precision": self.precision, "disclaimer": self.disclaimer,
            "ood_distance": self.ood_distance, "frame_index": self.frame_index,
            "fingerprint_json": json.dumps(self.fingerprint),
            "heatmap_json": self.heatmap_evidence.to_json() if self.heatmap_evidence else "",
            "notes_json": json.dumps(list(self.notes)),
        }

    @classmethod
    def from_record(cls, row: Mapping[str, Any]) -> "AnalysisResult":
        """The result an ``analysis_results`` row of an analysed or abstained image records.

        A row recorded before the heatmap evidence was kept has none: its objects get no heatmap.
        """
        status = row["status"]
        if status not in (ResultStatus.ANALYZED, ResultStatus.ABSTAINED):
            raise ValueError(f"result {row.get('id')} is {status!r}: only analysed or abstained results have objects")
        evidence = HeatmapEvidence.from_json(row["heatmap_json"]) if row.get("heatmap_json") else None
        frame = row.get("frame_index")
        return cls(
            model=row["model_id"], model_version=row["model_version"], backend=row["backend"],
            precision=row["precision"], disclaimer=row.get("disclaimer") or "",
            findings=[FindingResult(**f) for f in json.loads(row["findings_json"])],
            abstention=Abstention(row["abstention_code"], row["abstention_reason"]) if status == ResultStatus.ABSTAINED else None,
            heatmap_finding=evidence.finding if evidence else None, heatmap_evidence=evidence,
            ood_distance=row.get("ood_distance"), source={} if frame is None else {"frame_index": int(frame)},
            fingerprint=json.loads(row.get("fingerprint_json") or "{}"),
            notes=json.loads(row.get("notes_json") or "[]"),
        )
