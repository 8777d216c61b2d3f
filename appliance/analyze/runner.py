"""One image through one model: decode -> gate(meta) -> preprocess -> infer -> gate(ood) -> post.

``ModelRunner`` holds a loaded backend session and the package's OOD statistics, so it is
built once per model and reused for every image (``get_runner`` caches them per process).
Nothing here raises for a bad *image* on purpose: decode failures and gate refusals become an
``abstention`` on the result, so one unreadable file never stops a worker.  Bad *models*
(ManifestError, InferenceError) do raise: they are configuration faults, not patient data.
Whatever else an image makes a library raise, the caller records with :func:`failure_reason`.
"""
from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ..config import Config
from ..errors import DecodeError, InferenceError
from ..imaging.decode import DecodedImage, decode
from ..imaging.preprocess import preprocess
from . import gate, heatmap
from .backends import Backend, create_backend, resolve_backend
from .manifest import Manifest, find_model
from .result import AI_NOTICE, AnalysisResult, FindingResult, HeatmapEvidence, acquisition_fingerprint

log = logging.getLogger(__name__)

REASON_MAX = 300  # characters of an exception's message kept as a case's failure reason


def failure_reason(exc: BaseException) -> str:
    """``Type: first line of the message``, short: the reason recorded on the case.

    Recorded in the database (which holds the case anyway), never logged: a library's message
    may quote the value it choked on, and that value may be a patient's name.
    """
    lines = str(exc).strip().splitlines()
    text = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
    return text if len(text) <= REASON_MAX else text[:REASON_MAX - 1] + "…"


def interrupted_reason(attempts: int, doing: str) -> str:
    """The reason for work whose every attempt ended with the process (a crash, a kill, the OOM
    killer): after ``attempts`` of them it is not tried again."""
    times = "once" if attempts == 1 else f"{attempts} times"
    return f"Interrupted: the appliance stopped {times} while {doing} (a crash or a kill); not tried again"


def _activate(scores: np.ndarray, activation: str) -> np.ndarray:
    values = np.asarray(scores, dtype=np.float64)
    if activation == "sigmoid":
        return 1.0 / (1.0 + np.exp(-values))
    if activation == "softmax":
        shifted = np.exp(values - values.max(axis=-1, keepdims=True))
        # (numpy's stubs type a keepdims reduction as Any; the quotient is float64 already)
        return np.asarray(shifted / shifted.sum(axis=-1, keepdims=True), dtype=np.float64)
    return values  # *_applied / none: the graph already produced probabilities


def default_precision(manifest: Manifest, backend_name: str) -> str:
    """The precision used when none is asked for.

    TensorRT: INT8 from the package's accuracy-checked QDQ model, else FP16.  ONNX Runtime: FP32,
    because it is the reference the golden outputs and the OOD statistics were made with, and
    because for the 28×28 reference models INT8 is *slower* on the CPU (docs/BENCHMARKS.md);
    INT8 on the CPU is available by asking for it.
    """
    if backend_name == "tensorrt":
        return "int8" if manifest.has_int8 else "fp16"
    return "fp32"


class ModelRunner:
    """A model package bound to a loaded backend."""

    def __init__(self, manifest: Manifest, backend: Backend, precision: str) -> None:
        self.manifest = manifest
        self.backend = backend
        self.precision = precision
        self.ood = gate.OodStats.load(manifest)
        self.scores = manifest.output("scores")
        self.cam = manifest.output("heatmap")
        self.embedding = manifest.output("embedding")
        # ONNX Runtime sessions are thread-safe; TensorRT contexts and buffers are not.
        self._lock: Optional[threading.Lock] = None if backend.name == "onnxruntime" else threading.Lock()

    @classmethod
    def load(cls, manifest: Manifest, backend: str = "auto", precision: Optional[str] = None,
             threads: int = 2, data_dir: Optional[Path] = None) -> "ModelRunner":
        name = resolve_backend(backend)
        precision = precision or default_precision(manifest, name)
        if precision == "int8" and not manifest.has_int8:
            raise InferenceError(f"model {manifest.id} has no model.int8.onnx; run `appliance models quantize`")
        instance = create_backend(name, threads=threads)
        if name == "tensorrt":
            from .engines import ensure_engine

            if data_dir is None:
                raise InferenceError("the tensorrt backend needs the data directory for its engine cache")
            instance.load(ensure_engine(manifest, precision, data_dir), precision)
        else:
            instance.load(manifest.model_path(precision), precision)
        return cls(manifest, instance, precision)

    @property
    def backend_label(self) -> str:
        return self.backend.describe()

    def infer(self, tensor: np.ndarray) -> dict[str, np.ndarray]:
        inputs = {self.manifest.input.name: tensor}
        if self._lock is None:
            return self.backend.run(inputs)
        with self._lock:
            return self.backend.run(inputs)

    def _result(self, **kwargs: Any) -> AnalysisResult:
        return AnalysisResult(model=self.manifest.id, model_version=self.manifest.version,
                              backend=self.backend_label, precision=self.precision,
                              disclaimer=self.manifest.disclaimer or AI_NOTICE, **kwargs)

    def analyze(self, source: Any, frame: Optional[int] = None, make_heatmap: bool = True,
                fingerprint: Optional[dict[str, Any]] = None) -> AnalysisResult:
        """Run the full run-time path on a path, Dataset, DICOM bytes or DecodedImage.

        The model runs once.  The result keeps the heatmap evidence of that run (the top
        finding's activation map and the crop), from which the results stage draws the overlay;
        ``make_heatmap`` also draws it here (``result.heatmap``).  ``fingerprint`` is the
        image's :func:`acquisition_fingerprint` when the caller has it already."""
        try:
            image: DecodedImage = decode(source, frame=frame)
        except DecodeError as exc:
            return self._result(abstention=gate.Abstention("UNREADABLE_PIXELS", f"cannot decode the image: {exc}"))
        meta = {"modality": image.modality, "body_part": image.body_part, "view": image.view,
                "photometric": image.photometric, "rows": image.rows, "columns": image.columns,
                "frames": image.frames, "frame_index": image.frame_index, "is_colour": image.is_colour}
        if fingerprint is None:
            fingerprint = acquisition_fingerprint(image.header) if image.header is not None else {}
        patient = gate.read_patient(image.header) if image.header is not None else None
        population, notes = gate.check_population(patient, self.manifest)
        refusal = gate.check_metadata(image, self.manifest) or population or gate.check_pixels(image, self.manifest)
        if refusal is not None:
            return self._result(abstention=refusal, source=meta, fingerprint=fingerprint)
        grey = image.grey
        prepared = preprocess(grey, self.manifest.preprocess, self.manifest.input.shape)
        outputs = self.infer(prepared.tensor)
        distance, refusal = None, None
        if self.embedding is not None and self.ood is not None:
            distance, refusal = gate.check_ood(outputs[self.embedding.name][0], self.ood)
        if refusal is not None:
            return self._result(abstention=refusal, ood_distance=distance, source=meta, fingerprint=fingerprint)
        if self.scores is None:  # manifest loading refuses this; kept for type narrowing
            raise InferenceError(f"model {self.manifest.id}: no scores output")
        probs = _activate(outputs[self.scores.name], self.scores.activation)[0]
        findings = []
        for finding in self.manifest.findings:
            if finding.index >= probs.shape[-1]:
                raise InferenceError(f"model {self.manifest.id}: finding index {finding.index} "
                                     f"outside the scores output ({probs.shape[-1]} values)")
            p = float(probs[finding.index])
            findings.append(FindingResult(finding.code, finding.label, p, p >= finding.threshold,
                                          finding.threshold, finding.severity))
        evidence, overlay = None, None
        if self.cam is not None and findings:
            top = max(range(len(findings)), key=lambda i: findings[i].probability)
            cam = np.asarray(outputs[self.cam.name][0, self.manifest.findings[top].index], dtype=np.float32)
            evidence = HeatmapEvidence(findings[top].code, cam, prepared.crop)
            if make_heatmap:
                overlay = heatmap.evidence_overlay(image, evidence)
        return self._result(findings=findings, heatmap=overlay, heatmap_finding=evidence.finding if evidence else None,
                            heatmap_evidence=evidence, ood_distance=distance, source=meta, fingerprint=fingerprint,
                            notes=notes)


_RUNNERS: dict[tuple[str, ...], ModelRunner] = {}
_RUNNERS_LOCK = threading.Lock()


def get_runner(model_id: str, config: Config, precision: Optional[str] = None) -> ModelRunner:
    """The process-wide runner for a model under this configuration, loaded on first use."""
    analyze_cfg = config.analyze
    key = (str(analyze_cfg.engines_dir), model_id, str(analyze_cfg.backend), str(precision),
           str(analyze_cfg.threads))
    with _RUNNERS_LOCK:
        runner = _RUNNERS.get(key)
        if runner is None:
            manifest = find_model(analyze_cfg.engines_dir, model_id)
            runner = ModelRunner.load(manifest, backend=analyze_cfg.backend, precision=precision,
                                      threads=int(analyze_cfg.threads), data_dir=config.data_dir)
            _RUNNERS[key] = runner
        return runner


def analyze_image(source: Any, model_id: str, config: Config, precision: Optional[str] = None,
                  frame: Optional[int] = None) -> AnalysisResult:
    """Convenience for the pipeline: one image, one model, cached runner."""
    return get_runner(model_id, config, precision).analyze(source, frame=frame)
