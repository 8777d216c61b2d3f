"""INT8 quantization of a model package, refused when it costs accuracy.

``quantize_model`` turns a package's FP32 ``model.onnx`` into a QDQ INT8 ``model.int8.onnx``
with ONNX Runtime static quantization.  Calibration uses the package's ``calibration.npz`` (real
training images) fed through the manifest's own preprocessing, so the activation ranges are the
ones the box will see.  The INT8 model is then scored against FP32 on the validation split named
in the manifest's ``[data]`` table; if the AUC drops by more than ``max_auc_drop`` nothing is
written and :class:`QuantizeRefusedError` is raised.

The quantization is symmetric INT8 for weights (per output channel) and activations, which is
what TensorRT's explicit quantization expects, so the same QDQ file serves ONNX Runtime on a CPU
and an INT8 TensorRT engine on the device.
"""
from __future__ import annotations

import logging
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on the device's Python 3.10
    import tomli as tomllib

from ..atomicfile import write_atomic
from ..errors import ManifestError, QuantizeRefusedError
from ..imaging.preprocess import preprocess
from .manifest import load_manifest, sha256_file
from .validate import bootstrap_ci, roc_auc

log = logging.getLogger(__name__)

MANIFEST = "manifest.toml"
FP32_MODEL = "model.onnx"
INT8_MODEL = "model.int8.onnx"
GOLDEN = "golden.npz"
CALIBRATION = "calibration.npz"

# Only the compute-heavy ops are quantized.  Pooling, concatenation, the ensemble average and the
# sigmoid stay in float: they cost nothing and quantizing the final probabilities would put a
# 1/255 staircase on the score the operating point is compared against.
OPS_TO_QUANTIZE = ("Conv", "Gemm", "MatMul")


# --------------------------------------------------------------------------- package files

def refresh_file_hashes(package_dir: Path) -> dict[str, str]:
    """Rewrite the manifest's ``[files]`` table with the sha256 of every other package file.

    Only the ``[files]`` table is replaced; the rest of the manifest text (comments, order) is
    kept as written.  Hidden files and temporary files are ignored.
    """
    package_dir = Path(package_dir)
    hashes = {
        p.name: sha256_file(p)
        for p in sorted(package_dir.iterdir())
        if p.is_file() and p.name != MANIFEST and not p.name.startswith(".")
        and not p.name.endswith(".tmp")
    }
    path = package_dir / MANIFEST
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines()
    header = re.compile(r"^\s*\[")
    files_header = re.compile(r"^\s*\[files\]\s*(#.*)?$")
    start = next((i for i, ln in enumerate(lines) if files_header.match(ln)), None)
    if start is None:
        kept = lines
    else:
        end = next((j for j in range(start + 1, len(lines)) if header.match(lines[j])), len(lines))
        kept = lines[:start] + lines[end:]
    while kept and not kept[-1].strip():
        kept.pop()
    table = ["", "[files]                         # sha256 of every file except manifest.toml"]
    table += [f'"{name}" = "{digest}"' for name, digest in hashes.items()]
    new_text = "\n".join(kept + table) + "\n"
    tomllib.loads(new_text)  # never leave a manifest behind that does not parse
    write_atomic(path, new_text.encode("utf-8"))
    return hashes


# --------------------------------------------------------------------------- preprocessing

def preprocess_source_images(images: np.ndarray, manifest: Mapping[str, Any]) -> np.ndarray:
    """N×H×W grey source images (calibration, validation arrays) → N×C×h×w model input.

    Each image goes through :func:`appliance.imaging.preprocess.preprocess`, the run-time path,
    so calibration ranges and validation scores are those of images the box would see.
    """
    shape = manifest.get("input", {}).get("shape", [1, 1, 28, 28])
    steps = manifest.get("preprocess", [])
    return np.concatenate([preprocess(img, steps, shape).tensor for img in np.asarray(images)])


# --------------------------------------------------------------------------- quantization

class _CalibrationReader:
    """Feeds calibration batches to ``quantize_static`` (the CalibrationDataReader protocol)."""

    def __init__(self, input_name: str, batches: np.ndarray, batch_size: int = 16) -> None:
        self._input = input_name
        self._data = batches
        self._bs = batch_size
        self._it: Iterator[dict[str, np.ndarray]] = self._gen()

    def _gen(self) -> Iterator[dict[str, np.ndarray]]:
        for i in range(0, len(self._data), self._bs):
            yield {self._input: self._data[i:i + self._bs]}

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = self._gen()


def _session(model_path: Path, threads: int = 2) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(str(model_path), opts, providers=["CPUExecutionProvider"])


def run_model(session: Any, input_name: str, x: np.ndarray, batch: int = 128) -> dict[str, np.ndarray]:
    """Run every output of an ONNX Runtime session over ``x`` in batches."""
    names = [o.name for o in session.get_outputs()]
    parts: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for i in range(0, len(x), batch):
        for n, v in zip(names, session.run(names, {input_name: x[i:i + batch]})):
            parts[n].append(v)
    return {n: np.concatenate(v) for n, v in parts.items()}


def validation_split(manifest: Mapping[str, Any], shared_data_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """Validation images (N×H×W uint8) and finding labels (1 = finding present) for a package."""
    data = manifest.get("data")
    if not data or "file" not in data:
        raise ManifestError("manifest has no [data] table naming the validation file")
    path = Path(shared_data_dir) / str(data["file"])
    try:
        with np.load(path) as npz:
            images, labels = npz["val_images"], npz["val_labels"].ravel()
    except (OSError, KeyError) as exc:
        raise ManifestError(f"validation data {path}: {exc}") from exc
    positive = [int(v) for v in data.get("positive_labels", [1])]
    return images, np.isin(labels, positive).astype(np.int64)


def _quantize_to(fp32: Path, out: Path, calib: np.ndarray, input_name: str,
                 per_channel: bool, nodes_to_exclude: Sequence[str]) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    quantize_static(
        str(fp32), str(out), _CalibrationReader(input_name, calib),
        quant_format=QuantFormat.QDQ,
        op_types_to_quantize=list(OPS_TO_QUANTIZE),
        per_channel=per_channel,
        activation_type=QuantType.QInt8,
        weight_type=QuantType.QInt8,
        nodes_to_exclude=list(nodes_to_exclude),
        calibrate_method=CalibrationMethod.MinMax,
        # symmetric ranges (zero point 0) are what TensorRT's explicit INT8 accepts
        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True},
    )


def quantize_model(package_dir: Path, shared_data_dir: Path, max_auc_drop: float = 0.01,
                   per_channel: bool = True, nodes_to_exclude: Sequence[str] = ()) -> dict[str, Any]:
    """Quantize ``package_dir/model.onnx`` to INT8 QDQ, or refuse if validation AUC drops too much.

    On success ``model.int8.onnx`` is written atomically, ``golden.npz`` gains the INT8 outputs
    (``<output>_int8``) and the manifest's ``[files]`` hashes are refreshed.  Returns
    ``{"fp32_auc", "int8_auc", "drop", "path"}`` (plus the AUCs' 95% bootstrap CIs).
    """
    package_dir = Path(package_dir)
    # a package whose files do not match its manifest is refused before anything is derived from it
    manifest = load_manifest(package_dir, verify=True).raw
    input_name = str(manifest["input"]["name"])
    fp32_path = package_dir / FP32_MODEL

    try:
        with np.load(package_dir / CALIBRATION) as npz:
            calib_src = npz["images"]
    except (OSError, KeyError) as exc:
        raise ManifestError(f"{package_dir / CALIBRATION}: {exc}") from exc
    calib = preprocess_source_images(calib_src, manifest)
    val_images, val_labels = validation_split(manifest, shared_data_dir)
    val_x = preprocess_source_images(val_images, manifest)

    out_path = package_dir / INT8_MODEL
    fd, tmp_name = tempfile.mkstemp(dir=package_dir, prefix=".model.int8.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    gtmp = ""
    try:
        _quantize_to(fp32_path, tmp, calib, input_name, per_channel, nodes_to_exclude)
        fp32_sess, int8_sess = _session(fp32_path), _session(tmp)
        fp32_probs = run_model(fp32_sess, input_name, val_x)["probs"][:, 0]
        int8_probs = run_model(int8_sess, input_name, val_x)["probs"][:, 0]
        fp32_auc, int8_auc = roc_auc(val_labels, fp32_probs), roc_auc(val_labels, int8_probs)
        if fp32_auc is None or int8_auc is None:
            raise ManifestError(f"{package_dir.name}: validation split needs both classes for an AUC")
        drop = fp32_auc - int8_auc
        log.info("%s: FP32 AUC %.4f, INT8 AUC %.4f, drop %.4f", package_dir.name, fp32_auc,
                 int8_auc, drop)
        if not drop <= max_auc_drop:
            raise QuantizeRefusedError(
                f"{package_dir.name}: INT8 validation AUC {int8_auc:.4f} is {drop:.4f} below FP32 "
                f"{fp32_auc:.4f} (allowed {max_auc_drop:.4f}); model.int8.onnx not written")

        golden_path = package_dir / GOLDEN
        with np.load(golden_path) as npz:
            golden = {k: npz[k] for k in npz.files if not k.endswith("_int8")}
        for name, value in run_model(int8_sess, input_name, golden["inputs"]).items():
            golden[f"{name}_int8"] = value
        fd, gtmp = tempfile.mkstemp(dir=package_dir, prefix=".golden.", suffix=".tmp")
        os.chmod(gtmp, 0o644)
        os.chmod(tmp, 0o644)
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, **golden)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, out_path)
        os.replace(gtmp, golden_path)
    finally:
        for leftover in (tmp, Path(gtmp) if gtmp else None):
            if leftover is not None and leftover.exists():
                leftover.unlink()
    refresh_file_hashes(package_dir)
    return {
        "fp32_auc": fp32_auc,
        "int8_auc": int8_auc,
        "drop": drop,
        "fp32_auc_ci": bootstrap_ci(val_labels, fp32_probs),
        "int8_auc_ci": bootstrap_ci(val_labels, int8_probs),
        "n_val": int(val_labels.size),
        "path": out_path,
    }
