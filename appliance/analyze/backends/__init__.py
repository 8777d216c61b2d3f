"""Backend registry: which runtime executes a model on this machine.

``auto`` picks TensorRT only when ``import tensorrt`` works *and* pycuda finds a CUDA device;
everywhere else (dev machines, CI, a Jetson whose GPU is unavailable) it picks ONNX Runtime on
the CPU, which is always installed.  Asking for ``tensorrt`` explicitly where it cannot run is
an error, not a silent fallback, so a site that configured the GPU learns it is not getting it.
"""
from __future__ import annotations

import functools
import logging

from ...errors import BackendUnavailableError, ConfigError
from .base import PRECISIONS, Backend
from .onnxruntime import OnnxRuntimeBackend

log = logging.getLogger(__name__)

__all__ = ["Backend", "PRECISIONS", "OnnxRuntimeBackend", "create_backend", "gpu_present",
           "resolve_backend", "tensorrt_importable"]


def tensorrt_importable() -> bool:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False
    return True


@functools.lru_cache(maxsize=1)
def gpu_present() -> bool:
    """True when pycuda can initialise the driver and sees at least one device."""
    try:
        import pycuda.driver as cuda

        cuda.init()
        return int(cuda.Device.count()) > 0
    except Exception:  # ImportError, or pycuda's LogicError/RuntimeError without a driver
        return False


def resolve_backend(requested: str) -> str:
    """Map the configured ``analyze.backend`` (auto|onnxruntime|tensorrt) to a usable backend name."""
    if requested == "onnxruntime":
        return "onnxruntime"
    if requested == "tensorrt":
        if not tensorrt_importable():
            raise BackendUnavailableError("backend 'tensorrt' requested but TensorRT is not installed")
        if not gpu_present():
            raise BackendUnavailableError("backend 'tensorrt' requested but no CUDA GPU is present")
        return "tensorrt"
    if requested == "auto":
        chosen = "tensorrt" if tensorrt_importable() and gpu_present() else "onnxruntime"
        log.debug("backend auto -> %s", chosen)
        return chosen
    raise ConfigError(f"analyze.backend: {requested!r} is not one of auto, onnxruntime, tensorrt")


def create_backend(name: str, threads: int = 2) -> Backend:
    """An unloaded backend instance for a resolved name."""
    if name == "onnxruntime":
        return OnnxRuntimeBackend(threads=threads)
    if name == "tensorrt":
        from .tensorrt import TensorRTBackend

        return TensorRTBackend()
    raise BackendUnavailableError(f"unknown backend {name!r}")
