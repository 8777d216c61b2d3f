"""The input gate: abstain on what the model was not made for, analyse the chest CR."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from appliance.analyze.gate import CATEGORY, OodStats, check_ood
from appliance.analyze.manifest import load_manifest
from appliance.analyze.runner import ModelRunner
from appliance.config import PROJECT_ROOT
from tests.analyze.samples import colour_photo, write_png, write_secondary_capture
from tests.analyze.toy_package import MODEL_ID, US_MODEL_ID, toy_engines, write_manifest  # noqa: F401

warnings.filterwarnings("ignore", category=UserWarning, module="pydicom")
REAL_CXR = PROJECT_ROOT / "engines" / "cxr-pneumonia"


@pytest.fixture(scope="module", params=["toy", "cxr-pneumonia"])
def chest_runner(request: pytest.FixtureRequest, toy_engines: Path) -> ModelRunner:  # noqa: F811
    if request.param == "toy":
        return ModelRunner.load(load_manifest(toy_engines / MODEL_ID), backend="onnxruntime")
    assert (REAL_CXR / "manifest.toml").is_file(), "engines/cxr-pneumonia is missing"
    return ModelRunner.load(load_manifest(REAL_CXR), backend="onnxruntime")


def dicom(name: str) -> str:
    path = get_testdata_file(name)
    assert path is not None
    return str(path)


@pytest.mark.parametrize("name,code", [
    ("CT_small.dcm", "NOT_APPLICABLE_MODALITY"),
    ("RG3_UNCR.dcm", "WRONG_BODY_PART"),
    ("RG3_J2KR.dcm", "WRONG_BODY_PART"),
    ("US1_UNCR.dcm", "NOT_APPLICABLE_MODALITY"),
    ("MR_truncated.dcm", "UNREADABLE_PIXELS"),
])
def test_abstains_on_inputs_outside_intended_use(chest_runner: ModelRunner, name: str, code: str) -> None:
    result = chest_runner.analyze(dicom(name))
    assert result.abstention is not None and result.abstention.code == code, result.abstention
    assert result.findings == [] and result.heatmap is None
    assert result.to_dict()["status"] == "abstained"


@pytest.mark.parametrize("name", ["RG1_UNCR.dcm", "RG1_J2KR.dcm"])
def test_analyzes_the_chest_cr(chest_runner: ModelRunner, name: str) -> None:
    result = chest_runner.analyze(dicom(name))
    assert result.abstention is None, result.abstention
    assert len(result.findings) >= 1 and 0.0 <= result.findings[0].probability <= 1.0
    assert result.heatmap is not None and result.heatmap.shape == (1955, 1841, 3)
    assert result.ood_distance is not None


def test_colour_photograph_png_and_dicom(chest_runner: ModelRunner, tmp_path: Path) -> None:
    photo = colour_photo()
    for path in (write_png(tmp_path / "photo.png", photo),
                 write_secondary_capture(tmp_path / "photo.dcm", photo)):
        result = chest_runner.analyze(path)
        assert result.abstention is not None and result.abstention.code == "COLOUR_IMAGE", path


def test_blank_images(chest_runner: ModelRunner, tmp_path: Path) -> None:
    blank = write_png(tmp_path / "blank.png", np.full((512, 512), 128, dtype=np.uint8))
    assert chest_runner.analyze(blank).abstention.code == "UNREADABLE_PIXELS"
    ds = pydicom.dcmread(dicom("RG1_UNCR.dcm"))
    ds.PixelData = np.zeros((ds.Rows, ds.Columns), dtype=np.uint16).tobytes()
    result = chest_runner.analyze(ds)
    assert result.abstention.code == "UNREADABLE_PIXELS" and "blank" in result.abstention.reason


def test_view_size_and_missing_values(chest_runner: ModelRunner) -> None:
    ds = pydicom.dcmread(dicom("RG1_UNCR.dcm"))
    ds.ViewPosition = "LL"
    assert chest_runner.analyze(ds).abstention.code == "WRONG_VIEW"
    del ds.ViewPosition  # "" is allowed: a missing view does not refuse
    del ds.BodyPartExamined
    assert chest_runner.analyze(ds).abstention is None
    small = pydicom.dcmread(dicom("RG1_UNCR.dcm"))
    arr = small.pixel_array[::10, ::10].copy()
    small.Rows, small.Columns = arr.shape
    small.PixelData = arr.tobytes()
    result = chest_runner.analyze(small)
    assert result.abstention.code == "TOO_SMALL" and "196×185" in result.abstention.reason


def test_image_smaller_than_the_model_input(chest_runner: ModelRunner, tmp_path: Path) -> None:
    tiny = write_png(tmp_path / "tiny.png", np.random.default_rng(0).integers(0, 255, (20, 20), dtype=np.uint8))
    assert chest_runner.analyze(tiny).abstention.code == "TOO_SMALL"


def test_out_of_distribution(toy_engines: Path, tmp_path: Path) -> None:  # noqa: F811
    import shutil

    package = tmp_path / MODEL_ID
    shutil.copytree(toy_engines / MODEL_ID, package)
    write_manifest(package, ood_threshold=0.5)
    runner = ModelRunner.load(load_manifest(package), backend="onnxruntime")
    result = runner.analyze(dicom("RG1_UNCR.dcm"))
    assert result.abstention.code == "OUT_OF_DISTRIBUTION" and result.abstention.category == -3
    assert result.ood_distance > 0.5


def test_ood_distance_formula() -> None:
    stats = OodStats(mean=np.array([1.0, 2.0]), precision=np.diag([4.0, 1.0]), threshold=3.0)
    assert stats.distance(np.array([2.0, 2.0])) == pytest.approx(2.0)  # sqrt(4 * 1^2)
    assert check_ood(np.array([1.0, 6.0]), stats)[1].code == "OUT_OF_DISTRIBUTION"  # sqrt(16) = 4 > 3
    assert check_ood(np.array([1.0, 4.0]), stats)[1] is None  # 2 <= 3
    assert set(CATEGORY.values()) == {-1, -2, -3}


def test_ultrasound_model_converts_colour_to_grey(toy_engines: Path) -> None:  # noqa: F811
    runner = ModelRunner.load(load_manifest(toy_engines / US_MODEL_ID), backend="onnxruntime")
    result = runner.analyze(dicom("color3d_jpeg_baseline.dcm"))
    assert result.abstention is None, result.abstention
    assert result.source["frame_index"] == 60 and result.heatmap.shape == (480, 640, 3)
    assert runner.analyze(dicom("RG1_UNCR.dcm")).abstention.code == "NOT_APPLICABLE_MODALITY"
