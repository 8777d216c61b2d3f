"""Layered configuration.

Precedence, lowest to highest:

1. built-in defaults (``DEFAULTS`` below),
2. ``firmware_config/appliance.toml`` (the device's documented defaults),
3. a site file (``--config FILE`` or ``APPLIANCE_CONFIG``),
4. ``APPLIANCE_<SECTION>_<KEY>`` environment variables,
5. command-line flags.

Every value is checked against its declared type once, after layering, and every integer
against its range (:data:`BOUNDS`); an invalid value fails fast with a :class:`ConfigError`
that names the key and the problem.  A file that is not UTF-8 TOML text (a binary file, a
truncated copy) fails the same way.
"""
from __future__ import annotations

import copy
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable, Mapping

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

# section -> key -> default.  The default's type is the key's type (lists are lists of str).
DEFAULTS: dict[str, dict[str, Any]] = {
    "storage": {
        "data_dir": str(PROJECT_ROOT / "data"),
        "min_free_mb": 500,
    },
    "dicom": {
        "ae_title": "EDGE",
        "host": "0.0.0.0",
        "port": 11112,
        "allowed_calling_aes": [],
        "max_associations": 16,
        "max_associations_per_peer": 8,
        "max_pending_connections": 256,
        "association_timeout_s": 10,
        "network_timeout_s": 60,
        "pdu_timeout_s": 30,
        "max_association_s": 14400,
        "max_pdu_kb": 1024,
        "max_dataset_mb": 1024,
        "max_inflated_mb": 256,
        "processes": 0,
        "fast_reactor": True,
    },
    "http": {
        "host": "0.0.0.0",
        "port": 8080,
        "threads": 8,
        "secret_key": "",
    },
    "log": {
        "level": "INFO",
    },
    "analyze": {
        "engines_dir": str(PROJECT_ROOT / "engines"),
        "backend": "auto",
        "threads": 2,
        "workers": 1,
        "study_quiet_s": 60,
        "max_attempts": 8,
        "defer_while_receiving_s": 10,
        "shared_data_dir": str(PROJECT_ROOT.parent / "shared" / "data"),
    },
}

AE_TITLE_MAX = 16
# A site file is a few kilobytes; anything this large is not one (and is not read into memory).
CONFIG_FILE_MAX = 1024 * 1024

# Inclusive (lowest, highest) of every integer key; tests/test_config.py checks that none is
# missing.  The reasons for the DICOM limits are in firmware_config/appliance.toml.
BOUNDS: dict[str, tuple[int, int]] = {
    "storage.min_free_mb": (0, 1_000_000),
    "dicom.port": (0, 65535),
    "dicom.max_associations": (1, 256),
    "dicom.max_associations_per_peer": (1, 256),
    "dicom.max_pending_connections": (8, 1024),
    "dicom.association_timeout_s": (1, 120),
    "dicom.network_timeout_s": (1, 3600),
    "dicom.pdu_timeout_s": (1, 600),
    "dicom.max_association_s": (60, 86400),
    "dicom.max_pdu_kb": (4, 16384),
    "dicom.max_dataset_mb": (1, 4095),
    "dicom.max_inflated_mb": (1, 4095),
    "dicom.processes": (0, 16),
    "http.port": (0, 65535),
    "http.threads": (1, 256),
    "analyze.threads": (1, 64),
    "analyze.workers": (1, 16),
    "analyze.study_quiet_s": (0, 86400),
    "analyze.max_attempts": (1, 100),
    "analyze.defer_while_receiving_s": (0, 3600),
}
DESTINATION_BOUNDS: dict[str, tuple[int, int]] = {
    "port": (1, 65535),
    "max_rate_kbps": (0, 10_000_000),
    "poll_reports_s": (1, 86400),
    "retry_max_s": (1, 86400),
}

# Arrays of tables ([[destinations]], [[forward_rules]]): a layer that defines one replaces the
# lower layers' list.  key -> (default, allowed values or None); a default of None = required.
DESTINATION_KEYS: dict[str, tuple[Any, tuple | None]] = {
    "name": (None, None),
    "kind": (None, ("dicom", "dicomweb")),
    "host": ("", None),
    "port": (104, None),
    "called_ae": ("", None),
    "calling_ae": ("", None),
    "tls_ca": ("", None),
    "tls_cert": ("", None),
    "tls_key": ("", None),
    "url": ("", None),
    "username": ("", None),
    "password": ("", None),
    "token": ("", None),
    "deidentify": (True, None),
    "allow_burned_in": (False, None),
    "compress": ("none", ("none", "jpeg2000-lossless", "jpegls-lossless")),
    "attach_ai_results": (True, None),
    "send_window": ("", None),
    "max_rate_kbps": (0, None),
    "poll_reports_s": (300, None),
    "report_ae": ("", None),
    "retry_max_s": (300, None),
}
FORWARD_RULE_KEYS: dict[str, tuple[Any, tuple | None]] = {
    "when": (None, ("urgent", "reviewed", "analyzed")),
    "to": (None, None),
    "priority": ("routine", ("urgent", "routine")),
}
TABLE_ARRAYS = {"destinations": DESTINATION_KEYS, "forward_rules": FORWARD_RULE_KEYS}


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


def _check_level(key: str, value: str) -> None:
    if value.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ConfigError(f"{key}: {value!r} is not one of DEBUG, INFO, WARNING, ERROR")


def _check_backend(key: str, value: str) -> None:
    if value not in ("auto", "onnxruntime", "tensorrt"):
        raise ConfigError(f"{key}: {value!r} is not one of auto, onnxruntime, tensorrt")


def _check_calling_aes(key: str, value: list) -> None:
    for ae in value:
        if ae != "*":
            _check_ae(key, ae)


CHECKS: dict[str, Callable[[str, Any], None]] = {
    "dicom.ae_title": _check_ae,
    "dicom.allowed_calling_aes": _check_calling_aes,
    "log.level": _check_level,
    "analyze.backend": _check_backend,
}


class Config:
    """The effective configuration: ``config["dicom"]["port"]`` or ``config.get("dicom.port")``."""

    def __init__(self, values: dict[str, Any], sources: list[str]):
        self._values = values
        self.sources = sources

    def __getitem__(self, section: str) -> Any:
        return self._values[section]

    def destination(self, name: str) -> dict[str, Any]:
        for dest in self._values["destinations"]:
            if dest["name"] == name:
                return dest
        known = ", ".join(d["name"] for d in self._values["destinations"]) or "none configured"
        raise ConfigError(f"no destination named {name!r} (known: {known})")

    def get(self, dotted: str) -> Any:
        section, key = dotted.split(".", 1)
        return self._values[section][key]

    @property
    def data_dir(self) -> Path:
        return Path(self._values["storage"]["data_dir"])

    def as_dict(self) -> dict[str, Any]:
        return copy.deepcopy(self._values)

    def masked(self) -> dict[str, Any]:
        """A copy safe to log: values of secret-looking keys replaced by ``***``."""
        out = self.as_dict()
        tables = [t for t in out.values() if isinstance(t, dict)]
        tables += [entry for name in TABLE_ARRAYS for entry in out[name]]
        for table in tables:
            for key, value in table.items():
                if value and any(word in key for word in SECRET_WORDS):
                    table[key] = "***"
        return out

    def log_effective(self) -> None:
        log.info("configuration sources: %s", ", ".join(self.sources))
        log.info("effective configuration: %s", json.dumps(self.masked(), sort_keys=True))


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
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc
    except RecursionError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: nested too deeply") from exc


def _coerce(key: str, default: Any, value: Any, origin: str) -> Any:
    """Convert ``value`` to the type of ``default``; strings (environment) are parsed."""
    where = f"{key} (from {origin})"
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return value.lower() in ("1", "true", "yes", "on")
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if isinstance(default, int):
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
    if isinstance(default, list):
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{where}: expected a list of strings, got {value!r}")
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    return value


def _table_array(name: str, entries: Any, origin: str) -> list[dict[str, Any]]:
    """Validate one ``[[name]]`` array: known keys, required keys, types, allowed values."""
    schema = TABLE_ARRAYS[name]
    if not isinstance(entries, list) or not all(isinstance(e, Mapping) for e in entries):
        raise ConfigError(f"{name} (from {origin}): expected an array of tables ([[{name}]])")
    out = []
    for i, entry in enumerate(entries):
        where = f"{name}[{i}]"
        item: dict[str, Any] = {}
        for key, value in entry.items():
            if key not in schema:
                raise ConfigError(f"{where}.{key} (from {origin}): unknown key")
        for key, (default, allowed) in schema.items():
            if key not in entry:
                if default is None:
                    raise ConfigError(f"{where}.{key} (from {origin}): required")
                item[key] = default
                continue
            item[key] = _coerce(f"{where}.{key}", "" if default is None else default, entry[key], origin)
            if allowed and item[key] not in allowed:
                raise ConfigError(f"{where}.{key} (from {origin}): {item[key]!r} is not one of {', '.join(allowed)}")
        out.append(item)
    return out


def _check_forwarding(values: dict[str, Any]) -> None:
    names = [d["name"] for d in values["destinations"]]
    for i, dest in enumerate(values["destinations"]):
        where = f"destinations[{i}] ({dest['name']})"
        if names.count(dest["name"]) > 1:
            raise ConfigError(f"{where}.name: duplicate destination name")
        for key, bounds in DESTINATION_BOUNDS.items():
            _check_range(f"{where}.{key}", dest[key], bounds)
        if dest["kind"] == "dicom":
            if not dest["host"]:
                raise ConfigError(f"{where}.host: required for kind = \"dicom\"")
            _check_ae(f"{where}.called_ae", dest["called_ae"])
        elif not dest["url"].startswith(("http://", "https://")):
            raise ConfigError(f"{where}.url: a DICOMweb base URL (https://...) is required for kind = \"dicomweb\"")
        if dest["send_window"] and not _valid_window(dest["send_window"]):
            raise ConfigError(f"{where}.send_window: {dest['send_window']!r} is not HH:MM-HH:MM")
    for i, rule in enumerate(values["forward_rules"]):
        if rule["to"] not in names:
            raise ConfigError(f"forward_rules[{i}].to: no destination named {rule['to']!r}")


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


def _merge(values: dict[str, Any], layer: Mapping[str, Any], origin: str) -> None:
    for section, table in layer.items():
        if section in TABLE_ARRAYS:
            values[section] = _table_array(section, table, origin)
            continue
        if section not in DEFAULTS:
            raise ConfigError(f"{section} (from {origin}): unknown section; known: {', '.join(DEFAULTS)}")
        if not isinstance(table, Mapping):
            raise ConfigError(f"{section} (from {origin}): expected a table")
        for key, value in table.items():
            if key not in DEFAULTS[section]:
                raise ConfigError(f"{section}.{key} (from {origin}): unknown key")
            values[section][key] = _coerce(f"{section}.{key}", DEFAULTS[section][key], value, origin)


def _env_layer(environ: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    layer: dict[str, dict[str, Any]] = {}
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX) or name == ENV_PREFIX + "CONFIG":
            continue
        rest = name[len(ENV_PREFIX):].lower()
        if rest.startswith("destinations_"):
            continue  # applied per destination by _env_destinations
        for section in DEFAULTS:
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
    for dest in values["destinations"]:
        prefix = ENV_PREFIX + "DESTINATIONS_" + "".join(c if c.isalnum() else "_" for c in dest["name"].upper()) + "_"
        for name, value in environ.items():
            if name.startswith(prefix):
                key = name[len(prefix):].lower()
                if key not in DESTINATION_KEYS or key in ("name", "kind"):
                    raise ConfigError(f"{name}: unknown destination key {key!r}")
                dest[key] = _coerce(f"destinations.{dest['name']}.{key}", DESTINATION_KEYS[key][0], value, "environment")
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
    values: dict[str, Any] = copy.deepcopy(DEFAULTS)
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
    for dotted, bounds in BOUNDS.items():
        section, key = dotted.split(".", 1)
        _check_range(dotted, values[section][key], bounds)
    for dotted, check in CHECKS.items():
        section, key = dotted.split(".", 1)
        check(dotted, values[section][key])
    _check_forwarding(values)
    return Config(values, sources)
