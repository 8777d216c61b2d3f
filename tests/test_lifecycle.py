"""The lifecycle vocabulary (appliance.lifecycle): the study transition table and its one mover,
the words the schema spells agreeing with the enums, the source classification in Python and in
SQL agreeing, and no other module writing a study's state or spelling a state word in its SQL."""
from __future__ import annotations

import json
import re
import sqlite3
from pathlib import Path

import pytest

from appliance import lifecycle
from appliance.db import open_database
from appliance.errors import ApplianceError
from appliance.lifecycle import (STUDY_TRANSITIONS, InstanceKind, LifecycleError, OutboxState, Source, StudyEvent,
                                 StudyState, move_study)

ROOT = Path(__file__).resolve().parent.parent
S, E = StudyState, StudyEvent


@pytest.fixture
def db(tmp_path):
    database = open_database(tmp_path / "data")
    yield database
    database.close()


def add_study(database, uid: str, state: str) -> None:
    with database.atomic() as tx:
        tx.execute("INSERT OR IGNORE INTO patients (patient_id) VALUES ('P1')")
        tx.execute("INSERT INTO studies (study_uid, patient_pk, state, first_received_at, last_received_at) "
                   "VALUES (?, (SELECT id FROM patients WHERE patient_id = 'P1'), ?, 'now', 'now')", (uid, state))


def state_of(database, uid: str) -> str:
    return database.query("SELECT state FROM studies WHERE study_uid = ?", (uid,))[0]["state"]


# -- the table ------------------------------------------------------------------------------------
@pytest.mark.parametrize(("before", "event"), sorted(STUDY_TRANSITIONS, key=str))
def test_every_listed_transition_moves_a_stored_study(db, before, event):
    add_study(db, "1.2.3", before.value)
    with db.atomic() as tx:
        after = move_study(tx, "1.2.3", event)
    assert after == STUDY_TRANSITIONS[before, event]
    assert state_of(db, "1.2.3") == after.value


def test_the_table_is_the_documented_behaviour():
    expected = {
        # A late image re-opens an analyzed study; analysis done moves received on; later stages stay.
        (S.ANALYZED, E.ANALYSIS_QUEUED): S.RECEIVED, (S.RECEIVED, E.ANALYSIS_DONE): S.ANALYZED,
        (S.REVIEWED, E.ANALYSIS_QUEUED): S.REVIEWED, (S.SENT, E.ANALYSIS_DONE): S.SENT,
        (S.REPORT_RECEIVED, E.ANALYSIS_QUEUED): S.REPORT_RECEIVED,
        # A review does not take a sent study back; a send does not hide a report.
        (S.RECEIVED, E.REVIEWED): S.REVIEWED, (S.ANALYZED, E.REVIEWED): S.REVIEWED, (S.SENT, E.REVIEWED): S.SENT,
        (S.REPORT_RECEIVED, E.REVIEWED): S.REPORT_RECEIVED, (S.RECEIVED, E.SENT): S.SENT,
        (S.REPORT_RECEIVED, E.SENT): S.REPORT_RECEIVED, (S.RECEIVED, E.REPORT_RECEIVED): S.REPORT_RECEIVED,
    }
    for pair, after in expected.items():
        assert STUDY_TRANSITIONS[pair] == after, pair
    # Total over the known states and events: every case the box meets is decided by the table.
    assert set(STUDY_TRANSITIONS) == {(s, e) for s in S for e in E}
    assert lifecycle.STUDY_INITIAL == S.RECEIVED


def test_the_docstring_table_matches_the_transition_table():
    lines = [line.split() for line in (lifecycle.__doc__ or "").splitlines()]
    rows = {cells[0]: cells[1:] for cells in lines if cells and cells[0] in S.values() and len(cells) == 6}
    assert set(rows) == set(S.values())
    for state, cells in rows.items():
        for event, cell in zip(E, cells):
            after = STUDY_TRANSITIONS[S(state), event].value
            assert after.startswith(cell.rstrip(".")), (state, event, cell)


# -- refusals -------------------------------------------------------------------------------------
def test_an_unknown_event_is_refused_and_nothing_changes(db):
    add_study(db, "1.2.3", "analyzed")
    with pytest.raises(LifecycleError) as info, db.atomic() as tx:
        move_study(tx, "1.2.3", "archived")
    assert info.value.code == "unknown_event" and "'archived'" in str(info.value)
    assert isinstance(info.value, ApplianceError)
    assert state_of(db, "1.2.3") == "analyzed"


def test_a_stored_state_this_version_does_not_know_is_refused(db):
    add_study(db, "1.2.3", "archived")
    with pytest.raises(LifecycleError) as info, db.atomic() as tx:
        move_study(tx, "1.2.3", StudyEvent.SENT)
    assert info.value.code == "unknown_state" and "'archived'" in str(info.value)
    assert state_of(db, "1.2.3") == "archived"


def test_a_pair_missing_from_the_table_is_refused(db, monkeypatch):
    table = dict(STUDY_TRANSITIONS)
    del table[S.REPORT_RECEIVED, E.SENT]
    monkeypatch.setattr(lifecycle, "STUDY_TRANSITIONS", table)
    add_study(db, "1.2.3", "report_received")
    with pytest.raises(LifecycleError) as info, db.atomic() as tx:
        move_study(tx, "1.2.3", StudyEvent.SENT)
    assert info.value.code == "no_transition"
    assert "report_received" in str(info.value) and "sent" in str(info.value)


def test_an_unknown_study_is_refused(db):
    with pytest.raises(LifecycleError) as info, db.atomic() as tx:
        move_study(tx, "9.9.9", StudyEvent.REVIEWED)
    assert info.value.code == "no_study"


# -- the words ------------------------------------------------------------------------------------
def test_members_are_their_stored_words_on_every_python():
    assert S.SENT == "sent" and str(S.SENT) == "sent" and f"{S.SENT}" == "sent" and f"{S.SENT:>6}" == "  sent"
    assert json.dumps({"state": S.REPORT_RECEIVED}) == '{"state": "report_received"}'
    assert {S.SENT: 1}.get("sent") == 1 and "queued" in lifecycle.OUTBOX_ACTIVE
    conn = sqlite3.connect(":memory:")
    conn.execute("CREATE TABLE t (s TEXT)")
    conn.execute("INSERT INTO t VALUES (?)", (OutboxState.QUEUED,))
    assert conn.execute("SELECT s, typeof(s) FROM t WHERE s = ?", (OutboxState.QUEUED,)).fetchall() == \
        [("queued", "text")]


def column_default(database, table: str, column: str) -> str:
    rows = database.query(f"PRAGMA table_info({table})")
    (dflt,) = [r["dflt_value"] for r in rows if r["name"] == column]
    return str(dflt).strip("'")


def test_the_schema_spells_the_same_words(db):
    assert column_default(db, "studies", "state") == lifecycle.STUDY_INITIAL
    for table, column, enum in (("instances", "state", lifecycle.InstanceState), ("instances", "source", Source),
                                ("analysis_jobs", "state", lifecycle.JobState),
                                ("analysis_results", "objects_state", lifecycle.ObjectsState),
                                ("outbox_items", "state", OutboxState),
                                ("outbox_instances", "state", lifecycle.OutboxInstanceState),
                                ("forward_requests", "state", lifecycle.ForwardRequestState)):
        assert column_default(db, table, column) in enum.values(), (table, column)
    # The partial unique index (one active item per study and destination) spells OUTBOX_ACTIVE.
    (sql,) = [r["sql"] for r in db.query("SELECT sql FROM sqlite_master WHERE name = 'idx_outbox_active'")]
    where = sql.split("WHERE", 1)[1]
    assert set(re.findall(r"'([a-z_]+)'", where)) == set(lifecycle.words(lifecycle.OUTBOX_ACTIVE))


# -- what an instance is, whatever its source ------------------------------------------------------
def test_every_source_but_ai_and_report_is_a_clinical_image():
    assert lifecycle.kind_of(Source.AI) == InstanceKind.AI_OBJECT
    assert lifecycle.kind_of(Source.REPORT) == InstanceKind.REPORT
    for source in (Source.DICOM, Source.IMPORT, Source.RECOVERED, "capture", "a-source-of-2031"):
        assert lifecycle.is_clinical(source), source
        assert lifecycle.is_forwarded(source, attach_ai_results=False)
    assert lifecycle.is_forwarded(Source.AI, attach_ai_results=True)
    assert not lifecycle.is_forwarded(Source.AI, attach_ai_results=False)
    assert not lifecycle.is_forwarded(Source.REPORT, attach_ai_results=True)


@pytest.mark.parametrize("attach", [False, True])
def test_the_sql_conditions_select_what_the_python_says(attach):
    sources = [*Source.values(), "capture", "x-unknown"]
    conn = sqlite3.connect(":memory:")
    conn.execute("CREATE TABLE i (source TEXT)")
    conn.executemany("INSERT INTO i VALUES (?)", [(s,) for s in sources])
    for condition, params, wanted in (
            (*lifecycle.clinical_sql("source"), {s for s in sources if lifecycle.is_clinical(s)}),
            (*lifecycle.forwarded_sql("source", attach), {s for s in sources if lifecycle.is_forwarded(s, attach)}),
            (*lifecycle.kind_sql("source", (InstanceKind.AI_OBJECT,)), {"ai"})):
        assert "'" not in condition  # values go as parameters
        got = {r[0] for r in conn.execute(f"SELECT source FROM i WHERE {condition}", params)}
        assert got == wanted, condition


# -- one writer, no spelled words -----------------------------------------------------------------
def python_sources(*roots: str) -> list[Path]:
    return sorted(p for root in roots for p in (ROOT / root).rglob("*.py"))


def sql_strings(path: Path) -> str:
    """The file's text with adjacent string literals joined, so SQL split over lines reads whole."""
    return re.sub(r"\"\s*\n\s*f?\"", "", path.read_text())


def test_no_module_but_lifecycle_writes_a_study_state():
    writers = []
    for path in python_sources("appliance", "web", "scripts"):
        text = sql_strings(path)
        for match in re.finditer(r"UPDATE\s+studies\s+SET\s+(.*?)(WHERE|\"|$)", text, re.S | re.I):
            if re.search(r"(?<![\w.])state\s*=", match.group(1)):
                writers.append(path.relative_to(ROOT))
    assert writers == [Path("appliance/lifecycle.py")]


# The vocabulary's owner, and the schema's migrations (shipped history, never edited; their words
# are checked against the enums above).
NOT_SQL_USERS = ("appliance/lifecycle.py", "appliance/db.py")
WORD = re.compile(r"\b(state|source|status|objects_state)\s*(=|!=|<>|IN|NOT IN)\s*\(?\s*'", re.I)


def test_sql_takes_state_and_source_words_as_parameters():
    spelled = []
    for path in python_sources("appliance", "web"):
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith(NOT_SQL_USERS):
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if WORD.search(line) and "``" not in line:  # ``...``: a docstring quoting a state
                spelled.append(f"{rel}:{number}: {line.strip()}")
    assert spelled == []
