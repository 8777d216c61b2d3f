"""Read-side queries over what is stored: the data behind `appliance studies` and the worklist."""
from __future__ import annotations

from typing import Any

import json

from .db import Database
from .triage import WORKLIST_ORDER

SCHEMA_VERSION = 1


def list_studies(database: Database) -> list[dict[str, Any]]:
    """Every study with its patient, series and instances, newest arrival first.

    This is the documented ``appliance studies --json`` schema (see README); add keys, never
    rename or remove them.
    """
    studies = database.query(
        "SELECT s.*, p.patient_id, p.issuer, p.name, p.birth_date, p.sex FROM studies s "
        f"JOIN patients p ON p.id = s.patient_pk ORDER BY {WORKLIST_ORDER}, s.study_uid"
    )
    results_by_instance: dict[str, list[dict[str, Any]]] = {}
    for row in database.query("SELECT * FROM analysis_results ORDER BY id"):
        results_by_instance.setdefault(row["sop_instance_uid"], []).append(row)
    job_errors = {
        row["sop_instance_uid"]: row["last_error"]
        for row in database.query("SELECT sop_instance_uid, last_error FROM analysis_jobs WHERE state = 'failed'")
    }
    series_rows = database.query("SELECT * FROM series ORDER BY study_uid, series_number, series_uid")
    instance_rows = database.query(
        "SELECT sop_instance_uid, series_uid, sop_class_uid, instance_number, file_path, size, sha256, "
        "transfer_syntax, calling_ae, source, received_at, state FROM instances "
        "ORDER BY series_uid, CAST(instance_number AS INTEGER), sop_instance_uid"
    )
    instances_by_series: dict[str, list[dict[str, Any]]] = {}
    for row in instance_rows:
        row.update(_analysis(results_by_instance.get(row["sop_instance_uid"], []), job_errors.get(row["sop_instance_uid"])))
        instances_by_series.setdefault(row.pop("series_uid"), []).append(row)
    series_by_study: dict[str, list[dict[str, Any]]] = {}
    for row in series_rows:
        instances = instances_by_series.get(row["series_uid"], [])
        series_by_study.setdefault(row.pop("study_uid"), []).append(
            {**row, "instance_count": len(instances), "instances": instances}
        )
    out = []
    for s in studies:
        series = series_by_study.get(s["study_uid"], [])
        out.append(
            {
                "study_uid": s["study_uid"],
                "patient": {
                    "id": s["patient_id"],
                    "issuer": s["issuer"],
                    "name": s["name"],
                    "birth_date": s["birth_date"],
                    "sex": s["sex"],
                },
                "accession": s["accession"],
                "study_date": s["study_date"],
                "study_time": s["study_time"],
                "description": s["description"],
                "state": s["state"],
                "priority": s["priority"],
                "score": s["score"],
                "settled_at": s["settled_at"] or None,
                "first_received_at": s["first_received_at"],
                "last_received_at": s["last_received_at"],
                "modalities": sorted({x["modality"] for x in series if x["modality"]}),
                "series_count": len(series),
                "instance_count": sum(x["instance_count"] for x in series),
                "series": series,
            }
        )
    return out


def _analysis(results: list[dict[str, Any]], job_error: str | None) -> dict[str, Any]:
    """Per-image analysis keys of the JSON schema: findings, abstentions, errors, objects."""
    findings, abstentions, errors, srs, heatmaps = [], [], [], [], []
    objects_pending = False
    for r in results:
        objects_pending = objects_pending or r["objects_state"] in ("pending", "building")
        if r["objects_state"] == "failed":
            errors.append({"model": r["model_id"], "model_version": r["model_version"], "error": r["objects_error"]})
        for f in json.loads(r["findings_json"]):
            findings.append({
                "model": r["model_id"], "model_version": r["model_version"], "finding": f["code"],
                "label": f.get("label", f["code"]), "probability": f["probability"], "positive": f["positive"],
                "threshold": f["threshold"], "severity": f.get("severity", ""),
            })
        if r["status"] == "abstained":
            abstentions.append({"model": r["model_id"], "model_version": r["model_version"],
                                "code": r["abstention_code"], "reason": r["abstention_reason"]})
        if r["status"] == "failed":
            errors.append({"model": r["model_id"], "model_version": r["model_version"], "error": r["error"]})
        if r["sr_path"]:
            srs.append({"model": r["model_id"], "sop_instance_uid": r["sr_sop_instance_uid"], "path": r["sr_path"]})
        if r["heatmap_path"]:
            heatmaps.append({"model": r["model_id"], "sop_instance_uid": r["heatmap_sop_instance_uid"],
                             "path": r["heatmap_path"]})
    if job_error:
        errors.append({"model": "", "model_version": "", "error": job_error})
    return {"findings": findings, "abstentions": abstentions, "errors": errors, "sr": srs, "heatmaps": heatmaps,
            "objects_pending": objects_pending}
