"""Read-side queries over what is stored: the data behind `appliance studies` and the worklist."""
from __future__ import annotations

import json
from typing import Any

from .db import Database
from .lifecycle import OBJECTS_OUTSTANDING, JobState, ObjectsState, ResultStatus
from .triage import WORKLIST_ORDER, current_results

SCHEMA_VERSION = 1


def list_studies(database: Database) -> list[dict[str, Any]]:
    """Every study with its patient, series and instances, newest arrival first.

    This is the documented ``appliance studies --json`` schema (see README); add keys, never
    rename or remove them.  Per image, ``findings`` and the other analysis keys hold the current
    results only (computed on the image's current bytes; each finding says its ``sha256``), and
    ``superseded_results`` the results of bytes since replaced (see :func:`superseded_results`).
    """
    studies = database.query(
        "SELECT s.*, p.patient_id, p.issuer, p.name, p.birth_date, p.sex FROM studies s "
        f"JOIN patients p ON p.id = s.patient_pk ORDER BY {WORKLIST_ORDER}, s.study_uid"
    )
    results_by_instance: dict[str, list[dict[str, Any]]] = {}
    for row in database.query("SELECT * FROM analysis_results ORDER BY id"):
        results_by_instance.setdefault(row["sop_instance_uid"], []).append(row)
    superseded_by_instance: dict[str, list[dict[str, Any]]] = {}
    for row in database.query("SELECT * FROM superseded_results ORDER BY id"):
        superseded_by_instance.setdefault(row["sop_instance_uid"], []).append(_superseded(row))
    job_errors = {
        row["sop_instance_uid"]: row["last_error"]
        for row in database.query("SELECT sop_instance_uid, last_error FROM analysis_jobs WHERE state = ?",
                                  (JobState.FAILED.value,))
    }
    series_rows = database.query("SELECT * FROM series ORDER BY study_uid, series_number, series_uid")
    instance_rows = database.query(
        "SELECT sop_instance_uid, series_uid, sop_class_uid, instance_number, file_path, size, sha256, "
        "transfer_syntax, calling_ae, source, received_at, state FROM instances "
        "ORDER BY series_uid, CAST(instance_number AS INTEGER), sop_instance_uid"
    )
    instances_by_series: dict[str, list[dict[str, Any]]] = {}
    for row in instance_rows:
        sop = row["sop_instance_uid"]
        # A result on other bytes is superseded (the worker moves it within a second): never current.
        current = [r for r in results_by_instance.get(sop, []) if r["sha256"] == row["sha256"]]
        row.update(_analysis(current, job_errors.get(sop)))
        row["superseded_results"] = superseded_by_instance.get(sop, [])
        instances_by_series.setdefault(row.pop("series_uid"), []).append(row)
    series_by_study: dict[str, list[dict[str, Any]]] = {}
    for row in series_rows:
        instances = instances_by_series.get(row["series_uid"], [])
        series_by_study.setdefault(row.pop("study_uid"), []).append(
            {**row, "instance_count": len(instances), "instances": instances}
        )
    failures = study_failures(database, [s["study_uid"] for s in studies])
    out = []
    for s in studies:
        series = series_by_study.get(s["study_uid"], [])
        study_failed = failures.get(s["study_uid"], [])
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
                "failures": study_failed,
                "notes": failure_notes(study_failed),
            }
        )
    return out


def study_failures(database: Database, study_uids: list[str]) -> dict[str, list[dict[str, Any]]]:
    """Per study, what of the AI's work failed: analysis jobs, models on an image, AI objects.

    Each entry: ``stage`` ("analysis" or "objects"), ``sop_instance_uid``, ``model`` and
    ``model_version`` (empty for a whole job), ``reason``.  Only the newest version of each model
    counts, as for triage: a newer model that succeeded supersedes an older one that failed.
    """
    if not study_uids:
        return {}
    out: dict[str, list[dict[str, Any]]] = {}
    for chunk in range(0, len(study_uids), 500):  # SQLite's bound-parameter limit
        uids = study_uids[chunk:chunk + 500]
        marks = ", ".join("?" * len(uids))
        # An image's latest job only: a later (re-)analysis that ran supersedes a failed one.
        for row in database.query(f"SELECT study_uid, sop_instance_uid, last_error FROM analysis_jobs j "
                                  f"WHERE state = ? AND study_uid IN ({marks}) AND id = (SELECT MAX(id) "
                                  f"FROM analysis_jobs WHERE sop_instance_uid = j.sop_instance_uid) ORDER BY id",
                                  (JobState.FAILED.value, *uids)):
            out.setdefault(row["study_uid"], []).append(
                {"stage": "analysis", "sop_instance_uid": row["sop_instance_uid"], "model": "", "model_version": "",
                 "reason": row["last_error"]})
        by_study: dict[str, list[dict[str, Any]]] = {}
        for row in database.query(f"SELECT r.* FROM analysis_results r JOIN instances i ON i.sop_instance_uid = "
                                  f"r.sop_instance_uid AND i.sha256 = r.sha256 WHERE r.study_uid IN ({marks}) "
                                  f"ORDER BY r.id", tuple(uids)):
            by_study.setdefault(row["study_uid"], []).append(row)
        for study_uid, rows in by_study.items():
            for r in current_results(rows):
                for stage, failed, reason in (("analysis", r["status"] == ResultStatus.FAILED, r["error"]),
                                              ("objects", r["objects_state"] == ObjectsState.FAILED,
                                               r["objects_error"])):
                    if failed:
                        out.setdefault(study_uid, []).append(
                            {"stage": stage, "sop_instance_uid": r["sop_instance_uid"], "model": r["model_id"],
                             "model_version": r["model_version"], "reason": reason})
    return out


def failure_notes(failures: list[dict[str, Any]]) -> list[str]:
    """The failures in words, one line per distinct failure ("AI objects failed (model 1.0): why")."""
    notes: list[str] = []
    for f in failures:
        what = "AI objects failed" if f["stage"] == "objects" else "analysis failed"
        model = f" ({f['model']} {f['model_version']})" if f["model"] else ""
        note = f"{what}{model}: {f['reason']}"
        if note not in notes:
            notes.append(note)
    return notes


def superseded_results(database: Database, study_uid: str) -> list[dict[str, Any]]:
    """A study's superseded results, oldest first: the history the study view shows as such.

    Each: ``sop_instance_uid``, ``model``, ``model_version``, ``status``, ``sha256`` (the bytes
    it was computed on), ``superseded_at``, ``superseded_by_sha256`` (the bytes that replaced
    them), ``created_at``, ``findings`` (as per image, with ``sha256``), ``abstention`` (code and
    reason, or None), ``error``, ``sr_sop_instance_uid``, ``heatmap_sop_instance_uid`` (the AI
    objects superseded with it; empty if it had none).
    """
    return [_superseded(row) for row in database.query(
        "SELECT * FROM superseded_results WHERE study_uid = ? ORDER BY id", (study_uid,))]


def _superseded(r: dict[str, Any]) -> dict[str, Any]:
    return {
        "sop_instance_uid": r["sop_instance_uid"], "model": r["model_id"], "model_version": r["model_version"],
        "status": r["status"], "sha256": r["sha256"], "superseded_at": r["superseded_at"],
        "superseded_by_sha256": r["superseded_by_sha256"], "created_at": r["created_at"],
        "findings": [_finding(r, f) for f in json.loads(r["findings_json"])],
        "abstention": {"code": r["abstention_code"], "reason": r["abstention_reason"]}
        if r["status"] == ResultStatus.ABSTAINED else None,
        "error": r["error"], "sr_sop_instance_uid": r["sr_sop_instance_uid"],
        "heatmap_sop_instance_uid": r["heatmap_sop_instance_uid"],
    }


def _finding(r: dict[str, Any], f: dict[str, Any]) -> dict[str, Any]:
    return {
        "model": r["model_id"], "model_version": r["model_version"], "finding": f["code"],
        "label": f.get("label", f["code"]), "probability": f["probability"], "positive": f["positive"],
        "threshold": f["threshold"], "severity": f.get("severity", ""), "sha256": r["sha256"], **_monitoring(r),
    }


def _monitoring(r: dict[str, Any]) -> dict[str, Any]:
    """What a site-QA monitor reads per result: ``ood_distance`` (None: no OOD statistics),
    ``frame_index`` (0-based) and the acquisition ``fingerprint`` (appliance.analyze.result);
    and ``notes``, what the staff must read with the result (e.g. the patient's age was unknown)."""
    return {"ood_distance": r["ood_distance"], "frame_index": r["frame_index"],
            "fingerprint": json.loads(r["fingerprint_json"] or "{}"), "notes": json.loads(r["notes_json"] or "[]")}


def _analysis(results: list[dict[str, Any]], job_error: str | None) -> dict[str, Any]:
    """Per-image analysis keys of the JSON schema: findings, abstentions, errors, objects."""
    findings, abstentions, errors, srs, heatmaps = [], [], [], [], []
    objects_pending = False
    for r in results:
        objects_pending = objects_pending or r["objects_state"] in OBJECTS_OUTSTANDING
        if r["objects_state"] == ObjectsState.FAILED:
            errors.append({"model": r["model_id"], "model_version": r["model_version"], "error": r["objects_error"]})
        findings += [_finding(r, f) for f in json.loads(r["findings_json"])]
        if r["status"] == ResultStatus.ABSTAINED:
            abstentions.append({"model": r["model_id"], "model_version": r["model_version"],
                                "code": r["abstention_code"], "reason": r["abstention_reason"], **_monitoring(r)})
        if r["status"] == ResultStatus.FAILED:
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
