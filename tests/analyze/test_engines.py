"""Engine cache keys and staleness (pure Python, fake TensorRT versions and GPUs)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from appliance.analyze.commands import engines
from appliance.analyze.engines import (CACHE_DIR, EngineKey, cache_status, discard_engine, engine_key,
                                       engine_paths, store_engine, timing_cache_path)
from appliance.analyze.manifest import load_manifest
from appliance.errors import InferenceError
from tests.analyze.toy_package import MODEL_ID, build_package, toy_copy, toy_engines  # noqa: F401

TRT, ORIN = "10.3.0", "8.7"


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return tmp_path / CACHE_DIR


def test_key_uses_the_onnx_file_of_the_precision(toy_copy: Path) -> None:  # noqa: F811
    m = load_manifest(toy_copy)
    fp16 = engine_key(m, "fp16", TRT, ORIN)
    int8 = engine_key(m, "int8", TRT, ORIN)
    assert fp16.model_sha256 == m.files["model.onnx"]
    assert int8.model_sha256 == m.files["model.int8.onnx"]
    with pytest.raises(InferenceError, match="precision must be one of"):
        engine_key(m, "fp32", TRT, ORIN)


def test_int8_engine_needs_the_qdq_model(tmp_path: Path) -> None:
    m = load_manifest(build_package(tmp_path, MODEL_ID, int8=False))
    with pytest.raises(InferenceError, match="no model.int8.onnx"):
        engine_key(m, "int8", TRT, ORIN)


def test_missing_then_valid(cache: Path) -> None:
    key = EngineKey(MODEL_ID, "a" * 64, TRT, ORIN, "fp16")
    assert cache_status(cache, key) == "missing"
    plan = store_engine(cache, key, b"serialized engine")
    assert plan == cache / MODEL_ID / "fp16.plan" and plan.read_bytes() == b"serialized engine"
    assert cache_status(cache, key) == "valid"
    record = json.loads(engine_paths(cache, key)[1].read_text())
    assert record["key"]["trt_version"] == TRT and len(record["plan_sha256"]) == 64


@pytest.mark.parametrize("change,status", [
    ({"model_sha256": "b" * 64}, "stale"),          # the ONNX model was replaced
    ({"trt_version": "10.4.0"}, "foreign"),         # JetPack upgrade
    ({"compute_capability": "7.2"}, "foreign"),     # engine copied from a Xavier
])
def test_stale_and_foreign_engines_are_not_loaded(cache: Path, change: dict, status: str) -> None:
    built = EngineKey(MODEL_ID, "a" * 64, TRT, ORIN, "fp16")
    store_engine(cache, built, b"old engine")
    current = EngineKey(**{**built.__dict__, **change})
    assert cache_status(cache, current) == status


def test_corrupt_entries(cache: Path) -> None:
    key = EngineKey(MODEL_ID, "a" * 64, TRT, ORIN, "int8")
    plan, record = engine_paths(cache, key)
    store_engine(cache, key, b"engine bytes")
    plan.write_bytes(b"engine bytez")  # truncated / overwritten plan
    assert cache_status(cache, key) == "corrupt"
    record.write_text("{not json")
    assert cache_status(cache, key) == "corrupt"
    record.unlink()
    assert cache_status(cache, key) == "missing"  # a plan without its record is never trusted
    discard_engine(cache, key)
    assert not plan.exists()


def test_precisions_are_cached_separately(cache: Path) -> None:
    fp16 = EngineKey(MODEL_ID, "a" * 64, TRT, ORIN, "fp16")
    int8 = EngineKey(MODEL_ID, "c" * 64, TRT, ORIN, "int8")
    store_engine(cache, fp16, b"half")
    assert cache_status(cache, int8) == "missing" and cache_status(cache, fp16) == "valid"
    assert timing_cache_path(cache, TRT, ORIN).name == "timing-trt10.3.0-sm87.cache"


def test_engines_build_fails_clearly_without_a_gpu(toy_engines: Path, tmp_path: Path) -> None:  # noqa: F811
    config = tmp_path / "site.toml"
    config.write_text(f'[analyze]\nengines_dir = "{toy_engines}"\n[storage]\ndata_dir = "{tmp_path / "data"}"\n')
    result = CliRunner().invoke(engines, ["build", "--config", str(config)])
    assert result.exit_code != 0
    assert "cannot build TensorRT engines on this machine" in result.output
    assert "Traceback" not in result.output
