"""What the outbox hands a peer, what a peer reports back, and the peer protocol.

A peer (``dicom_peer.DicomPeer``, ``dicomweb.DicomWebPeer``) sends a list of :class:`Outgoing`
instances and reports one :class:`Outcome` per instance as it goes, so the outbox can commit
progress instance by instance.  A transient problem (link down, peer busy) is raised as
``TransientSendError`` and ends the attempt; per-instance refusals are outcomes, not exceptions.

A peer may send on several connections at once (:func:`run_lanes`): every instance still waits
for its own answer, but while one connection waits a round trip for it, another keeps the link busy.

What leaves the box is built here (:func:`with_syntax`, :func:`encode`), de-identified or not,
over either path: a fresh file meta with only the elements PS3.10 requires, and a zero preamble.
The hub has no use for the box's local file meta, and what a received or imported file carried
there (Source AE Title, Private Information Creator UID, Private Information, whatever was in its
128-byte preamble) stays on the box.
"""
from __future__ import annotations

import io
import queue
import threading
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Optional, Protocol, Sequence

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID
from pynetdicom.dsutils import create_file_meta

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

    def present(self, remote_study_uids: Sequence[str]) -> set[str]:
        """Remote SOP Instance UIDs the peer lists in any of these studies (one query per few dozen)."""
        ...

    def close(self) -> None: ...


def run_lanes(lanes: Sequence[Any], outgoing: list[Outgoing], send_one: Callable[[Any, Outgoing], Outcome],
              report: Report, should_stop: ShouldStop) -> None:
    """Send ``outgoing`` in order over ``lanes`` (one thread each; ``send_one(lane, o)`` sends one
    instance and waits for its answer).  Outcomes are reported from the calling thread one by one
    as they arrive, and ``should_stop`` is asked there after each; once it says stop, or a lane
    raises, no further instance is started and the first exception is re-raised when all lanes
    have finished the instance they were sending."""
    work = deque(outgoing)
    lock = threading.Lock()
    results: "queue.Queue[Any]" = queue.Queue()
    halt = threading.Event()
    done = object()

    def lane(handle: Any) -> None:
        try:
            while not halt.is_set():
                with lock:
                    if not work:
                        break
                    o = work.popleft()
                results.put(send_one(handle, o))
        except BaseException as exc:  # noqa: BLE001 - handed to the calling thread
            halt.set()
            results.put(exc)
        finally:
            results.put(done)

    threads = [threading.Thread(target=lane, args=(h,), name=f"forward-lane-{n}", daemon=True)
               for n, h in enumerate(lanes)]
    for t in threads:
        t.start()
    error: Optional[BaseException] = None
    finished = 0
    try:
        while finished < len(threads):
            result = results.get()
            if result is done:
                finished += 1
            elif isinstance(result, BaseException):
                error = error or result
            else:  # acknowledged even if another lane failed meanwhile: worth recording
                report([result])
                if should_stop():
                    halt.set()
    finally:
        halt.set()
        for t in threads:
            t.join()
    if error is not None:
        raise error


PREAMBLE = b"\x00" * 128
NOT_IN_A_DATA_SET = (0x0000, 0x0002)  # command and file meta groups


def fresh_file_meta(ds: Dataset, transfer_syntax: str) -> FileMetaDataset:
    """A file meta group for ``ds`` with only what PS3.10 requires: version, SOP class and
    instance (from the data set itself), transfer syntax, and the box's implementation UID and
    version (pynetdicom's, as on the files the box stores)."""
    return create_file_meta(sop_class_uid=ds.SOPClassUID, sop_instance_uid=ds.SOPInstanceUID,
                            transfer_syntax=UID(transfer_syntax))


def _refresh(ds: Dataset) -> Dataset:
    """``ds`` given a fresh file meta for its transfer syntax and a zero preamble.  Command
    (0000,eeee) and file meta (0002,eeee) elements a careless writer left in the data set are
    dropped: they do not belong there, and pydicom refuses to write a file that has them."""
    for tag in [t for t in ds.keys() if t.group in NOT_IN_A_DATA_SET]:
        del ds[tag]
    ds.file_meta = fresh_file_meta(ds, str(ds.file_meta.TransferSyntaxUID))
    ds.preamble = PREAMBLE
    return ds


def encode(ds: Dataset) -> bytes:
    """Part 10 bytes of ``ds`` in its own transfer syntax (what goes on the wire), with a fresh
    file meta and a zero preamble (``ds`` is given them too)."""
    _refresh(ds)
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def with_syntax(ds: Dataset, accepted: set[str], compress_method: str) -> Optional[Dataset]:
    """``ds`` in a transfer syntax from ``accepted``: losslessly compressed if the destination
    asks for it and the peer accepts it, else as stored, else decompressed to explicit (or
    implicit) VR little endian; with a fresh file meta for that syntax.  None if none of these is
    accepted."""
    ready = _in_syntax(ds, accepted, compress_method)
    return None if ready is None else _refresh(ready)


def _in_syntax(ds: Dataset, accepted: set[str], compress_method: str) -> Optional[Dataset]:
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
