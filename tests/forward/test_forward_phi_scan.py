"""PHI planted in every attribute of the Basic Profile table (and in the identifying attributes it
omits), in private attributes, nested sequences, overlay planes, curves, the file meta and the
preamble; imported into the box, forwarded de-identified over C-STORE and STOW-RS to real Orthancs,
and every byte each Orthanc stored scanned for every planted value.

Each planted value is a unique marker.  Text markers carry ``PHI`` and a number; dates, times,
numbers and UIDs are recognisable values (dates before 1871, a private UID root), matched only
where no digit or dot precedes them, so a random UID of the hub cannot match them by chance.

A third Orthanc receives the same file without de-identification: every data set marker must be
found there (the scan can see them all), and none of the file meta, the preamble or the command
elements a careless writer left in the data set (none of these ever leaves the box).
"""
from __future__ import annotations

import datetime
import io
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.datadict import dictionary_has_tag, dictionary_VR
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian

from appliance.acquire.importer import import_files
from appliance.forward import request_forward, study_forwarding
from appliance.forward.deid import action_for, profile, table_action
from appliance.forward.transfer import encode, with_syntax
from tests.forward.conftest import PASSWORD
from tests.forward.local_peers import make_box
from tests.forward.util import destination_toml
from tests.helpers import sample

# VRs of table rows newer than the installed pydicom's dictionary (PS3.6 2025-2026).
NEWER_VRS = {
    0x0040B034: "DT", 0x0040E012: "UR", 0x0040A034: "DT", 0x0040A035: "DT", 0x00102162: "UC", 0x00100044: "SQ",
    0x00100045: "LT", 0x00100041: "SQ", 0x00081304: "SQ", 0x0040B03F: "LO", 0x0040B03B: "LO", 0x00100012: "PN",
    0x00100013: "UT", 0x00100011: "SQ", 0x00081302: "SQ", 0x00081301: "SQ", 0x00100015: "SQ", 0x00100016: "UT",
    0x00081303: "SQ", 0x0040B036: "DT", 0x00100046: "SQ", 0x00100042: "UT", 0x00100047: "UR", 0x00100043: "SQ",
    0x00100014: "SQ", 0x3004007F: "LO",
}
BINARY_NUMBERS = {"US", "SS", "UL", "SL", "FL", "FD", "AT", "UV", "SV"}
ONLY_AT_TOP = (0x0000, 0xFFFA, 0xFFFC)  # command group, digital signatures, trailing padding
REFERENCED_SERIES, REFERENCED_INSTANCE = 0x00081115, 0x0008114A  # hosts for the nested copies (not in the table)
PRIVATE_GROUP = 0x0009
REQUIRED_META = {0x00020000, 0x00020001, 0x00020002, 0x00020003, 0x00020010, 0x00020012, 0x00020013}
UID_ROOT = "1.3.6.1.4.1.99999.7777."
# pydicom warns when it reads the command elements spliced into the test file (it expects that
# group implicit): the careless file is the point.
pytestmark = pytest.mark.filterwarnings("ignore:Expected implicit VR:UserWarning")


def vr_of(tag: int) -> str:
    return NEWER_VRS.get(tag) or dictionary_VR(tag).split(" or ")[0]


@dataclass
class Planted:
    """Every marker planted, with where it was put; ``local`` ones went where nothing is sent
    from, de-identified or not: the file meta, the preamble, command elements in the data set."""

    where: dict[str, str] = field(default_factory=dict)
    local: set[str] = field(default_factory=set)
    count: int = 0

    def marker(self, where: str, vr: str) -> Any:
        """A value valid for ``vr`` that is unique to ``where`` (bytes for OB, OW and UN)."""
        self.count += 1
        n = self.count
        day = (datetime.date(1850, 1, 1) + datetime.timedelta(days=3 * n)).strftime("%Y%m%d")
        text = {
            "AE": f"PHI{n:05d}AE", "CS": f"PHI{n:05d}CS", "SH": f"PHI{n:05d}SH", "PN": f"PHI{n:05d}^PN",
            "AS": f"{n % 90 + 10:03d}Y", "DA": day, "TM": f"235959.7{n:05d}", "DT": f"{day}235959.7{n:05d}",
            "DS": f"77{n:05d}.5", "IS": f"88{n:05d}", "UI": f"{UID_ROOT}{n:05d}",
            "UR": f"http://example.invalid/PHI{n:05d}UR", "OB": f"PHI{n:05d}OB", "OW": f"PHI{n:05d}OW",
            "UN": f"PHI{n:05d}UN",
        }.get(vr, f"PHI{n:05d}{vr} free text")
        if vr != "AS":  # an age is 4 characters: checked in the parsed data sets, not in the bytes
            self.where[text] = where
        return text.encode().ljust(12, b"\0") if vr in ("OB", "OW", "UN") else text

    def pattern(self, marker: str) -> re.Pattern[bytes]:
        """A marker that starts with a digit must not continue a number or a UID (a hub's random
        ``2.25.`` UID holds any short run of digits).  Markers of one VR have one fixed width, so
        none is the start of another."""
        raw = re.escape(marker.encode())
        return re.compile(rb"(?<![0-9.])" + raw if marker[0].isdigit() else raw)

    def found_in(self, data: bytes) -> dict[str, str]:
        return {m: w for m, w in self.where.items() if self.pattern(m).search(data)}


def code_item(planted: Planted, where: str) -> Dataset:
    item = Dataset()
    item.CodeValue = planted.marker(f"{where} > Code Value", "SH")
    item.CodingSchemeDesignator = "99PHI"
    item.CodeMeaning = planted.marker(f"{where} > Code Meaning", "LO")
    return item


def table_item(planted: Planted, where: str) -> Dataset:
    """An item with attributes the table lists (for sequences whose items are kept and cleaned)."""
    item = Dataset()
    item.PersonName = planted.marker(f"{where} > Person Name", "PN")
    item.DateTime = planted.marker(f"{where} > DateTime", "DT")
    item.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    item.ReferencedSOPInstanceUID = planted.marker(f"{where} > Referenced SOP Instance UID", "UI")
    return item


def plant_private(ds: Dataset, planted: Planted, where: str) -> None:
    block = ds.private_block(PRIVATE_GROUP, planted.marker(f"{where} private creator", "LO"), create=True)
    block.add_new(0x10, "LO", planted.marker(f"{where} private LO", "LO"))
    block.add_new(0x11, "UI", planted.marker(f"{where} private UI", "UI"))
    block.add_new(0x12, "OB", planted.marker(f"{where} private OB", "OB"))
    inner = Dataset()
    inner.PatientName = planted.marker(f"{where} private SQ > Patient's Name", "PN")
    block.add_new(0x13, "SQ", Sequence([inner]))


def plant_table(ds: Dataset, planted: Planted, where: str, top: bool,
                command: list[tuple[int, str]] | None = None) -> None:
    """A marker in every exact-tag row of the profile whose VR can hold one; the command group
    rows (UIDs) are put in ``command``."""
    exact, _masked = profile()
    command = [] if command is None else command
    for tag in sorted(exact):
        if tag >> 16 == 0x0002 or (not top and tag >> 16 in ONLY_AT_TOP):
            continue  # the file meta is planted separately
        if not dictionary_has_tag(tag) and tag not in NEWER_VRS:
            raise AssertionError(f"no VR known for {tag:08X}")
        vr = vr_of(tag)
        label = f"{where} ({tag >> 16:04X},{tag & 0xFFFF:04X})"
        if tag >> 16 == 0x0000:
            uid = planted.marker(label, vr)
            command.append((tag, uid))  # pydicom will not write these: spliced in
            planted.local.add(uid)
        elif vr == "SQ":
            if not top:
                continue
            kept = action_for(tag, is_sequence=True) == "K" and tag != 0x00401101
            ds.add_new(tag, "SQ", Sequence([table_item(planted, label) if kept else code_item(planted, label)]))
        elif vr in BINARY_NUMBERS:
            ds.add_new(tag, vr, 4)  # no room for a marker: the parsed data set is checked instead
        else:
            ds.add_new(tag, vr, planted.marker(label, vr))


def plant_repeating_groups(ds: Dataset, planted: Planted) -> None:
    for group in (0x6000, 0x6002):
        label = f"overlay {group:04X}"
        ds.add_new((group, 0x0010), "US", 16)
        ds.add_new((group, 0x0011), "US", 16)
        ds.add_new((group, 0x0040), "CS", "G")
        ds.add_new((group, 0x0050), "SS", [1, 1])
        ds.add_new((group, 0x0100), "US", 1)
        ds.add_new((group, 0x0102), "US", 0)
        ds.add_new((group, 0x0022), "LO", planted.marker(f"{label} Overlay Description", "LO"))
        ds.add_new((group, 0x0045), "LO", planted.marker(f"{label} Overlay Subtype", "LO"))
        ds.add_new((group, 0x1500), "LO", planted.marker(f"{label} Overlay Label", "LO"))
        ds.add_new((group, 0x4000), "LT", planted.marker(f"{label} Overlay Comments", "LT"))
        ds.add_new((group, 0x3000), "OB", planted.marker(f"{label} Overlay Data", "OB").ljust(32, b"\0"))
    ds.add_new((0x5000, 0x0022), "LO", planted.marker("curve 5000 Curve Description", "LO"))
    ds.add_new((0x5000, 0x2500), "LO", planted.marker("curve 5000 Curve Label", "LO"))
    ds.add_new((0x5000, 0x200E), "LT", planted.marker("curve 5000 Audio Comments", "LT"))
    ds.add_new((0x5000, 0x3000), "OB", planted.marker("curve 5000 Curve Data", "OB"))


def plant_file_meta(ds: Dataset, planted: Planted) -> None:
    before = set(planted.where)
    meta = ds.file_meta
    for keyword, vr in (("SourceApplicationEntityTitle", "AE"), ("SendingApplicationEntityTitle", "AE"),
                        ("ReceivingApplicationEntityTitle", "AE"), ("SourcePresentationAddress", "UR"),
                        ("SendingPresentationAddress", "UR"), ("ReceivingPresentationAddress", "UR"),
                        ("PrivateInformationCreatorUID", "UI"), ("PrivateInformation", "OB"),
                        ("ImplementationClassUID", "UI"), ("ImplementationVersionName", "SH")):
        setattr(meta, keyword, planted.marker(f"file meta {keyword}", vr))
    ds.preamble = planted.marker("preamble", "LT").encode().ljust(128, b"\0")
    planted.local |= set(planted.where) - before


def phi_file(path: Path) -> tuple[Planted, Dataset]:
    """The real CT image with a marker in every place listed above."""
    ds = pydicom.dcmread(sample("CT_small.dcm"))
    planted = Planted()
    command: list[tuple[int, str]] = []
    plant_table(ds, planted, "top", top=True, command=command)
    for tag in (0x00100010, 0x00100020, 0x00100030):  # the patient's own, named in the failures
        assert str(ds[tag].value) in planted.where
    nested = Dataset()
    plant_table(nested, planted, "nested", top=False)
    plant_private(nested, planted, "nested")
    deeper = Dataset()
    plant_table(deeper, planted, "nested twice", top=False)
    plant_private(deeper, planted, "nested twice")
    nested.add_new(REFERENCED_INSTANCE, "SQ", Sequence([deeper]))
    ds.add_new(REFERENCED_SERIES, "SQ", Sequence([nested]))
    plant_private(ds, planted, "top")
    plant_repeating_groups(ds, planted)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    plant_file_meta(ds, planted)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(with_command_elements(buffer.getvalue(), command))
    return planted, pydicom.dcmread(path)


def with_command_elements(part10: bytes, command: list[tuple[int, str]]) -> bytes:
    """``part10`` with (0000,eeee) UI elements at the start of its data set (explicit VR little
    endian), as a careless writer leaves them."""
    (meta_length,) = struct.unpack_from("<I", part10, 132 + 8)
    start = 132 + 12 + meta_length
    elements = b""
    for tag, uid in sorted(command):
        value = uid.encode() + (b"\0" if len(uid) % 2 else b"")
        elements += struct.pack("<HH2sH", 0x0000, tag & 0xFFFF, b"UI", len(value)) + value
    return part10[:start] + elements + part10[start:]


def elements(ds: Dataset) -> list[pydicom.DataElement]:
    found = []
    for elem in ds:
        found.append(elem)
        if elem.VR == "SQ":
            for item in elem.value:
                found.extend(elements(item))
    return found


def assert_deidentified(received: bytes, planted: Planted, original: Dataset, hub: str) -> None:
    leaks = planted.found_in(received)
    assert not leaks, f"{len(leaks)} planted values reached {hub}: {sorted(leaks.values())[:20]}"
    ds = pydicom.dcmread(io.BytesIO(received))
    every = elements(ds)
    assert not [e for e in every if e.tag.is_private], f"private attributes reached {hub}"
    assert not [e for e in every if e.tag.group in (0x5000, 0x6000, 0x6002)], f"curves or overlays reached {hub}"
    removed = [e for e in every if table_action(int(e.tag)) and action_for(int(e.tag), e.VR == "SQ") == "X"]
    assert not removed, f"attributes the profile removes reached {hub}: {[str(e.tag) for e in removed]}"
    ages = {str(e.value) for e in elements(original) if e.VR == "AS"}
    assert not [e for e in every if e.VR == "AS" and str(e.value) in ages], f"a planted age reached {hub}"
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "StudyInstanceUID", "SeriesInstanceUID",
                    "SOPInstanceUID", "FrameOfReferenceUID", "AccessionNumber", "InstitutionName"):
        value = str(original[keyword].value)
        assert not planted.pattern(value).search(received), f"the original {keyword} reached {hub}"
    assert ds.PatientIdentityRemoved == "YES" and ds.PatientName == ds.PatientID != original.PatientID


def test_planted_phi_never_reaches_the_hub_over_either_path(tmp_path, orthanc_factory):
    pacs, web, raw = (orthanc_factory(name).start() for name in ("pacs", "web", "raw"))
    box = make_box(tmp_path,
                   destination_toml("pacs", "dicom", pacs, deidentify=True, attach_ai_results=False),
                   destination_toml("web", "dicomweb", web, deidentify=True, attach_ai_results=False),
                   destination_toml("raw", "dicomweb", raw, deidentify=False, attach_ai_results=False),
                   environ={"APPLIANCE_DESTINATIONS_WEB_PASSWORD": PASSWORD,
                            "APPLIANCE_DESTINATIONS_RAW_PASSWORD": PASSWORD})
    path = tmp_path / "in" / "phi.dcm"
    planted, original = phi_file(path)
    assert planted.found_in(path.read_bytes()) == planted.where  # the file holds every marker
    assert len(planted.where) > 1500, len(planted.where)
    assert import_files(box.store, [path]).imported == 1
    study = str(original.StudyInstanceUID)
    for name in ("pacs", "web", "raw"):
        request_forward(box.db, box.config, study, name, "routine", "phi-scan")
    box.drain()
    states = {i["destination"]: i["state"] for i in study_forwarding(box.db, study)}
    assert states == {"pacs": "confirmed", "web": "confirmed", "raw": "confirmed"}, study_forwarding(box.db, study)

    for hub, name in ((pacs, "the hub over C-STORE"), (web, "the hub over STOW-RS")):
        (instance,) = hub.instance_ids()
        assert_deidentified(hub.instance_file(instance), planted, original, name)

    # Without de-identification the data set goes as it is (the scan finds every one of its
    # markers), but not the file meta, the preamble or command elements.
    (instance,) = raw.instance_ids()
    received = raw.instance_file(instance)
    missing = set(planted.where) - planted.found_in(received).keys()
    assert missing == planted.local, sorted(missing ^ planted.local)[:20]
    meta = pydicom.dcmread(io.BytesIO(received)).file_meta
    assert meta.MediaStorageSOPInstanceUID == original.SOPInstanceUID


def test_what_leaves_the_box_has_a_fresh_file_meta_de_identified_or_not(tmp_path):
    """The Part 10 bytes the box sends (STOW-RS body, C-STORE size): only the required file meta
    elements, none of the received ones, a zero preamble."""
    from appliance.db import open_database
    from appliance.forward.deid import UidMap, deidentify

    planted, original = phi_file(tmp_path / "phi.dcm")
    uids = UidMap(open_database(tmp_path / "data"))
    for ds in (deidentify(original, uids), pydicom.dcmread(tmp_path / "phi.dcm")):
        ready = with_syntax(ds, {ExplicitVRLittleEndian}, "none")
        assert ready is not None
        data = encode(ready)
        assert data[:128] == b"\0" * 128 and data[128:132] == b"DICM"
        sent = pydicom.dcmread(io.BytesIO(data))
        assert {int(e.tag) for e in sent.file_meta} == REQUIRED_META
        assert sent.file_meta.MediaStorageSOPInstanceUID == sent.SOPInstanceUID
        assert sent.file_meta.MediaStorageSOPClassUID == sent.SOPClassUID
        assert not {m for m in planted.local if planted.pattern(m).search(data)}
