"""Tiny, real model packages built in tests (ONNX graph from onnx.helper, INT8 by ORT).

The toy model follows the package spec exactly (input "image" N×1×28×28, outputs probs / cam /
embedding), and its probability rises with image brightness, so a folder of bright "positive"
and dark "negative" images gives a known AUC of 1.0.
"""
from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import Iterator

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

EMBED = 4
MODEL_ID = "toy-cxr"
US_MODEL_ID = "toy-us"


def toy_graph(drop_output: str | None = None, input_name: str = "image", height: int = 28) -> onnx.ModelProto:
    conv_w = np.array([1.0, 0.5, 2.0, 1.5], dtype=np.float32).reshape(EMBED, 1, 1, 1)
    # Biases keep every feature positive over the input range, so the score is monotonic in brightness.
    conv_b = np.array([1.2, 0.6, 2.2, 1.6], dtype=np.float32)
    fc_w = np.array([[1.2, 0.8, 0.6, 1.0]], dtype=np.float32)
    fc_b = np.array([-4.84], dtype=np.float32)  # p = 0.5 at mid-grey
    inits = [numpy_helper.from_array(conv_w, "conv_w"), numpy_helper.from_array(conv_b, "conv_b"),
             numpy_helper.from_array(fc_w, "fc_w"), numpy_helper.from_array(fc_b, "fc_b"),
             numpy_helper.from_array(fc_w.reshape(1, EMBED, 1, 1), "cam_w"),
             numpy_helper.from_array(np.array([0, -1], dtype=np.int64), "flat_shape")]
    nodes = [
        helper.make_node("AveragePool", [input_name], ["pooled"], kernel_shape=[4, 4], strides=[4, 4]),
        helper.make_node("Conv", ["pooled", "conv_w", "conv_b"], ["conv"]),
        helper.make_node("Relu", ["conv"], ["feat"]),
        helper.make_node("GlobalAveragePool", ["feat"], ["gap"]),
        helper.make_node("Reshape", ["gap", "flat_shape"], ["embedding"]),
        helper.make_node("Gemm", ["embedding", "fc_w", "fc_b"], ["logits"], transB=1),
        helper.make_node("Sigmoid", ["logits"], ["probs"]),
        helper.make_node("Conv", ["feat", "cam_w"], ["cam_raw"]),
        helper.make_node("Relu", ["cam_raw"], ["cam"]),
    ]
    outputs = [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", 1]),
               helper.make_tensor_value_info("cam", TensorProto.FLOAT, ["N", 1, 7, 7]),
               helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["N", EMBED])]
    outputs = [o for o in outputs if o.name != drop_output]
    graph = helper.make_graph(
        nodes, "toy", [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, ["N", 1, height, 28])],
        outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _calibration_images(n: int = 32, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.uniform(30, 220, size=(n, 1, 1))
    return np.clip(base + rng.normal(0, 20, size=(n, 28, 28)), 0, 255).astype(np.uint8)


def _normalise(images: np.ndarray) -> np.ndarray:
    return ((images.astype(np.float32) / 255.0 - 0.5) / 0.5)[:, None, :, :]


def _quantize(fp32: Path, out: Path, calib: np.ndarray) -> None:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._items = iter([{"image": calib[i:i + 1]} for i in range(len(calib))])

        def get_next(self):  # type: ignore[override]
            return next(self._items, None)

    quantize_static(str(fp32), str(out), Reader(), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)


MANIFEST = """\
[model]
id = "{id}"
version = "0.0.1"
name = "Toy model for tests"
task = "classification"
intended_use = "Tests only."
disclaimer = "AI assist — not a diagnosis. Not for clinical use."

[applicability]
modalities = {modalities}
body_parts = {body_parts}
views = {views}
photometric = {photometric}
min_rows = {min_size}
min_columns = {min_size}
colour = "{colour}"

[input]
name = "image"
shape = [1, 1, 28, 28]
dtype = "float32"
layout = "NCHW"

[[preprocess]]
op = "center_crop_square"
[[preprocess]]
op = "resize"
size = [28, 28]
interpolation = "area"
[[preprocess]]
op = "normalize"
scale = 255.0
mean = 0.5
std = 0.5

[[outputs]]
name = "probs"
activation = "sigmoid_applied"
[[outputs]]
name = "cam"
kind = "heatmap"
[[outputs]]
name = "embedding"
kind = "embedding"

[[findings]]
index = 0
code = "bright"
label = "Bright image"
severity = "urgent"
threshold = {threshold}
sensitivity = 0.95
specificity = 0.80

[ood]
method = "mahalanobis"
stats = "ood.npz"
threshold = {ood_threshold}
percentile = 99.5

[files]
{files}
"""


def write_manifest(package: Path, model_id: str = MODEL_ID, ood_threshold: float = 1.0e6,
                   threshold: float = 0.5, kind: str = "cxr") -> None:
    names = sorted(p.name for p in package.iterdir() if p.is_file() and p.name != "manifest.toml")
    files = "\n".join(f'"{n}" = "{_sha(package / n)}"' for n in names)
    if kind == "cxr":
        fields = dict(modalities='["CR", "DX"]', body_parts='["CHEST", ""]', views='["PA", "AP", ""]',
                      photometric='["MONOCHROME1", "MONOCHROME2"]', min_size=256, colour="reject")
    else:
        fields = dict(modalities='["US"]', body_parts="[]", views="[]", photometric="[]", min_size=64,
                      colour="to_grey")
    (package / "manifest.toml").write_text(MANIFEST.format(
        id=model_id, files=files, ood_threshold=ood_threshold, threshold=threshold, **fields))


def build_package(root: Path, model_id: str = MODEL_ID, kind: str = "cxr", int8: bool = True) -> Path:
    """A complete package under ``root/model_id`` (model, QDQ model, golden, OOD stats, card)."""
    import onnxruntime as ort

    package = root / model_id
    package.mkdir(parents=True)
    fp32 = package / "model.onnx"
    onnx.save(toy_graph(), str(fp32))
    calib = _calibration_images()
    inputs = _normalise(calib)
    if int8:
        _quantize(fp32, package / "model.int8.onnx", inputs)
    np.savez(package / "calibration.npz", images=calib)
    golden = {"inputs": inputs[:4]}
    for name, suffix in (("model.onnx", ""), ("model.int8.onnx", "_int8")):
        if (package / name).exists():
            session = ort.InferenceSession(str(package / name), providers=["CPUExecutionProvider"])
            for out, value in zip(("probs", "cam", "embedding"), session.run(None, {"image": inputs[:4]})):
                golden[out + suffix] = value
    np.savez(package / "golden.npz", **golden)
    session = ort.InferenceSession(str(fp32), providers=["CPUExecutionProvider"])
    emb = session.run(["embedding"], {"image": inputs})[0].astype(np.float64)
    cov = np.cov(emb, rowvar=False) + 0.1 * np.eye(EMBED)
    np.savez(package / "ood.npz", mean=emb.mean(axis=0).astype(np.float32),
             precision=np.linalg.inv(cov).astype(np.float32))
    (package / "MODEL_CARD.md").write_text("# Toy model\nNOT FOR CLINICAL USE.\n")
    write_manifest(package, model_id, kind=kind)
    return package


@pytest.fixture(scope="session")
def toy_engines(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An engines_dir with a chest-like and an ultrasound-like toy package (built once)."""
    root = tmp_path_factory.mktemp("engines")
    build_package(root, MODEL_ID, "cxr")
    build_package(root, US_MODEL_ID, "us")
    return root


@pytest.fixture
def toy_copy(toy_engines: Path, tmp_path: Path) -> Iterator[Path]:
    """A private copy of the chest toy package that a test may tamper with."""
    target = tmp_path / "engines" / MODEL_ID
    shutil.copytree(toy_engines / MODEL_ID, target)
    yield target
