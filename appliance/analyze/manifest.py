"""Model packages: load ``engines/<id>/manifest.toml``, check it against its files and graph.

The format is specified in ``docs/MODEL_PACKAGES.md``.  Loading is strict on purpose: a
package whose hashes, ONNX input or outputs do not match its manifest is refused with a
:class:`ManifestError` naming the file and the problem, because a silently mismatched model
would produce confident nonsense.  ``[applicability]`` keys the box does not know are refused
too: a misspelt limit (``max_age = 5``) would otherwise silently let every patient through.
"""
from __future__ import annotations

import hashlib
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - the device runs Python 3.10
    import tomli as tomllib

from ..errors import ManifestError
from ..imaging.preprocess import validate_steps

log = logging.getLogger(__name__)

MANIFEST = "manifest.toml"
MODEL_FILES = {"fp32": "model.onnx", "int8": "model.int8.onnx"}
SEVERITIES = ("urgent", "review", "routine")
ACTIVATIONS = ("sigmoid_applied", "softmax_applied", "sigmoid", "softmax", "none")
COLOUR_POLICIES = ("reject", "to_grey")
UNKNOWN_POLICIES = ("abstain", "analyse")
SEXES = ("M", "F", "O")  # Patient's Sex (0010,0040) defined terms
APPLICABILITY_KEYS = ("modalities", "body_parts", "views", "photometric", "min_rows", "min_columns",
                      "colour", "population", "min_age_years", "max_age_years", "unknown_age", "sexes",
                      "unknown_sex")


@dataclass(frozen=True)
class Applicability:
    """What the model is for: the images (metadata gate) and the patients (population gate).

    Ages are in completed years and both bounds are inclusive: ``max_age_years = 5`` takes a child
    of 5 years 11 months.  ``None`` is no bound.  ``unknown_age`` / ``unknown_sex`` say what to do
    when the image does not tell (declared per model: the data it was validated on decide).
    """

    modalities: list[str] = field(default_factory=list)
    body_parts: list[str] = field(default_factory=list)
    views: list[str] = field(default_factory=list)
    photometric: list[str] = field(default_factory=list)
    min_rows: int = 0
    min_columns: int = 0
    colour: str = "reject"
    population: str = ""  # plain words for the reasons: "children aged 1–5 years"
    min_age_years: Optional[int] = None
    max_age_years: Optional[int] = None
    unknown_age: str = "analyse"
    sexes: list[str] = field(default_factory=list)  # empty = any
    unknown_sex: str = "analyse"

    @property
    def limits_age(self) -> bool:
        return self.min_age_years is not None or self.max_age_years is not None


@dataclass(frozen=True)
class InputSpec:
    name: str
    shape: list[int]
    dtype: str = "float32"
    layout: str = "NCHW"


@dataclass(frozen=True)
class OutputSpec:
    name: str
    kind: str = "scores"  # scores | heatmap | embedding
    activation: str = "none"


@dataclass(frozen=True)
class Finding:
    index: int
    code: str
    label: str
    severity: str
    threshold: float
    sensitivity: Optional[float] = None
    specificity: Optional[float] = None


@dataclass(frozen=True)
class OodSpec:
    method: str
    stats: str
    threshold: float
    percentile: Optional[float] = None


@dataclass
class Manifest:
    """A loaded, checked model package."""

    package_dir: Path
    id: str
    version: str
    name: str
    task: str
    intended_use: str
    disclaimer: str
    applicability: Applicability
    input: InputSpec
    preprocess: list[dict[str, Any]]
    outputs: list[OutputSpec]
    findings: list[Finding]
    ood: Optional[OodSpec]
    files: dict[str, str]
    raw: dict[str, Any] = field(repr=False, default_factory=dict)

    def path(self, name: str) -> Path:
        return self.package_dir / name

    def model_path(self, precision: str) -> Path:
        """The ONNX file for a precision: ``fp32``/``fp16`` -> model.onnx, ``int8`` -> QDQ model."""
        name = MODEL_FILES["int8"] if precision == "int8" else MODEL_FILES["fp32"]
        return self.package_dir / name

    def sha256(self, name: str) -> str:
        return self.files[name]

    @property
    def has_int8(self) -> bool:
        return MODEL_FILES["int8"] in self.files

    def output(self, kind: str) -> Optional[OutputSpec]:
        return next((o for o in self.outputs if o.kind == kind), None)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _table(data: dict[str, Any], key: str, where: Path) -> dict[str, Any]:
    value = data.get(key)
    if not isinstance(value, dict):
        raise ManifestError(f"{where}: missing or invalid [{key}] table")
    return value


def _get(table: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if key not in table:
        raise ManifestError(f"{where}: missing key {key!r}")
    value = table[key]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise ManifestError(f"{where}: {key!r} has the wrong type ({type(value).__name__})")
    return value


def _upper_list(table: dict[str, Any], key: str, where: str) -> list[str]:
    value = table.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ManifestError(f"{where}: {key!r} must be a list of strings")
    return [v.strip().upper() for v in value]


def _age_bound(table: dict[str, Any], key: str, where: str) -> Optional[int]:
    if key not in table:
        return None
    value = _get(table, key, int, where)
    if value < 0:
        raise ManifestError(f"{where}: {key} must be 0 or more, got {value}")
    return int(value)


def _policy(table: dict[str, Any], key: str, needed: bool, where: str) -> str:
    """An unknown-value policy: required where its limit is declared, so the choice is explicit."""
    if key not in table:
        if needed:
            raise ManifestError(f"{where}: {key} must be declared ({' or '.join(UNKNOWN_POLICIES)}) "
                                f"when the population is limited")
        return "analyse"
    value = table[key]
    if value not in UNKNOWN_POLICIES:
        raise ManifestError(f"{where}: {key} must be one of {UNKNOWN_POLICIES}, got {value!r}")
    return str(value)


def _applicability(app: Any, where: str) -> Applicability:
    if not isinstance(app, dict):
        raise ManifestError(f"{where}: must be a table")
    unknown = sorted(set(app) - set(APPLICABILITY_KEYS))
    if unknown:
        raise ManifestError(f"{where}: unknown key(s) {', '.join(unknown)} (known: {', '.join(APPLICABILITY_KEYS)})")
    colour = app.get("colour", "reject")
    if colour not in COLOUR_POLICIES:
        raise ManifestError(f"{where}: colour must be one of {COLOUR_POLICIES}, got {colour!r}")
    min_age, max_age = _age_bound(app, "min_age_years", where), _age_bound(app, "max_age_years", where)
    if min_age is not None and max_age is not None and min_age > max_age:
        raise ManifestError(f"{where}: min_age_years {min_age} is above max_age_years {max_age}")
    sexes = _upper_list(app, "sexes", where)
    if any(s not in SEXES for s in sexes):
        raise ManifestError(f"{where}: sexes must be Patient's Sex values {SEXES}, got {sexes!r}")
    limits_age = min_age is not None or max_age is not None
    population = app.get("population", "")
    if not isinstance(population, str):
        raise ManifestError(f"{where}: 'population' must be a string")
    if (limits_age or sexes) and not population.strip():
        raise ManifestError(f"{where}: population (plain words such as \"children aged 1–5 years\") "
                            f"must be given with an age or sex limit: abstention reasons quote it")
    return Applicability(
        modalities=_upper_list(app, "modalities", where),
        body_parts=_upper_list(app, "body_parts", where),
        views=_upper_list(app, "views", where),
        photometric=_upper_list(app, "photometric", where),
        min_rows=int(app.get("min_rows", 0)),
        min_columns=int(app.get("min_columns", 0)),
        colour=colour,
        population=population.strip(),
        min_age_years=min_age,
        max_age_years=max_age,
        unknown_age=_policy(app, "unknown_age", limits_age, where),
        sexes=sexes,
        unknown_sex=_policy(app, "unknown_sex", bool(sexes), where),
    )


def _parse(data: dict[str, Any], package_dir: Path) -> Manifest:
    mf = package_dir / MANIFEST
    model = _table(data, "model", mf)
    applicability = _applicability(data.get("applicability", {}), f"{mf} [applicability]")
    inp = _table(data, "input", mf)
    shape = _get(inp, "shape", list, f"{mf} [input]")
    if len(shape) != 4 or not all(isinstance(v, int) and v > 0 for v in shape):
        raise ManifestError(f"{mf} [input]: shape must be 4 positive integers (N, C, H, W), got {shape!r}")
    if inp.get("layout", "NCHW") != "NCHW" or inp.get("dtype", "float32") != "float32":
        raise ManifestError(f"{mf} [input]: only float32 NCHW inputs are supported")
    input_spec = InputSpec(_get(inp, "name", str, f"{mf} [input]"), shape)
    steps = data.get("preprocess", [])
    if not isinstance(steps, list) or not all(isinstance(s, dict) for s in steps):
        raise ManifestError(f"{mf}: [[preprocess]] must be an array of tables")
    validate_steps(steps)
    outputs = []
    for raw in data.get("outputs", []):
        name = _get(raw, "name", str, f"{mf} [[outputs]]")
        activation = raw.get("activation", "none")
        if activation not in ACTIVATIONS:
            raise ManifestError(f"{mf} output {name!r}: unknown activation {activation!r}")
        kind = raw.get("kind", "scores" if "activation" in raw else "other")
        outputs.append(OutputSpec(name=name, kind=kind, activation=activation))
    if not any(o.kind == "scores" for o in outputs):
        raise ManifestError(f"{mf}: no [[outputs]] entry with an activation (the scores output)")
    findings = []
    for raw in data.get("findings", []):
        where = f"{mf} [[findings]] {raw.get('code', '?')!r}"
        severity = _get(raw, "severity", str, where)
        if severity not in SEVERITIES:
            raise ManifestError(f"{where}: severity must be one of {SEVERITIES}, got {severity!r}")
        threshold = float(_get(raw, "threshold", (int, float), where))
        if not 0.0 <= threshold <= 1.0:
            raise ManifestError(f"{where}: threshold {threshold} is outside 0..1")
        findings.append(Finding(
            index=int(_get(raw, "index", int, where)), code=_get(raw, "code", str, where),
            label=_get(raw, "label", str, where), severity=severity, threshold=threshold,
            sensitivity=raw.get("sensitivity"), specificity=raw.get("specificity")))
    if not findings:
        raise ManifestError(f"{mf}: no [[findings]]")
    ood = None
    if "ood" in data:
        table = data["ood"]
        if table.get("method") != "mahalanobis":
            raise ManifestError(f"{mf} [ood]: only method = \"mahalanobis\" is supported")
        if not any(o.kind == "embedding" for o in outputs):
            raise ManifestError(f"{mf} [ood]: needs an [[outputs]] entry with kind = \"embedding\"")
        ood = OodSpec(method="mahalanobis", stats=_get(table, "stats", str, f"{mf} [ood]"),
                      threshold=float(_get(table, "threshold", (int, float), f"{mf} [ood]")),
                      percentile=table.get("percentile"))
    files = _table(data, "files", mf)
    return Manifest(
        package_dir=package_dir, id=_get(model, "id", str, f"{mf} [model]"),
        version=_get(model, "version", str, f"{mf} [model]"), name=str(model.get("name", "")),
        task=str(model.get("task", "classification")), intended_use=str(model.get("intended_use", "")),
        disclaimer=str(model.get("disclaimer", "AI assist — not a diagnosis.")),
        applicability=applicability, input=input_spec, preprocess=steps, outputs=outputs,
        findings=findings, ood=ood, files={str(k): str(v) for k, v in files.items()}, raw=data)


def _check_files(manifest: Manifest) -> None:
    root = manifest.package_dir
    if MODEL_FILES["fp32"] not in manifest.files:
        raise ManifestError(f"{root / MANIFEST}: [files] does not list {MODEL_FILES['fp32']}")
    if manifest.ood and manifest.ood.stats not in manifest.files:
        raise ManifestError(f"{root / MANIFEST}: [files] does not list the OOD stats {manifest.ood.stats}")
    for name, expected in manifest.files.items():
        path = root / name
        if not path.is_file():
            raise ManifestError(f"{path}: listed in [files] but missing")
        actual = sha256_file(path)
        if actual != expected.lower():
            raise ManifestError(f"{path}: sha256 {actual} does not match the manifest ({expected})")
    # Every file the package holds must be covered by a hash, so nothing unverified is used.
    for path in sorted(root.iterdir()):
        if path.is_file() and path.name != MANIFEST and not path.name.startswith(".") \
                and path.name not in manifest.files:
            raise ManifestError(f"{path}: file in the package but not listed in [files]")


def check_graph(manifest: Manifest, model_file: str) -> None:
    """The ONNX graph's input name/shape/dtype and outputs must match the manifest."""
    import onnx

    path = manifest.package_dir / model_file
    try:
        graph = onnx.load(str(path), load_external_data=False).graph
    except Exception as exc:  # onnx raises DecodeError/ValueError/OSError variants
        raise ManifestError(f"{path}: not a readable ONNX model: {exc}") from exc
    initialisers = {init.name for init in graph.initializer}
    inputs = {i.name: i for i in graph.input if i.name not in initialisers}
    spec = manifest.input
    if spec.name not in inputs:
        raise ManifestError(f"{path}: graph input {spec.name!r} not found (graph has {sorted(inputs)})")
    tensor_type = inputs[spec.name].type.tensor_type
    if tensor_type.elem_type != onnx.TensorProto.FLOAT:
        raise ManifestError(f"{path}: input {spec.name!r} is not float32")
    dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim]
    if len(dims) != len(spec.shape):
        raise ManifestError(f"{path}: input {spec.name!r} has rank {len(dims)}, manifest says shape {spec.shape}")
    for axis, (actual, wanted) in enumerate(zip(dims, spec.shape)):
        # A symbolic dimension is accepted only for the batch axis.
        if actual is None and axis == 0:
            continue
        if actual != wanted:
            raise ManifestError(f"{path}: input {spec.name!r} shape {dims} does not match manifest {spec.shape}")
    graph_outputs = {o.name for o in graph.output}
    for out in manifest.outputs:
        if out.name not in graph_outputs:
            raise ManifestError(f"{path}: output {out.name!r} named in the manifest is missing from the graph "
                                f"(graph has {sorted(graph_outputs)})")


def load_manifest(package_dir: Path | str, verify: bool = True) -> Manifest:
    """Load and (unless ``verify`` is False) fully check one model package."""
    package_dir = Path(package_dir)
    mf = package_dir / MANIFEST
    try:
        with open(mf, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError as exc:
        raise ManifestError(f"{mf}: missing") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ManifestError(f"{mf}: not valid TOML: {exc}") from exc
    manifest = _parse(data, package_dir)
    if manifest.id != package_dir.name:
        raise ManifestError(f"{mf}: model id {manifest.id!r} does not match the folder name {package_dir.name!r}")
    if verify:
        _check_files(manifest)
        for model_file in MODEL_FILES.values():
            if model_file in manifest.files:
                check_graph(manifest, model_file)
    return manifest


def discover_models(engines_dir: Path | str) -> dict[str, Manifest | ManifestError]:
    """Every package under ``engines_dir``: id -> Manifest, or the ManifestError that refused it.

    Broken packages are reported, not raised, so one bad package cannot hide the good ones.
    """
    engines_dir = Path(engines_dir)
    found: dict[str, Manifest | ManifestError] = {}
    if not engines_dir.is_dir():
        return found
    for package in sorted(p for p in engines_dir.iterdir() if (p / MANIFEST).is_file()):
        try:
            found[package.name] = load_manifest(package)
        except ManifestError as exc:
            log.warning("model package refused: %s", exc)
            found[package.name] = exc
    return found


def find_model(engines_dir: Path | str, model_id: str) -> Manifest:
    """Load the package ``model_id`` or raise ManifestError saying what is available."""
    package = Path(engines_dir) / model_id
    if not (package / MANIFEST).is_file():
        available = sorted(p.parent.name for p in Path(engines_dir).glob(f"*/{MANIFEST}"))
        raise ManifestError(f"no model package {model_id!r} under {engines_dir} "
                            f"(available: {', '.join(available) or 'none'})")
    return load_manifest(package)
