"""``/healthz``: liveness for monitors and installers; no login, no patient data."""
from __future__ import annotations

import shutil
from typing import Optional

from flask import Blueprint, Response, current_app, jsonify

from appliance.config import Config

bp = Blueprint("health", __name__)


@bp.get("/healthz")
def healthz() -> Response:
    config: Optional[Config] = current_app.config.get("APPLIANCE")
    body: dict[str, object] = {"status": "ok"}
    if config is not None:
        free_mb = shutil.disk_usage(config.data_dir).free // (1024 * 1024)
        floor_mb = config.storage.min_free_mb
        body.update(disk_free_mb=free_mb, disk_floor_mb=floor_mb, accepting_images=free_mb >= floor_mb)
    return jsonify(body)
