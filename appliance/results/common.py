"""What the SR and the heatmap Secondary Capture share: identity, notice, source metadata, bytes.

Both result objects are new instances in the *source's* study, so the patient and study
attributes are copied from the source, never invented.  Type 2 attributes a modality left out
are added empty (present but unknown) because highdicom reads them unconditionally and
``dciodvfy`` wants them present; values the builders would refuse are made to conform in the
copy (see ``conform.py``).
"""
from __future__ import annotations

import copy
import io
import logging
import socket
from typing import Any, Optional

import pydicom
from pydicom.dataset import Dataset
from pydicom.tag import Tag
from pydicom.uid import generate_uid

from .. import __version__
from ..analyze.runner import AI_NOTICE, AnalysisResult
from .conform import conform_values

from ..store import AI_MANUFACTURER as MANUFACTURER  # one name for "made by this box"

log = logging.getLogger(__name__)

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


def source_metadata(source: Dataset) -> Dataset:
    """A pixel-free copy of the source's top-level attributes, with empty Type 2 study fields
    and every value a builder checks made to conform.

    The copy keeps highdicom from deep-copying megabytes of pixels (or 120 ultrasound frames)
    and lets us fill in missing Type 2 attributes and repair values without touching the
    caller's dataset.
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
    changed = conform_values(meta)
    if changed:  # keywords only: the values are patient data
        log.info("source values made to conform for the AI objects: %s", ", ".join(sorted(set(changed))))
    for keyword in PATIENT_STUDY_KEYWORDS:
        if keyword not in meta:
            setattr(meta, keyword, "")
    return meta


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
