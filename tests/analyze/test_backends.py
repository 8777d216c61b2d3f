"""Backend registry and the golden self-test on ONNX Runtime (toy and reference packages)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from appliance.analyze.backends import OnnxRuntimeBackend, create_backend, gpu_present, resolve_backend
from appliance.analyze.engines import self_test
from appliance.analyze.manifest import load_manifest
from appliance.config import PROJECT_ROOT
from appliance.errors import BackendUnavailableError, InferenceError
from tests.analyze.toy_package import MODEL_ID, toy_copy, toy_engines, write_manifest  # noqa: F401

REFERENCE = ["cxr-pneumonia", "us-breast-lesion"]


def test_auto_picks_onnxruntime_without_gpu() -> None:
    assert not gpu_present()  # dev/CI machines: if this fails, the GPU tests belong on the device
    assert resolve_backend("auto") == "onnxruntime"
    assert resolve_backend("onnxruntime") == "onnxruntime"
    with pytest.raises(BackendUnavailableError, match="tensorrt"):
        resolve_backend("tensorrt")
    assert isinstance(create_backend("onnxruntime", threads=1), OnnxRuntimeBackend)


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_toy_self_test_passes(toy_engines: Path, precision: str) -> None:  # noqa: F811
    manifest = load_manifest(toy_engines / MODEL_ID)
    backend = create_backend("onnxruntime", threads=1)
    backend.load(manifest.model_path(precision), precision)
    result = self_test(manifest, backend, precision)
    assert result.passed, result.detail
    assert set(result.max_error) == {"probs", "cam", "embedding"}


def test_self_test_detects_wrong_outputs(toy_copy: Path) -> None:  # noqa: F811
    golden = dict(np.load(toy_copy / "golden.npz"))
    golden["probs"] = golden["probs"] + 0.2
    np.savez(toy_copy / "golden.npz", **golden)
    write_manifest(toy_copy)
    manifest = load_manifest(toy_copy)
    backend = create_backend("onnxruntime", threads=1)
    backend.load(manifest.model_path("fp32"), "fp32")
    result = self_test(manifest, backend, "fp32")
    assert not result.passed and "probs: max error" in result.detail


def test_onnxruntime_errors(toy_engines: Path, tmp_path: Path) -> None:  # noqa: F811
    backend = OnnxRuntimeBackend(threads=1)
    with pytest.raises(InferenceError, match="before load"):
        backend.run({"image": np.zeros((1, 1, 28, 28), np.float32)})
    with pytest.raises(InferenceError, match="not 'fp16'"):
        backend.load(toy_engines / MODEL_ID / "model.onnx", "fp16")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"nonsense")
    with pytest.raises(InferenceError, match="cannot load the model"):
        backend.load(bad, "fp32")
    backend.load(toy_engines / MODEL_ID / "model.onnx", "fp32")
    with pytest.raises(InferenceError, match="inference failed"):
        backend.run({"image": np.zeros((1, 1, 30, 28), np.float32)})
    batch = backend.run({"image": np.zeros((8, 1, 28, 28), np.float32)})
    assert batch["probs"].shape == (8, 1) and batch["cam"].shape == (8, 1, 7, 7)


@pytest.mark.parametrize("model_id", REFERENCE)
@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_reference_packages_match_golden(model_id: str, precision: str) -> None:
    package = PROJECT_ROOT / "engines" / model_id
    assert (package / "manifest.toml").is_file(), f"engines/{model_id} is missing"
    manifest = load_manifest(package)
    if precision == "int8" and not manifest.has_int8:
        pytest.fail(f"{model_id} has no model.int8.onnx")
    backend = create_backend("onnxruntime", threads=2)
    backend.load(manifest.model_path(precision), precision)
    result = self_test(manifest, backend, precision)
    assert result.passed, result.detail
