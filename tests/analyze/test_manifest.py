"""Package loading: a manifest that does not match its files is refused, naming file and problem."""
from __future__ import annotations

import re
from pathlib import Path

import onnx
import pytest

from appliance.analyze.manifest import discover_models, find_model, load_manifest
from appliance.errors import ManifestError
from tests.analyze.toy_package import MODEL_ID, toy_copy, toy_engines, toy_graph, write_manifest  # noqa: F401


def test_valid_package_loads(toy_copy: Path) -> None:
    m = load_manifest(toy_copy)
    assert m.id == MODEL_ID and m.input.name == "image" and m.input.shape == [1, 1, 28, 28]
    assert [o.name for o in m.outputs] == ["probs", "cam", "embedding"]
    assert m.output("heatmap").name == "cam" and m.output("embedding").name == "embedding"
    assert m.findings[0].code == "bright" and m.has_int8
    assert m.applicability.modalities == ["CR", "DX"] and "" in m.applicability.body_parts
    assert m.model_path("int8").name == "model.int8.onnx" and m.model_path("fp16").name == "model.onnx"


def test_flipped_byte_is_refused(toy_copy: Path) -> None:
    data = bytearray((toy_copy / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0x01
    (toy_copy / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(ManifestError, match=r"model\.onnx: sha256 .* does not match"):
        load_manifest(toy_copy)


def test_changed_shape_is_refused(toy_copy: Path) -> None:
    text = (toy_copy / "manifest.toml").read_text().replace("shape = [1, 1, 28, 28]", "shape = [1, 1, 32, 32]")
    (toy_copy / "manifest.toml").write_text(text)
    with pytest.raises(ManifestError, match=re.escape("model.onnx: input 'image' shape")):
        load_manifest(toy_copy)


def test_graph_with_other_input_size_is_refused(toy_copy: Path) -> None:
    onnx.save(toy_graph(height=32), str(toy_copy / "model.onnx"))
    (toy_copy / "model.int8.onnx").unlink()
    write_manifest(toy_copy)
    with pytest.raises(ManifestError, match="does not match manifest"):
        load_manifest(toy_copy)


def test_removed_output_is_refused(toy_copy: Path) -> None:
    onnx.save(toy_graph(drop_output="cam"), str(toy_copy / "model.onnx"))
    write_manifest(toy_copy)  # hashes are right: only the graph disagrees
    with pytest.raises(ManifestError, match="output 'cam' named in the manifest is missing"):
        load_manifest(toy_copy)


def test_renamed_input_is_refused(toy_copy: Path) -> None:
    onnx.save(toy_graph(input_name="pixels"), str(toy_copy / "model.onnx"))
    (toy_copy / "model.int8.onnx").unlink()
    write_manifest(toy_copy)
    with pytest.raises(ManifestError, match="graph input 'image' not found"):
        load_manifest(toy_copy)


def test_missing_and_unlisted_files_are_refused(toy_copy: Path) -> None:
    (toy_copy / "extra.bin").write_bytes(b"x")
    with pytest.raises(ManifestError, match="extra.bin: file in the package but not listed"):
        load_manifest(toy_copy)
    (toy_copy / "extra.bin").unlink()
    (toy_copy / "golden.npz").unlink()
    with pytest.raises(ManifestError, match="golden.npz: listed in \\[files\\] but missing"):
        load_manifest(toy_copy)


@pytest.mark.parametrize("old,new,message", [
    ('severity = "urgent"', 'severity = "panic"', "severity must be one of"),
    ("threshold = 0.5", "threshold = 1.5", "outside 0..1"),
    ('op = "center_crop_square"', 'op = "warp"', "unknown op 'warp'"),
    ('colour = "reject"', 'colour = "maybe"', "colour must be one of"),
    ('id = "toy-cxr"', 'id = "other"', "does not match the folder name"),
    ("[input]", "[inputs]", r"missing or invalid \[input\]"),
])
def test_invalid_fields_are_refused(toy_copy: Path, old: str, new: str, message: str) -> None:
    path = toy_copy / "manifest.toml"
    path.write_text(path.read_text().replace(old, new, 1))
    with pytest.raises(ManifestError, match=message):
        load_manifest(toy_copy)


def test_not_toml_is_refused(toy_copy: Path) -> None:
    (toy_copy / "manifest.toml").write_text("[model\nid=")
    with pytest.raises(ManifestError, match="not valid TOML"):
        load_manifest(toy_copy)


def test_discover_reports_broken_packages_without_hiding_good_ones(toy_copy: Path) -> None:
    broken = toy_copy.parent / "broken-model"
    broken.mkdir()
    (broken / "manifest.toml").write_text("[model]\nid='broken-model'\n")
    found = discover_models(toy_copy.parent)
    assert set(found) == {MODEL_ID, "broken-model"}
    assert not isinstance(found[MODEL_ID], ManifestError)
    assert isinstance(found["broken-model"], ManifestError)
    with pytest.raises(ManifestError, match="no model package 'nope'.*available: broken-model, toy-cxr"):
        find_model(toy_copy.parent, "nope")
