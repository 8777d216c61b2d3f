"""The study view: images with the AI heatmap, findings, review, forwarding (request, cancel,
retry, its state per destination) and the specialists' reports."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from flask import Blueprint, Response, abort, current_app, flash, g, redirect, render_template, request, url_for
from flask_babel import gettext as _

from appliance import audit, catalog, triage
from appliance import review as reviewing
from appliance.analyze.result import AI_NOTICE
from appliance.errors import ConfigError, DecodeError
from appliance.forward import cancel_item, request_forward, retry_item
from appliance.forward.errors import ForwardRequestError
from appliance.lifecycle import OUTBOX_ACTIVE, clinical_sql, marks, words
from web.core import imaging
from web.core.formatting import age, local_time, patient_name
from web.core.security import database, roles_required

from .. import engines_info, forwarding, queries

bp = Blueprint("study", __name__, url_prefix="/study")

FORWARD_PRIORITIES = ("urgent", "routine")
ROUTER = "router"


SHOWN_DESTINATION_KEYS = ("name", "kind", "host", "port", "called_ae", "url", "deidentify")


def destination_details() -> list[dict[str, Any]]:
    """``[[destinations]]`` from the configuration, without credentials (never shown on screen)."""
    configured = current_app.config["APPLIANCE"].destinations
    return [{k: getattr(d, k) for k in SHOWN_DESTINATION_KEYS} for d in configured]


def destinations() -> list[str]:
    """Destination names; empty while none is configured (the pages say so)."""
    return [str(d["name"]) for d in destination_details()]


def _study_or_404(study_uid: str) -> dict[str, Any]:
    rows = database().query(
        "SELECT s.*, p.patient_id, p.name, p.birth_date, p.sex FROM studies s JOIN patients p ON p.id = s.patient_pk "
        "WHERE s.study_uid = ?", (study_uid,))
    if not rows:
        abort(404)
    return rows[0]


def _results(study_uid: str) -> list[dict[str, Any]]:
    db = database()
    engines_dir = current_app.config["APPLIANCE"].analyze.engines_dir
    rows = db.query("SELECT * FROM analysis_results WHERE study_uid = ? ORDER BY id", (study_uid,))
    current = {r["id"] for r in triage.current_results(rows)}
    out = []
    for r in rows:
        findings = json.loads(r["findings_json"])
        for f in findings:
            f["key"] = reviewing.finding_key(r["id"], f["code"])
        out.append({
            **r, "findings": findings, "current": r["id"] in current, "notes": json.loads(r["notes_json"] or "[]"),
            "model_name": _("no model") if r["model_id"] == ROUTER else engines_info.model_name(engines_dir, r["model_id"]),
            "router": r["model_id"] == ROUTER,
            "abstain_words": queries.abstention_words(r["abstention_code"]) if r["abstention_code"] else "",
        })
    return out


def _images(study_uid: str, results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    clinical, params = clinical_sql("i.source")
    rows = database().query(
        "SELECT i.sop_instance_uid, i.file_path, i.instance_number, i.state, se.modality, se.body_part, "
        "se.description AS series_description FROM instances i JOIN series se ON se.series_uid = i.series_uid "
        f"WHERE i.study_uid = ? AND {clinical} "
        "ORDER BY se.series_number, CAST(i.instance_number AS INTEGER), i.sop_instance_uid", (study_uid, *params))
    by_sop: dict[str, list[dict[str, Any]]] = {}
    for r in results:
        by_sop.setdefault(r["sop_instance_uid"], []).append(r)
    for row in rows:
        row["frames"] = imaging.frame_count(Path(row["file_path"]))
        row["results"] = by_sop.get(row["sop_instance_uid"], [])
        row["heatmaps"] = [r for r in row["results"] if r["heatmap_path"] and r["current"]]
        # The heatmap explains the frame that was analysed: the middle one (decode's rule).
        row["analysed_frame"] = row["frames"] // 2
        row["greyscale"] = row["modality"] not in ("US", "XC", "OT", "SC")
    return rows


@bp.get("/<study_uid>")
def view(study_uid: str) -> Any:
    db = database()
    study = _study_or_404(study_uid)
    results = _results(study_uid)
    images = _images(study_uid, results)
    done = reviewing.list_reviews(db, study_uid)
    forwards = forwarding.study_items(db, study_uid)
    audit.record(db, g.user.username, "view_study", study_uid)
    summary = queries.ai_summary(results, 0, 0)
    problems = catalog.failure_notes(catalog.study_failures(db, [study_uid]).get(study_uid, []))
    engines_dir = current_app.config["APPLIANCE"].analyze.engines_dir
    superseded = [dict(s, superseded_at=local_time(s["superseded_at"]),
                       model_name=_("no model") if s["model"] == ROUTER else engines_info.model_name(engines_dir, s["model"]))
                  for s in catalog.superseded_results(db, study_uid)]
    return render_template(
        "study.html", study=study, images=images, results=results, reviews=done, forwards=forwards,
        reports=forwarding.study_report_list(db, study_uid),
        summary=summary, ai_notice=AI_NOTICE, verdicts=reviewing.VERDICTS, destinations=destinations(),
        chips=queries.chips(study["state"], forwards), patient_name=patient_name(study["name"]),
        age=age(study["birth_date"], study["study_date"]), presets=list(imaging.PRESETS),
        priority_label=queries.priority_words(study["priority"]), forward_priorities=FORWARD_PRIORITIES,
        last_verdicts=done[0]["verdicts"] if done else {}, problems=problems, superseded=superseded)


def _png(path: Path, frame: Any, preset: str) -> Response:
    try:
        png = imaging.render_png(path, frame, preset)
    except DecodeError:
        abort(404, description="image")
    except OSError:
        abort(404, description="image")
    return Response(png, mimetype="image/png")


@bp.get("/<study_uid>/image/<sop_uid>.png")
def image(study_uid: str, sop_uid: str) -> Any:
    clinical, params = clinical_sql("source")
    rows = database().query(f"SELECT file_path FROM instances WHERE sop_instance_uid = ? AND study_uid = ? "
                            f"AND {clinical}", (sop_uid, study_uid, *params))
    if not rows:
        abort(404)
    frame = request.args.get("frame", type=int)
    preset = request.args.get("preset", "standard")
    if preset not in imaging.PRESETS:
        abort(400)
    return _png(Path(rows[0]["file_path"]), frame, preset)


@bp.get("/<study_uid>/heatmap/<int:result_id>.png")
def heatmap(study_uid: str, result_id: int) -> Any:
    rows = database().query("SELECT heatmap_path FROM analysis_results WHERE id = ? AND study_uid = ?",
                            (result_id, study_uid))
    if not rows or not rows[0]["heatmap_path"]:
        abort(404)
    return _png(Path(rows[0]["heatmap_path"]), None, "standard")


@bp.post("/<study_uid>/review")
@roles_required("admin", "staff")
def review(study_uid: str) -> Any:
    _study_or_404(study_uid)
    # One form field per current finding; a verdict left empty is no verdict.
    verdicts = {key: request.form[f"verdict:{key}"] for key in reviewing.finding_keys(database(), study_uid)
                if request.form.get(f"verdict:{key}")}
    try:
        reviewing.record_review(database(), study_uid, g.user.username, verdicts, request.form.get("note", ""))
    except reviewing.ReviewError as exc:
        abort(404 if exc.code == "no_study" else 400)
    flash(_("Marked as reviewed."), "ok")
    return redirect(url_for("study.view", study_uid=study_uid))


def _active_item(study_uid: str, destination: str) -> Optional[int]:
    rows = database().query(f"SELECT id FROM outbox_items WHERE study_uid = ? AND destination = ? AND state IN "
                            f"({marks(OUTBOX_ACTIVE)})", (study_uid, destination, *words(OUTBOX_ACTIVE)))
    return int(rows[0]["id"]) if rows else None


@bp.post("/<study_uid>/forward")
@roles_required("admin", "staff")
def forward(study_uid: str) -> Any:
    back = redirect(url_for("study.view", study_uid=study_uid))
    destination = request.form.get("destination", "").strip()[:64]
    priority = request.form.get("priority", "routine")
    if priority not in FORWARD_PRIORITIES or not destination:
        flash(_("Choose a destination and a priority."), "error")
        return back
    db = database()
    already = _active_item(study_uid, destination)
    try:
        item_id = request_forward(db, current_app.config["APPLIANCE"], study_uid, destination, priority,
                                  requested_by=g.user.username, origin="ui")
    except ConfigError:
        flash(_("“%(dest)s” is not a configured destination; nothing was queued.", dest=destination), "error")
        return back
    except ForwardRequestError:
        # The study is gone (or never existed): its page would only say "not found".
        flash(_("That study is not on this device; nothing was queued."), "error")
        return redirect(url_for("worklist.index"))
    if already == item_id:
        # request_forward audits only the request that creates an item; a repeat (or an urgent
        # upgrade) is still the user's action and goes to the audit log too.
        audit.record(db, g.user.username, "forward_request", study_uid,
                     {"destination": destination, "priority": priority, "outbox_item": item_id,
                      "already_queued": True, "origin": "ui"})
        flash(_("Already queued for %(dest)s; it stays in the outbox.", dest=destination), "ok")
    else:
        flash(_("Queued for %(dest)s. It is sent as soon as the destination can be reached.", dest=destination), "ok")
    return back


def _item_state(study_uid: str, item_id: int) -> str:
    """The outbox item's state; 404 unless it belongs to this study (a forged id cannot touch
    another case)."""
    rows = database().query("SELECT state FROM outbox_items WHERE id = ? AND study_uid = ?", (item_id, study_uid))
    if not rows:
        abort(404)
    return str(rows[0]["state"])


@bp.post("/<study_uid>/outbox/<int:item_id>/cancel")
@roles_required("admin", "staff")
def cancel(study_uid: str, item_id: int) -> Any:
    state = _item_state(study_uid, item_id)
    if state not in forwarding.CANCELLABLE:
        flash(_("This forwarding can no longer be cancelled (%(state)s).", state=forwarding.state_words(state)),
              "error")
    else:
        try:
            cancel_item(database(), item_id, g.user.username)  # writes the audit entry
            flash(_("Forwarding cancelled."), "ok")
        except ForwardRequestError:
            flash(_("This forwarding can no longer be cancelled."), "error")
    return redirect(url_for("study.view", study_uid=study_uid))


@bp.post("/<study_uid>/outbox/<int:item_id>/retry")
@roles_required("admin", "staff")
def retry(study_uid: str, item_id: int) -> Any:
    state = _item_state(study_uid, item_id)
    if state not in forwarding.RETRYABLE:
        flash(_("Only a failed or cancelled forwarding can be retried (%(state)s).",
                state=forwarding.state_words(state)), "error")
    else:
        try:
            retry_item(database(), item_id, g.user.username)  # writes the audit entry
            flash(_("Forwarding queued again."), "ok")
        except ForwardRequestError:
            # Another item already sends this study to the same destination.
            flash(_("This study is already being sent to that destination."), "error")
    return redirect(url_for("study.view", study_uid=study_uid))
