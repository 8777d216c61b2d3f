#!/usr/bin/env bash
# Device self-test (Jetson): build TensorRT engines for every model package, self-test them
# against the golden outputs (done by `engines build` after every build), then print a latency
# table TensorRT vs ONNX Runtime.  Run on the device after installing or updating models:
#
#     scripts/device_selftest.sh [--config /etc/appliance/appliance.toml]
#
# Exits non-zero, with a message, on a machine without TensorRT or a CUDA GPU, and when any
# engine fails to build or to match its golden outputs.
# NOT VERIFIED ON HARDWARE: written against JetPack 6 (TensorRT 10.3, CUDA 12.6, Python 3.10).
set -euo pipefail

cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] && PY="${PYTHON:-.venv/bin/python}"
CONFIG_ARGS=("$@")

fail() { echo "device_selftest: $*" >&2; exit 1; }

"$PY" - <<'PYEOF' || fail "TensorRT and a CUDA GPU are required (this is the Jetson self-test; on other machines use the onnxruntime backend)"
import sys
try:
    import tensorrt, pycuda.driver as cuda
    cuda.init()
    ok = cuda.Device.count() > 0
except Exception as exc:  # ImportError or no driver
    print(f"  {type(exc).__name__}: {exc}", file=sys.stderr)
    ok = False
sys.exit(0 if ok else 1)
PYEOF

echo "== building engines (each build is followed by its golden self-test)"
"$PY" -m appliance.cli engines build "${CONFIG_ARGS[@]}" || fail "engine build or self-test failed (see above)"

echo "== latency (batch 1, 100 runs after 10 warm-up runs)"
"$PY" - "${CONFIG_ARGS[@]}" <<'PYEOF'
import sys, time
import numpy as np
from appliance.config import load_config
from appliance.analyze.manifest import Manifest, discover_models
from appliance.analyze.runner import ModelRunner

args = sys.argv[1:]
config = load_config(args[args.index("--config") + 1] if "--config" in args else None)
rows = []
for model_id, manifest in discover_models(config.analyze.engines_dir).items():
    if not isinstance(manifest, Manifest):
        print(f"{model_id}: refused: {manifest}", file=sys.stderr)
        continue
    x = np.random.default_rng(0).standard_normal(manifest.input.shape).astype(np.float32)
    combos = [("onnxruntime", "fp32"), ("tensorrt", "fp16")]
    if manifest.has_int8:
        combos += [("onnxruntime", "int8"), ("tensorrt", "int8")]
    for backend, precision in combos:
        runner = ModelRunner.load(manifest, backend=backend, precision=precision,
                                  threads=int(config.analyze.threads), data_dir=config.data_dir)
        for _ in range(10):
            runner.infer(x)
        times = []
        for _ in range(100):
            t = time.perf_counter(); runner.infer(x); times.append(time.perf_counter() - t)
        rows.append((model_id, backend, precision, 1000 * np.percentile(times, 50), 1000 * np.percentile(times, 95)))
print(f"{'model':24} {'backend':12} {'prec':5} {'p50 ms':>8} {'p95 ms':>8}")
for r in rows:
    print(f"{r[0]:24} {r[1]:12} {r[2]:5} {r[3]:8.2f} {r[4]:8.2f}")
PYEOF
echo "== device self-test passed"
