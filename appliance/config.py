"""Layered configuration.

Precedence, lowest to highest:

1. built-in defaults (``DEFAULTS`` below),
2. ``firmware_config/appliance.toml`` (the device's documented defaults),
3. a site file (``--config FILE`` or ``APPLIANCE_CONFIG``),
4. ``APPLIANCE_<SECTION>_<KEY>`` environment variables,
5. command-line flags.

Every value is checked against its declared type once, after layering; an invalid value fails
fast with a :class:`ConfigError` that names the key and the problem.
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
        "network_timeout_s": 60,
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
        "shared_data_dir": str(PROJECT_ROOT.parent / "shared" / "data"),
    },
}

AE_TITLE_MAX = 16


def _check_ae(key: str, value: str) -> None:
    if not value or len(value) > AE_TITLE_MAX or "\\" in value or not value.isprintable():
        raise ConfigError(f"{key}: {value!r} is not a valid AE title (1-16 printable characters)")


def _check_port(key: str, value: int) -> None:
    if not 0 <= value <= 65535:
        raise ConfigError(f"{key}: {value} is not a TCP port (0-65535)")


def _check_positive(key: str, value: int) -> None:
    if value < 1:
        raise ConfigError(f"{key}: must be at least 1, got {value}")


def _check_non_negative(key: str, value: int) -> None:
    if value < 0:
        raise ConfigError(f"{key}: must not be negative, got {value}")


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
    "storage.min_free_mb": _check_non_negative,
    "dicom.ae_title": _check_ae,
    "dicom.port": _check_port,
    "dicom.allowed_calling_aes": _check_calling_aes,
    "dicom.max_associations": _check_positive,
    "dicom.network_timeout_s": _check_positive,
    "http.port": _check_port,
    "http.threads": _check_positive,
    "log.level": _check_level,
    "analyze.backend": _check_backend,
    "analyze.threads": _check_positive,
    "analyze.workers": _check_positive,
    "analyze.study_quiet_s": _check_non_negative,
    "analyze.max_attempts": _check_positive,
}


class Config:
    """The effective configuration: ``config["dicom"]["port"]`` or ``config.get("dicom.port")``."""

    def __init__(self, values: dict[str, dict[str, Any]], sources: list[str]):
        self._values = values
        self.sources = sources

    def __getitem__(self, section: str) -> dict[str, Any]:
        return self._values[section]

    def get(self, dotted: str) -> Any:
        section, key = dotted.split(".", 1)
        return self._values[section][key]

    @property
    def data_dir(self) -> Path:
        return Path(self._values["storage"]["data_dir"])

    def as_dict(self) -> dict[str, dict[str, Any]]:
        return copy.deepcopy(self._values)

    def masked(self) -> dict[str, dict[str, Any]]:
        """A copy safe to log: values of secret-looking keys replaced by ``***``."""
        out = self.as_dict()
        for section in out.values():
            for key, value in section.items():
                if value and any(word in key for word in SECRET_WORDS):
                    section[key] = "***"
        return out

    def log_effective(self) -> None:
        log.info("configuration sources: %s", ", ".join(self.sources))
        log.info("effective configuration: %s", json.dumps(self.masked(), sort_keys=True))


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError as exc:
        raise ConfigError(f"config file {path} does not exist") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc
    except OSError as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc}") from exc


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


def _merge(values: dict[str, dict[str, Any]], layer: Mapping[str, Any], origin: str) -> None:
    for section, table in layer.items():
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
        for section in DEFAULTS:
            if rest.startswith(section + "_"):
                layer.setdefault(section, {})[rest[len(section) + 1:]] = value
                break
        else:
            raise ConfigError(f"{name}: unknown configuration section in environment variable")
    return layer


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
    values = copy.deepcopy(DEFAULTS)
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
        sources.append("environment")
    cli_layer: dict[str, dict[str, Any]] = {}
    for dotted, value in (overrides or {}).items():
        if value is not None:
            section, key = dotted.split(".", 1)
            cli_layer.setdefault(section, {})[key] = value
    if cli_layer:
        _merge(values, cli_layer, "command line")
        sources.append("command line")
    for dotted, check in CHECKS.items():
        section, key = dotted.split(".", 1)
        check(dotted, values[section][key])
    return Config(values, sources)
