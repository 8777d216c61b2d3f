"""``/healthz``: liveness for monitors and installers; no login, no patient data."""
from __future__ import annotations

import shutil

from flask import Blueprint, current_app, jsonify

bp = Blueprint("health", __name__)


@bp.get("/healthz")
def healthz():  # type: ignore[no-untyped-def]
    config = current_app.config.get("APPLIANCE")
    body: dict = {"status": "ok"}
    if config is not None:
        usage = shutil.disk_usage(config.data_dir)
        body["disk_free_mb"] = usage.free // (1024 * 1024)
        body["disk_floor_mb"] = config.storage.min_free_mb
        body["accepting_images"] = body["disk_free_mb"] >= body["disk_floor_mb"]
    return jsonify(body)
