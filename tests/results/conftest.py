"""Real sources from pydicom-data and hand-made model results for the DICOM result writers."""
from __future__ import annotations

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from appliance.analyze import heatmap
from appliance.analyze.gate import Abstention
from appliance.analyze.result import AI_NOTICE, AnalysisResult, FindingResult
from appliance.imaging.decode import decode
from tests.helpers import sample

US_FRAME = 37  # 0-based, as decode() and the runner report it


def _read(name: str) -> Dataset:
    return pydicom.dcmread(sample(name))


@pytest.fixture(scope="session")
def chest_cr() -> Dataset:
    return _read("RG1_UNCR.dcm")


@pytest.fixture(scope="session")
def us_clip() -> Dataset:
    return _read("color3d_jpeg_baseline.dcm")


def _cam() -> np.ndarray:
    cam = np.zeros((7, 7), dtype=np.float32)
    cam[2, 4] = 1.0  # one hot cell: the overlay is tinted there and plain elsewhere
    return cam


def analyzed(source: Dataset, frame: int | None = None) -> AnalysisResult:
    """A positive and a negative finding, with a real overlay on the source's own pixels."""
    image = decode(source, frame=frame)
    overlay = heatmap.overlay(image.pixels if image.pixels.ndim == 3 else image.grey, _cam())
    return AnalysisResult(
        model="cxr-reference", model_version="1.4.2", backend="onnxruntime 1.19 (CPU)", precision="int8",
        disclaimer=AI_NOTICE,
        findings=[FindingResult("ptx", "Pneumothorax", 0.8731, True, 0.42, "urgent"),
                  FindingResult("tb", "Tuberculosis", 0.0625, False, 0.35, "review")],
        heatmap=overlay, heatmap_finding="ptx",
        source={"modality": image.modality, "frame_index": image.frame_index, "frames": image.frames})


def abstained(code: str = "NOT_APPLICABLE_MODALITY", frame: int | None = None) -> AnalysisResult:
    return AnalysisResult(
        model="cxr-reference", model_version="1.4.2", backend="onnxruntime 1.19 (CPU)", precision="int8",
        disclaimer=AI_NOTICE,
        abstention=Abstention(code, "modality 'US' is not one of CR, DX for this model"),
        source={"modality": "US", "frame_index": frame or 0})
