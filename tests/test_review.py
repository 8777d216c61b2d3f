"""appliance.review and appliance.alerts: a review and an alert acknowledgement are each one
transaction with their audit entry, on a study stored and analysed by the real pipeline (store,
worker, the toy chest model with its operating point lowered so the radiograph is urgent)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from appliance import accounts, alerts, review
from appliance.db import open_database
from tests.analyze.toy_package import MODEL_ID, build_package, write_manifest
from tests.web.conftest import CHEST, CT, ingest_and_analyse


@pytest.fixture(scope="module")
def analysed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("review")
    engines = root / "engines"
    build_package(engines, MODEL_ID, "cxr")
    write_manifest(engines / MODEL_ID, MODEL_ID, threshold=0.01, kind="cxr")
    data_dir = root / "data"
    return data_dir, ingest_and_analyse(data_dir, engines, (CHEST, CT))


@pytest.fixture
def box(tmp_path: Path, analysed: tuple[Path, dict[str, str]]) -> tuple[Any, dict[str, str]]:
    source, uids = analysed
    shutil.copytree(source, tmp_path / "data")
    return open_database(tmp_path / "data"), uids


def _state(db: Any, uid: str) -> str:
    return str(db.query("SELECT state FROM studies WHERE study_uid = ?", (uid,))[0]["state"])


def _audit(db: Any) -> list[tuple[str, str, str, dict[str, Any]]]:
    return [(r["actor"], r["action"], r["study_uid"], json.loads(r["detail"]) if r["detail"] else {})
            for r in db.query("SELECT * FROM audit_log ORDER BY id")]


def test_review_is_recorded_with_its_audit_entry_and_moves_the_study(box: tuple[Any, dict[str, str]]) -> None:
    db, uids = box
    uid = uids[CHEST]
    (result,) = db.query("SELECT id, findings_json FROM analysis_results WHERE study_uid = ? AND model_id = ?",
                         (uid, MODEL_ID))
    codes = [f["code"] for f in json.loads(result["findings_json"])]
    keys = review.finding_keys(db, uid)
    assert keys == {review.finding_key(result["id"], code) for code in codes} and keys
    key = sorted(keys)[0]
    assert _state(db, uid) == "analyzed"
    review_id = review.record_review(db, uid, "nurse", {key: "agree"}, "  right lower zone  " + "x" * 3000)
    (row,) = review.list_reviews(db, uid)
    assert row["id"] == review_id and row["username"] == "nurse" and row["verdicts"] == {key: "agree"}
    assert row["note"].startswith("right lower zone") and len(row["note"]) == review.NOTE_MAX
    assert _state(db, uid) == "reviewed"
    assert _audit(db) == [("nurse", "review", uid, {"verdicts": {key: "agree"}, "note_chars": review.NOTE_MAX})]
    # A second review is added (newest first); a review without verdicts is a review too.
    review.record_review(db, uid, "doctor", {})
    assert [r["username"] for r in review.list_reviews(db, uid)] == ["doctor", "nurse"]


def test_a_review_does_not_undo_later_stages(box: tuple[Any, dict[str, str]]) -> None:
    db, uids = box
    uid = uids[CHEST]
    with db.atomic() as tx:
        tx.execute("UPDATE studies SET state = 'sent' WHERE study_uid = ?", (uid,))
    review.record_review(db, uid, "nurse", {})
    assert _state(db, uid) == "sent"
    # A study still receiving (not analysed yet) is reviewed as it is.
    ct = uids[CT]
    with db.atomic() as tx:
        tx.execute("UPDATE studies SET state = 'received' WHERE study_uid = ?", (ct,))
    review.record_review(db, ct, "nurse", {})
    assert _state(db, ct) == "reviewed"


@pytest.mark.parametrize("verdicts,code", [
    ({"KEY": "maybe"}, "bad_verdict"),
    ({"KEY": ""}, "bad_verdict"),
    ({"999999:bright": "agree"}, "unknown_finding"),
])
def test_refused_reviews_change_nothing(box: tuple[Any, dict[str, str]], verdicts: dict[str, str], code: str) -> None:
    db, uids = box
    uid = uids[CHEST]
    key = sorted(review.finding_keys(db, uid))[0]
    chosen = {key if k == "KEY" else k: v for k, v in verdicts.items()}
    with pytest.raises(review.ReviewError) as refused:
        review.record_review(db, uid, "nurse", {key: "agree", **chosen})
    assert refused.value.code == code
    assert review.list_reviews(db, uid) == [] and _state(db, uid) == "analyzed" and _audit(db) == []


def test_no_review_of_a_study_that_is_not_there(box: tuple[Any, dict[str, str]]) -> None:
    db, _uids = box
    with pytest.raises(review.ReviewError) as refused:
        review.record_review(db, "1.2.3.4", "nurse", {})
    assert refused.value.code == "no_study"
    assert db.query("SELECT COUNT(*) AS n FROM reviews")[0]["n"] == 0 and _audit(db) == []


def test_findings_of_superseded_model_versions_take_no_verdict(box: tuple[Any, dict[str, str]]) -> None:
    db, uids = box
    uid = uids[CHEST]
    (old,) = db.query("SELECT * FROM analysis_results WHERE study_uid = ? AND model_id = ?", (uid, MODEL_ID))
    old_keys = review.finding_keys(db, uid)
    newer = {k: v for k, v in old.items() if k != "id"}
    newer["model_version"] = "99.0.0"
    columns = ", ".join(newer)
    with db.atomic() as tx:
        new_id = tx.execute(f"INSERT INTO analysis_results ({columns}) VALUES ({', '.join('?' * len(newer))})",
                            tuple(newer.values())).lastrowid
    keys = review.finding_keys(db, uid)
    assert keys and all(k.startswith(f"{new_id}:") for k in keys) and not keys & old_keys
    with pytest.raises(review.ReviewError) as refused:
        review.record_review(db, uid, "nurse", {sorted(old_keys)[0]: "agree"})
    assert refused.value.code == "unknown_finding"


def test_alerts_are_acknowledged_per_user_never_backwards_nor_ahead(box: tuple[Any, dict[str, str]]) -> None:
    db, uids = box
    nurse = accounts.create_user(db, "nurse", "nurse-password-1", "staff")
    doctor = accounts.create_user(db, "doctor", "doctor-password-1", "staff")
    (alert,) = alerts.open_alerts(db, nurse.alert_ack_event_id)
    assert alert["study_uid"] == uids[CHEST] and alert["patient_id"] and set(alert) == \
        {"id", "at", "study_uid", "patient_id", "name"}
    newest = db.query("SELECT MAX(id) AS n FROM events")[0]["n"]
    # An id from the future is clamped to the newest event: it cannot silence alerts not raised yet.
    assert alerts.acknowledge(db, nurse, newest + 1000) == newest
    assert alerts.open_alerts(db, accounts.get_user(db, nurse.id).alert_ack_event_id) == []
    assert alerts.acknowledge(db, nurse, 0) == newest  # never moves back
    assert accounts.get_user(db, nurse.id).alert_ack_event_id == newest
    assert accounts.get_user(db, doctor.id).alert_ack_event_id == 0  # per user
    assert _audit(db) == [("nurse", "alert_ack", "", {"upto_event": newest})] * 2
    # A study that is no longer urgent raises no alert, acknowledged or not.
    with db.atomic() as tx:
        tx.execute("UPDATE studies SET priority = 'routine' WHERE study_uid = ?", (uids[CHEST],))
    assert alerts.open_alerts(db, 0) == []


def test_acknowledging_for_a_user_that_is_gone_is_refused(box: tuple[Any, dict[str, str]]) -> None:
    db, _uids = box
    ghost = accounts.User(id=4242, username="ghost", role="staff", language="en", disabled=False, has_pin=False,
                          session_version=1, last_login_at="")
    with pytest.raises(accounts.AccountError) as refused:
        alerts.acknowledge(db, ghost, 1)
    assert refused.value.code == "no_user" and _audit(db) == []
