"""De-identification per destination: DICOM PS3.15 Annex E, Basic Application Level
Confidentiality Profile.

The profile's table (which attribute gets which action) is data: the ``dicom-anonymizer``
package's copy of PS3.15 Table E.1-1 (edition 2026c), with the rows of edition 2026d it lacks and
the identifying attributes the table omits (overlay text, names, issuers) from
:mod:`.basic_profile`.  The engine that applies it is ours.

Actions, and what the standard's combined codes become:

- ``X`` remove; ``Z`` empty (or a consistent dummy, see the patient pseudonym); ``D`` dummy value
  of the attribute's VR; ``U`` UID replaced through the re-identification map.
- An attribute: ``Z/D``, ``X/D``, ``X/Z/D`` -> ``D`` (a dummy is valid whatever the attribute's
  type in the IOD, and never keeps the original); ``X/Z`` -> ``Z`` (an empty Type 2 attribute keeps
  the object valid).
- A sequence: ``X/D`` and ``X/Z/D`` -> removed (a "dummy" sequence would be its items cleaned, and
  those keep the code values that name the operator or the institution); ``X/Z`` -> empty;
  ``D`` (Content Sequence, Graphic Annotation Sequence, ...) and ``X/Z/U*`` (reference sequences)
  -> kept, the profile applied to every item, recursively; the codes of a Person Identification
  Code Sequence are replaced by one dummy code.  Sequences the table does not list are cleaned
  the same way.
- Every private attribute is removed (no safe-private list), and so are group lengths and
  command (0000,xxxx) and file meta (0002,xxxx) elements found in the data set.
- The file meta is built afresh (:func:`.transfer.fresh_file_meta`): nothing of the received
  one (Source AE Title, Private Information) is copied.

UIDs: the replacement is HMAC-SHA256(box secret, original) written as a ``2.25.`` UID, so the same
original gets the same new UID forever (a resend after a crash is the same instance on the hub),
and the pair is recorded in ``deid_map`` so a report coming back can be mapped to the original
study.  The secret and the map never leave the box.
"""
from __future__ import annotations

import hashlib
import hmac
import secrets
from functools import lru_cache
from typing import Any, Callable, Iterable

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag

from ..db import Database
from ..store import AI_MANUFACTURER, utc_now
from . import basic_profile
from .errors import PolicyBlocked
from .transfer import NOT_IN_A_DATA_SET, fresh_file_meta

PROFILE_EDITION = "dicomfields_2026c"
METHOD = "PS3.15 Annex E Basic Application Level Confidentiality Profile"
METHOD_CODE = ("113100", "DCM", "Basic Application Confidentiality Profile")

# Dummy values per VR for action D (non-empty, valid for the VR).
DUMMY: dict[str, Any] = {
    "PN": "ANONYMIZED", "LO": "ANONYMIZED", "SH": "ANON", "LT": "ANONYMIZED", "ST": "ANONYMIZED",
    "UT": "ANONYMIZED", "UC": "ANONYMIZED", "CS": "ANON", "AE": "ANON", "DA": "19000101",
    "TM": "000000", "DT": "19000101000000", "AS": "000Y", "IS": "0", "DS": "0", "UR": "ANONYMIZED",
    "US": 0, "SS": 0, "UL": 0, "SL": 0, "UV": 0, "SV": 0, "FL": 0.0, "FD": 0.0, "AT": 0,
}
DUMMY_CODE = ("ANON", "99BOX", "ANONYMIZED")  # Code Value, Coding Scheme Designator, Code Meaning
# Sequences of codes that identify a person (action D in the table): one dummy code instead of
# their items cleaned, which would keep the code values.
IDENTITY_CODE_SEQUENCES = frozenset({0x00401101})  # Person Identification Code Sequence
# The table's actions the engine knows; anything else in a table is an error at load time.
ACTIONS = frozenset({"X", "Z", "D", "U", "Z/D", "X/D", "X/Z/D", "X/Z", "X/Z/U*"})


@lru_cache(maxsize=1)
def profile() -> tuple[dict[int, str], list[tuple[int, int, int, int, str]]]:
    """(exact tag -> action, masked entries (group, element, group mask, element mask, action)),
    with the table's own action codes (``X/Z/D`` etc.)."""
    from dicomanonymizer.dicomfields_selector import dicom_anonymization_database_selector

    table = dicom_anonymization_database_selector(PROFILE_EDITION)
    codes = {"D_TAGS": "D", "Z_TAGS": "Z", "X_TAGS": "X", "U_TAGS": "U", "Z_D_TAGS": "Z/D", "X_D_TAGS": "X/D",
             "X_Z_D_TAGS": "X/Z/D", "X_Z_TAGS": "X/Z", "X_Z_U_STAR_TAGS": "X/Z/U*"}
    exact: dict[int, str] = {}
    masked: list[tuple[int, int, int, int, str]] = []

    def add(entry: tuple[int, ...], action: str) -> None:
        if action not in ACTIONS:
            raise ValueError(f"unknown de-identification action {action!r}")
        if len(entry) == 2 or entry[2:] == (0xFFFF, 0xFFFF):
            exact[(entry[0] << 16) | entry[1]] = action
        else:  # repeating groups such as (50xx,xxxx) curves and (60xx,xxxx) overlay planes
            group, element, gmask, emask = entry
            masked.append((group, element, gmask, emask, action))

    for name, action in codes.items():
        for entry in table[name]:
            add(entry, action)
    for entry, action in basic_profile.entries().items():
        add(entry, action)
    return exact, masked


def table_action(tag: int) -> str:
    """The table's action code for ``tag``; ``""`` = not in the profile (keep)."""
    exact, masked = profile()
    if tag in exact:
        return exact[tag]
    group, element = tag >> 16, tag & 0xFFFF
    for g, e, gm, em, action in masked:
        if group & gm == g and element & em == e:
            return action
    return ""


def resolve(action: str, is_sequence: bool) -> str:
    """What the engine does for a table action: X, Z, D, U, or K (keep, cleaning a sequence's items)."""
    if not action:
        return "K"
    if is_sequence:
        if action in ("X", "X/D", "X/Z/D"):
            return "X"
        if action in ("Z", "X/Z"):
            return "Z"
        return "K"  # D, Z/D, U, X/Z/U*: the items are kept and cleaned
    if action == "X/Z":
        return "Z"
    if action in ("Z/D", "X/D", "X/Z/D"):
        return "D"
    return "U" if action == "X/Z/U*" else action


def action_for(tag: int, is_sequence: bool = False) -> str:
    """The engine's action for ``tag`` (see :func:`resolve`)."""
    return resolve(table_action(tag), is_sequence)


class UidMap:
    """The re-identification map, backed by ``deid_map`` and a per-box secret."""

    def __init__(self, database: Database):
        self.db = database
        self._secret = self._load_secret()
        self._pending: dict[tuple[str, str], str] = {}

    def _load_secret(self) -> bytes:
        with self.db.atomic() as tx:
            tx.execute("INSERT OR IGNORE INTO deid_secret (id, secret) VALUES (1, ?)", (secrets.token_hex(32),))
            return bytes.fromhex(tx.execute("SELECT secret FROM deid_secret WHERE id = 1").fetchone()[0])

    def _digest(self, kind: str, original: str) -> bytes:
        return hmac.new(self._secret, f"{kind}:{original}".encode(), hashlib.sha256).digest()

    def uid(self, original: str) -> str:
        replacement = "2.25." + str(int.from_bytes(self._digest("uid", original)[:16], "big"))
        self._pending[("uid", original)] = replacement
        return replacement

    def patient(self, patient_id: str) -> str:
        """A consistent pseudonym per patient, so the hub can still tell patients apart."""
        replacement = "ANON-" + self._digest("patient", patient_id).hex()[:12].upper()
        self._pending[("patient", patient_id)] = replacement
        return replacement

    def flush(self) -> None:
        """Record the pairs used so far.  Called before the de-identified bytes leave the box, so
        a report for any instance the hub holds can always be mapped back."""
        if not self._pending:
            return
        now = utc_now()
        with self.db.atomic() as tx:
            tx.conn.executemany("INSERT OR IGNORE INTO deid_map (kind, original, replacement, created_at) VALUES (?, ?, ?, ?)",
                           [(k, o, r, now) for (k, o), r in self._pending.items()])
        self._pending.clear()

    def original(self, replacement: str, kind: str = "uid") -> str | None:
        rows = self.db.query("SELECT original FROM deid_map WHERE kind = ? AND replacement = ?", (kind, replacement))
        return rows[0]["original"] if rows else None


def made_by_box(ds: Dataset) -> bool:
    return str(ds.get("Manufacturer", "") or "").strip() == AI_MANUFACTURER


def check_burned_in(ds: Dataset, allow_burned_in: bool) -> None:
    """Refuse images whose pixels may carry patient text.  The box's own heatmaps are exempt:
    what is burned into them (the AI notice, model and findings) is written by the box itself."""
    if allow_burned_in or made_by_box(ds):
        return
    if str(ds.get("BurnedInAnnotation", "") or "").strip().upper() == "YES":
        raise PolicyBlocked("image has burned-in annotation (BurnedInAnnotation YES): patient text may be in the "
                            "pixels, which de-identification cannot remove; set allow_burned_in for this destination "
                            "to send it anyway")


def deidentify(ds: Dataset, uids: UidMap, allow_burned_in: bool = False) -> Dataset:
    """A de-identified copy of ``ds`` (the input is not modified).  Raises PolicyBlocked."""
    check_burned_in(ds, allow_burned_in)
    out = Dataset()
    patient_id = str(ds.get("PatientID", "") or "") + "^" + str(ds.get("IssuerOfPatientID", "") or "")
    pseudonym = uids.patient(patient_id)
    _clean(ds, out, uids.uid)
    out.PatientID = pseudonym
    out.PatientName = pseudonym
    out.PatientIdentityRemoved = "YES"
    out.DeidentificationMethod = METHOD
    out.DeidentificationMethodCodeSequence = Sequence([_code(*METHOD_CODE)])
    out.file_meta = fresh_file_meta(out, str(ds.file_meta.TransferSyntaxUID))
    return out


def _clean(src: Dataset, dst: Dataset, new_uid: Callable[[str], str]) -> None:
    for elem in src:
        tag = BaseTag(elem.tag)
        if tag.is_private or tag.group in NOT_IN_A_DATA_SET or tag.element == 0x0000:
            continue  # private attributes (and their creators), group lengths, stray command / meta
        is_sequence = elem.VR == "SQ"
        action = action_for(int(tag), is_sequence)
        if action == "X":
            continue
        if is_sequence:
            if action == "Z":
                dst.add_new(tag, "SQ", Sequence())
            elif int(tag) in IDENTITY_CODE_SEQUENCES:
                dst.add_new(tag, "SQ", Sequence([_code(*DUMMY_CODE)]))
            else:
                dst.add_new(tag, "SQ", Sequence([_clean_item(item, new_uid) for item in elem.value]))
        elif action == "K":
            dst.add(elem)
        elif action == "U":
            dst.add_new(tag, elem.VR, _map_uids(elem.value, new_uid) if elem.VR == "UI" else _dummy(elem.VR))
        elif action == "Z":
            dst.add_new(tag, elem.VR, None)
        else:  # D
            dst.add_new(tag, elem.VR, _dummy(elem.VR) if elem.VR != "UI" else _map_uids(elem.value, new_uid))


def _clean_item(item: Dataset, new_uid: Callable[[str], str]) -> Dataset:
    out = Dataset()
    _clean(item, out, new_uid)
    return out


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = value, scheme, meaning
    return code


def _map_uids(value: Any, new_uid: Callable[[str], str]) -> Any:
    if value is None or value == "":
        return value
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return [new_uid(str(v)) for v in value]
    return new_uid(str(value))


def _dummy(vr: str) -> Any:
    if vr in ("OB", "OW", "OF", "OD", "OL", "OV", "UN"):
        return b"\x00\x00"
    return DUMMY.get(vr, "ANONYMIZED")


def profile_tags(actions: Iterable[str]) -> set[int]:
    """Exact tags whose engine action for a non-sequence attribute is one of ``actions`` (used by
    tests and docs)."""
    exact, _ = profile()
    wanted = set(actions)
    return {tag for tag, action in exact.items() if resolve(action, False) in wanted}
