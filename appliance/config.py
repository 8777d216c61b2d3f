"""Layered, typed configuration.

Every section is a frozen dataclass (:class:`Storage`, :class:`Dicom`, :class:`Http`,
:class:`Log`, :class:`Analyze`), every ``[[destinations]]`` entry a :class:`Destination` and
every ``[[forward_rules]]`` entry a :class:`ForwardRule`, all inside one frozen :class:`Config`
(``config.dicom.port``, ``config.destination("hub").url``).  A setting's default, and its bounds
or allowed values, are declared once, on its field (:func:`setting`); there is no other table of
defaults.  ``firmware_config/appliance.toml`` documents the same values (a test checks that it
agrees).

Precedence, lowest to highest:

1. the built-in defaults (the dataclass fields below),
2. ``firmware_config/appliance.toml`` (the device's documented defaults),
3. a site file (``--config FILE`` or ``APPLIANCE_CONFIG``),
4. ``APPLIANCE_<SECTION>_<KEY>`` environment variables (``APPLIANCE_DESTINATIONS_<NAME>_<KEY>``
   for a key of one destination),
5. command-line flags.

Each layer's values are converted to the field's type as they are read (so an error names the
layer); bounds, allowed values and the cross-checks of forwarding are checked once, when the
:class:`Config` is built after layering.  An invalid value fails fast with a
:class:`ConfigError` that names the key and the problem.  A file that is not UTF-8 TOML text (a
binary file, a truncated copy) fails the same way.

No default points outside the project: ``storage.data_dir`` and ``analyze.engines_dir`` default
to ``data/`` and ``engines/`` in it, and ``analyze.shared_data_dir`` (validation data sets, read
only by ``appliance models quantize``) has no default: :meth:`Analyze.require_shared_data_dir`
says how to set it.
"""
from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import MISSING, dataclass, field, fields
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, get_type_hints

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on the device's Python 3.10
    import tomli as tomllib

from .errors import ConfigError

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parent.parent
FIRMWARE_CONFIG = PROJECT_ROOT / "firmware_config" / "appliance.toml"
ENV_PREFIX = "APPLIANCE_"
SECRET_WORDS = ("password", "secret", "token", "key")
AE_TITLE_MAX = 16
# A site file is a few kilobytes; anything this large is not one (and is not read into memory).
CONFIG_FILE_MAX = 1024 * 1024
TRUE_WORDS, FALSE_WORDS = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


# ----------------------------------------------------------------------------- value checks

def _check_ae(key: str, value: str) -> None:
    if not value or len(value) > AE_TITLE_MAX or "\\" in value or not value.isprintable():
        raise ConfigError(f"{key}: {value!r} is not a valid AE title (1-16 printable characters)")


def _check_range(key: str, value: int, bounds: tuple[int, int]) -> None:
    low, high = bounds
    if low <= value <= high:
        return
    if key.endswith("port"):
        raise ConfigError(f"{key}: {value} is not a TCP port ({low}-{high})")
    raise ConfigError(f"{key}: {value} is out of range (allowed: {low} to {high})")


def _check_choice(key: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(choices)}")


def _check_level(key: str, value: str) -> None:
    _check_choice(key, value.upper(), ("DEBUG", "INFO", "WARNING", "ERROR"))


def _check_calling_aes(key: str, value: Sequence[str]) -> None:
    for ae in value:
        if ae != "*":
            _check_ae(key, ae)


def _check_window(key: str, value: str) -> None:
    if value and not _valid_window(value):
        raise ConfigError(f"{key}: {value!r} is not HH:MM-HH:MM")


def _valid_window(text: str) -> bool:
    try:
        start, end = text.split("-")
        for part in (start, end):
            hours, minutes = part.strip().split(":")
            if not (0 <= int(hours) <= 23 and 0 <= int(minutes) <= 59):
                return False
    except ValueError:
        return False
    return True


def setting(default: Any, *, bounds: Optional[tuple[int, int]] = None, choices: Optional[tuple[str, ...]] = None,
            check: Optional[Callable[[str, Any], None]] = None) -> Any:
    """A field with its default and, beside it, what values it admits: ``bounds`` (inclusive, every
    integer has them), ``choices`` (allowed strings) or a ``check(key, value)`` raising ConfigError."""
    return field(default=default, metadata={"bounds": bounds, "choices": choices, "check": check})


def required(*, choices: Optional[tuple[str, ...]] = None) -> Any:
    """A field of a ``[[table array]]`` entry that has no default: an entry without it is refused."""
    return field(metadata={"bounds": None, "choices": choices, "check": None})


# ----------------------------------------------------------------------------- sections

@dataclass(frozen=True)
class Storage:
    data_dir: Path = setting(PROJECT_ROOT / "data")
    min_free_mb: int = setting(500, bounds=(0, 1_000_000))


@dataclass(frozen=True)
class Dicom:
    # The reasons for the limits are in firmware_config/appliance.toml.
    ae_title: str = setting("EDGE", check=_check_ae)
    host: str = setting("0.0.0.0")
    port: int = setting(11112, bounds=(0, 65535))
    allowed_calling_aes: tuple[str, ...] = setting((), check=_check_calling_aes)
    max_associations: int = setting(16, bounds=(1, 256))
    max_associations_per_peer: int = setting(8, bounds=(1, 256))
    max_pending_connections: int = setting(256, bounds=(8, 1024))
    association_timeout_s: int = setting(10, bounds=(1, 120))
    network_timeout_s: int = setting(60, bounds=(1, 3600))
    pdu_timeout_s: int = setting(30, bounds=(1, 600))
    max_association_s: int = setting(14400, bounds=(60, 86400))
    max_pdu_kb: int = setting(1024, bounds=(4, 16384))
    max_dataset_mb: int = setting(1024, bounds=(1, 4095))
    max_inflated_mb: int = setting(256, bounds=(1, 4095))
    processes: int = setting(0, bounds=(0, 16))
    fast_reactor: bool = setting(True)


@dataclass(frozen=True)
class Http:
    host: str = setting("0.0.0.0")
    port: int = setting(8080, bounds=(0, 65535))
    threads: int = setting(8, bounds=(1, 256))
    secret_key: str = setting("")


@dataclass(frozen=True)
class Log:
    level: str = setting("INFO", check=_check_level)


@dataclass(frozen=True)
class Analyze:
    engines_dir: Path = setting(PROJECT_ROOT / "engines")
    backend: str = setting("auto", choices=("auto", "onnxruntime", "tensorrt"))
    threads: int = setting(2, bounds=(1, 64))
    workers: int = setting(1, bounds=(1, 16))
    study_quiet_s: int = setting(60, bounds=(0, 86400))
    max_attempts: int = setting(8, bounds=(1, 100))
    defer_while_receiving_s: int = setting(10, bounds=(0, 3600))
    # Where model packages' validation data sets are (manifest [data] file); no default.
    shared_data_dir: Optional[Path] = setting(None)

    def require_shared_data_dir(self) -> Path:
        """``shared_data_dir``, for the commands that read validation data; unset is a ConfigError."""
        if self.shared_data_dir is None:
            raise ConfigError("analyze.shared_data_dir is not set: it is the folder holding the model packages' "
                              "validation data (the manifest's [data] file); set it in the site file "
                              "([analyze] shared_data_dir = \"/path\") or in APPLIANCE_ANALYZE_SHARED_DATA_DIR")
        return self.shared_data_dir


@dataclass(frozen=True)
class Destination:
    """One ``[[destinations]]`` entry (docs/FORWARDING.md describes every key)."""

    name: str = required()
    kind: str = required(choices=("dicom", "dicomweb"))
    host: str = setting("")
    port: int = setting(104, bounds=(1, 65535))
    called_ae: str = setting("")
    calling_ae: str = setting("")
    tls_ca: str = setting("")
    tls_cert: str = setting("")
    tls_key: str = setting("")
    url: str = setting("")
    username: str = setting("")
    password: str = setting("")
    token: str = setting("")
    deidentify: bool = setting(True)
    allow_burned_in: bool = setting(False)
    compress: str = setting("none", choices=("none", "jpeg2000-lossless", "jpegls-lossless"))
    attach_ai_results: bool = setting(True)
    send_window: str = setting("", check=_check_window)
    max_rate_kbps: int = setting(0, bounds=(0, 10_000_000))
    poll_reports_s: int = setting(300, bounds=(1, 86400))
    report_ae: str = setting("")
    retry_max_s: int = setting(300, bounds=(1, 86400))


@dataclass(frozen=True)
class ForwardRule:
    """One ``[[forward_rules]]`` entry: studies matching ``when`` are queued for destination ``to``."""

    when: str = required(choices=("urgent", "reviewed", "analyzed"))
    to: str = required()
    priority: str = setting("routine", choices=("urgent", "routine"))


SECTIONS: dict[str, type] = {"storage": Storage, "dicom": Dicom, "http": Http, "log": Log, "analyze": Analyze}
# Arrays of tables: a layer that defines one replaces the lower layers' list.
TABLE_ARRAYS: dict[str, type] = {"destinations": Destination, "forward_rules": ForwardRule}


@dataclass(frozen=True)
class Config:
    """The effective configuration; building one validates it (bounds, choices, forwarding)."""

    storage: Storage = field(default_factory=Storage)
    dicom: Dicom = field(default_factory=Dicom)
    http: Http = field(default_factory=Http)
    log: Log = field(default_factory=Log)
    analyze: Analyze = field(default_factory=Analyze)
    destinations: tuple[Destination, ...] = ()
    forward_rules: tuple[ForwardRule, ...] = ()
    # Where the values came from, lowest layer first (logged and shown on the connections page).
    sources: tuple[str, ...] = field(default=("defaults",), compare=False)

    def __post_init__(self) -> None:
        _validate(self)

    @property
    def data_dir(self) -> Path:
        return self.storage.data_dir

    def destination(self, name: str) -> Destination:
        for dest in self.destinations:
            if dest.name == name:
                return dest
        known = ", ".join(d.name for d in self.destinations) or "none configured"
        raise ConfigError(f"no destination named {name!r} (known: {known})")

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values: sections as tables, table arrays as lists of tables."""
        out: dict[str, Any] = {name: _plain(getattr(self, name)) for name in SECTIONS}
        out.update({name: [_plain(entry) for entry in getattr(self, name)] for name in TABLE_ARRAYS})
        return out

    def masked(self) -> dict[str, Any]:
        """:meth:`as_dict` safe to log: values of secret-looking keys replaced by ``***``."""
        out = self.as_dict()
        tables = [out[name] for name in SECTIONS] + [entry for name in TABLE_ARRAYS for entry in out[name]]
        for table in tables:
            for key, value in table.items():
                if value and any(word in key for word in SECRET_WORDS):
                    table[key] = "***"
        return out

    def log_effective(self) -> None:
        log.info("configuration sources: %s", ", ".join(self.sources))
        log.info("effective configuration: %s", json.dumps(self.masked(), sort_keys=True))


def _plain(table: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in fields(table):
        value = getattr(table, f.name)
        out[f.name] = str(value) if isinstance(value, Path) else list(value) if isinstance(value, tuple) else value
    return out


def _check_fields(table: Any, where: str) -> None:
    for f in fields(table):
        value, key = getattr(table, f.name), f"{where}.{f.name}"
        if f.metadata["bounds"] is not None:
            _check_range(key, value, f.metadata["bounds"])
        if f.metadata["choices"] is not None:
            _check_choice(key, value, f.metadata["choices"])
        if f.metadata["check"] is not None:
            f.metadata["check"](key, value)


def _validate(config: Config) -> None:
    for name in SECTIONS:
        _check_fields(getattr(config, name), name)
    names = [d.name for d in config.destinations]
    for i, dest in enumerate(config.destinations):
        where = f"destinations[{i}] ({dest.name})"
        if names.count(dest.name) > 1:
            raise ConfigError(f"{where}.name: duplicate destination name")
        _check_fields(dest, where)
        if dest.kind == "dicom":
            if not dest.host:
                raise ConfigError(f"{where}.host: required for kind = \"dicom\"")
            _check_ae(f"{where}.called_ae", dest.called_ae)
        elif not dest.url.startswith(("http://", "https://")):
            raise ConfigError(f"{where}.url: a DICOMweb base URL (https://...) is required for kind = \"dicomweb\"")
    for i, rule in enumerate(config.forward_rules):
        _check_fields(rule, f"forward_rules[{i}]")
        if rule.to not in names:
            raise ConfigError(f"forward_rules[{i}].to: no destination named {rule.to!r}")


# ----------------------------------------------------------------------------- reading layers

@lru_cache(maxsize=None)
def _types(cls: type) -> dict[str, Any]:
    return get_type_hints(cls)


def _coerce(key: str, kind: Any, value: Any, origin: str) -> Any:
    """Convert ``value`` to the field type ``kind``; strings (environment, flags) are parsed."""
    where = f"{key} (from {origin})"
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in TRUE_WORDS + FALSE_WORDS:
            return value.lower() in TRUE_WORDS
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if kind is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if kind == tuple[str, ...]:
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{where}: expected a list of strings, got {value!r}")
        return tuple(value)
    if kind in (Path, Optional[Path]):
        if isinstance(value, Path):
            return value
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a path (a string), got {value!r}")
        if not value.strip():
            if kind is Path:
                raise ConfigError(f"{where}: expected a path, got an empty string")
            return None  # empty = not set
        return Path(value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    return value


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            raw = fh.read(CONFIG_FILE_MAX + 1)
    except FileNotFoundError as exc:
        raise ConfigError(f"config file {path} does not exist") from exc
    except OSError as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc.strerror or exc}") from exc
    if len(raw) > CONFIG_FILE_MAX:
        raise ConfigError(f"config file {path} is larger than {CONFIG_FILE_MAX // 1024} KiB: not a configuration file")
    if b"\0" in raw:
        raise ConfigError(f"config file {path} is a binary file (it contains NUL bytes), not TOML text")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path} is not UTF-8 text (invalid byte at offset {exc.start})") from exc
    try:
        parsed: dict[str, Any] = tomllib.loads(text)
        return parsed
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc
    except RecursionError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: nested too deeply") from exc


def _table_array(name: str, entries: Any, origin: str) -> list[dict[str, Any]]:
    """One ``[[name]]`` array: known keys, required keys, types and allowed values, per entry."""
    cls = TABLE_ARRAYS[name]
    if not isinstance(entries, list) or not all(isinstance(e, Mapping) for e in entries):
        raise ConfigError(f"{name} (from {origin}): expected an array of tables ([[{name}]])")
    out = []
    for i, entry in enumerate(entries):
        where = f"{name}[{i}]"
        for key in entry:
            if key not in _types(cls):
                raise ConfigError(f"{where}.{key} (from {origin}): unknown key")
        item: dict[str, Any] = {}
        for f in fields(cls):
            if f.name not in entry:
                if f.default is MISSING:
                    raise ConfigError(f"{where}.{f.name} (from {origin}): required")
                continue
            item[f.name] = _coerce(f"{where}.{f.name}", _types(cls)[f.name], entry[f.name], origin)
            if f.metadata["choices"] is not None:
                _check_choice(f"{where}.{f.name} (from {origin})", item[f.name], f.metadata["choices"])
        out.append(item)
    return out


def _merge(values: dict[str, Any], layer: Mapping[str, Any], origin: str) -> None:
    for section, table in layer.items():
        if section in TABLE_ARRAYS:
            values[section] = _table_array(section, table, origin)
            continue
        if section not in SECTIONS:
            raise ConfigError(f"{section} (from {origin}): unknown section; known: {', '.join(SECTIONS)}")
        if not isinstance(table, Mapping):
            raise ConfigError(f"{section} (from {origin}): expected a table")
        types = _types(SECTIONS[section])
        for key, value in table.items():
            if key not in types:
                raise ConfigError(f"{section}.{key} (from {origin}): unknown key")
            values[section][key] = _coerce(f"{section}.{key}", types[key], value, origin)


def _env_layer(environ: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    layer: dict[str, dict[str, Any]] = {}
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX) or name == ENV_PREFIX + "CONFIG":
            continue
        rest = name[len(ENV_PREFIX):].lower()
        if rest.startswith("destinations_"):
            continue  # applied per destination by _env_destinations
        for section in SECTIONS:
            if rest.startswith(section + "_"):
                layer.setdefault(section, {})[rest[len(section) + 1:]] = value
                break
        else:
            raise ConfigError(f"{name}: unknown configuration section in environment variable")
    return layer


def _env_destinations(values: dict[str, Any], environ: Mapping[str, str]) -> bool:
    """``APPLIANCE_DESTINATIONS_<NAME>_<KEY>`` sets a key of the destination called NAME
    (upper-cased, non-alphanumerics as ``_``), so passwords and tokens need not be in a file."""
    applied = False
    types = _types(Destination)
    for dest in values["destinations"]:
        prefix = ENV_PREFIX + "DESTINATIONS_" + "".join(c if c.isalnum() else "_" for c in dest["name"].upper()) + "_"
        for name, value in environ.items():
            if name.startswith(prefix):
                key = name[len(prefix):].lower()
                if key not in types or key in ("name", "kind"):
                    raise ConfigError(f"{name}: unknown destination key {key!r}")
                dest[key] = _coerce(f"destinations.{dest['name']}.{key}", types[key], value, "environment")
                applied = True
    return applied


def load_config(
    site_file: str | os.PathLike[str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    firmware_file: Path | None = FIRMWARE_CONFIG,
) -> Config:
    """Build the effective configuration from all layers.

    ``overrides`` maps dotted keys (``"dicom.port"``) to values from command-line flags; ``None``
    values are ignored so unset flags do not mask lower layers.
    """
    environ = os.environ if environ is None else environ
    # Only what the layers set; the dataclass defaults fill in the rest.
    values: dict[str, Any] = {name: {} for name in SECTIONS}
    values.update({name: [] for name in TABLE_ARRAYS})
    sources = ["defaults"]
    if firmware_file is not None and firmware_file.exists():
        _merge(values, _read_toml(firmware_file), str(firmware_file))
        sources.append(str(firmware_file))
    site = site_file or environ.get(ENV_PREFIX + "CONFIG")
    if site:
        _merge(values, _read_toml(Path(site)), str(site))
        sources.append(str(site))
    env_layer = _env_layer(environ)
    if env_layer:
        _merge(values, env_layer, "environment")
    # Both must run: `or` would skip the destination secrets whenever another variable is set.
    env_destinations = _env_destinations(values, environ)
    if env_layer or env_destinations:
        sources.append("environment")
    cli_layer: dict[str, dict[str, Any]] = {}
    for dotted, value in (overrides or {}).items():
        if value is not None:
            section, key = dotted.split(".", 1)
            cli_layer.setdefault(section, {})[key] = value
    if cli_layer:
        _merge(values, cli_layer, "command line")
        sources.append("command line")
    built: dict[str, Any] = {name: cls(**values[name]) for name, cls in SECTIONS.items()}
    built.update({name: tuple(cls(**entry) for entry in values[name]) for name, cls in TABLE_ARRAYS.items()})
    return Config(**built, sources=tuple(sources))
