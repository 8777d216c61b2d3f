"""Installed model packages as the UI shows them, cached briefly.

``discover_models`` verifies every file hash of every package (hundreds of ms); the study
view, status and admin screens need only names and versions, so the answer is kept for
``TTL_S`` seconds.  A package installed meanwhile shows up within that time.
"""
from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

from appliance.analyze.manifest import Manifest, discover_models
from appliance.errors import ManifestError

TTL_S = 60.0
_lock = threading.Lock()
_cache: dict[str, tuple[float, dict[str, Any]]] = {}


def installed(engines_dir: Path | str) -> dict[str, Any]:
    """id -> {"ok", "name", "version", "error", "manifest"} for every package."""
    key = str(engines_dir)
    with _lock:
        hit = _cache.get(key)
        if hit is not None and time.monotonic() - hit[0] < TTL_S:
            return hit[1]
    out: dict[str, Any] = {}
    for model_id, found in discover_models(engines_dir).items():
        if isinstance(found, ManifestError):
            out[model_id] = {"ok": False, "name": model_id, "version": "", "error": str(found), "manifest": None}
        else:
            out[model_id] = {"ok": True, "name": found.name or model_id, "version": found.version, "error": "",
                             "manifest": found}
    with _lock:
        _cache[key] = (time.monotonic(), out)
    return out


def model_name(engines_dir: Path | str, model_id: str) -> str:
    info = installed(engines_dir).get(model_id)
    return str(info["name"]) if info else model_id


def manifest(engines_dir: Path | str, model_id: str) -> Manifest | None:
    info = installed(engines_dir).get(model_id)
    return info["manifest"] if info else None
