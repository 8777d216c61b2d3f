"""What the outbox hands a peer, what a peer reports back, and the peer protocol.

A peer (``dicom_peer.DicomPeer``, ``dicomweb.DicomWebPeer``) sends a list of :class:`Outgoing`
instances and reports one :class:`Outcome` per instance as it goes, so the outbox can commit
progress instance by instance.  A transient problem (link down, peer busy) is raised as
``TransientSendError`` and ends the attempt; per-instance refusals are outcomes, not exceptions.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Callable, Optional, Protocol

import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import UID

from .compress import compress, target_syntax


@dataclass
class Outgoing:
    """One instance to send.  ``load`` builds the dataset to send (de-identified if the
    destination asks for it) and may raise PolicyBlocked."""

    sop_instance_uid: str
    remote_sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax: str
    load: Callable[[], Dataset]


@dataclass
class Outcome:
    """``state``: ``sent`` (acknowledged), ``refused`` (by the peer) or ``blocked`` (by policy)."""

    sop_instance_uid: str
    state: str
    bytes_sent: int = 0
    transfer_syntax: str = ""
    reason: str = ""


Report = Callable[[list[Outcome]], None]
ShouldStop = Callable[[], bool]


class Peer(Protocol):
    def send(self, outgoing: list[Outgoing], report: Report, should_stop: ShouldStop) -> None: ...

    def present(self, remote_study_uid: str) -> set[str]: ...

    def close(self) -> None: ...


def encode(ds: Dataset) -> bytes:
    """Part 10 bytes of ``ds`` in its own transfer syntax (what goes on the wire)."""
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def with_syntax(ds: Dataset, accepted: set[str], compress_method: str) -> Optional[Dataset]:
    """``ds`` in a transfer syntax from ``accepted``: losslessly compressed if the destination
    asks for it and the peer accepts it, else as stored, else decompressed to explicit (or
    implicit) VR little endian.  None if none of these is accepted."""
    target = target_syntax(compress_method)
    if target is not None and target in accepted:
        packed = compress(ds, compress_method)
        if packed is not None:
            return packed
    current = str(ds.file_meta.TransferSyntaxUID)
    if current in accepted:
        return ds
    for fallback in (pydicom.uid.ExplicitVRLittleEndian, pydicom.uid.ImplicitVRLittleEndian):
        if fallback in accepted:
            if UID(current).is_compressed:
                ds.decompress(generate_instance_uid=False)  # lossless: decoding only; a lossy original stays as lossy as it was
            ds.file_meta.TransferSyntaxUID = fallback
            return ds
    return None
