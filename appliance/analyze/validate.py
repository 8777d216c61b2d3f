"""Site acceptance test: run a model over a labelled folder through the full run-time path.

``DIR/labels.csv`` has columns ``file,label`` (label 1 = the model's finding present, 0 =
absent); files are DICOM, PNG or JPEG, relative to DIR.  Every image goes through exactly what
the worker does (decode -> gate -> preprocess -> infer -> gate), so abstentions count here as
they would in the clinic.  Metrics use the images that were analysed:

* AUC (Mann-Whitney, ties averaged) with a 95% percentile bootstrap CI (2000 resamples, fixed
  seed, so the same folder always prints the same interval);
* sensitivity / specificity and the confusion matrix at the manifest's operating point.
"""
from __future__ import annotations

import csv
import html
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from ..errors import ApplianceError
from .runner import ModelRunner

log = logging.getLogger(__name__)

BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 20240601


class ValidationSetError(ApplianceError):
    """The validation folder or its labels.csv is missing, malformed or empty."""

    code = "validation_set_invalid"


@dataclass
class Case:
    file: str
    label: int
    probability: Optional[float] = None
    abstention: Optional[str] = None


@dataclass
class ValidationReport:
    model: str
    model_version: str
    finding: str
    backend: str
    precision: str
    threshold: float
    cases: list[Case] = field(default_factory=list)
    auc: Optional[float] = None
    auc_ci: Optional[tuple[float, float]] = None

    @property
    def analysed(self) -> list[Case]:
        return [c for c in self.cases if c.probability is not None]

    def confusion(self, threshold: Optional[float] = None) -> dict[str, int]:
        cut = self.threshold if threshold is None else threshold
        labels = np.array([c.label for c in self.analysed], dtype=int)
        scores = np.array([c.probability for c in self.analysed], dtype=float)
        predicted = scores >= cut
        return {"tp": int(np.sum(predicted & (labels == 1))), "fp": int(np.sum(predicted & (labels == 0))),
                "tn": int(np.sum(~predicted & (labels == 0))), "fn": int(np.sum(~predicted & (labels == 1)))}

    def summary(self) -> dict[str, object]:
        """The ``--json`` object: exactly the documented keys."""
        cm = self.confusion()
        return {
            "model": self.model, "n": len(self.cases),
            "abstained": sum(1 for c in self.cases if c.abstention is not None),
            "auc": self.auc, "auc_ci": list(self.auc_ci) if self.auc_ci else None,
            "threshold": self.threshold,
            "sensitivity": _ratio(cm["tp"], cm["tp"] + cm["fn"]),
            "specificity": _ratio(cm["tn"], cm["tn"] + cm["fp"]),
            **cm,
        }


def _ratio(num: int, den: int) -> Optional[float]:
    return num / den if den else None


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks; tied scores share the mean of the ranks they span (Mann-Whitney)."""
    ordered = np.sort(values)
    first = np.searchsorted(ordered, values, side="left")
    last = np.searchsorted(ordered, values, side="right")
    return (first + last + 1) / 2.0


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> Optional[float]:
    """Area under the ROC curve, or None when only one class is present."""
    labels = np.asarray(labels, dtype=int)
    n_pos = int(labels.sum())
    n_neg = len(labels) - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = _average_ranks(np.asarray(scores, dtype=float))
    return float((ranks[labels == 1].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def bootstrap_ci(labels: np.ndarray, scores: np.ndarray, resamples: int = BOOTSTRAP_RESAMPLES,
                 seed: int = BOOTSTRAP_SEED) -> Optional[tuple[float, float]]:
    """95% percentile bootstrap interval of the AUC (resamples with one class are skipped)."""
    labels = np.asarray(labels, dtype=int)
    scores = np.asarray(scores, dtype=float)
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(resamples):
        idx = rng.integers(0, len(labels), len(labels))
        auc = roc_auc(labels[idx], scores[idx])
        if auc is not None:
            values.append(auc)
    if not values:
        return None
    low, high = np.percentile(values, [2.5, 97.5])
    return float(low), float(high)


def read_labels(folder: Path) -> list[Case]:
    """Parse and check ``labels.csv`` before any image is touched."""
    if not folder.is_dir():
        raise ValidationSetError(f"{folder}: validation folder does not exist")
    labels_path = folder / "labels.csv"
    if not labels_path.is_file():
        raise ValidationSetError(f"{labels_path}: missing (columns: file,label)")
    cases: list[Case] = []
    with open(labels_path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        if reader.fieldnames is None or not {"file", "label"} <= {f.strip() for f in reader.fieldnames}:
            raise ValidationSetError(f"{labels_path}: header must have columns file,label (got {reader.fieldnames})")
        for line, row in enumerate(reader, start=2):
            row = {k.strip(): (v or "").strip() for k, v in row.items() if k is not None}
            if not row.get("file"):
                raise ValidationSetError(f"{labels_path}:{line}: empty file name")
            if row.get("label") not in ("0", "1"):
                raise ValidationSetError(f"{labels_path}:{line}: unknown label {row.get('label')!r} "
                                         "(use 1 = finding present, 0 = absent)")
            if not (folder / row["file"]).is_file():
                raise ValidationSetError(f"{labels_path}:{line}: file {row['file']!r} not found in {folder}")
            cases.append(Case(file=row["file"], label=int(row["label"])))
    if not cases:
        raise ValidationSetError(f"{labels_path}: no images listed")
    return cases


def validate_folder(runner: ModelRunner, folder: Path, finding_code: Optional[str] = None,
                    progress: Optional[Callable[[int, int], None]] = None) -> ValidationReport:
    """Run every listed image through ``runner`` and compute the metrics."""
    folder = Path(folder)
    cases = read_labels(folder)
    findings = runner.manifest.findings
    finding = next((f for f in findings if f.code == finding_code), None) if finding_code else findings[0]
    if finding is None:
        raise ValidationSetError(f"model {runner.manifest.id} has no finding {finding_code!r} "
                                 f"(has {', '.join(f.code for f in findings)})")
    report = ValidationReport(model=runner.manifest.id, model_version=runner.manifest.version,
                              finding=finding.code, backend=runner.backend_label,
                              precision=runner.precision, threshold=finding.threshold, cases=cases)
    for done, case in enumerate(cases, start=1):
        result = runner.analyze(folder / case.file, make_heatmap=False)
        if result.abstention is not None:
            case.abstention = result.abstention.code
        else:
            case.probability = next(f.probability for f in result.findings if f.code == finding.code)
        if progress:
            progress(done, len(cases))
    analysed = report.analysed
    if analysed:
        labels = np.array([c.label for c in analysed])
        scores = np.array([c.probability for c in analysed], dtype=float)
        report.auc = roc_auc(labels, scores)
        report.auc_ci = bootstrap_ci(labels, scores) if report.auc is not None else None
    return report


def roc_points(report: ValidationReport) -> list[tuple[float, float]]:
    """(FPR, TPR) from (0,0) to (1,1), one point per distinct score."""
    labels = np.array([c.label for c in report.analysed])
    scores = np.array([c.probability for c in report.analysed], dtype=float)
    n_pos, n_neg = int(labels.sum()), int(len(labels) - labels.sum())
    if not n_pos or not n_neg:
        return []
    points = [(0.0, 0.0)]
    for cut in np.unique(scores)[::-1]:
        predicted = scores >= cut
        points.append((float(np.sum(predicted & (labels == 0)) / n_neg), float(np.sum(predicted & (labels == 1)) / n_pos)))
    if points[-1] != (1.0, 1.0):
        points.append((1.0, 1.0))
    return points


def _fmt(value: Optional[float]) -> str:
    return "—" if value is None else f"{value:.3f}"


def render_html(report: ValidationReport) -> str:
    """A self-contained page: inline SVG ROC curve and a threshold table, no external assets."""
    size, pad = 360, 40
    pts = roc_points(report)
    poly = " ".join(f"{pad + x * size:.1f},{pad + (1 - y) * size:.1f}" for x, y in pts)
    cm = report.confusion()
    op_fpr = _ratio(cm["fp"], cm["fp"] + cm["tn"])
    op_tpr = _ratio(cm["tp"], cm["tp"] + cm["fn"])
    marker = "" if op_fpr is None or op_tpr is None else (
        f'<circle cx="{pad + op_fpr * size:.1f}" cy="{pad + (1 - op_tpr) * size:.1f}" r="5" fill="#c0392b">'
        f"<title>operating point {report.threshold:.3f}</title></circle>")
    svg = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{size + 2 * pad}" height="{size + 2 * pad}" '
           f'role="img" aria-label="ROC curve">'
           f'<rect x="{pad}" y="{pad}" width="{size}" height="{size}" fill="none" stroke="#888"/>'
           f'<line x1="{pad}" y1="{pad + size}" x2="{pad + size}" y2="{pad}" stroke="#bbb" stroke-dasharray="4"/>'
           f'<polyline points="{poly}" fill="none" stroke="#1f5fa8" stroke-width="2"/>{marker}'
           f'<text x="{pad + size / 2}" y="{size + 2 * pad - 8}" text-anchor="middle">1 − specificity</text>'
           f'<text x="12" y="{pad + size / 2}" transform="rotate(-90 12 {pad + size / 2})" '
           f'text-anchor="middle">sensitivity</text></svg>')
    rows = []
    cuts = sorted(set([round(t, 2) for t in np.arange(0.05, 1.0, 0.05)] + [report.threshold]))
    for cut in cuts:
        c = report.confusion(cut)
        style = ' style="font-weight:bold;background:#fde"' if cut == report.threshold else ""
        rows.append(f"<tr{style}><td>{cut:.3f}</td><td>{_fmt(_ratio(c['tp'], c['tp'] + c['fn']))}</td>"
                    f"<td>{_fmt(_ratio(c['tn'], c['tn'] + c['fp']))}</td>"
                    f"<td>{_fmt(_ratio(c['tp'], c['tp'] + c['fp']))}</td>"
                    f"<td>{_fmt(_ratio(c['tn'], c['tn'] + c['fn']))}</td>"
                    f"<td>{c['tp']}</td><td>{c['fp']}</td><td>{c['tn']}</td><td>{c['fn']}</td></tr>")
    s = report.summary()
    interval = report.auc_ci
    ci = f"{interval[0]:.3f}–{interval[1]:.3f}" if interval else "—"
    title = html.escape(f"Validation of {report.model} {report.model_version}")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:60em}}td,th{{padding:2px 8px;text-align:right}}
table{{border-collapse:collapse}}tr:nth-child(even){{background:#f4f4f4}}</style></head><body>
<h1>{title}</h1>
<p><strong>AI assist — not a diagnosis. Not for clinical use.</strong></p>
<p>Finding <code>{html.escape(report.finding)}</code>; backend {html.escape(report.backend)}, precision
{html.escape(report.precision)}. Images: {s['n']}, abstained: {s['abstained']}, analysed: {len(report.analysed)}.</p>
<p>AUC {_fmt(report.auc)} (95% CI {ci}, bootstrap {BOOTSTRAP_RESAMPLES}×). At the operating point
{report.threshold:.3f}: sensitivity {_fmt(op_tpr)}, specificity {_fmt(_ratio(cm['tn'], cm['tn'] + cm['fp']))};
TP {s['tp']}, FP {s['fp']}, TN {s['tn']}, FN {s['fn']}.</p>
{svg}
<h2>Thresholds</h2>
<table><tr><th>threshold</th><th>sensitivity</th><th>specificity</th><th>PPV</th><th>NPV</th>
<th>TP</th><th>FP</th><th>TN</th><th>FN</th></tr>
{''.join(rows)}
</table></body></html>
"""
