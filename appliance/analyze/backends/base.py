"""The one small interface every inference backend implements.

A backend executes one model artefact: an ONNX file for ONNX Runtime, a serialized engine
(plan) for TensorRT.  Inputs and outputs are numpy arrays addressed by tensor name, so the
runner never needs to know which backend it is talking to (MONAI Deploy's pattern).
"""
from __future__ import annotations

import abc
from pathlib import Path

import numpy as np

PRECISIONS = ("fp32", "fp16", "int8")


class Backend(abc.ABC):
    """Load a model once, then run it many times; not thread-safe unless a subclass says so."""

    name: str = "abstract"

    @property
    @abc.abstractmethod
    def version(self) -> str:
        """Version of the underlying runtime (recorded with every result)."""

    @abc.abstractmethod
    def load(self, model_path: Path, precision: str) -> None:
        """Prepare ``model_path`` for execution; raises InferenceError if it cannot."""

    @abc.abstractmethod
    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one batch; returns every model output by name as a host numpy array."""

    @property
    @abc.abstractmethod
    def output_names(self) -> list[str]:
        """Names of the loaded model's outputs."""

    def describe(self) -> str:
        return f"{self.name} {self.version}"
