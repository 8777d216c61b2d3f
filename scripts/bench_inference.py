#!/usr/bin/env python3
"""Inference benchmark (issue 3): latency and throughput on this machine's CPU.

(a) The reference model packages under engines/: ONNX Runtime FP32 vs INT8 (QDQ).
(b) A CheXNet-sized network, DenseNet-121 at 224×224 with random weights (SPEED ONLY: its
    outputs mean nothing), defined below in plain torch: PyTorch eager FP32 vs ONNX Runtime
    FP32 vs ONNX Runtime INT8 (static QDQ quantization calibrated on random images, which is
    fine for timing and meaningless for accuracy).

Latency: p50/p95 of single-image (batch 1) runs.  Throughput: images/s at batch 8.  Every
configuration uses the same thread count (``--threads``, default: all cores).  Ratios are
against PyTorch eager FP32 measured in the same run.  Run: ``.venv/bin/python
scripts/bench_inference.py`` (about 2–4 minutes on 2 cores).  Output: a Markdown table on stdout.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


# --------------------------------------------------------------------------- DenseNet-121
def densenet121(num_classes: int = 14) -> Any:
    """DenseNet-121 (Huang et al. 2017; growth 32, blocks 6/12/24/16), as used by CheXNet."""
    import torch
    from torch import nn

    class DenseLayer(nn.Module):
        def __init__(self, cin: int, growth: int = 32, bottleneck: int = 4) -> None:
            super().__init__()
            self.body = nn.Sequential(
                nn.BatchNorm2d(cin), nn.ReLU(inplace=True),
                nn.Conv2d(cin, bottleneck * growth, 1, bias=False),
                nn.BatchNorm2d(bottleneck * growth), nn.ReLU(inplace=True),
                nn.Conv2d(bottleneck * growth, growth, 3, padding=1, bias=False))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.cat([x, self.body(x)], dim=1)

    def transition(cin: int) -> nn.Module:
        return nn.Sequential(nn.BatchNorm2d(cin), nn.ReLU(inplace=True),
                             nn.Conv2d(cin, cin // 2, 1, bias=False), nn.AvgPool2d(2, 2))

    layers: list[nn.Module] = [nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False), nn.BatchNorm2d(64),
                               nn.ReLU(inplace=True), nn.MaxPool2d(3, stride=2, padding=1)]
    channels = 64
    for i, count in enumerate((6, 12, 24, 16)):
        for _ in range(count):
            layers.append(DenseLayer(channels))
            channels += 32
        if i < 3:
            layers.append(transition(channels))
            channels //= 2
    layers += [nn.BatchNorm2d(channels), nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
               nn.Linear(channels, num_classes), nn.Sigmoid()]
    return nn.Sequential(*layers).eval()


def count_flops(model: Any, shape: tuple[int, ...]) -> float:
    """FLOPs of one forward pass (2 per multiply-accumulate; convolutions and linear layers)."""
    import torch
    from torch import nn

    total = [0.0]

    def conv_hook(module: nn.Conv2d, _inp: Any, out: torch.Tensor) -> None:
        kh, kw = module.kernel_size
        macs = out.numel() // out.shape[0] * (module.in_channels // module.groups) * kh * kw
        total[0] += 2.0 * macs

    def linear_hook(module: nn.Linear, _inp: Any, out: torch.Tensor) -> None:
        total[0] += 2.0 * module.in_features * module.out_features

    hooks = [m.register_forward_hook(conv_hook) for m in model.modules() if isinstance(m, nn.Conv2d)]
    hooks += [m.register_forward_hook(linear_hook) for m in model.modules() if isinstance(m, nn.Linear)]
    with torch.no_grad():
        model(torch.zeros(shape))
    for hook in hooks:
        hook.remove()
    return total[0]


# --------------------------------------------------------------------------- timing
def measure(run: Callable[[np.ndarray], Any], shape: tuple[int, ...], iters1: int, iters8: int) -> dict[str, float]:
    rng = np.random.default_rng(0)
    one = rng.standard_normal((1,) + shape[1:]).astype(np.float32)
    eight = rng.standard_normal((8,) + shape[1:]).astype(np.float32)
    for _ in range(3):
        run(one)
    times = []
    for _ in range(iters1):
        start = time.perf_counter()
        run(one)
        times.append(time.perf_counter() - start)
    run(eight)
    start = time.perf_counter()
    for _ in range(iters8):
        run(eight)
    batch_time = (time.perf_counter() - start) / iters8
    return {"p50_ms": 1000 * float(np.percentile(times, 50)), "p95_ms": 1000 * float(np.percentile(times, 95)),
            "throughput": 8.0 / batch_time}


def ort_runner(path: Path, threads: int, spin: bool = False) -> Callable[[np.ndarray], Any]:
    """The appliance's own ONNX Runtime backend; ``spin`` lets idle intra-op threads spin (ONNX
    Runtime's default; the appliance turns it off because it shares its cores)."""
    from appliance.analyze.backends.onnxruntime import OnnxRuntimeBackend

    backend = OnnxRuntimeBackend(threads=threads, spin=spin)
    backend.load(path, "int8" if "int8" in path.name else "fp32")
    import onnx

    name = [i.name for i in onnx.load(str(path), load_external_data=False).graph.input][0]
    return lambda x: backend.run({name: x})


def quantize_random(fp32: Path, out: Path, shape: tuple[int, ...], samples: int = 8) -> None:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = out.with_name("prepared.onnx")
    quant_pre_process(str(fp32), str(prepared))
    rng = np.random.default_rng(1)
    batches = [{"image": rng.standard_normal((1,) + shape[1:]).astype(np.float32)} for _ in range(samples)]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter(batches)

        def get_next(self) -> Any:
            return next(self._it, None)

    # U8 activations / S8 weights, per-channel: the combination ORT's x86 VNNI kernels are fastest on.
    quantize_static(str(prepared), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)


# --------------------------------------------------------------------------- sections
def bench_reference(threads: int, rows: list[list[str]]) -> None:
    from appliance.analyze.manifest import Manifest, discover_models

    found = discover_models(ROOT / "engines")
    if not found:
        rows.append(["(no reference packages under engines/)", "", "", "", "", ""])
    for model_id, manifest in found.items():
        if not isinstance(manifest, Manifest):
            rows.append([f"{model_id}: refused ({manifest})", "", "", "", "", ""])
            continue
        shape = tuple(manifest.input.shape)
        base = None
        for precision in ("fp32", "int8") if manifest.has_int8 else ("fp32",):
            m = measure(ort_runner(manifest.model_path(precision), threads), shape, 300, 100)
            base = base or m
            rows.append([f"{model_id} ({shape[2]}×{shape[3]})", f"ONNX Runtime {precision.upper()}",
                         f"{m['p50_ms']:.2f}", f"{m['p95_ms']:.2f}", f"{m['throughput']:.0f}",
                         f"{base['p50_ms'] / m['p50_ms']:.2f}×"])
            print(f"  {model_id} {precision}: {m}", file=sys.stderr)


def bench_densenet(threads: int, rows: list[list[str]], iters1: int, iters8: int) -> None:
    import torch

    torch.manual_seed(0)
    torch.set_num_threads(threads)
    model = densenet121()
    shape = (1, 3, 224, 224)
    gflops = count_flops(model, shape) / 1e9
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = Path(tmp) / "densenet121.onnx"
        int8 = Path(tmp) / "densenet121.int8.onnx"
        # The TorchScript exporter: the dynamo exporter needs onnxscript, which we do not ship.
        torch.onnx.export(model, torch.zeros(shape), str(fp32), input_names=["image"], output_names=["probs"],
                          dynamic_axes={"image": {0: "N"}, "probs": {0: "N"}}, opset_version=17, dynamo=False)
        print("  exported DenseNet-121; quantizing (random calibration, speed only) ...", file=sys.stderr)
        quantize_random(fp32, int8, shape)

        def eager(x: np.ndarray) -> Any:
            with torch.inference_mode():
                return model(torch.from_numpy(x))

        configs = [("PyTorch eager FP32", eager), ("ONNX Runtime FP32", ort_runner(fp32, threads)),
                   ("ONNX Runtime INT8 (QDQ)", ort_runner(int8, threads)),
                   ("ONNX Runtime INT8 (QDQ), threads spinning", ort_runner(int8, threads, spin=True))]
        base = None
        for label, run in configs:
            m = measure(run, shape, iters1, iters8)
            base = base or m
            rows.append([f"DenseNet-121 224×224, speed only ({gflops:.2f} GFLOP/img)", label,
                         f"{m['p50_ms']:.1f}", f"{m['p95_ms']:.1f}", f"{m['throughput']:.1f}",
                         f"{base['p50_ms'] / m['p50_ms']:.2f}× (b8: {m['throughput'] / base['throughput']:.2f}×); "
                         f"{gflops * 1000 / m['p50_ms']:.0f} GFLOP/s b1, {gflops * m['throughput']:.0f} b8"])
            print(f"  {label}: {m}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--iters", type=int, default=30, help="batch-1 runs for the DenseNet (default 30)")
    parser.add_argument("--skip-densenet", action="store_true")
    args = parser.parse_args(argv)
    import onnxruntime
    import torch

    rows: list[list[str]] = []
    print(f"threads={args.threads} onnxruntime={onnxruntime.__version__} torch={torch.__version__}", file=sys.stderr)
    bench_reference(args.threads, rows)
    if not args.skip_densenet:
        bench_densenet(args.threads, rows, args.iters, max(args.iters // 6, 3))
    print(f"CPU threads: {args.threads}; onnxruntime {onnxruntime.__version__}; torch {torch.__version__}\n")
    print("| model | runtime | p50 ms (b1) | p95 ms (b1) | images/s (b8) | vs first row of the model |")
    print("| --- | --- | ---: | ---: | ---: | --- |")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
