"""Every state the box stores, the words of ``instances.source``, and what moves a study.

This module owns the lifecycle vocabulary, as pynetdicom's ``fsm.py`` owns the association's
states: every state word written to the database is a member of one of the enums below (they are
``str`` enums, so a member compares equal to the stored TEXT and binds as an SQL parameter), and
a study's state changes only through :func:`move_study`, by an event of :class:`StudyEvent`
looked up in :data:`STUDY_TRANSITIONS`.

A study (``studies.state``)
---------------------------

A study is created ``received`` by its first image.  Then, by event::

    state \\ event     analysis_queued   analysis_done   reviewed    sent        report_received
    ---------------   ---------------   -------------   ---------   ---------   ---------------
    received          received          analyzed        reviewed    sent        report_received
    analyzed          received          analyzed        reviewed    sent        report_received
    reviewed          reviewed          reviewed        reviewed    sent        report_received
    sent              sent              sent            sent        sent        report_received
    report_received   report_received   report_received report_rec. report_rec. report_received

Who raises the events:

- ``analysis_queued`` -- an image that needs analysis is stored (:mod:`appliance.index`), or the
  triage of a study finds analysis still outstanding (:func:`appliance.triage.update_study`): a
  late image re-opens an analyzed study until its analysis is done.
- ``analysis_done`` -- triage finds no analysis job pending or running for the study.
- ``reviewed`` -- a clinician records a review (:func:`appliance.review.record_review`).
- ``sent`` -- every outbox item of the study is confirmed or cancelled and at least one was just
  confirmed (:func:`appliance.forward.outbox.settle`).
- ``report_received`` -- a specialist's report came back (:func:`appliance.forward.reports.ingest`).

Later stages are never undone by earlier events: a review does not take a sent study back, a
send does not hide that a report came back.  The table is total over the known states and
events; anything else (a state word this version does not know, an event that is not one) is
refused with :class:`LifecycleError`.

Other states (each column's words; their transitions are kept by the module named)
-----------------------------------------------------------------------------------

- :class:`InstanceState` (``instances.state``): ``received`` -> ``analyzed`` | ``abstained`` |
  ``failed``, back to ``received`` when the image is queued again (``appliance.analyze``).
- :class:`JobState` (``analysis_jobs.state``): ``pending`` -> ``running`` -> ``done`` |
  ``failed``; ``running`` -> ``pending`` on a retry or a restart (``appliance.analyze.worker``).
- :class:`ResultStatus` (``analysis_results.status``): ``analyzed``, ``abstained``, ``failed``.
- :class:`ObjectsState` (``analysis_results.objects_state``, the AI's SR and heatmap SC):
  ``pending`` -> ``building`` -> ``done`` | ``failed``; ``none`` for results that get no objects.
- :class:`OutboxState` (``outbox_items.state``): ``queued`` -> ``sending`` -> ``delivered`` ->
  ``confirmed``; ``failed`` (refused or blocked); ``cancelled``; :data:`OUTBOX_ACTIVE` are the
  states of an item still on its way (``appliance.forward.outbox``).
- :class:`OutboxInstanceState` (``outbox_instances.state``): ``pending`` -> ``sent`` ->
  ``confirmed``; ``refused``, ``blocked``, ``superseded`` are final.
- :class:`ForwardRequestState` (``forward_requests.state``, schema version 3, no longer written).

Where an instance came from (``instances.source``)
--------------------------------------------------

:class:`Source`.  What the box does with an instance follows from its kind
(:func:`kind_of`), not from a list of sources: anything that is neither the box's own AI output
(``ai``) nor a report that came back (``report``) is a clinical image -- analysed, shown and
forwarded -- so a new source (a captured ultrasound clip, say) is handled as one by default.
"""
from __future__ import annotations

from enum import Enum
from typing import Any, Mapping

import sqlite_utils

from .errors import ApplianceError


class _Word(str, Enum):
    """A stored word: equal to its TEXT, printed and formatted as it (on every Python version)."""

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)

    @classmethod
    def values(cls) -> tuple[str, ...]:
        return tuple(str(m.value) for m in cls)


class StudyState(_Word):
    """``studies.state``, in the order a case moves through them."""

    RECEIVED = "received"
    ANALYZED = "analyzed"
    REVIEWED = "reviewed"
    SENT = "sent"
    REPORT_RECEIVED = "report_received"


class StudyEvent(_Word):
    """What happens to a study (see the table in the module docstring)."""

    ANALYSIS_QUEUED = "analysis_queued"
    ANALYSIS_DONE = "analysis_done"
    REVIEWED = "reviewed"
    SENT = "sent"
    REPORT_RECEIVED = "report_received"


class InstanceState(_Word):
    """``instances.state``: what analysis made of an image."""

    RECEIVED = "received"
    ANALYZED = "analyzed"
    ABSTAINED = "abstained"
    FAILED = "failed"


class JobState(_Word):
    """``analysis_jobs.state``."""

    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


class ResultStatus(_Word):
    """``analysis_results.status`` (and ``superseded_results.status``)."""

    ANALYZED = "analyzed"
    ABSTAINED = "abstained"
    FAILED = "failed"


class ObjectsState(_Word):
    """``analysis_results.objects_state``: the result's SR and heatmap SC."""

    PENDING = "pending"
    BUILDING = "building"
    DONE = "done"
    FAILED = "failed"
    NONE = "none"  # a result that gets no objects (router abstentions, failures)


class OutboxState(_Word):
    """``outbox_items.state``."""

    QUEUED = "queued"
    SENDING = "sending"
    DELIVERED = "delivered"
    CONFIRMED = "confirmed"
    FAILED = "failed"
    CANCELLED = "cancelled"


class OutboxInstanceState(_Word):
    """``outbox_instances.state``."""

    PENDING = "pending"
    SENT = "sent"
    CONFIRMED = "confirmed"
    REFUSED = "refused"  # the peer said no
    BLOCKED = "blocked"  # the box's policy said no
    SUPERSEDED = "superseded"  # retired before it was confirmed (a superseded AI object): never sent


class ForwardRequestState(_Word):
    """``forward_requests.state`` (schema version 3; the outbox replaced the table)."""

    REQUESTED = "requested"


class Source(_Word):
    """``instances.source``: how an instance reached the box."""

    DICOM = "dicom"  # C-STORE from a modality
    IMPORT = "import"  # `appliance import`
    RECOVERED = "recovered"  # found on disk by the index rebuild
    AI = "ai"  # the box's own AI objects (SR, heatmap SC)
    REPORT = "report"  # a specialist's report that came back from a destination


class InstanceKind(_Word):
    """What an instance is to the box, whatever its source."""

    CLINICAL = "clinical"  # the clinic's images: analysed, shown, forwarded
    AI_OBJECT = "ai_object"  # the box's own output: forwarded while current, if the destination takes it
    REPORT = "report"  # a report back from a destination: shown with its study, not forwarded


# Outbox items still on their way: at most one per (study, destination) (the partial unique index
# idx_outbox_active of appliance.db spells the same three words; tests/test_lifecycle.py checks).
OUTBOX_ACTIVE: tuple[OutboxState, ...] = (OutboxState.QUEUED, OutboxState.SENDING, OutboxState.DELIVERED)
# Outbox items that are over (a study is ``sent`` once all its items are).
OUTBOX_DONE: tuple[OutboxState, ...] = (OutboxState.CONFIRMED, OutboxState.CANCELLED)
# Analysis jobs not finished yet.
JOB_OUTSTANDING: tuple[JobState, ...] = (JobState.PENDING, JobState.RUNNING)
# AI objects not built yet.
OBJECTS_OUTSTANDING: tuple[ObjectsState, ...] = (ObjectsState.PENDING, ObjectsState.BUILDING)
# Outbox instances still to be sent or confirmed.
OUTBOX_INSTANCE_OPEN: tuple[OutboxInstanceState, ...] = (OutboxInstanceState.PENDING, OutboxInstanceState.SENT)
# Outbox instances the box did not send on purpose or by refusal (a ``failed`` item's reason).
OUTBOX_INSTANCE_NOT_SENT: tuple[OutboxInstanceState, ...] = (OutboxInstanceState.REFUSED,
                                                             OutboxInstanceState.BLOCKED)

# Sources that are not clinical images; every other source is one.
_NOT_CLINICAL: Mapping[str, InstanceKind] = {Source.AI: InstanceKind.AI_OBJECT, Source.REPORT: InstanceKind.REPORT}


def kind_of(source: str) -> InstanceKind:
    """The kind of an instance of ``source``: any source but ``ai`` and ``report`` is clinical."""
    return _NOT_CLINICAL.get(source, InstanceKind.CLINICAL)


def is_clinical(source: str) -> bool:
    """True for the clinic's images (analysed and shown as the study's images)."""
    return kind_of(source) is InstanceKind.CLINICAL


def kind_sql(column: str, kinds: tuple[InstanceKind, ...]) -> tuple[str, tuple[str, ...]]:
    """SQL condition (and its parameters) true where the source in ``column`` is of one of
    ``kinds``, as :func:`kind_of` classifies it (so a source not known here counts as clinical)."""
    if InstanceKind.CLINICAL not in kinds:
        wanted = tuple(str(source) for source, kind in _NOT_CLINICAL.items() if kind in kinds)
        return f"{column} IN ({marks(wanted)})", wanted
    excluded = tuple(str(source) for source, kind in _NOT_CLINICAL.items() if kind not in kinds)
    if not excluded:
        return "1", ()
    return f"{column} NOT IN ({marks(excluded)})", excluded


def clinical_sql(column: str = "source") -> tuple[str, tuple[str, ...]]:
    """SQL condition (and its parameters) true where ``column`` names a clinical source."""
    return kind_sql(column, (InstanceKind.CLINICAL,))


def forwarded_kinds(attach_ai_results: bool) -> tuple[InstanceKind, ...]:
    """The kinds of instance an outbox item sends: the clinic's images, plus the box's AI objects
    for a destination with ``attach_ai_results`` (the outbox sends only the current ones).  A
    report is not sent on: it came from a destination, and a PDF cannot be de-identified."""
    return (InstanceKind.CLINICAL, InstanceKind.AI_OBJECT) if attach_ai_results else (InstanceKind.CLINICAL,)


def is_forwarded(source: str, attach_ai_results: bool) -> bool:
    """Whether an instance of ``source`` is of a kind :func:`forwarded_kinds` sends."""
    return kind_of(source) in forwarded_kinds(attach_ai_results)


def forwarded_sql(column: str, attach_ai_results: bool) -> tuple[str, tuple[str, ...]]:
    """SQL condition (and its parameters) true where ``column`` names a source
    :func:`is_forwarded` says is sent: every source but those of kinds not sent, so a new source
    is forwarded by default."""
    return kind_sql(column, forwarded_kinds(attach_ai_results))


def marks(values: tuple[Any, ...] | list[Any]) -> str:
    """``?, ?, ...``: placeholders for ``values`` in an ``IN (...)`` list."""
    if not values:
        raise ValueError("an IN list needs at least one value")
    return ", ".join("?" * len(values))


def words(values: tuple[_Word, ...] | list[_Word]) -> tuple[str, ...]:
    """Plain strings of ``values``, for SQL parameters."""
    return tuple(str(v.value) for v in values)


# -- the study state machine ----------------------------------------------------------------------
def _table() -> dict[tuple[StudyState, StudyEvent], StudyState]:
    S, E = StudyState, StudyEvent
    late = (S.REVIEWED, S.SENT, S.REPORT_RECEIVED)
    table: dict[tuple[StudyState, StudyEvent], StudyState] = {}
    # Analysis moves a study between received and analyzed only; later stages stay.
    table[S.RECEIVED, E.ANALYSIS_QUEUED] = S.RECEIVED
    table[S.ANALYZED, E.ANALYSIS_QUEUED] = S.RECEIVED
    table[S.RECEIVED, E.ANALYSIS_DONE] = S.ANALYZED
    table[S.ANALYZED, E.ANALYSIS_DONE] = S.ANALYZED
    for state in late:
        table[state, E.ANALYSIS_QUEUED] = state
        table[state, E.ANALYSIS_DONE] = state
    # A review marks a study reviewed unless it is already further on.
    for state in (S.RECEIVED, S.ANALYZED, S.REVIEWED):
        table[state, E.REVIEWED] = S.REVIEWED
    for state in (S.SENT, S.REPORT_RECEIVED):
        table[state, E.REVIEWED] = state
    # Sent from any stage, except that a report back stays visible.
    for state in (S.RECEIVED, S.ANALYZED, S.REVIEWED, S.SENT):
        table[state, E.SENT] = S.SENT
    table[S.REPORT_RECEIVED, E.SENT] = S.REPORT_RECEIVED
    for state in S:
        table[state, E.REPORT_RECEIVED] = S.REPORT_RECEIVED
    return table


# (state, event) -> the state after it.  Pairs not listed are refused.
STUDY_TRANSITIONS: Mapping[tuple[StudyState, StudyEvent], StudyState] = _table()
# The state of a study its first image creates (the column default of studies.state).
STUDY_INITIAL = StudyState.RECEIVED


class LifecycleError(ApplianceError):
    """A study move was refused.  ``code``: ``unknown_event`` (not a :class:`StudyEvent`),
    ``unknown_state`` (the stored state is not a :class:`StudyState`), ``no_transition`` (the
    pair is not in :data:`STUDY_TRANSITIONS`) or ``no_study``."""

    code = "transition_refused"

    def __init__(self, code: str, message: str):
        self.code = code
        super().__init__(message)


def next_state(state: str, event: str) -> StudyState:
    """The state after ``event`` in ``state``; raises :class:`LifecycleError` for anything the
    table does not list."""
    try:
        ev = StudyEvent(event)
    except ValueError:
        raise LifecycleError("unknown_event", f"not a study event: {event!r} "
                                              f"(one of {', '.join(StudyEvent.values())})") from None
    try:
        current = StudyState(state)
    except ValueError:
        raise LifecycleError("unknown_state", f"not a study state: {state!r} "
                                              f"(one of {', '.join(StudyState.values())})") from None
    after = STUDY_TRANSITIONS.get((current, ev))
    if after is None:
        raise LifecycleError("no_transition", f"a study in state {current} has no transition on {ev}")
    return after


def move_study(tx: sqlite_utils.Database, study_uid: str, event: str) -> StudyState:
    """Inside the caller's transaction ``tx``: apply ``event`` to ``study_uid`` and return its state
    afterwards.  The one writer of ``studies.state``.  Raises :class:`LifecycleError` for an
    unknown study, event or stored state."""
    row = tx.execute("SELECT state FROM studies WHERE study_uid = ?", (study_uid,)).fetchone()
    if row is None:
        raise LifecycleError("no_study", f"no study {study_uid}")
    after = next_state(row[0], event)
    if after != row[0]:
        tx.execute("UPDATE studies SET state = ? WHERE study_uid = ?", (after.value, study_uid))
    return after
