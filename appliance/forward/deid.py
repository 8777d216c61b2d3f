"""De-identification per destination: DICOM PS3.15 Annex E, Basic Application Level
Confidentiality Profile.

The profile's table (which attribute gets which action) is data, taken from the
``dicom-anonymizer`` package's copy of PS3.15 Table E.1-1; the engine that applies it is ours.

Actions and the precedence we apply for the standard's combined codes:

- ``X`` remove; ``Z`` empty (or a consistent dummy, see the patient pseudonym); ``D`` dummy value
  of the attribute's VR; ``U`` UID replaced through the re-identification map.
- ``Z/D``, ``X/D``, ``X/Z/D`` -> ``D``: a dummy is valid whatever the attribute's type in the IOD,
  and never keeps the original.  ``X/Z`` -> ``Z``: an empty Type 2 attribute keeps the object
  valid.  ``X/Z/U*`` (reference sequences) -> keep the sequence and replace the UIDs inside.
- A sequence whose action is ``D`` (Content Sequence) is cleaned: the profile is applied to every
  item, recursively.  Sequences the table does not list are cleaned the same way.
- Every private attribute is removed.

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

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag

from ..db import Database
from ..store import AI_MANUFACTURER, utc_now
from .errors import PolicyBlocked

PROFILE_EDITION = "dicomfields_2026c"
METHOD = "PS3.15 Annex E Basic Application Level Confidentiality Profile"
METHOD_CODE = ("113100", "DCM", "Basic Application Confidentiality Profile")

# Dummy values per VR for action D (non-empty, valid for the VR).
DUMMY: dict[str, Any] = {
    "PN": "ANONYMIZED", "LO": "ANONYMIZED", "SH": "ANON", "LT": "ANONYMIZED", "ST": "ANONYMIZED",
    "UT": "ANONYMIZED", "UC": "ANONYMIZED", "CS": "ANON", "AE": "ANON", "DA": "19000101",
    "TM": "000000", "DT": "19000101000000", "AS": "000Y", "IS": "0", "DS": "0", "UR": "",
    "US": 0, "SS": 0, "UL": 0, "SL": 0, "UV": 0, "SV": 0, "FL": 0.0, "FD": 0.0, "AT": 0,
}


@lru_cache(maxsize=1)
def profile() -> tuple[dict[int, str], list[tuple[int, int, int, int, str]]]:
    """(exact tag -> action, masked entries (group, element, group mask, element mask, action))."""
    from dicomanonymizer.dicomfields_selector import dicom_anonymization_database_selector  # type: ignore[import-untyped]

    table = dicom_anonymization_database_selector(PROFILE_EDITION)
    resolved = {"D_TAGS": "D", "Z_TAGS": "Z", "X_TAGS": "X", "U_TAGS": "U", "Z_D_TAGS": "D", "X_D_TAGS": "D",
                "X_Z_D_TAGS": "D", "X_Z_TAGS": "Z", "X_Z_U_STAR_TAGS": "U*"}
    exact: dict[int, str] = {}
    masked: list[tuple[int, int, int, int, str]] = []
    for name, action in resolved.items():
        for entry in table[name]:
            if len(entry) == 2:
                exact[(entry[0] << 16) | entry[1]] = action
            else:  # repeating groups such as (50xx,xxxx) curves and (60xx,3000) overlay data
                group, element, gmask, emask = entry
                masked.append((group, element, gmask, emask, action))
    return exact, masked


def action_for(tag: int) -> str:
    """The resolved profile action for ``tag``; ``""`` = not in the profile (keep)."""
    exact, masked = profile()
    if tag in exact:
        return exact[tag]
    group, element = tag >> 16, tag & 0xFFFF
    for g, e, gm, em, action in masked:
        if group & gm == g and element & em == e:
            return action
    return ""


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
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = METHOD_CODE
    out.DeidentificationMethodCodeSequence = Sequence([code])
    meta = FileMetaDataset()
    for elem in ds.file_meta:
        meta.add(elem)
    meta.MediaStorageSOPInstanceUID = out.SOPInstanceUID
    out.file_meta = meta
    return out


def _clean(src: Dataset, dst: Dataset, new_uid: Callable[[str], str]) -> None:
    for elem in src:
        tag = BaseTag(elem.tag)
        if tag.is_private:
            continue  # private attributes (and their creators) are removed wholesale
        action = action_for(int(tag))
        if action == "X":
            continue
        if elem.VR == "SQ":
            if action == "Z":
                dst.add_new(tag, "SQ", Sequence())
                continue
            dst.add_new(tag, "SQ", Sequence([_clean_item(item, new_uid) for item in elem.value]))
            continue
        if action == "":
            dst.add(elem)
        elif action in ("U", "U*"):
            dst.add_new(tag, elem.VR, _map_uids(elem.value, new_uid) if elem.VR == "UI" else _dummy(elem.VR))
        elif action == "Z":
            dst.add_new(tag, elem.VR, None)
        else:  # D
            dst.add_new(tag, elem.VR, _dummy(elem.VR) if elem.VR != "UI" else _map_uids(elem.value, new_uid))


def _clean_item(item: Dataset, new_uid: Callable[[str], str]) -> Dataset:
    out = Dataset()
    _clean(item, out, new_uid)
    return out


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
    """Exact tags whose resolved action is one of ``actions`` (used by tests and docs)."""
    exact, _ = profile()
    wanted = set(actions)
    return {tag for tag, action in exact.items() if action in wanted}
