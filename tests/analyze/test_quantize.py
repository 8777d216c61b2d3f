"""INT8 quantization of model packages, and integrity of the committed reference packages."""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from appliance.analyze.manifest import sha256_file
from appliance.analyze.quantize import INT8_MODEL, quantize_model, refresh_file_hashes
from appliance.errors import ManifestError, QuantizeRefusedError
from tests.helpers import SHARED_DATA

ROOT = Path(__file__).resolve().parents[2]
ENGINES = ROOT / "engines"
PACKAGES = ["cxr-pneumonia", "us-breast-lesion"]



def _manifest(pkg: Path) -> dict:
    with open(pkg / "manifest.toml", "rb") as fh:
        return tomllib.load(fh)


def _run(model: Path, x: np.ndarray) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, {sess.get_inputs()[0].name: x})))


@pytest.fixture
def package_copy(tmp_path: Path) -> Path:
    """A copy of the breast package without its INT8 model and INT8 golden outputs."""
    dst = tmp_path / "us-breast-lesion"
    shutil.copytree(ENGINES / "us-breast-lesion", dst)
    (dst / INT8_MODEL).unlink(missing_ok=True)
    with np.load(dst / "golden.npz") as npz:
        fp32_only = {k: npz[k] for k in npz.files if not k.endswith("_int8")}
    np.savez(dst / "golden.npz", **fp32_only)
    refresh_file_hashes(dst)
    return dst


# --------------------------------------------------------------------------- manifest hashes

def test_refresh_file_hashes_keeps_the_rest_of_the_manifest(tmp_path: Path) -> None:
    (tmp_path / "manifest.toml").write_text(
        '[model]\nid = "x"  # comment kept\n\n[files]  # old\n"gone.bin" = "00"\n\n[ood]\nthreshold = 1.5\n')
    (tmp_path / "a.bin").write_bytes(b"abc")
    refresh_file_hashes(tmp_path)
    text = (tmp_path / "manifest.toml").read_text()
    assert "# comment kept" in text and "gone.bin" not in text
    m = tomllib.loads(text)
    assert m["ood"]["threshold"] == 1.5
    assert m["files"] == {"a.bin": sha256_file(tmp_path / "a.bin")}


# --------------------------------------------------------------------------- committed packages

@pytest.mark.parametrize("model_id", PACKAGES)
def test_committed_package_hashes_match_files(model_id: str) -> None:
    pkg = ENGINES / model_id
    files = _manifest(pkg)["files"]
    on_disk = {p.name for p in pkg.iterdir() if p.is_file() and p.name != "manifest.toml"}
    assert set(files) == on_disk
    for name in ("model.onnx", INT8_MODEL, "MODEL_CARD.md", "calibration.npz", "golden.npz",
                 "ood.npz"):
        assert files[name] == sha256_file(pkg / name), name


@pytest.mark.parametrize("model_id", PACKAGES)
def test_committed_models_reproduce_golden_outputs(model_id: str) -> None:
    pkg = ENGINES / model_id
    manifest = _manifest(pkg)
    with np.load(pkg / "golden.npz") as npz:
        golden = {k: npz[k] for k in npz.files}
    x = golden["inputs"]
    assert x.dtype == np.float32 and x.shape[1:] == tuple(manifest["input"]["shape"][1:])
    out = _run(pkg / "model.onnx", x)
    for spec in manifest["outputs"]:
        name = spec["name"]
        np.testing.assert_allclose(out[name], golden[name], atol=1e-4, rtol=0, err_msg=name)
    assert out["probs"].shape == (len(x), 1)
    assert (out["cam"] >= 0).all() and out["cam"].ndim == 4
    assert out["embedding"].shape[1] <= 256
    int8 = _run(pkg / INT8_MODEL, x)
    for spec in manifest["outputs"]:
        name = spec["name"]
        # INT8 kernels may round differently on another CPU; the golden set pins the rest
        np.testing.assert_allclose(int8[name], golden[f"{name}_int8"], atol=1e-3, rtol=1e-3,
                                   err_msg=f"{name}_int8")


@pytest.mark.parametrize("model_id", PACKAGES)
def test_committed_ood_stats_match_embedding(model_id: str) -> None:
    pkg = ENGINES / model_id
    manifest = _manifest(pkg)
    with np.load(pkg / manifest["ood"]["stats"]) as npz:
        mean, precision = npz["mean"], npz["precision"]
    with np.load(pkg / "golden.npz") as npz:
        emb = npz["embedding"]
    assert mean.shape == (emb.shape[1],) and precision.shape == (emb.shape[1],) * 2
    d = emb.astype(np.float64) - mean
    dist = np.sqrt(np.einsum("ij,jk,ik->i", d, precision.astype(np.float64), d))
    # golden inputs are ordinary validation images: inside the gate
    assert np.median(dist) < manifest["ood"]["threshold"]


# --------------------------------------------------------------------------- quantize_model

def test_quantize_writes_int8_model_golden_and_hashes(package_copy: Path) -> None:
    result = quantize_model(package_copy, SHARED_DATA)
    assert set(result) >= {"fp32_auc", "int8_auc", "drop", "path"}
    assert result["path"] == package_copy / INT8_MODEL and result["path"].is_file()
    assert result["drop"] == pytest.approx(result["fp32_auc"] - result["int8_auc"])
    assert result["drop"] <= 0.01
    assert result["fp32_auc"] == pytest.approx(_manifest(package_copy)["validation"]["auc"],
                                               abs=1e-4)
    files = _manifest(package_copy)["files"]
    for name in (INT8_MODEL, "golden.npz", "model.onnx"):
        assert files[name] == sha256_file(package_copy / name)
    with np.load(package_copy / "golden.npz") as npz:
        golden = {k: npz[k] for k in npz.files}
    int8 = _run(package_copy / INT8_MODEL, golden["inputs"])
    np.testing.assert_array_equal(int8["probs"], golden["probs_int8"])
    np.testing.assert_allclose(golden["probs_int8"], golden["probs"], atol=0.1)
    assert not [p for p in package_copy.iterdir() if p.name.endswith(".tmp")]


def test_quantize_refusal_leaves_no_int8_model(package_copy: Path) -> None:
    before = {p.name: p.read_bytes() for p in package_copy.iterdir()}
    with pytest.raises(QuantizeRefusedError, match="not written"):
        quantize_model(package_copy, SHARED_DATA, max_auc_drop=-1.0)
    assert not (package_copy / INT8_MODEL).exists()
    after = {p.name: p.read_bytes() for p in package_copy.iterdir()}
    assert after == before  # no temporary file, manifest and golden untouched


def test_quantize_refuses_with_broken_calibration(package_copy: Path) -> None:
    # calibrating on blank frames gives activation ranges of ~0: the INT8 model saturates
    with np.load(package_copy / "calibration.npz") as npz:
        images = npz["images"]
    np.savez(package_copy / "calibration.npz", images=np.zeros_like(images))
    refresh_file_hashes(package_copy)  # a consistent package, just badly calibrated
    with pytest.raises(QuantizeRefusedError):
        quantize_model(package_copy, SHARED_DATA)
    assert not (package_copy / INT8_MODEL).exists()


def test_quantize_refuses_a_tampered_package(package_copy: Path) -> None:
    with open(package_copy / "MODEL_CARD.md", "a") as fh:
        fh.write("edited after hashing\n")
    with pytest.raises(ManifestError, match="sha256"):
        quantize_model(package_copy, SHARED_DATA)
    assert not (package_copy / INT8_MODEL).exists()
