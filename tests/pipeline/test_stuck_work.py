"""Work never stuck (issue 11, point 5).

Two real images used to block their studies forever: a multi-frame ultrasound with an empty
Number of Frames left its analysis job ``running``, a chest CR whose Patient's Name holds a
backslash left its AI objects ``building``.  Here they end analysed or failed with a reason, are
forwarded to a real Orthanc with what exists, and a job or an object build that keeps taking the
process down (SIGKILL mid-inference) is failed after ``analyze.max_attempts`` instead of running
the same crash at every start.
"""
from __future__ import annotations

import copy
import io
import json
import logging
import re
import shutil
import sqlite3
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx
import pydicom
import pytest
from onnx import TensorProto, helper, numpy_helper
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.uid import generate_uid

from appliance.analyze import worker as worker_module
from appliance.analyze.runner import ModelRunner
from appliance.catalog import list_studies
from appliance.config import PROJECT_ROOT, load_config
from appliance.db import Database, open_database
from appliance.forward import outbox, study_forwarding
from appliance.pipeline import Pipeline
from appliance.results import worker as results_worker
from appliance.store import InstanceStore
from tests.analyze.toy_package import build_package, toy_graph, write_manifest
from tests.forward.conftest import PASSWORD, orthanc_factory  # noqa: F401 - the shared Orthanc fixture
from tests.forward.util import box_env, destination_toml, outbox_json, small_chest, wait_confirmed, write_config
from tests.helpers import dcmsend, paediatric_sample_bytes, sample
from tests.pipeline.test_pipeline_e2e import studies

NAME = b"Quimby\\Zebedee"  # the backslash is DICOM's value delimiter: two names where one belongs
CONFORMED_NAME = "Quimby Zebedee"
FRAMES_REASON = "Number of Frames is empty but the pixel data holds 120 frames"
RULE = '[[forward_rules]]\nwhen = "analyzed"\nto = "hub"\n'
SLOW_MODEL = "toy-slow"
SLOW_TRIPS = 500  # matrix products per inference: seconds on this CPU, minutes on none


# -- the two images -------------------------------------------------------------------------
def _with_raw(ds: pydicom.Dataset, keyword: str, value: bytes) -> pydicom.Dataset:
    """``ds`` with ``keyword`` holding ``value`` exactly as a modality wrote it, new UIDs."""
    tag = tag_for_keyword(keyword)
    value = value + b" " if len(value) % 2 else value
    ds = copy.deepcopy(ds)  # Dataset.copy() would share the elements with the caller's dataset
    ds[tag] = RawDataElement(tag, dictionary_VR(tag), len(value), value, 0, False, True)
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    return ds


def _save(ds: pydicom.Dataset, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, implicit_vr=False, little_endian=True)
    return path


def stuck_ultrasound(path: Path) -> Path:
    """The 120-frame ultrasound clip (JPEG baseline) with an empty Number of Frames."""
    return _save(_with_raw(pydicom.dcmread(sample("color3d_jpeg_baseline.dcm")), "NumberOfFrames", b""), path)


def stuck_chest(path: Path, size: int = 384) -> Path:
    """The RG1 chest CR (area-resized so it runs quickly) with a backslash in Patient's Name."""
    return _save(_with_raw(small_chest(size), "PatientName", NAME), path)


def uid_of(path: Path, keyword: str = "SOPInstanceUID") -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).get(keyword))


# -- reading the box from outside -------------------------------------------------------------
def query(data_dir: Path, sql: str, params: tuple = ()) -> list[tuple]:
    conn = sqlite3.connect(data_dir / "appliance.db", timeout=30)
    try:
        return conn.execute(sql, params).fetchall()
    except sqlite3.OperationalError:
        return []  # not created or migrated yet
    finally:
        conn.close()


def wait_for(check: Callable[[], bool], what: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not in {timeout}s: {what}")
        time.sleep(0.05)


def job(data_dir: Path, sop: str) -> tuple:
    rows = query(data_dir, "SELECT state, attempts FROM analysis_jobs WHERE sop_instance_uid = ?", (sop,))
    return rows[0] if rows else ()


def objects_of(data_dir: Path, sop: str) -> tuple:
    rows = query(data_dir, "SELECT objects_state, objects_attempts FROM analysis_results WHERE sop_instance_uid = ? "
                 "AND model_id = ?", (sop, SLOW_MODEL))
    return rows[0] if rows else ()


def image_report(report: list[dict[str, Any]], sop: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(study, instance) of ``sop`` in `appliance studies --json`."""
    for study in report:
        for series in study["series"]:
            for instance in series["instances"]:
                if instance["sop_instance_uid"] == sop:
                    return study, instance
    raise AssertionError(f"{sop} not in the report")


def hub_files(hub: Any) -> dict[str, bytes]:
    """SOP Instance UID -> the bytes the hub stored."""
    out = {}
    for orthanc_id in hub.instance_ids():
        data = hub.instance_file(orthanc_id)
        out[str(pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).SOPInstanceUID)] = data
    return out


def assert_no_name_in_log(log_path: Path) -> None:
    log = log_path.read_text(errors="replace")
    for part in NAME.decode().split("\\"):
        assert not re.search(rf"(?<![A-Za-z]){part}(?![A-Za-z])", log), "a patient name reached the log"


# -- end to end -------------------------------------------------------------------------------
def test_stuck_images_end_with_a_reason_and_are_forwarded(tmp_path, server_factory, orthanc_factory):
    hub = orthanc_factory().start()
    config = write_config(tmp_path / "site.toml", destination_toml("hub", "dicomweb", hub, deidentify=False), RULE)
    server = server_factory(config_file=config, extra_env=box_env(PASSWORD, ("hub",))).start()
    us, chest = stuck_ultrasound(tmp_path / "in" / "us.dcm"), stuck_chest(tmp_path / "in" / "cr.dcm")
    assert dcmsend(server.dicom_port, [us, chest]).returncode == 0
    wait_confirmed(server.data_dir, 2, timeout=240)

    report = studies(server.data_dir)
    us_study, us_image = image_report(report, uid_of(us))
    assert us_image["state"] == "failed" and not us_image["objects_pending"]
    assert [e["model"] for e in us_image["errors"]] == ["us-breast-lesion"]
    assert FRAMES_REASON in us_image["errors"][0]["error"]
    assert len(us_study["notes"]) == 1 and us_study["notes"][0].startswith("analysis failed (us-breast-lesion ")
    assert FRAMES_REASON in us_study["notes"][0]
    assert [(f["stage"], f["sop_instance_uid"]) for f in us_study["failures"]] == [("analysis", uid_of(us))]

    cr_study, cr_image = image_report(report, uid_of(chest))
    assert cr_image["state"] in ("analyzed", "abstained") and cr_image["errors"] == [], cr_image
    assert len(cr_image["sr"]) == 1 and cr_study["notes"] == [] and cr_study["failures"] == []
    sr = pydicom.dcmread(cr_image["sr"][0]["path"])
    assert str(sr.PatientName) == CONFORMED_NAME and sr.StudyInstanceUID == uid_of(chest, "StudyInstanceUID")
    assert {s for (s,) in query(server.data_dir, "SELECT state FROM analysis_jobs")} == {"done"}
    assert {a for (a,) in query(server.data_dir, "SELECT attempts FROM analysis_jobs")} == {1}

    held = hub_files(hub)
    ai = [i["sop_instance_uid"] for i in cr_image["sr"] + cr_image["heatmaps"]]
    assert set(held) == {uid_of(us), uid_of(chest), *ai}
    assert NAME in held[uid_of(chest)]  # the clinic's image goes as it came: the source is untouched
    assert pydicom.dcmread(io.BytesIO(held[uid_of(us)])).PixelData == pydicom.dcmread(us).PixelData  # every frame
    # The study view's forwarding status says what the hub got without.
    site = load_config(config, overrides={"storage.data_dir": str(server.data_dir)}, environ={})
    database = Database(server.data_dir / "appliance.db")
    assert [i["notes"] for i in study_forwarding(database, cr_study["study_uid"], site)] == [[]]
    assert [i["notes"] for i in study_forwarding(database, us_study["study_uid"], site)] == [us_study["notes"]]
    database.close()
    assert_no_name_in_log(server.log_path)


def slow_graph(trips: int, size: int = 768) -> onnx.ModelProto:
    """The toy chest model plus ``trips`` products of ``size``² matrices that change nothing: an
    inference long enough to kill the process in the middle of it."""
    model = toy_graph()
    graph = model.graph
    for node in graph.node:
        if node.output[0] == "probs":
            node.output[0] = "probs_fast"
    square = [size, size]
    body = helper.make_graph(
        [helper.make_node("MatMul", ["a_in", "slow_w"], ["product"]), helper.make_node("Tanh", ["product"], ["a_out"]),
         helper.make_node("Identity", ["cond_in"], ["cond_out"])], "grind",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("a_in", TensorProto.FLOAT, square)],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("a_out", TensorProto.FLOAT, square)])
    weights = (np.random.default_rng(0).standard_normal(square) / np.sqrt(size)).astype(np.float32)
    graph.initializer.extend([
        numpy_helper.from_array(weights, "slow_w"), numpy_helper.from_array(np.array(trips, np.int64), "slow_trips"),
        numpy_helper.from_array(np.array(True), "slow_cond"),
        numpy_helper.from_array(np.array(square, np.int64), "slow_shape"),
        numpy_helper.from_array(np.zeros((1,), np.float32), "slow_zero")])
    # The grind depends on the input, so ONNX Runtime cannot fold it away at load time.
    graph.node.extend([
        helper.make_node("ReduceMean", ["image"], ["slow_mean"], keepdims=0),
        helper.make_node("Expand", ["slow_mean", "slow_shape"], ["slow_start"]),
        helper.make_node("Loop", ["slow_trips", "slow_cond", "slow_start"], ["slow_end"], body=body),
        helper.make_node("ReduceMean", ["slow_end"], ["slow_sum"], keepdims=0),
        helper.make_node("Mul", ["slow_sum", "slow_zero"], ["slow_nothing"]),
        helper.make_node("Add", ["probs_fast", "slow_nothing"], ["probs"])])
    onnx.checker.check_model(model)
    return model


@pytest.fixture(scope="module")
def slow_engines(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A chest model that takes seconds per image, beside the real ultrasound model."""
    root = tmp_path_factory.mktemp("slow-engines")
    package = build_package(root, SLOW_MODEL, "cxr", int8=False)
    onnx.save(slow_graph(SLOW_TRIPS), str(package / "model.onnx"))
    write_manifest(package, SLOW_MODEL)
    shutil.copytree(PROJECT_ROOT / "engines" / "us-breast-lesion", root / "us-breast-lesion")
    return root


def test_crashes_across_restarts_are_bounded_then_failed_and_forwarded(tmp_path, server_factory, orthanc_factory,
                                                                      slow_engines):
    hub = orthanc_factory().start()
    config = write_config(tmp_path / "site.toml", destination_toml("hub", "dicomweb", hub, deidentify=False), RULE)
    env = {**box_env(PASSWORD, ("hub",)), "APPLIANCE_ANALYZE_ENGINES_DIR": str(slow_engines),
           "APPLIANCE_ANALYZE_MAX_ATTEMPTS": "2"}
    server = server_factory(config_file=config, extra_env=env).start()
    killed_running = stuck_chest(tmp_path / "in" / "a.dcm")  # killed while analysed
    # Killed while its AI objects are built.  They come from the recorded result (the model does
    # not run again), so B is nearly full size: drawing and writing its heatmap SC takes long
    # enough (about 0.3 s) to be seen 'building'.
    killed_building = stuck_chest(tmp_path / "in" / "b.dcm", size=1536)
    us = stuck_ultrasound(tmp_path / "in" / "us.dcm")
    a, b, u = uid_of(killed_running), uid_of(killed_building), uid_of(us)
    data = server.data_dir
    # The ultrasound first and on its own, so that no kill below can land during its job.
    assert dcmsend(server.dicom_port, [us]).returncode == 0
    wait_for(lambda: job(data, u) == ("done", 1), "the ultrasound's job done")
    assert dcmsend(server.dicom_port, [killed_running, killed_building]).returncode == 0

    # Every attempt at A dies with the process; the attempt was counted before it ran.
    for attempt in (1, 2):
        wait_for(lambda: job(data, a) == ("running", attempt), f"A running, attempt {attempt}")
        server.kill()
        server.start()
    wait_for(lambda: job(data, a) == ("failed", 2), "A failed after 2 attempts")
    # B's analysis completes; building its objects then dies with the process, twice.
    for attempt in (1, 2):
        wait_for(lambda: objects_of(data, b) == ("building", attempt), f"B's objects building, attempt {attempt}")
        server.kill()
        server.start()
    wait_for(lambda: objects_of(data, b) == ("failed", 2), "B's objects failed after 2 attempts")
    wait_confirmed(data, 3, timeout=240)
    server.stop()  # a clean start later runs nothing again: every state is final
    server.start()
    time.sleep(2)

    assert job(data, a) == ("failed", 2) and job(data, b) == ("done", 1) and job(data, u) == ("done", 1)
    assert objects_of(data, b) == ("failed", 2)
    report = studies(data)
    study_a, image_a = image_report(report, a)
    assert image_a["state"] == "failed"
    assert study_a["notes"] == [
        "analysis failed: Interrupted: the appliance stopped 2 times while analysing this image (a crash or a kill); "
        "not tried again"]
    study_b, image_b = image_report(report, b)
    assert image_b["state"] == "analyzed" and [f["model"] for f in image_b["findings"]] == [SLOW_MODEL]
    assert image_b["sr"] == [] and image_b["heatmaps"] == [] and not image_b["objects_pending"]
    assert study_b["notes"] == [
        f"AI objects failed ({SLOW_MODEL} 0.0.1): Interrupted: the appliance stopped 2 times while building the "
        "AI objects of this result (a crash or a kill); not tried again"]
    study_u, image_u = image_report(report, u)
    assert image_u["state"] == "failed" and FRAMES_REASON in study_u["notes"][0]

    # Forwarded with what exists, and the outbox says what is missing.
    assert set(hub_files(hub)) == {a, b, u}
    items = {i["study_uid"]: i for i in outbox_json(data, config, "--all")["items"]}
    assert {i["state"] for i in items.values()} == {"confirmed"}
    assert items[study_b["study_uid"]]["instances"]["total"] == 1
    site = load_config(config, overrides={"storage.data_dir": str(data)}, environ={})
    database = Database(data / "appliance.db")
    assert [i["notes"] for i in study_forwarding(database, study_b["study_uid"], site)] == [study_b["notes"]]
    database.close()
    (detail,) = [json.loads(d) for (d,) in query(data, "SELECT detail FROM events WHERE kind = 'forwarded' AND "
                                                       "study_uid = ?", (study_b["study_uid"],))]
    assert detail["notes"] == study_b["notes"]
    assert_no_name_in_log(server.log_path)


# -- in process: whatever is raised, the job or the row ends with a reason --------------------
@pytest.fixture
def box(tmp_path):
    config_file = write_config(tmp_path / "site.toml", '[[destinations]]\nname = "hub"\nkind = "dicomweb"\n'
                               'url = "http://127.0.0.1:9/dicom-web"\n')
    config = load_config(config_file, overrides={"storage.data_dir": str(tmp_path / "data"),
                                                 "storage.min_free_mb": 0}, environ={})
    database = open_database(config.data_dir)
    store = InstanceStore(config.data_dir, database, 0)
    return config, database, store, Pipeline(config, database, store)


class Odd(BaseException):
    """Not an Exception: what a careless library (or a C extension) may still raise."""


def _raise(exc: BaseException) -> Callable[..., Any]:
    def fail(*_args: Any, **_kwargs: Any) -> Any:
        raise exc
    return fail


def test_any_exception_from_the_model_runner_fails_that_result_with_the_reason(box, monkeypatch, caplog):
    config, database, store, pipeline = box
    outcome = store.store(paediatric_sample_bytes())
    monkeypatch.setattr(ModelRunner, "analyze", _raise(RuntimeError("cannot handle Zebedee's image")))
    with caplog.at_level(logging.INFO):
        assert pipeline.analysis.run_once()
    (row,) = database.query("SELECT * FROM analysis_results")
    assert (row["model_id"], row["status"]) == ("cxr-pneumonia", "failed")
    assert row["error"] == "analysis failed: RuntimeError: cannot handle Zebedee's image"
    assert database.query("SELECT state, attempts FROM analysis_jobs") == [{"state": "done", "attempts": 1}]
    assert database.query("SELECT state FROM instances")[0]["state"] == "failed"
    (study,) = list_studies(database)
    assert study["notes"] == [f"analysis failed (cxr-pneumonia {row['model_version']}): {row['error']}"]
    assert "RuntimeError" in caplog.text and "Zebedee" not in caplog.text  # the type, never the message
    pipeline.analysis.quiet_s = 0
    assert pipeline.analysis.settle_quiet_studies() == 1  # nothing outstanding: the study settles (and may be forwarded)
    assert database.query("SELECT settled_at FROM studies WHERE study_uid = ?", (outcome.study_uid,))[0]["settled_at"]


def test_an_exception_outside_the_models_fails_the_job_with_the_reason(box, monkeypatch):
    config, database, store, pipeline = box
    store.store(paediatric_sample_bytes())
    monkeypatch.setattr(worker_module, "route", _raise(Odd("routing table upside down")))
    assert pipeline.analysis.run_once()
    (job_row,) = database.query("SELECT state, attempts, last_error FROM analysis_jobs")
    assert job_row == {"state": "failed", "attempts": 1, "last_error": "Odd: routing table upside down"}
    assert database.query("SELECT state FROM instances")[0]["state"] == "failed"
    assert database.query("SELECT state, priority FROM studies") == [{"state": "analyzed", "priority": "not_analyzed"}]
    (study,) = list_studies(database)
    assert study["notes"] == ["analysis failed: Odd: routing table upside down"]
    assert not pipeline.analysis.run_once()  # nothing left, nothing re-run


def test_a_kill_mid_job_counts_and_recovery_fails_it_after_max_attempts(box, monkeypatch):
    config, database, store, pipeline = box
    pipeline.analysis.max_attempts = 2
    store.store(paediatric_sample_bytes())
    # KeyboardInterrupt stands for the process ending mid-job: it is not caught, the job stays running.
    monkeypatch.setattr(worker_module, "route", _raise(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        pipeline.analysis.run_once()
    assert database.query("SELECT state, attempts FROM analysis_jobs") == [{"state": "running", "attempts": 1}]
    assert pipeline.analysis.recover() == 1  # under the bound: back to pending
    with pytest.raises(KeyboardInterrupt):
        pipeline.analysis.run_once()
    assert pipeline.analysis.recover() == 0  # at the bound: failed, not re-queued
    (job_row,) = database.query("SELECT state, attempts, last_error FROM analysis_jobs")
    assert (job_row["state"], job_row["attempts"]) == ("failed", 2)
    assert job_row["last_error"].startswith("Interrupted: the appliance stopped 2 times while analysing this image")
    assert database.query("SELECT state FROM instances")[0]["state"] == "failed"
    assert not pipeline.analysis.run_once()


def test_any_exception_from_the_sr_builder_fails_the_objects_and_never_blocks_forwarding(box, monkeypatch):
    config, database, store, pipeline = box
    outcome = store.store(paediatric_sample_bytes())
    assert pipeline.analysis.run_once()
    monkeypatch.setattr(results_worker, "build_ai_sr", _raise(LookupError("builder refused")))
    assert pipeline.objects.build_once()
    (row,) = database.query("SELECT * FROM analysis_results")
    assert (row["status"], row["objects_state"], row["objects_attempts"]) == ("analyzed", "failed", 1)
    assert row["objects_error"] == "result objects cannot be built: LookupError: builder refused"
    assert not pipeline.objects.build_once()  # failed is final
    assert database.query("SELECT COUNT(*) AS n FROM instances WHERE source = 'ai'")[0]["n"] == 0

    item_id = outbox.request_forward(database, config, outcome.study_uid, "hub")
    (claimed,) = outbox.claim_batch(database, config)  # the study goes with what exists
    assert claimed["id"] == item_id
    outbox.refresh_instances(database, claimed, attach_ai_results=True)
    assert [r["sop_instance_uid"] for r in outbox.instances(database, item_id)] == [outcome.sop_instance_uid]
    note = f"AI objects failed (cxr-pneumonia {row['model_version']}): {row['objects_error']}"
    assert study_forwarding(database, outcome.study_uid, config)[0]["notes"] == [note]
    assert list_studies(database)[0]["notes"] == [note]


def test_a_kill_mid_build_counts_and_recovery_fails_the_objects_after_max_attempts(box, monkeypatch):
    config, database, store, pipeline = box
    pipeline.objects.max_attempts = 1
    store.store(paediatric_sample_bytes())
    assert pipeline.analysis.run_once()
    monkeypatch.setattr(results_worker, "build_heatmap_sc", _raise(SystemExit(9)))
    with pytest.raises(SystemExit):
        pipeline.objects.build_once()
    assert database.query("SELECT objects_state, objects_attempts FROM analysis_results") == [
        {"objects_state": "building", "objects_attempts": 1}]
    pipeline.objects.recover()
    (row,) = database.query("SELECT objects_state, objects_error FROM analysis_results")
    assert row["objects_state"] == "failed"
    assert row["objects_error"].startswith("Interrupted: the appliance stopped once while building the AI objects")


def test_both_stuck_images_end_in_process(box, tmp_path):
    config, database, store, pipeline = box
    for path in (stuck_ultrasound(tmp_path / "us.dcm"), stuck_chest(tmp_path / "cr.dcm")):
        store.store(path.read_bytes())
    pipeline.run_until_idle(timeout_s=300)
    assert {r["state"] for r in database.query("SELECT state FROM analysis_jobs")} == {"done"}
    states = {r["model_id"]: (r["status"], r["objects_state"]) for r in database.query(
        "SELECT model_id, status, objects_state FROM analysis_results")}
    assert states["us-breast-lesion"] == ("failed", "none")
    assert states["cxr-pneumonia"][1] == "done"
