"""TensorRT engine cache, engine builds, and the golden-output self-test.

An engine is only valid for the exact ONNX file, TensorRT version, GPU architecture and
precision it was built for, so the cache key is exactly those four (DESIGN.md §5):

    <data_dir>/engine_cache/<model-id>/<precision>.plan   the serialized engine
    <data_dir>/engine_cache/<model-id>/<precision>.json   its key + sha256 of the plan
    <data_dir>/engine_cache/timing-trt<version>-sm<cc>.cache   shared timing cache

``cache_status`` decides, in pure Python, whether a cached engine may be loaded: a plan whose
recorded model hash differs is *stale*, one built by another TensorRT version or on another GPU
is *foreign*, one whose bytes no longer match its record is *corrupt*; all three are rebuilt,
never loaded (TensorRT would refuse or, worse, misbehave).

The build itself (``build_engine``) needs TensorRT and a GPU and is NOT VERIFIED ON HARDWARE:
it runs only on the device via ``appliance engines build`` / ``scripts/device_selftest.sh``.
The self-test (``self_test``) is backend-agnostic and is unit-tested with ONNX Runtime.
"""
from __future__ import annotations

import json
import logging
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from ..atomicfile import write_atomic
from ..errors import BackendUnavailableError, InferenceError
from .backends.base import Backend
from .manifest import MODEL_FILES, Manifest, sha256_file

log = logging.getLogger(__name__)

CACHE_DIR = "engine_cache"
ENGINE_PRECISIONS = ("fp16", "int8")
# Self-test tolerance per precision: max |actual - golden| <= ATOL + RTOL * max |golden|.
# fp32 on another CPU differs only by summation order; int8 kernels and TensorRT fp16/int8
# tactics round differently, so they get a looser bound that still catches a broken engine.
TOLERANCE = {"fp32": (1e-4, 1e-3), "int8": (2e-2, 5e-2), "fp16": (1e-2, 2e-2)}


@dataclass(frozen=True)
class EngineKey:
    model_id: str
    model_sha256: str
    trt_version: str
    compute_capability: str  # e.g. "8.7" (Jetson Orin)
    precision: str


def engine_key(manifest: Manifest, precision: str, trt_version: str, compute_capability: str) -> EngineKey:
    """The key for building ``precision`` from the package's matching ONNX file."""
    if precision not in ENGINE_PRECISIONS:
        raise InferenceError(f"engine precision must be one of {ENGINE_PRECISIONS}, got {precision!r}")
    source = MODEL_FILES["int8"] if precision == "int8" else MODEL_FILES["fp32"]
    if source not in manifest.files:
        raise InferenceError(f"model {manifest.id}: no {source} in the package to build a {precision} engine from")
    return EngineKey(manifest.id, manifest.files[source], trt_version, compute_capability, precision)


def engine_paths(cache_root: Path, key: EngineKey) -> tuple[Path, Path]:
    folder = cache_root / key.model_id
    return folder / f"{key.precision}.plan", folder / f"{key.precision}.json"


def timing_cache_path(cache_root: Path, trt_version: str, compute_capability: str) -> Path:
    return cache_root / f"timing-trt{trt_version}-sm{compute_capability.replace('.', '')}.cache"


def cache_status(cache_root: Path, key: EngineKey) -> str:
    """``valid``, ``missing``, ``stale`` (model changed), ``foreign`` (other TRT/GPU) or ``corrupt``."""
    plan, record_path = engine_paths(cache_root, key)
    if not plan.is_file() or not record_path.is_file():
        return "missing"
    try:
        record = json.loads(record_path.read_text())
        recorded = EngineKey(**record["key"])
        plan_sha = str(record["plan_sha256"])
    except (OSError, ValueError, KeyError, TypeError):
        return "corrupt"
    if recorded.trt_version != key.trt_version or recorded.compute_capability != key.compute_capability:
        return "foreign"
    if recorded.model_sha256 != key.model_sha256 or recorded.precision != key.precision \
            or recorded.model_id != key.model_id:
        return "stale"
    if sha256_file(plan) != plan_sha:
        return "corrupt"
    return "valid"


def store_engine(cache_root: Path, key: EngineKey, plan_bytes: bytes) -> Path:
    """Write plan then record; a crash between the two leaves a "missing" entry, never a wrong one."""
    plan, record_path = engine_paths(cache_root, key)
    record_path.unlink(missing_ok=True)
    write_atomic(plan, plan_bytes)
    record = {"key": asdict(key), "plan_sha256": sha256_file(plan)}
    write_atomic(record_path, json.dumps(record, indent=2).encode())
    return plan


def discard_engine(cache_root: Path, key: EngineKey) -> None:
    for path in engine_paths(cache_root, key):
        path.unlink(missing_ok=True)


@dataclass
class SelfTestResult:
    passed: bool
    max_error: dict[str, float]
    detail: str


def self_test(manifest: Manifest, backend: Backend, precision: str) -> SelfTestResult:
    """Run the golden inputs through a loaded backend and compare with the golden outputs.

    fp32 and fp16 compare against the FP32 references (``<output>``), int8 against the INT8
    references (``<output>_int8``) made by the same QDQ model on ONNX Runtime.
    """
    golden_path = manifest.path("golden.npz")
    if "golden.npz" not in manifest.files:
        raise InferenceError(f"model {manifest.id}: package has no golden.npz for the self-test")
    atol, rtol = TOLERANCE[precision]
    suffix = "_int8" if precision == "int8" else ""
    with np.load(golden_path) as golden:
        inputs = np.asarray(golden["inputs"], dtype=np.float32)
        expected = {o.name: np.asarray(golden[o.name + suffix]) for o in manifest.outputs
                    if o.name + suffix in golden.files}
    if not expected:
        raise InferenceError(f"{golden_path}: no golden outputs for precision {precision}")
    outputs = backend.run({manifest.input.name: inputs})
    errors: dict[str, float] = {}
    failures = []
    for name, want in expected.items():
        got = outputs.get(name)
        if got is None or got.shape != want.shape:
            failures.append(f"{name}: shape {None if got is None else got.shape} != golden {want.shape}")
            continue
        errors[name] = float(np.max(np.abs(got.astype(np.float64) - want)))
        bound = atol + rtol * float(np.max(np.abs(want)))
        if errors[name] > bound:
            failures.append(f"{name}: max error {errors[name]:.3g} > {bound:.3g}")
    detail = "; ".join(failures) if failures else \
        ", ".join(f"{k} max error {v:.2g}" for k, v in errors.items())
    return SelfTestResult(passed=not failures, max_error=errors, detail=detail)


# --------------------------------------------------------------------------- device-only part
# NOT VERIFIED ON HARDWARE: everything below needs TensorRT 10 and a CUDA GPU.

def device_identity() -> tuple[str, str]:
    """(TensorRT version, compute capability "major.minor") of this machine's GPU 0."""
    try:
        import tensorrt as trt
        import pycuda.driver as cuda
    except ImportError as exc:
        raise BackendUnavailableError(
            "building engines needs TensorRT and pycuda, which ship with the Jetson device image; "
            "this machine has neither (use the onnxruntime backend here)") from exc
    try:
        cuda.init()
        if cuda.Device.count() < 1:
            raise BackendUnavailableError("no CUDA GPU present: TensorRT engines can only be built on the device")
        major, minor = cuda.Device(0).compute_capability()
    except cuda.Error as exc:
        raise BackendUnavailableError(f"CUDA driver unavailable: {exc}") from exc
    return str(trt.__version__), f"{major}.{minor}"


def _progress_monitor(trt: Any, report: Callable[[str], None]) -> Any:
    class Monitor(trt.IProgressMonitor):  # type: ignore[misc]  # tensorrt has no stubs: the base is Any
        """Prints each optimiser phase and its step count; never cancels the build."""

        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)
            self._steps: dict[str, int] = {}

        def phase_start(self, phase_name: str, parent_phase: Optional[str], num_steps: int) -> None:
            self._steps[phase_name] = num_steps
            indent = "  " if parent_phase else ""
            report(f"{indent}{phase_name}: 0/{num_steps}")

        def step_complete(self, phase_name: str, step: int) -> bool:
            total = self._steps.get(phase_name, 0)
            if total <= 20 or (step + 1) % max(total // 10, 1) == 0:
                report(f"  {phase_name}: {step + 1}/{total}")
            return True

        def phase_finish(self, phase_name: str) -> None:
            report(f"{phase_name}: done")

    return Monitor()


def build_engine(manifest: Manifest, precision: str, timing_cache: Path,
                 report: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr),
                 max_batch: int = 8) -> bytes:
    """Build a serialized engine from the package's FP32 (fp16) or QDQ (int8) ONNX model."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    # TensorRT 10 networks are always explicit-batch; flag 0 is the non-deprecated spelling.
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    onnx_path = manifest.model_path(precision)
    if not parser.parse(onnx_path.read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise InferenceError(f"{onnx_path}: TensorRT cannot parse the ONNX model: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, 1 << 30)
    config.set_flag(trt.BuilderFlag.FP16)
    if precision == "int8":
        # Explicit quantization: scales come from the QDQ nodes, no calibrator is involved.
        config.set_flag(trt.BuilderFlag.INT8)
    _, channels, height, width = manifest.input.shape
    profile = builder.create_optimization_profile()
    profile.set_shape(manifest.input.name, (1, channels, height, width), (1, channels, height, width),
                      (max_batch, channels, height, width))
    config.add_optimization_profile(profile)
    previous = timing_cache.read_bytes() if timing_cache.is_file() else b""
    cache = config.create_timing_cache(previous)
    config.set_timing_cache(cache, ignore_mismatch=False)
    monitor = _progress_monitor(trt, report)
    config.progress_monitor = monitor  # must outlive the build: kept alive by this local
    report(f"building {manifest.id} {precision} engine from {onnx_path.name} ...")
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise InferenceError(f"TensorRT failed to build the {precision} engine for {manifest.id}")
    write_atomic(timing_cache, bytes(config.get_timing_cache().serialize()))
    return bytes(plan)


def ensure_engine(manifest: Manifest, precision: str, data_dir: Path,
                  report: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr),
                  force: bool = False) -> Path:
    """A valid cached engine for this device, building (and self-testing) it when needed."""
    from .backends.tensorrt import TensorRTBackend

    trt_version, capability = device_identity()
    cache_root = Path(data_dir) / CACHE_DIR
    key = engine_key(manifest, precision, trt_version, capability)
    status = "forced" if force else cache_status(cache_root, key)
    plan_path, _ = engine_paths(cache_root, key)
    if status == "valid":
        return plan_path
    report(f"{manifest.id} {precision}: cached engine {status}, building")
    plan = build_engine(manifest, precision, timing_cache_path(cache_root, trt_version, capability), report)
    plan_path = store_engine(cache_root, key, plan)
    backend = TensorRTBackend()
    backend.load(plan_path, precision)
    result = self_test(manifest, backend, precision)
    if not result.passed:
        discard_engine(cache_root, key)
        raise InferenceError(f"{manifest.id} {precision} engine failed its self-test: {result.detail}")
    report(f"{manifest.id} {precision}: self-test passed ({result.detail})")
    return plan_path
