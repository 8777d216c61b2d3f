"""End to end with real parts: dcmtk storescu -> `appliance serve` -> models -> SR + heatmap SC."""
from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

import pydicom

from appliance.config import PROJECT_ROOT
from tests.helpers import dcmsend, paediatric_sample, run_cli, sample
from tests.results.dciodvfy import dciodvfy

ENGINES = PROJECT_ROOT / "engines"
DEADLINE_S = 60


def studies(data_dir: Path) -> list[dict]:
    result = run_cli("studies", "--json", "--data-dir", str(data_dir))
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["studies"]


def clinic_instances(report: list[dict]) -> dict[str, dict]:
    return {i["sop_instance_uid"]: i for s in report for se in s["series"] for i in se["instances"]
            if i["source"] != "ai"}


def wait_until_analyzed(data_dir: Path, expected: int, timeout: float = DEADLINE_S) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        report = studies(data_dir)
        done = [i for i in clinic_instances(report).values()
                if i["state"] in ("analyzed", "abstained", "failed") and not i["objects_pending"]]
        if len(done) >= expected:
            return report
        if time.monotonic() > deadline:
            raise AssertionError(f"only {len(done)} of {expected} images analyzed in {timeout}s")
        time.sleep(0.3)


def dciodvfy_errors(path: str) -> list[str]:
    return dciodvfy(Path(path)).errors


def test_chest_cr_ultrasound_clip_and_ct(server_factory, tmp_path):
    server = server_factory().start()
    # RG1 as a 3-year-old's film: the reference pneumonia model is made for children aged 1-5.
    chest = paediatric_sample(tmp_path / "chest")
    clip, ct = sample("color3d_jpeg_baseline.dcm"), sample("CT_small.dcm")
    started = time.monotonic()
    assert dcmsend(server.dicom_port, [chest, clip, ct]).returncode == 0
    report = wait_until_analyzed(server.data_dir, 3)
    elapsed = time.monotonic() - started
    images = clinic_instances(report)
    uid = {p.name: str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in (chest, clip, ct)}

    cr = images[uid["RG1_UNCR.dcm"]]
    assert cr["state"] == "analyzed", cr
    assert [(f["model"], f["finding"]) for f in cr["findings"]] == [("cxr-pneumonia", "pneumonia")]
    finding = cr["findings"][0]
    assert 0.0 <= finding["probability"] <= 1.0 and finding["positive"] == (finding["probability"] >= finding["threshold"])
    assert finding["model_version"]

    us = images[uid["color3d_jpeg_baseline.dcm"]]
    assert {a["model"] for a in us["abstentions"]} | {f["model"] for f in us["findings"]} == {"us-breast-lesion"}

    ct_image = images[uid["CT_small.dcm"]]
    assert ct_image["state"] == "abstained" and ct_image["findings"] == []
    assert ct_image["abstentions"][0]["code"] == "NO_APPLICABLE_MODEL"
    assert "CT" in ct_image["abstentions"][0]["reason"]

    # The AI results are standard DICOM in the same study, referencing the source image.
    for image, source in ((cr, chest), (us, clip)):
        assert len(image["sr"]) == 1
        sr = pydicom.dcmread(image["sr"][0]["path"])
        src = pydicom.dcmread(source, stop_before_pixels=True)
        assert sr.StudyInstanceUID == src.StudyInstanceUID and sr.PatientID == src.PatientID
        assert src.SOPInstanceUID in str(sr)
        assert "AI assist — not a diagnosis" in str(sr)
        assert dciodvfy_errors(image["sr"][0]["path"]) == []
    assert len(cr["heatmaps"]) == 1
    sc = pydicom.dcmread(cr["heatmaps"][0]["path"])
    assert sc.StudyInstanceUID == pydicom.dcmread(chest, stop_before_pixels=True).StudyInstanceUID
    assert (sc.Rows, sc.Columns) == (1955, 1841) and sc.BurnedInAnnotation == "YES"
    assert dciodvfy_errors(cr["heatmaps"][0]["path"]) == []

    chest_study = next(s for s in report if s["study_uid"] == sr_study(chest))
    assert chest_study["priority"] in ("urgent", "routine")
    assert chest_study["state"] == "analyzed"
    assert elapsed < DEADLINE_S
    # Patient and physician names never reach the application log.
    log = server.log_path.read_text()
    for source in (chest, clip, ct):
        header = pydicom.dcmread(source, stop_before_pixels=True)
        for keyword in ("PatientName", "ReferringPhysicianName"):
            name = str(header.get(keyword, "") or "")
            if len(name) > 3:  # as a whole word: "ward" (a physician here) is inside "forward"
                assert not re.search(rf"(?<![A-Za-z]){re.escape(name)}(?![A-Za-z])", log), keyword


def sr_study(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)


def test_corrupted_model_fails_its_cases_only(server_factory, tmp_path):
    engines = tmp_path / "engines"
    shutil.copytree(ENGINES, engines)
    onnx = engines / "us-breast-lesion" / "model.onnx"
    data = bytearray(onnx.read_bytes())
    data[len(data) // 2: len(data) // 2 + 64] = b"\0" * 64
    onnx.write_bytes(bytes(data))
    server = server_factory(extra_env={"APPLIANCE_ANALYZE_ENGINES_DIR": str(engines)}).start()
    assert dcmsend(server.dicom_port, [sample("US1_UNCR.dcm"), paediatric_sample(tmp_path / "chest")]).returncode == 0
    images = clinic_instances(wait_until_analyzed(server.data_dir, 2))
    us = images[str(pydicom.dcmread(sample("US1_UNCR.dcm"), stop_before_pixels=True).SOPInstanceUID)]
    cr = images[str(pydicom.dcmread(sample("RG1_UNCR.dcm"), stop_before_pixels=True).SOPInstanceUID)]
    assert us["state"] == "failed"
    assert us["errors"][0]["model"] == "us-breast-lesion"
    assert "model.onnx" in us["errors"][0]["error"] and "sha256" in us["errors"][0]["error"]
    assert cr["state"] == "analyzed" and cr["findings"][0]["model"] == "cxr-pneumonia"
