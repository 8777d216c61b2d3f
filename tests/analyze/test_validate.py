"""`appliance models validate|list` through click's CliRunner on a labelled folder built here."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from appliance.analyze.commands import models
from appliance.analyze.validate import bootstrap_ci, roc_auc
from tests.analyze.samples import colour_photo, write_png
from tests.analyze.toy_package import MODEL_ID, toy_engines  # noqa: F401

KEYS = {"model", "n", "abstained", "auc", "auc_ci", "threshold", "sensitivity", "specificity",
        "tp", "fp", "tn", "fn"}


@pytest.fixture
def site(toy_engines: Path, tmp_path: Path) -> str:  # noqa: F811
    config = tmp_path / "site.toml"
    config.write_text(f'[analyze]\nengines_dir = "{toy_engines}"\nbackend = "onnxruntime"\nthreads = 1\n'
                      f'[storage]\ndata_dir = "{tmp_path / "data"}"\n')
    return str(config)


def labelled_folder(root: Path, levels: list[tuple[int, int]], extra: str = "") -> Path:
    """PNG images of a given mean brightness; the toy model's probability rises with brightness."""
    root.mkdir()
    rng = np.random.default_rng(5)
    rows = ["file,label"]
    for i, (mean, label) in enumerate(levels):
        pixels = np.clip(rng.normal(mean, 15, (28, 28)), 0, 255).astype(np.uint8)
        write_png(root / f"img{i:02d}.png", pixels)
        rows.append(f"img{i:02d}.png,{label}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n" + extra)
    return root


def invoke(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(models, list(args))
    return result.exit_code, result.stdout, result.stderr


def test_validate_json_is_one_object_with_the_documented_keys(site: str, tmp_path: Path) -> None:
    levels = [(200, 1), (190, 1), (180, 1), (60, 1), (40, 0), (50, 0), (70, 0), (185, 0)]
    folder = labelled_folder(tmp_path / "set", levels)
    write_png(folder / "photo.png", colour_photo(64, 64))
    with open(folder / "labels.csv", "a") as fh:
        fh.write("photo.png,0\n")
    report = tmp_path / "report.html"
    code, out, err = invoke("validate", "--model", MODEL_ID, str(folder), "--json", "--report", str(report),
                            "--config", site)
    assert code == 0, err
    summary = json.loads(out)  # exactly one JSON document on stdout
    assert set(summary) == KEYS
    assert summary["model"] == MODEL_ID and summary["n"] == 9 and summary["abstained"] == 1
    # 4 positives, 4 negatives analysed; one positive (60) is dark and one negative (185) bright.
    assert (summary["tp"], summary["fn"], summary["tn"], summary["fp"]) == (3, 1, 3, 1)
    assert summary["auc"] == pytest.approx(roc_auc(np.array([1, 1, 1, 1, 0, 0, 0, 0]),
                                                   np.array([200, 190, 180, 60, 40, 50, 70, 185])))
    low, high = summary["auc_ci"]
    assert low <= summary["auc"] <= high
    assert summary["sensitivity"] == 0.75 and summary["specificity"] == 0.75
    page = report.read_text()
    assert "<svg" in page and "<polyline" in page and "Thresholds" in page
    assert "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")  # no external assets
    assert "validating" in err


def test_validate_human_output(site: str, tmp_path: Path) -> None:
    folder = labelled_folder(tmp_path / "set", [(200, 1), (40, 0), (210, 1), (30, 0)])
    code, out, _ = invoke("validate", "--model", MODEL_ID, str(folder), "--config", site, "--precision", "fp32")
    assert code == 0
    assert "AUC          1.000" in out and "abstained 0" in out and "confusion" in out


@pytest.mark.parametrize("case,message", [
    ("no_labels", "labels.csv: missing"),
    ("missing_file", "file 'ghost.png' not found"),
    ("bad_label", "unknown label 'yes'"),
    ("empty", "no images listed"),
    ("bad_header", "header must have columns file,label"),
    ("no_dir", "validation folder does not exist"),
])
def test_validate_errors(site: str, tmp_path: Path, case: str, message: str) -> None:
    folder = tmp_path / "set"
    if case == "no_labels":
        folder.mkdir()
    elif case == "missing_file":
        labelled_folder(folder, [(200, 1)], extra="ghost.png,0\n")
    elif case == "bad_label":
        labelled_folder(folder, [(200, 1)], extra="img00.png,yes\n")
    elif case == "empty":
        folder.mkdir()
        (folder / "labels.csv").write_text("file,label\n")
    elif case == "bad_header":
        folder.mkdir()
        (folder / "labels.csv").write_text("image;label\n")
    code, out, err = invoke("validate", "--model", MODEL_ID, str(folder), "--json", "--config", site)
    assert code != 0 and out == ""
    assert message in err and "Traceback" not in err


def test_validate_unknown_model(site: str, tmp_path: Path) -> None:
    folder = labelled_folder(tmp_path / "set", [(200, 1), (20, 0)])
    code, _, err = invoke("validate", "--model", "nope", str(folder), "--config", site)
    assert code != 0 and "no model package 'nope'" in err


def test_models_list(site: str) -> None:
    code, out, _ = invoke("list", "--config", site, "--json")
    assert code == 0
    listing = json.loads(out)["models"]
    assert listing[MODEL_ID]["ok"] and listing[MODEL_ID]["precisions"] == ["fp32", "int8"]
    code, out, _ = invoke("list", "--config", site)
    assert code == 0 and MODEL_ID in out


def test_auc_and_ci_helpers() -> None:
    labels = np.array([0, 0, 1, 1])
    assert roc_auc(labels, np.array([0.1, 0.4, 0.35, 0.8])) == 0.75
    assert roc_auc(labels, np.array([0.5, 0.5, 0.5, 0.5])) == 0.5  # ties count half
    assert roc_auc(np.array([1, 1]), np.array([0.2, 0.3])) is None
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    s = y + rng.normal(0, 1, 200)
    assert bootstrap_ci(y, s) == bootstrap_ci(y, s)  # fixed seed: reproducible
    low, high = bootstrap_ci(y, s)
    assert low < roc_auc(y, s) < high


def test_reference_validation_auc_is_reproduced(tmp_path: Path) -> None:
    """PNGs of the shared validation split through `models validate` give the model card's AUC."""
    import sys

    from appliance.config import PROJECT_ROOT
    from tests.helpers import SHARED_DATA

    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib

    package = PROJECT_ROOT / "engines" / "cxr-pneumonia"
    assert (package / "manifest.toml").is_file(), "engines/cxr-pneumonia is missing"
    manifest = tomllib.loads((package / "manifest.toml").read_text())
    if "validation" not in manifest or "data" not in manifest:
        pytest.fail("cxr-pneumonia manifest lacks [validation] auc or [data] file")
    source = SHARED_DATA / manifest["data"]["file"]
    assert source.is_file(), f"{source} not available"
    with np.load(source) as data:
        images, labels = data["val_images"], data["val_labels"].reshape(-1)
    positive = set(manifest["data"].get("positive_labels", [1]))
    folder = tmp_path / "val"
    folder.mkdir()
    rows = ["file,label"]
    for i, (image, label) in enumerate(zip(images, labels)):
        write_png(folder / f"{i:04d}.png", image)
        rows.append(f"{i:04d}.png,{int(int(label) in positive)}")
    (folder / "labels.csv").write_text("\n".join(rows) + "\n")
    config = tmp_path / "site.toml"
    config.write_text(f'[analyze]\nengines_dir = "{PROJECT_ROOT / "engines"}"\nbackend = "onnxruntime"\n')
    code, out, err = invoke("validate", "--model", "cxr-pneumonia", str(folder), "--json", "--precision", "fp32",
                            "--config", str(config))
    assert code == 0, err
    summary = json.loads(out)
    assert summary["n"] == len(labels) and summary["abstained"] <= len(labels) * 0.01
    assert summary["auc"] == pytest.approx(float(manifest["validation"]["auc"]), abs=0.005)


def test_quantize_unknown_model_fails_clearly(site: str) -> None:
    code, out, err = invoke("quantize", "--model", "nope", "--config", site)
    assert code != 0 and "no model package 'nope'" in err and "Traceback" not in err
