"""TensorRT 10 on the Jetson GPU (tensors by name, ``execute_async_v3``, pycuda buffers).

NOT VERIFIED ON HARDWARE: dev and CI machines have no GPU and cannot install TensorRT, so this
module is exercised only by ``scripts/device_selftest.sh`` on a Jetson.  ``tensorrt`` and
``pycuda`` are imported inside methods so that importing this module never needs them.

Buffers: one page-locked host buffer and one device buffer per I/O tensor, sized for the
largest batch seen so far and reallocated only when a bigger batch arrives.  Every run is
host->device copy, ``execute_async_v3`` and device->host copy on one CUDA stream, then a
single synchronise.  The CUDA primary context is pushed around each call so the backend works
from whichever thread the worker uses.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import BackendUnavailableError, InferenceError
from .base import Backend

log = logging.getLogger(__name__)


def _import_trt() -> Any:
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise BackendUnavailableError("TensorRT is not installed (it ships with the Jetson device image)") from exc
    return trt


class TensorRTBackend(Backend):
    """Runs a serialized TensorRT engine; ``load`` takes the engine file from the engine cache."""

    name = "tensorrt"

    def __init__(self) -> None:
        self._engine: Any = None
        self._context: Any = None
        self._cuda_ctx: Any = None
        self._stream: Any = None
        self._buffers: dict[str, tuple[Any, Any, int]] = {}  # name -> (host, device, capacity)
        self._inputs: list[str] = []
        self._outputs: list[str] = []
        self.precision = ""

    @property
    def version(self) -> str:
        return str(_import_trt().__version__)

    def load(self, model_path: Path, precision: str) -> None:
        trt = _import_trt()
        import pycuda.driver as cuda

        cuda.init()
        self._cuda_ctx = cuda.Device(0).retain_primary_context()
        self._cuda_ctx.push()
        try:
            runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
            self._engine = runtime.deserialize_cuda_engine(Path(model_path).read_bytes())
            if self._engine is None:
                raise InferenceError(f"{model_path}: TensorRT could not deserialize the engine")
            self._context = self._engine.create_execution_context()
            self._stream = cuda.Stream()
            names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
            self._inputs = [n for n in names if self._engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
            self._outputs = [n for n in names if self._engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        finally:
            self._cuda_ctx.pop()
        self.precision = precision

    @property
    def output_names(self) -> list[str]:
        return list(self._outputs)

    def _buffer(self, name: str, shape: tuple[int, ...], dtype: np.dtype) -> tuple[Any, Any]:
        import pycuda.driver as cuda

        size = int(np.prod(shape))
        host, device, capacity = self._buffers.get(name, (None, None, 0))
        if size > capacity:
            host = cuda.pagelocked_empty(size, dtype)
            device = cuda.mem_alloc(host.nbytes)
            self._buffers[name] = (host, device, size)
        return host, device

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._context is None:
            raise InferenceError("tensorrt backend used before load()")
        trt = _import_trt()
        import pycuda.driver as cuda

        self._cuda_ctx.push()
        try:
            staged = []
            for name in self._inputs:
                if name not in inputs:
                    raise InferenceError(f"missing input tensor {name!r}")
                dtype = np.dtype(trt.nptype(self._engine.get_tensor_dtype(name)))
                array = np.ascontiguousarray(inputs[name], dtype=dtype)
                if not self._context.set_input_shape(name, array.shape):
                    raise InferenceError(f"input {name!r} shape {array.shape} is outside the engine's profile")
                host, device = self._buffer(name, array.shape, dtype)
                host[:array.size] = array.reshape(-1)
                cuda.memcpy_htod_async(device, host, self._stream)
                self._context.set_tensor_address(name, int(device))
                staged.append(name)
            results = []
            for name in self._outputs:
                shape = tuple(self._context.get_tensor_shape(name))
                dtype = np.dtype(trt.nptype(self._engine.get_tensor_dtype(name)))
                host, device = self._buffer(name, shape, dtype)
                self._context.set_tensor_address(name, int(device))
                results.append((name, shape, host))
            if not self._context.execute_async_v3(stream_handle=self._stream.handle):
                raise InferenceError("TensorRT execute_async_v3 failed")
            for name, _shape, host in results:
                cuda.memcpy_dtoh_async(host, self._buffers[name][1], self._stream)
            self._stream.synchronize()
            return {name: np.array(host[:int(np.prod(shape))]).reshape(shape).astype(np.float32)
                    for name, shape, host in results}
        except cuda.Error as exc:
            raise InferenceError(f"CUDA error during TensorRT inference: {exc}") from exc
        finally:
            self._cuda_ctx.pop()
