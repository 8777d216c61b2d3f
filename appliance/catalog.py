"""Read-side queries over what is stored: the data behind `appliance studies` and the worklist."""
from __future__ import annotations

from typing import Any

from .db import Database

SCHEMA_VERSION = 1


def list_studies(database: Database) -> list[dict[str, Any]]:
    """Every study with its patient, series and instances, newest arrival first.

    This is the documented ``appliance studies --json`` schema (see README); add keys, never
    rename or remove them.
    """
    studies = database.query(
        "SELECT s.*, p.patient_id, p.issuer, p.name, p.birth_date, p.sex FROM studies s "
        "JOIN patients p ON p.id = s.patient_pk ORDER BY s.last_received_at DESC, s.study_uid"
    )
    series_rows = database.query("SELECT * FROM series ORDER BY study_uid, series_number, series_uid")
    instance_rows = database.query(
        "SELECT sop_instance_uid, series_uid, sop_class_uid, instance_number, file_path, size, sha256, "
        "transfer_syntax, calling_ae, source, received_at, state FROM instances "
        "ORDER BY series_uid, CAST(instance_number AS INTEGER), sop_instance_uid"
    )
    instances_by_series: dict[str, list[dict[str, Any]]] = {}
    for row in instance_rows:
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
                "first_received_at": s["first_received_at"],
                "last_received_at": s["last_received_at"],
                "modalities": sorted({x["modality"] for x in series if x["modality"]}),
                "series_count": len(series),
                "instance_count": sum(x["instance_count"] for x in series),
                "series": series,
            }
        )
    return out
