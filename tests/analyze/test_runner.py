"""The per-image entry point the worker builds on."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from pydicom.data import get_testdata_file

from appliance.analyze.manifest import load_manifest
from appliance.analyze.result import AI_NOTICE
from appliance.analyze.runner import ModelRunner, analyze_image, get_runner
from appliance.config import load_config
from appliance.errors import InferenceError
from tests.analyze.toy_package import MODEL_ID, build_package, toy_engines  # noqa: F401


def test_result_object(toy_engines: Path) -> None:  # noqa: F811
    runner = ModelRunner.load(load_manifest(toy_engines / MODEL_ID), backend="auto", threads=1)
    assert runner.precision == "fp32"  # CPU default: the reference precision
    result = runner.analyze(get_testdata_file("RG1_UNCR.dcm"))
    d = result.to_dict()
    json.dumps(d)
    assert d["model"] == MODEL_ID and d["model_version"] == "0.0.1" and d["status"] == "analyzed"
    assert d["backend"].startswith("onnxruntime ") and "not a diagnosis" in d["disclaimer"]
    finding = d["findings"][0]
    assert set(finding) == {"code", "label", "probability", "positive", "threshold", "severity"}
    assert finding["positive"] == (finding["probability"] >= finding["threshold"])
    assert d["heatmap_finding"] == "bright" and result.heatmap.dtype == np.uint8
    assert d["source"]["modality"] == "CR" and AI_NOTICE.startswith("AI assist")


def test_brighter_images_score_higher(toy_engines: Path) -> None:  # noqa: F811
    from appliance.imaging.decode import DecodedImage

    runner = ModelRunner.load(load_manifest(toy_engines / MODEL_ID), backend="onnxruntime", precision="fp32")
    rng = np.random.default_rng(1)

    def score(level: float) -> float:
        pixels = np.clip(rng.normal(level, 10, (300, 300)), 0, 255).astype(np.float32)
        return runner.analyze(DecodedImage(pixels=pixels, source_kind="image")).findings[0].probability

    assert score(40) < score(120) < score(220)


def test_runner_cache_and_config(toy_engines: Path, tmp_path: Path) -> None:  # noqa: F811
    config = load_config(overrides={"analyze.engines_dir": str(toy_engines), "analyze.backend": "onnxruntime",
                                    "storage.data_dir": str(tmp_path)}, environ={})
    assert get_runner(MODEL_ID, config) is get_runner(MODEL_ID, config)
    assert get_runner(MODEL_ID, config, "int8") is not get_runner(MODEL_ID, config)
    assert get_runner(MODEL_ID, config, "int8").precision == "int8"
    result = analyze_image(get_testdata_file("CT_small.dcm"), MODEL_ID, config)
    assert result.abstention.code == "NOT_APPLICABLE_MODALITY"


def test_int8_requested_without_qdq_model(tmp_path: Path) -> None:
    manifest = load_manifest(build_package(tmp_path, MODEL_ID, int8=False))
    assert ModelRunner.load(manifest, backend="onnxruntime").precision == "fp32"
    with pytest.raises(InferenceError, match="no model.int8.onnx"):
        ModelRunner.load(manifest, backend="onnxruntime", precision="int8")
