"""Status screen: device health, queue depths, inference backend and models, destinations."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Optional

import psutil
from flask import Blueprint, current_app, render_template

from appliance.analyze.backends import resolve_backend
from appliance.errors import ApplianceError
from appliance.lifecycle import JobState

from web.core.security import database

from .. import engines_info, forwarding

bp = Blueprint("status", __name__)

CPU_SAMPLE_S = 0.1


def temperatures() -> list[dict[str, Any]]:
    """Highest current reading per sensor chip (Jetson: CPU/GPU/SoC thermal zones); empty where
    the platform exposes none (many VMs)."""
    read = getattr(psutil, "sensors_temperatures", None)
    if read is None:
        return []
    try:
        sensors = read() or {}
    except (OSError, RuntimeError):
        return []
    out = []
    for chip, entries in sorted(sensors.items()):
        values = [e.current for e in entries if e.current is not None]
        if values:
            highs = [e.high for e in entries if e.high]
            out.append({"name": chip, "celsius": round(max(values), 1), "high": min(highs) if highs else None})
    return out


def health(data_dir: Path, floor_mb: int) -> dict[str, Any]:
    memory = psutil.virtual_memory()
    disk = shutil.disk_usage(data_dir)
    free_mb = disk.free // (1024 * 1024)
    try:
        load: Optional[tuple[float, float, float]] = psutil.getloadavg()
    except (AttributeError, OSError):
        load = None
    return {
        "cpu_percent": psutil.cpu_percent(interval=CPU_SAMPLE_S),
        "cpu_count": psutil.cpu_count() or 1,
        "load": load,
        "memory_percent": memory.percent,
        "memory_available_mb": memory.available // (1024 * 1024),
        "memory_total_mb": memory.total // (1024 * 1024),
        "disk_free_mb": free_mb,
        "disk_total_mb": disk.total // (1024 * 1024),
        "disk_floor_mb": floor_mb,
        "accepting_images": free_mb >= floor_mb,
        "temperatures": temperatures(),
    }


def queues() -> dict[str, Any]:
    db = database()
    jobs = {r["state"]: r["n"] for r in db.query("SELECT state, COUNT(*) AS n FROM analysis_jobs GROUP BY state")}
    return {**{state.value: jobs.get(state.value, 0) for state in JobState}, "outbox": forwarding.outbox_depth(db)}


def inference() -> dict[str, Any]:
    config = current_app.config["APPLIANCE"]
    configured = config.analyze.backend
    try:
        active, problem = resolve_backend(configured), ""
    except ApplianceError as exc:
        active, problem = "", str(exc)
    last = database().query("SELECT backend, precision, created_at FROM analysis_results WHERE backend != '' "
                            "ORDER BY id DESC LIMIT 1")
    models = engines_info.installed(config.analyze.engines_dir)
    return {"configured": configured, "active": active, "problem": problem, "last": last[0] if last else None,
            "models": models}


@bp.get("/status")
def index() -> Any:
    config = current_app.config["APPLIANCE"]
    return render_template("status.html", health=health(Path(config.data_dir), int(config.storage.min_free_mb)),
                           queues=queues(), inference=inference(),
                           destinations=forwarding.destinations_overview(database(), config))
