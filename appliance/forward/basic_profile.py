"""What de-identification applies beyond the Table E.1-1 that ``dicom-anonymizer`` ships.

The table itself (PS3.15 Annex E, Table E.1-1, the Basic Profile column) is the
``dicom-anonymizer`` package's copy of edition 2026c, 655 rows.  It was compared row by row with
edition 2026d of the table: every action is the same, and 2026d adds one row, listed here under
NEWER_ROWS.  The other entries are attributes the table does not list but that carry text a
person typed, a name, or an identifier of the patient's institution; the Basic Profile keeps
unlisted attributes, so without these rows their original text would reach the hub.

Each entry: (group, element, group mask, element mask) -> (action, name, why).  The masks select
the repeating groups: 0xFF00 on the group matches 6000-60FF (the overlay planes; the odd groups in
that range are private and removed anyway).  Actions are those of Table E.1-1.
"""
from __future__ import annotations

NEWER_EDITION = "2026d"

Entry = tuple[int, int, int, int]
EXACT, ALL_ELEMENTS, ANY_GROUP = 0xFFFF, 0x0000, 0xFF00

NEWER_ROWS: dict[Entry, tuple[str, str]] = {
    (0x3004, 0x007F, EXACT, EXACT): ("X", "Dose Calculation Model Name"),
}

OMITTED: dict[Entry, tuple[str, str, str]] = {
    # Overlays.  The table removes Overlay Data (60xx,3000) and Overlay Comments (60xx,4000);
    # Overlay Description (60xx,0022), Overlay Label (60xx,1500) and the retired compression
    # label and originator are free text it does not list, and a plane left without its data
    # is invalid.  So the whole plane goes.
    (0x6000, 0x0000, ANY_GROUP, ALL_ELEMENTS): ("X", "Overlay Plane (every attribute)",
                                               "overlay text (Description, Label) and a plane without its data"),
    # Names of people the table does not list (PS3.6 attributes of VR PN).
    (0x0014, 0x0104, EXACT, EXACT): ("X", "Secondary Reviewer Name", "a person's name"),
    (0x0014, 0x2006, EXACT, EXACT): ("X", "Evaluator Name", "a person's name"),
    (0x0040, 0xA067, EXACT, EXACT): ("X", "Document Author (Trial)", "a person's name"),
    # The patient's birth and death dates written in another calendar: the table empties
    # Patient's Birth Date but does not list these, which carry the same dates.
    (0x0010, 0x0033, EXACT, EXACT): ("X", "Patient's Birth Date in Alternative Calendar", "the birth date"),
    (0x0010, 0x0034, EXACT, EXACT): ("X", "Patient's Death Date in Alternative Calendar", "the death date"),
    # Who issued the patient ID and the accession number: the table removes Issuer of Patient ID
    # and empties Accession Number, but not these qualifiers, which name the institution.
    (0x0010, 0x0024, EXACT, EXACT): ("X", "Issuer of Patient ID Qualifiers Sequence", "names the institution"),
    (0x0008, 0x0051, EXACT, EXACT): ("X", "Issuer of Accession Number Sequence", "names the institution"),
    (0x0040, 0x0031, EXACT, EXACT): ("X", "Local Namespace Entity ID", "names the institution"),
    (0x0040, 0x0032, EXACT, EXACT): ("X", "Universal Entity ID", "names the institution"),
    (0x0040, 0xE001, EXACT, EXACT): ("X", "HL7 Instance Identifier", "an identifier of a record"),
    (0x0018, 0x1803, EXACT, EXACT): ("X", "NTP Source Address", "a network address of the site"),
    (0x0088, 0x0130, EXACT, EXACT): ("X", "Storage Media File-set ID", "a site's label for the media"),
}


def entries() -> dict[Entry, str]:
    """Every entry here with its action."""
    found = {entry: action for entry, (action, _name) in NEWER_ROWS.items()}
    found.update({entry: action for entry, (action, _name, _why) in OMITTED.items()})
    return found
