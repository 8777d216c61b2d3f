"""One inference per image and model: the heatmap SC comes from the run that gave the score.

In process, with the real toy ONNX packages (tests/analyze/toy_package.py) on ONNX Runtime: the
backend each runner loads is wrapped so every ``run`` is counted per model, and every image goes
through the whole pipeline (analysis, then SR and heatmap SC).
"""
from __future__ import annotations

import io
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest

from appliance.analyze import runner as runner_module
from appliance.analyze.backends import Backend, create_backend
from appliance.analyze.result import AnalysisResult
from appliance.analyze.worker import enqueue_study
from appliance.config import load_config
from appliance.db import open_database
from appliance.pipeline import Pipeline
from appliance.results.secondary_capture import annotation_lines, burn_in
from appliance.store import InstanceStore
from tests.analyze.toy_package import MODEL_ID, US_MODEL_ID, toy_engines  # noqa: F401
from tests.helpers import resized_copy, sample, write_fresh_copies


class CountingBackend(Backend):
    """The real backend, with every run counted under the model it runs."""

    def __init__(self, inner: Backend, runs: Counter) -> None:
        self.inner = inner
        self.runs = runs
        self.model = ""
        self.name = inner.name

    @property
    def version(self) -> str:
        return self.inner.version

    def load(self, model_path: Path, precision: str) -> None:
        self.model = Path(model_path).parent.name  # engines_dir/<model id>/model.onnx
        self.inner.load(model_path, precision)

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.runs[self.model] += 1
        return self.inner.run(inputs)

    @property
    def output_names(self) -> list[str]:
        return self.inner.output_names


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> Counter:
    runs: Counter = Counter()
    real = create_backend
    monkeypatch.setattr(runner_module, "create_backend", lambda name, threads=2: CountingBackend(real(name, threads),
                                                                                                  runs))
    monkeypatch.setattr(runner_module, "_RUNNERS", {})  # runners loaded from here on are counted
    return runs


def test_every_image_is_inferred_once_per_model_and_its_heatmap_comes_from_that_run(
        toy_engines: Path, counted: Counter, tmp_path: Path) -> None:  # noqa: F811
    config = load_config(overrides={"storage.data_dir": str(tmp_path / "data"), "storage.min_free_mb": 0,
                                    "analyze.engines_dir": str(toy_engines), "analyze.backend": "onnxruntime"},
                         environ={})
    database = open_database(config.data_dir)
    store = InstanceStore(config.data_dir, database, 0)
    # Two chest CRs (two studies), an ultrasound clip of 120 frames, and a CT no toy model is for.
    chests = write_fresh_copies([resized_copy(pydicom.dcmread(sample("RG1_UNCR.dcm")), 512)] * 2, tmp_path / "cr")
    stored = [store.store(p.read_bytes(), source="dicom") for p in
              [*chests, sample("color3d_jpeg_baseline.dcm"), sample("CT_small.dcm")]]
    Pipeline(config, database, store).run_until_idle(timeout_s=300)

    rows = database.query("SELECT * FROM analysis_results ORDER BY id")
    inferred = Counter(r["model_id"] for r in rows if r["status"] == "analyzed")
    assert inferred == {MODEL_ID: 2, US_MODEL_ID: 1}, [(r["model_id"], r["status"], r["abstention_code"]) for r in rows]
    assert counted == inferred  # exactly one backend run per model per image: none for the objects
    for r in rows:
        if r["status"] == "analyzed":
            assert (r["objects_state"], bool(r["sr_path"]), bool(r["heatmap_path"])) == ("done", True, True), r

    # The heatmap SC shows the overlay the analysing run itself draws (the model, run once more
    # here, outside the pipeline, is deterministic).
    for r in rows:
        if r["status"] != "analyzed":
            continue
        data = Path(database.query("SELECT file_path FROM instances WHERE sop_instance_uid = ?",
                                   (r["sop_instance_uid"],))[0]["file_path"]).read_bytes()
        fresh = runner_module.get_runner(r["model_id"], config).analyze(data, frame=r["frame_index"])
        sc = pydicom.dcmread(r["heatmap_path"])
        assert fresh.heatmap is not None and sc.pixel_array.shape == fresh.heatmap.shape
        np.testing.assert_array_equal(sc.pixel_array, burn_in(fresh.heatmap, annotation_lines(fresh)))
        assert AnalysisResult.from_record(r).heatmap_finding == fresh.heatmap_finding
    counted.clear()

    # Re-analysis of a study whose images the installed models have already read: no run at all.
    assert enqueue_study(database, stored[0].study_uid) == 1
    Pipeline(config, database, store).run_until_idle(stored[0].study_uid, timeout_s=120)
    assert counted == {}


def test_a_result_recorded_then_rebuilt_is_the_result(toy_engines: Path, tmp_path: Path) -> None:  # noqa: F811
    config = load_config(overrides={"storage.data_dir": str(tmp_path / "data"), "analyze.engines_dir": str(toy_engines),
                                    "analyze.backend": "onnxruntime"}, environ={})
    data = sample("RG1_UNCR.dcm").read_bytes()
    result = runner_module.get_runner(MODEL_ID, config).analyze(data)
    row: dict[str, Any] = {**result.record(), "id": 1}
    rebuilt = AnalysisResult.from_record(row)
    assert rebuilt.findings == result.findings and rebuilt.frame_index == 0 == result.frame_index
    assert rebuilt.ood_distance == result.ood_distance is not None
    assert rebuilt.fingerprint == result.fingerprint and rebuilt.fingerprint["manufacturer"] == "Philips Medical Systems"
    assert rebuilt.heatmap_evidence is not None and result.heatmap_evidence is not None
    np.testing.assert_array_equal(rebuilt.heatmap_evidence.cam, result.heatmap_evidence.cam)
    assert rebuilt.heatmap_evidence.crop == result.heatmap_evidence.crop
    header = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    assert header.SOPInstanceUID  # the record holds no image: the results stage reads the source itself
