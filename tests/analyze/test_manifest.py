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


# -- the intended population in [applicability] -------------------------------------------------

POPULATION = '''population = "children aged 1–5 years"
min_age_years = 1
max_age_years = 5
unknown_age = "abstain"
'''


def _with_applicability(package: Path, lines: str) -> None:
    path = package / "manifest.toml"
    text = path.read_text()
    assert "\n[input]" in text
    path.write_text(text.replace("\n[input]", f"\n{lines}\n[input]", 1))


def test_population_fields_load(toy_copy: Path) -> None:
    _with_applicability(toy_copy, POPULATION + 'sexes = ["f", "M"]\nunknown_sex = "analyse"\n')
    app = load_manifest(toy_copy).applicability
    assert (app.population, app.min_age_years, app.max_age_years) == ("children aged 1–5 years", 1, 5)
    assert app.unknown_age == "abstain" and app.limits_age
    assert app.sexes == ["F", "M"] and app.unknown_sex == "analyse"


def test_no_population_fields_mean_no_population_limit(toy_copy: Path) -> None:
    app = load_manifest(toy_copy).applicability
    assert not app.limits_age and app.sexes == [] and app.population == ""


def test_open_ended_age_range(toy_copy: Path) -> None:
    _with_applicability(toy_copy, 'population = "adults"\nmin_age_years = 18\nunknown_age = "analyse"\n')
    app = load_manifest(toy_copy).applicability
    assert (app.min_age_years, app.max_age_years, app.limits_age) == (18, None, True)


@pytest.mark.parametrize("lines,message", [
    (POPULATION.replace("unknown_age = \"abstain\"\n", ""), "unknown_age must be declared"),
    (POPULATION.replace('"abstain"', '"guess"'), "unknown_age must be one of"),
    (POPULATION.replace("max_age_years = 5", "max_age_years = 0"), "min_age_years 1 is above max_age_years 0"),
    (POPULATION.replace("min_age_years = 1", "min_age_years = -1"), "min_age_years must be 0 or more"),
    (POPULATION.replace("min_age_years = 1", "min_age_years = 1.5"), "'min_age_years' has the wrong type"),
    (POPULATION.replace("min_age_years = 1", "min_age_years = true"), "'min_age_years' has the wrong type"),
    (POPULATION.replace("min_age_years = 1", 'min_age_years = "1"'), "'min_age_years' has the wrong type"),
    (POPULATION.replace('population = "children aged 1–5 years"', ""), "population .* must be given"),
    ('population = "women"\nsexes = ["F"]\n', "unknown_sex must be declared"),
    ('population = "women"\nsexes = ["W"]\nunknown_sex = "analyse"\n', "sexes must be Patient's Sex values"),
    ('sexes = ["F"]\nunknown_sex = "analyse"\n', "population .* must be given"),
    ('population = 5\n', "'population' must be a string"),
    # A misspelt limit would let everyone through: refused, naming the key.
    ('population = "children aged 1–5 years"\nmax_age = 5\n', "unknown key.*max_age "),
])
def test_invalid_population_fields_are_refused(toy_copy: Path, lines: str, message: str) -> None:
    _with_applicability(toy_copy, lines)
    with pytest.raises(ManifestError, match=message):
        load_manifest(toy_copy)


def test_reference_packages_declare_the_population_of_their_data() -> None:
    from appliance.config import PROJECT_ROOT

    chest = load_manifest(PROJECT_ROOT / "engines" / "cxr-pneumonia").applicability
    # Kermany et al.: children aged 1-5; both sexes.
    assert (chest.min_age_years, chest.max_age_years, chest.sexes) == (1, 5, [])
    assert chest.population == "children aged 1–5 years" and chest.unknown_age == "abstain"
    breast = load_manifest(PROJECT_ROOT / "engines" / "us-breast-lesion").applicability
    # BUSI: 600 women aged 25-75.
    assert (breast.min_age_years, breast.max_age_years, breast.sexes) == (25, 75, ["F"])
    assert breast.population == "women aged 25–75 years"
    assert (breast.unknown_age, breast.unknown_sex) == ("analyse", "analyse")
    for package, app in (("cxr-pneumonia", chest), ("us-breast-lesion", breast)):
        card = (PROJECT_ROOT / "engines" / package / "MODEL_CARD.md").read_text()
        assert f"**Intended population: {app.population}**" in card, package
