"""What the SR and the heatmap Secondary Capture share: identity, notice, source metadata, bytes.

Both result objects are new instances in the *source's* study, so the patient and study
attributes are copied from the source, never invented.  Type 2 attributes a modality left out
are added empty (present but unknown) because highdicom reads them unconditionally and
``dciodvfy`` wants them present; values their VR does not allow are normalised or left out in
the copy (the rules are in ``conform.py``), and :class:`SourceCopy` says which of the attributes
each object really copies were changed, so the SR (and the SC's comments) can say so.
"""
from __future__ import annotations

import copy
import io
import logging
import socket
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

import pydicom
from pydicom.dataset import Dataset
from pydicom.tag import Tag
from pydicom.uid import generate_uid

from .. import __version__
from ..analyze.result import AI_NOTICE, AnalysisResult
from ..store import AI_MANUFACTURER
from .conform import Change, conform_dataset

log = logging.getLogger(__name__)

# The Manufacturer of the box's own objects: the one name by which the index knows them as AI.
MANUFACTURER = AI_MANUFACTURER
MODEL_NAME = "Clinic Edge Appliance"
# UTF-8: the notice's em dash is not in ISO 8859-1, which most modalities declare.
CHARACTER_SET = "ISO_IR 192"
# Long String (LO) values are limited to 64 characters.
LO_MAX = 64

# Patient and General Study attributes copied verbatim from the source (Type 2 where not Type 1).
PATIENT_STUDY_KEYWORDS = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex",
    "StudyInstanceUID", "StudyDate", "StudyTime", "AccessionNumber",
    "ReferringPhysicianName", "StudyID",
)
_REQUIRED_UIDS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
# What else the builders read from the source: the references to it, and what describes it.
REFERENCE_KEYWORDS = ("SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID",
                      "NumberOfFrames", "Modality", "Rows", "Columns")
# The SC's own copies besides the patient and study (see build_heatmap_sc).
SC_KEYWORDS = PATIENT_STUDY_KEYWORDS + REFERENCE_KEYWORDS + (
    "PatientOrientation", "Laterality", "LossyImageCompression", "LossyImageCompressionRatio",
    "LossyImageCompressionMethod")
# highdicom's SR copies the source's acquisition equipment as Contributing Equipment.
EQUIPMENT_KEYWORDS = ("Manufacturer", "ManufacturerModelName", "SoftwareVersions", "DeviceSerialNumber",
                      "InstitutionName", "InstitutionalDepartmentName", "InstitutionAddress", "StationName",
                      "AcquisitionDateTime", "AcquisitionDate", "AcquisitionTime")


def lo(text: str) -> str:
    """Clip to the LO limit so a long label or model name never makes an invalid object."""
    return text if len(text) <= LO_MAX else text[: LO_MAX - 1] + "…"


def software_versions(result: AnalysisResult) -> list[str]:
    """The appliance's version, then the model's: a PACS then shows which build wrote the object."""
    return [lo(f"appliance {__version__}"), lo(f"{result.model} {result.model_version}")]


def notices(result: AnalysisResult) -> list[str]:
    """The fixed AI notice, plus the model package's own disclaimer when it says more."""
    texts = [AI_NOTICE]
    if result.disclaimer and result.disclaimer.strip() and result.disclaimer.strip() != AI_NOTICE:
        texts.append(result.disclaimer.strip())
    return texts


@dataclass
class SourceCopy:
    """The source's attributes as the builders get them, and what was changed on the way."""

    meta: Dataset
    changes: list[Change] = field(default_factory=list)

    def notes(self, copied: Iterable[str]) -> list[str]:
        """One sentence per attribute in ``copied`` that the object does not carry as sent."""
        wanted = set(copied)
        return list(dict.fromkeys(c.note() for c in self.changes if c.noted and c.keyword in wanted))


def sr_keywords(meta: Dataset) -> set[str]:
    """Every source attribute highdicom's SR copies: the root attributes of the Patient and Study
    modules of the source's IOD (``copy_patient_and_study_information``), its equipment, and
    what the content tree references."""
    from highdicom._standard_utils import (get_iod_module_map, get_module_attribute_map,  # one source of truth
                                           get_sop_class_iod_map)

    keywords = set(PATIENT_STUDY_KEYWORDS + REFERENCE_KEYWORDS + EQUIPMENT_KEYWORDS)
    iod = get_sop_class_iod_map().get(str(meta.SOPClassUID))
    attributes = get_module_attribute_map()
    for module in get_iod_module_map().get(iod, []) if iod else []:
        if module["ie"] in ("Patient", "Study"):
            keywords.update(str(a["keyword"]) for a in attributes[module["key"]] if not a["path"])
    return keywords


def source_copy(source: Dataset) -> SourceCopy:
    """A pixel-free copy of the source's top-level attributes, every covered value valid for its
    VR (or left out), and empty Type 2 study fields.

    The copy keeps highdicom from deep-copying megabytes of pixels (or 120 ultrasound frames)
    and lets us fill in missing Type 2 attributes and repair values without touching the
    caller's dataset.  Raises ValueError when the source lacks (or has an unusable) SOP Class UID
    or lacks another UID the objects are filed under.
    """
    missing = [kw for kw in _REQUIRED_UIDS if not source.get(kw)]
    if missing:
        raise ValueError(f"source dataset lacks {', '.join(missing)}")
    meta = Dataset()
    # Unconverted elements: a value pydicom cannot convert fails in the copy, where it is
    # repaired, not while reading the caller's dataset.
    for element in source.elements():
        if Tag(element.tag).group in (0x7FE0, 0xFFFA):  # pixel data and digital signatures
            continue
        meta[element.tag] = copy.deepcopy(element)  # never alias the caller's elements
    changes = conform_dataset(meta)
    if changes:  # keywords only: the values are patient data
        log.info("source values changed for the AI objects: %s",
                 ", ".join(sorted({f"{c.keyword} ({c.action})" for c in changes})))
    for keyword in PATIENT_STUDY_KEYWORDS:
        if keyword not in meta:
            setattr(meta, keyword, "")
    return SourceCopy(meta, changes)


def source_metadata(source: Dataset) -> Dataset:
    """:func:`source_copy` without the record of changes."""
    return source_copy(source).meta


def frame_number(source: Dataset, result: AnalysisResult) -> Optional[int]:
    """The 1-based frame the model looked at in a multi-frame source, else None."""
    frames = int(source.get("NumberOfFrames", 1) or 1)
    if frames <= 1:
        return None
    index = int(result.source.get("frame_index", 0) or 0)  # decode() reports it 0-based
    return min(max(index, 0), frames - 1) + 1


def device_uid(name: str = MANUFACTURER) -> str:
    """A UID for this box that is stable across restarts (derived from its host name)."""
    return str(generate_uid(entropy_srcs=[name, socket.gethostname()]))


def derived_uid(*parts: Any) -> str:
    """A deterministic UID from its parts, so a re-run writes the same identifiers."""
    return str(generate_uid(entropy_srcs=[str(p) for p in parts]))


def write_part10(ds: Dataset) -> bytes:
    """Encode a dataset as a DICOM Part 10 file (preamble, meta header, explicit VR LE).

    The caller stores the bytes through its durable store, so nothing here touches the disk.
    """
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()
