"""ONNX Runtime on the CPU: the embedded default and the reference for TensorRT output."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ...errors import InferenceError
from .base import PRECISIONS, Backend

log = logging.getLogger(__name__)


class OnnxRuntimeBackend(Backend):
    """CPU execution provider; ``threads`` is the intra-op thread count (``analyze.threads``)."""

    name = "onnxruntime"

    def __init__(self, threads: int = 2, spin: bool = False) -> None:
        self.threads = threads
        self.spin = spin
        self.precision: Optional[str] = None
        self._session: Any = None

    @property
    def version(self) -> str:
        import onnxruntime

        return str(onnxruntime.__version__)

    def load(self, model_path: Path, precision: str) -> None:
        import onnxruntime as ort

        if precision not in PRECISIONS or precision == "fp16":
            # FP16 is a GPU format; on the CPU it would be slower than FP32, not faster.
            raise InferenceError(f"onnxruntime backend runs fp32 or int8 models, not {precision!r}")
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        # One image at a time per session; parallelism between images is the worker pool's job.
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        # Idle intra-op threads sleep instead of spinning (unless ``spin``): the box receives,
        # serves the UI and analyzes at the same time on a few cores, and a spinning pool starves
        # the others.  Spinning is faster only for a process that has the cores to itself.
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if self.spin else "0")
        try:
            self._session = ort.InferenceSession(str(model_path), sess_options=options,
                                                 providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/... types
            raise InferenceError(f"{model_path}: ONNX Runtime cannot load the model: {exc}") from exc
        self.precision = precision
        log.debug("loaded %s (%s) with %d threads", model_path, precision, self.threads)

    @property
    def output_names(self) -> list[str]:
        self._require()
        return [o.name for o in self._session.get_outputs()]

    def _require(self) -> None:
        if self._session is None:
            raise InferenceError("onnxruntime backend used before load()")

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self._require()
        feeds = {name: np.ascontiguousarray(value, dtype=np.float32) for name, value in inputs.items()}
        try:
            values = self._session.run(None, feeds)
        except Exception as exc:
            raise InferenceError(f"ONNX Runtime inference failed: {exc}") from exc
        return dict(zip(self.output_names, values))
