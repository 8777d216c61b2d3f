"""The worker in-process: transient failures back off and retry; re-analysis keeps both versions."""
from __future__ import annotations

import re
import shutil

import pytest

from appliance.config import PROJECT_ROOT, load_config
from appliance.db import open_database
from appliance.pipeline import Pipeline
from appliance.store import InstanceStore
from tests.helpers import paediatric_sample_bytes, run_cli, sample


@pytest.fixture
def box(tmp_path):
    engines = tmp_path / "engines"
    shutil.copytree(PROJECT_ROOT / "engines", engines)
    config = load_config(overrides={"storage.data_dir": str(tmp_path / "data"), "analyze.engines_dir": str(engines),
                                    "storage.min_free_mb": 0}, environ={})
    database = open_database(config.data_dir)
    store = InstanceStore(config.data_dir, database, 0)
    return config, database, store, Pipeline(config, database, store)


def test_result_comes_first_objects_follow_with_backoff(box):
    config, database, store, pipeline = box
    store.store(paediatric_sample_bytes())
    store.min_free_mb = 10**9  # the AI objects cannot be written: a transient condition
    assert pipeline.analysis.run_once()  # the analysis itself needs no disk space: its result is committed
    result = database.query("SELECT * FROM analysis_results")[0]
    assert result["status"] == "analyzed" and result["objects_state"] == "pending" and result["sr_path"] == ""
    assert database.query("SELECT priority FROM studies")[0]["priority"] in ("urgent", "routine")

    assert not pipeline.analysis.run_once()  # no analysis left
    assert pipeline.objects.build_once()  # building the objects fails and backs off
    result = database.query("SELECT * FROM analysis_results")[0]
    assert result["objects_state"] == "pending" and result["objects_attempts"] == 1
    assert "OutOfSpaceError" in result["objects_error"] and result["objects_next_at"] > result["created_at"]
    assert not pipeline.objects.build_once()  # not before its backoff expires

    store.min_free_mb = 0
    with database.atomic() as tx:
        tx.execute("UPDATE analysis_results SET objects_next_at = ''")
    assert pipeline.objects.build_once()
    result = database.query("SELECT * FROM analysis_results")[0]
    assert result["objects_state"] == "done" and result["sr_path"] and result["heatmap_path"]
    assert database.query("SELECT COUNT(*) AS n FROM instances WHERE source = 'ai'")[0]["n"] == 2


def test_objects_that_keep_failing_are_marked_failed(box):
    config, database, store, pipeline = box
    pipeline.objects.max_attempts = 2
    store.store(paediatric_sample_bytes())
    store.min_free_mb = 10**9
    pipeline.analysis.run_once()
    pipeline.objects.build_once()
    with database.atomic() as tx:
        tx.execute("UPDATE analysis_results SET objects_next_at = ''")
    pipeline.objects.build_once()
    result = database.query("SELECT * FROM analysis_results")[0]
    assert result["objects_state"] == "failed" and "OutOfSpaceError" in result["objects_error"]
    assert database.query("SELECT state FROM instances")[0]["state"] == "analyzed"  # the finding stands


def test_reanalysis_with_newer_model_version_keeps_both(box, tmp_path):
    config, database, store, pipeline = box
    outcome = store.store(paediatric_sample_bytes())
    pipeline.run_until_idle()
    manifest = config.analyze.engines_dir / "cxr-pneumonia" / "manifest.toml"
    text = open(manifest).read()
    version = re.search(r'^version = "([^"]+)"', text, re.M).group(1)
    open(manifest, "w").write(text.replace(f'version = "{version}"', 'version = "99.0.0"', 1))
    env = {"APPLIANCE_ANALYZE_ENGINES_DIR": str(config.analyze.engines_dir), "APPLIANCE_STORAGE_MIN_FREE_MB": "0"}
    result = run_cli("analyze", "--study", outcome.study_uid, "--data-dir", str(config.data_dir), env=env)
    assert result.returncode == 0, result.stderr
    assert f"cxr-pneumonia {version}: 1 analyzed" in result.stdout
    assert "cxr-pneumonia 99.0.0: 1 analyzed" in result.stdout
    # Running it again with nothing new adds nothing.
    again = run_cli("analyze", "--study", outcome.study_uid, "--data-dir", str(config.data_dir), env=env)
    assert again.stdout.count("analyzed") == 2
    unknown = run_cli("analyze", "--study", "1.2.3", "--data-dir", str(config.data_dir), env=env)
    assert unknown.returncode != 0 and "no study 1.2.3" in unknown.stderr


def test_models_are_loaded_before_the_first_image(box):
    """The first image of the day does not wait for its model to be verified and loaded; a
    package that cannot load is left to its cases (they record why)."""
    from appliance.analyze import runner

    config, database, store, pipeline = box
    onnx = config.analyze.engines_dir / "us-breast-lesion" / "model.onnx"
    onnx.write_bytes(onnx.read_bytes()[:-64] + b"\0" * 64)  # fails its sha256 check
    assert pipeline.analysis.warm_up() == ["cxr-pneumonia"]
    loaded = {key[1] for key in runner._RUNNERS if key[0] == str(config.analyze.engines_dir)}
    assert loaded == {"cxr-pneumonia"}
    store.store(paediatric_sample_bytes())
    store.store(sample("US1_UNCR.dcm").read_bytes())
    pipeline.analysis.run_until_idle()
    states = {r["model_id"]: (r["status"], r["error"]) for r in database.query("SELECT * FROM analysis_results")}
    assert states["cxr-pneumonia"][0] == "analyzed"
    assert states["us-breast-lesion"][0] == "failed" and "sha256" in states["us-breast-lesion"][1]


def test_a_result_analysed_under_an_analyse_policy_carries_its_note(box):
    """A model whose manifest says unknown_age = "analyse" analyses an image of unknown age, and
    the result says so wherever it is read: the row, `studies --json`, the objects' input."""
    import io

    import pydicom

    from appliance.analyze.result import AnalysisResult
    from appliance.catalog import list_studies

    config, database, store, pipeline = box
    manifest = config.analyze.engines_dir / "cxr-pneumonia" / "manifest.toml"
    text = manifest.read_text()
    assert 'unknown_age = "abstain"' in text
    manifest.write_text(text.replace('unknown_age = "abstain"', 'unknown_age = "analyse"', 1))
    ds = pydicom.dcmread(sample("RG1_UNCR.dcm"))
    del ds.PatientBirthDate  # and no Patient's Age: the age is unknown
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    store.store(buffer.getvalue())
    pipeline.run_until_idle()
    (row,) = database.query("SELECT * FROM analysis_results")
    assert row["status"] == "analyzed"
    (note,) = AnalysisResult.from_record(row).notes
    assert note.startswith("analysed although the patient's age is unknown (no Patient's Age, and no birth date)")
    assert "children aged 1–5 years" in note
    images = [i for s in list_studies(database) for series in s["series"] for i in series["instances"]
              if i["source"] == "dicom"]
    assert [[f["notes"] for f in i["findings"]] for i in images] == [[[note]]]
