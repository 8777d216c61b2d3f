"""Read-side queries behind the worklist and the study view, and the plain-words AI summary.

The worklist's first page must render in well under 200 ms with 10,000 studies, so the page
query uses the worklist index (``triage.WORKLIST_ORDER``) with LIMIT/OFFSET, and everything
else (modalities, AI results, outbox items) is fetched for the page's studies only.
"""
from __future__ import annotations

import json
from typing import Any, Iterable

from flask_babel import gettext as _

from appliance import triage
from appliance.db import Database
from appliance.lifecycle import (JOB_OUTSTANDING, OUTBOX_ACTIVE, JobState, OutboxState, ResultStatus, StudyState,
                                 clinical_sql, words)
from appliance.lifecycle import marks as lifecycle_marks
from web.core.formatting import age, local_time, patient_name

PRIORITIES = ("urgent", "review", "routine", "not_analyzed")
# The study states (appliance.lifecycle), in the order a case moves through them.
STATES = StudyState.values()
ROUTER = "router"
# Larger page numbers are read as this one (then clamped to the last page): no arithmetic on,
# or SQL parameter from, a number with thirty digits.
MAX_PAGE = 10**6
LIKE_ESCAPE = "\\"


def abstention_words(code: str) -> str:
    """An abstention code (see appliance.analyze.gate) in words a clinic user understands."""
    words = {
        "NO_APPLICABLE_MODEL": _("no AI model for this type of image"),
        "NOT_APPLICABLE_MODALITY": _("not an image type this model reads"),
        "WRONG_BODY_PART": _("not the body part this model reads"),
        "WRONG_VIEW": _("not a view this model reads"),
        "WRONG_PHOTOMETRIC": _("unsupported image encoding"),
        "COLOUR_IMAGE": _("colour image; this model reads greyscale only"),
        "TOO_SMALL": _("image too small to analyse"),
        "UNREADABLE_PIXELS": _("image unreadable or blank"),
        "OUT_OF_DISTRIBUTION": _("image unlike those the model was trained on"),
        "OUTSIDE_POPULATION": _("patient outside the age or sex this model was made for"),
        "POPULATION_UNKNOWN": _("patient's age or sex unknown; this model needs it"),
    }
    return words.get(code, _("the model declined to analyse this image"))


def priority_words(priority: str) -> str:
    return {"urgent": _("Urgent"), "review": _("Review"), "routine": _("Routine"),
            "not_analyzed": _("Not analysed")}.get(priority, priority)


def state_words(state: str) -> str:
    names: dict[str, str] = {StudyState.RECEIVED: _("Received"), StudyState.ANALYZED: _("Analysed"),
                             StudyState.REVIEWED: _("Reviewed"), StudyState.SENT: _("Sent"),
                             StudyState.REPORT_RECEIVED: _("Report back")}
    return names.get(state, state)


def ai_summary(rows: Iterable[dict[str, Any]], outstanding: int, failed_jobs: int) -> dict[str, str]:
    """One line for the worklist: what the AI said about the study, in plain words."""
    rows = triage.current_results(rows)
    analyzed = [r for r in rows if r["status"] == ResultStatus.ANALYZED]
    positives, top = [], 0.0
    for r in analyzed:
        for f in json.loads(r["findings_json"]):
            top = max(top, float(f["probability"]))
            if f["positive"]:
                positives.append(f)
    if positives:
        best = max(positives, key=lambda f: float(f["probability"]))
        return {"kind": "positive", "text": f"{best.get('label', best['code'])} {float(best['probability']):.2f}"}
    if analyzed:
        return {"kind": "negative", "text": _("no finding above threshold (highest %(p)s)", p=f"{top:.2f}")}
    if outstanding:
        return {"kind": "pending", "text": _("analysis pending")}
    if failed_jobs or any(r["status"] == ResultStatus.FAILED for r in rows):
        return {"kind": "failed", "text": _("analysis failed")}
    abstained = [r for r in rows if r["status"] == ResultStatus.ABSTAINED]
    if abstained:
        # A model's own refusal says more than the router's "no model applies".
        chosen = next((r for r in abstained if r["model_id"] != ROUTER), abstained[0])
        return {"kind": "abstained", "text": _("abstained: %(why)s", why=abstention_words(chosen["abstention_code"]))}
    return {"kind": "none", "text": _("not analysed")}


def _in(values: list[str]) -> str:
    return ", ".join("?" * len(values))


def page_number(raw: str) -> int:
    """A ``page=`` value: 1 when absent, else ASCII digits meaning at least 1 (ValueError for
    anything else: signs, spaces, 0, other scripts' digits).  Capped at ``MAX_PAGE``."""
    if raw == "":
        return 1
    if not (raw.isascii() and raw.isdigit()):
        raise ValueError("not a page number")
    digits = raw.lstrip("0")
    if not digits:
        raise ValueError("pages start at 1")
    return min(int(digits), MAX_PAGE) if len(digits) <= len(str(MAX_PAGE)) else MAX_PAGE


def like_literal(text: str) -> str:
    """``text`` for a LIKE pattern with ``ESCAPE '\\'``: its ``%``, ``_`` and backslashes match
    themselves, not any characters."""
    return text.replace(LIKE_ESCAPE, LIKE_ESCAPE * 2).replace("%", LIKE_ESCAPE + "%").replace("_", LIKE_ESCAPE + "_")


def worklist(database: Database, search: str = "", priority: str = "", state: str = "", page: int = 1,
             page_size: int = 25) -> dict[str, Any]:
    """One page of the worklist in triage order, with everything a row shows."""
    where, params = [], []
    if search:
        # Spaces and commas stand for the name's ^ (or anything), typed characters for themselves.
        term = like_literal(search.strip().replace("*", "")).replace(" ", "%").replace(",", "%")
        like = f"LIKE ? ESCAPE '{LIKE_ESCAPE}'"
        where.append(f"(p.name {like} OR p.patient_id {like} OR s.accession {like})")
        params += [f"%{term}%", f"{term}%", f"{term}%"]
    if priority in PRIORITIES:
        where.append("s.priority = ?")
        params.append(priority)
    if state == StudyState.SENT:
        # Sent, or on its way (the chip reads "Send queued"): anything the outbox holds for it.
        where.append("(s.state = ? OR s.study_uid IN (SELECT study_uid FROM outbox_items WHERE state != ?))")
        params += [StudyState.SENT.value, OutboxState.CANCELLED.value]
    elif state in STATES:
        where.append("s.state = ?")
        params.append(state)
    clause = f"WHERE {' AND '.join(where)}" if where else ""
    total = database.query(f"SELECT COUNT(*) AS n FROM studies s JOIN patients p ON p.id = s.patient_pk {clause}",
                           tuple(params))[0]["n"]
    pages = max(1, -(-total // page_size))
    page = min(max(1, page), pages)
    studies = database.query(
        "SELECT s.study_uid, s.state, s.priority, s.score, s.study_date, s.description, s.accession, "
        "s.first_received_at, s.last_received_at, p.patient_id, p.name, p.birth_date, p.sex "
        f"FROM studies s JOIN patients p ON p.id = s.patient_pk {clause} "
        f"ORDER BY {triage.WORKLIST_ORDER}, s.study_uid LIMIT ? OFFSET ?",
        (*params, page_size, (page - 1) * page_size))
    uids = [s["study_uid"] for s in studies]
    details = page_details(database, uids) if uids else {}
    rows = [decorate(s, details.get(s["study_uid"], {})) for s in studies]
    return {"rows": rows, "total": total, "page": page, "pages": pages}


def page_details(database: Database, uids: list[str]) -> dict[str, dict[str, Any]]:
    """Modalities, AI results, job counts and outbox item states for a set of studies."""
    out: dict[str, dict[str, Any]] = {u: {"modalities": set(), "results": [], "outstanding": 0, "failed": 0,
                                          "forwards": []} for u in uids}
    marks = _in(uids)
    clinical, clinical_params = clinical_sql("i.source")
    for r in database.query(
            f"SELECT DISTINCT se.study_uid, se.modality FROM series se WHERE se.study_uid IN ({marks}) AND EXISTS "
            f"(SELECT 1 FROM instances i WHERE i.series_uid = se.series_uid AND {clinical})",
            (*uids, *clinical_params)):
        if r["modality"]:
            out[r["study_uid"]]["modalities"].add(r["modality"])
    for r in database.query(
            "SELECT study_uid, model_id, model_version, status, findings_json, abstention_code "
            f"FROM analysis_results WHERE study_uid IN ({marks})", tuple(uids)):
        out[r["study_uid"]]["results"].append(r)
    for r in database.query(
            f"SELECT study_uid, SUM(state IN ({lifecycle_marks(JOB_OUTSTANDING)})) AS outstanding, SUM(state = ?) AS failed "
            f"FROM analysis_jobs WHERE study_uid IN ({marks}) GROUP BY study_uid",
            (*words(JOB_OUTSTANDING), JobState.FAILED.value, *uids)):
        out[r["study_uid"]].update(outstanding=r["outstanding"] or 0, failed=r["failed"] or 0)
    for r in database.query(f"SELECT study_uid, destination, state FROM outbox_items WHERE study_uid IN ({marks}) "
                            "ORDER BY id", tuple(uids)):
        out[r["study_uid"]]["forwards"].append(r)
    return out


def chips(state: str, forwards: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The five stages with which are done.  ``forwards`` are the study's outbox items (at least
    ``state``): "Sent" once one is confirmed (the study state says so only when all are), "Send
    queued" while one is on its way, "Send failed" when the only ones left failed (the study view
    says why)."""
    reached = {stage: index for index, stage in enumerate(STATES)}.get(state, 0)
    confirmed = any(f["state"] == OutboxState.CONFIRMED for f in forwards)
    pending = any(f["state"] in OUTBOX_ACTIVE for f in forwards)
    failed = any(f["state"] == OutboxState.FAILED for f in forwards)
    out = []
    for index, stage in enumerate(STATES):
        label, done = state_words(stage), index <= reached
        if stage == StudyState.SENT and not done and confirmed:
            done = True
        elif stage == StudyState.SENT and not done and pending:
            label, done = _("Send queued"), True
        elif stage == StudyState.SENT and not done and failed:
            label = _("Send failed")
        out.append({"stage": stage, "label": label, "done": done, "current": index == reached})
    return out


def decorate(study: dict[str, Any], detail: dict[str, Any]) -> dict[str, Any]:
    """A worklist row as the template and the polling API see it (JSON-safe)."""
    forwards = detail.get("forwards", [])
    return {
        "study_uid": study["study_uid"],
        "priority": study["priority"],
        "priority_label": priority_words(study["priority"]),
        "patient_name": patient_name(study["name"]),
        "patient_id": study["patient_id"],
        "age": age(study["birth_date"], study["study_date"]),
        "sex": study["sex"],
        "modalities": ", ".join(sorted(detail.get("modalities", ()))),
        "description": study["description"],
        "received": local_time(study["first_received_at"]),
        "received_at": study["first_received_at"],
        "ai": ai_summary(detail.get("results", []), detail.get("outstanding", 0), detail.get("failed", 0)),
        "state": study["state"],
        "chips": chips(study["state"], forwards),
    }
