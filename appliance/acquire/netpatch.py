"""Changes to pynetdicom's transport, installed on import: read PDUs within limits and into
buffers that grow with what arrives, decode P-DATA PDUs without copying their fragments, and
let its reactor threads wait for something to happen instead of polling every millisecond.

Reading (:func:`_read_pdu_data`, in place of pynetdicom's): pynetdicom believes a PDU header
and allocates what it claims (a 6-byte header claiming 4 GiB cost 4 GiB), and blocks on a peer
that stops or trickles mid-PDU for as long as it keeps sending.  Here, with the limits of
:class:`~appliance.acquire.limits.Limits` that the receiving AE carries (``edge_limits``; the
defaults otherwise, e.g. for the box's own requests to a PACS):

* a PDU longer than its cap (64 KiB for association PDUs, ``PDU_HARD_CAP_FACTOR`` times the
  advertised maximum for P-DATA) is refused before anything is read;
* the buffer starts at 256 KiB at most and doubles as bytes arrive, so memory follows what the
  peer really sent;
* each PDU must arrive whole within ``pdu_timeout_s`` of its first byte, and no PDU is read
  after ``max_association_s`` since the connection started;
* the command set and the dataset of one DIMSE message may not exceed their sizes
  (``COMMAND_SET_MAX``, ``max_dataset_mb``).

A violation is logged in one line (no traceback, peer text escaped), answered with an A-ABORT
and the connection closed; pynetdicom's state machine then ends the association as for any
closed connection.

pynetdicom copies every received byte five times before a C-STORE handler sees it (the PDU as
bytes for an event nobody here listens to, each fragment out of the PDU, each fragment minus its
header byte, into the dataset buffer, out again); a P-DATA PDU is decoded here with its fragments
as views of the received buffer, so that they are copied once, into the dataset buffer, when no
handler is bound to the raw-data event (EVT_DATA_RECV; with one, pynetdicom's own decoding runs).

pynetdicom runs two polling loops per association: the DUL thread checks the socket and its send
queue, sleeping 1 ms whenever there is nothing to do, and the association thread checks for
decoded messages the same way.  Four idle associations cost a quarter of a CPU core that way,
and the box has two to six cores shared with image analysis.  Here those two 1 ms sleeps (and
only those) become waits that end as soon as there is work:

* the DUL thread waits on its socket and on a wake-up socket that ``send_pdu`` writes to;
* an acceptor's association thread waits on an event that its state machine sets after an
  action that leaves it work (a requestor's keeps polling: its user thread pauses the reactor
  between operations).

Every wait is capped (:data:`MAX_WAIT_S`), so a condition nobody signals (a timer, a kill flag)
is still seen within that time, as it was seen within 1 ms before: behaviour is the same,
only later by at most the cap in those rare cases.
"""
from __future__ import annotations

import contextlib
import logging
import select
import socket
import ssl
import struct
import threading
import time
from typing import Any, Callable

from pynetdicom import association as _association
from pynetdicom import dul as _dul
from pynetdicom import evt
from pynetdicom import fsm as _fsm
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.pdu_items import PresentationDataValueItem
from pynetdicom.transport import AssociationSocket

from .limits import COMMAND_SET_MAX, Limits, RefusalLog, peer_text
from .waker import Waker

MAX_WAIT_S = 0.05
_REACTOR_SLEEP_S = 0.001  # the association reactor's own poll interval (association.py)


_FIRST_READ = 256 * 1024
_P_DATA_TF = 0x04
_PDU_HEADER = struct.Struct(">BBI")
_PDU_NAMES = {0x01: "A-ASSOCIATE-RQ", 0x02: "A-ASSOCIATE-AC", 0x03: "A-ASSOCIATE-RJ", 0x04: "P-DATA-TF",
              0x05: "A-RELEASE-RQ", 0x06: "A-RELEASE-RP", 0x07: "A-ABORT"}
_A_ABORT_PDU = b"\x07\x00\x00\x00\x00\x04\x00\x00\x02\x00"  # source: service provider
DEFAULT_LIMITS = Limits()
log = logging.getLogger(__name__)
_refusals = RefusalLog(log)


class PeerViolation(Exception):
    """The peer broke one of the limits: ``kind`` (for the log's rate limit) and a message."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


def receive(sock: socket.socket, nr_bytes: int, deadline: float | None = None,
            buffer: bytearray | None = None) -> bytearray:
    """Read ``nr_bytes`` more from ``sock`` onto the end of ``buffer`` (a new one by default).

    Large reads straight into the buffer (pynetdicom's own receive takes 4 KiB per Python-level
    call, the largest single cost of receiving a radiograph), but the buffer only ever grows to
    at most twice what has arrived (plus 256 KiB), never to the length a header announced.
    Returns early, shorter, if the peer closes the connection; TimeoutError at ``deadline``
    (``time.monotonic()``).
    """
    buffer = bytearray() if buffer is None else buffer
    filled = len(buffer)
    end = filled + nr_bytes
    while filled < end:
        if filled == len(buffer):
            # bytes(n) is calloc'd: only the copy into the buffer touches memory.
            buffer.extend(bytes(min(end - filled, max(_FIRST_READ, filled))))
        if deadline is not None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("deadline passed")
            sock.settimeout(remaining)
        view = memoryview(buffer)[filled:]
        try:
            count = sock.recv_into(view)
        finally:
            view.release()
        if not count:
            del buffer[filled:]
            return buffer
        filled += count
    return buffer


def _recv(self: AssociationSocket, nr_bytes: int) -> bytearray:
    """``AssociationSocket.recv`` (pynetdicom's contract: blocks until ``nr_bytes`` are read,
    returns what was read so far if the peer closes), with :func:`receive`'s buffer."""
    return receive(self.socket, nr_bytes)  # type: ignore[arg-type]


def _limits(dul: Any) -> Limits:
    return getattr(dul.assoc.ae, "edge_limits", None) or DEFAULT_LIMITS


def _remote(dul: Any) -> tuple[str, str]:
    """(address, calling or called AE title) of the peer, escaped for the log."""
    assoc = dul.assoc
    user = assoc.requestor if assoc.is_acceptor else assoc.acceptor
    try:
        address = f"{user.address}:{user.port}"
    except Exception:  # noqa: BLE001 - logging aid only
        address = "?"
    return address, peer_text(getattr(user, "ae_title", "") or "?", 16)


def _read_pdu_data(self: Any) -> None:
    """pynetdicom's ``DULServiceProvider._read_pdu_data`` (one PDU from the socket onto the
    event queue), within the limits described in the module docstring."""
    sock = self.socket
    limits = _limits(self)
    now = time.monotonic()
    started = self.__dict__.setdefault("_edge_started", now)
    deadline = min(now + limits.pdu_timeout_s, started + limits.max_association_s)
    try:
        try:
            pdu = _receive_pdu(sock.socket, limits, deadline)
        finally:
            _blocking(sock.socket)
        if pdu is None:  # closed by the peer
            sock.close()
            return
        pdu_object, event = self._decode_pdu(pdu)
        if pdu[0] == _P_DATA_TF:
            _count_message_bytes(self, pdu_object, limits)
    except TimeoutError:
        if time.monotonic() >= started + limits.max_association_s:
            _abort_connection(self, "lifetime", f"association open longer than {limits.max_association_s:g} s "
                              "(dicom.max_association_s)")
        else:
            _abort_connection(self, "pdu timeout", f"PDU not complete within {limits.pdu_timeout_s:g} s of its "
                              "first byte (dicom.pdu_timeout_s)")
        return
    except PeerViolation as exc:
        _abort_connection(self, exc.kind, str(exc))
        return
    except OSError:  # reset by the peer, or closed under us
        sock.close()
        return
    except Exception as exc:  # noqa: BLE001 - pynetdicom's decoders raise many types on garbage
        _abort_connection(self, "undecodable", f"undecodable PDU ({type(exc).__name__}: {peer_text(exc, 80)})")
        return
    self.event_queue.put(event)
    self._recv_pdu.put(pdu_object)


def _receive_pdu(raw: Any, limits: Limits, deadline: float) -> bytearray | None:
    """One whole PDU (header included), or None if the peer closed the connection first."""
    pdu = receive(raw, _PDU_HEADER.size, deadline)
    if len(pdu) < _PDU_HEADER.size:
        return None
    pdu_type, _, length = _PDU_HEADER.unpack(pdu)
    name = _PDU_NAMES.get(pdu_type)
    if name is None:
        raise PeerViolation("pdu type", f"unknown PDU type 0x{pdu_type:02X}")
    cap = limits.pdu_cap(pdu_type)
    if length > cap:
        raise PeerViolation("pdu length", f"{name} PDU of {length} bytes (at most {cap} are read)")
    receive(raw, length, deadline, pdu)
    return pdu if len(pdu) == _PDU_HEADER.size + length else None


def _blocking(raw: Any) -> None:
    """Back to pynetdicom's blocking socket (its sends have no deadline of their own)."""
    if raw is not None:
        with contextlib.suppress(OSError):  # the socket is closed: pynetdicom finds out on its next use
            raw.settimeout(None)


def _count_message_bytes(dul: Any, pdu: Any, limits: Limits) -> None:
    """Add a P-DATA PDU's fragments to the DIMSE message they belong to; PeerViolation when
    its command set or dataset grows past its limit (before pynetdicom buffers them)."""
    counts = dul.__dict__.setdefault("_edge_message_bytes", [0, 0])  # [command, dataset]
    for item in pdu.presentation_data_value_items:
        value = item.presentation_data_value
        if not value:
            continue
        control = value[0]
        is_command = control & 1
        counts[0 if is_command else 1] += len(value) - 1
        if is_command and counts[0] > COMMAND_SET_MAX:
            raise PeerViolation("command size", f"DIMSE command set over {COMMAND_SET_MAX} bytes")
        if not is_command and counts[1] > limits.max_dataset_bytes:
            raise PeerViolation("dataset size", f"dataset over {limits.max_dataset_bytes // (1024 * 1024)} MB "
                                "(dicom.max_dataset_mb)")
        if control & 2:  # the last fragment of the command set or dataset
            counts[0 if is_command else 1] = 0


def _abort_connection(self: Any, kind: str, reason: str) -> None:
    """Log ``reason``, send an A-ABORT (best effort) and close the connection: the state
    machine sees a closed transport and ends the association."""
    address, title = _remote(self)
    _refusals.refused(address.rsplit(":", 1)[0], kind, "DICOM association from %s (AE %s) aborted: %s",
                      address, title, reason)
    close_transport(self)


def close_transport(dul: Any) -> None:
    """Send an A-ABORT (best effort: a full window or TLS just skips it) and close the
    connection of ``dul``."""
    sock = dul.socket
    raw = getattr(sock, "socket", None)
    if raw is not None:
        try:
            raw.send(_A_ABORT_PDU, socket.MSG_DONTWAIT)
        except (OSError, ValueError):  # window full, gone, or TLS (no flags): closing is enough
            pass
    if sock is not None:
        sock.close()


_original_run_reactor = getattr(_dul.DULServiceProvider, "run_reactor", None)


def _run_reactor(self: Any) -> None:
    """The DUL thread, whose unhandled exceptions (pynetdicom's state machine and DIMSE decoder
    raise on some malformed input) are one log line and an aborted association, not a
    traceback and a connection nobody serves."""
    try:
        _original_run_reactor(self)  # type: ignore[misc]
    except Exception as exc:  # noqa: BLE001 - the thread ends here either way
        address, title = _remote(self)
        _refusals.refused(address.rsplit(":", 1)[0], "upper layer error",
                          "DICOM association from %s (AE %s) aborted: the upper layer failed on what it was sent "
                          "(%s: %s)", address, title, type(exc).__name__, peer_text(exc, 120))
        close_transport(self)
        assoc = self.assoc
        assoc.is_aborted, assoc.is_established = True, False
        assoc._kill = True  # what pynetdicom's own handler of a reactor error does


_create_lock = threading.Lock()


def _waker(dul: Any) -> Waker:
    waker = dul.__dict__.get("_edge_waker")
    if waker is None:
        with _create_lock:
            waker = dul.__dict__.setdefault("_edge_waker", Waker())
    return waker


def _event(assoc: Any) -> threading.Event:
    event = assoc.__dict__.get("_edge_event")
    if event is None:
        with _create_lock:
            event = assoc.__dict__.setdefault("_edge_event", threading.Event())
    return event


def _dul_wait(dul: Any) -> None:
    """The DUL thread is idle: wait for incoming data or a primitive to send."""
    sock = getattr(dul.socket, "socket", None) if dul.socket is not None else None
    if sock is None or (isinstance(sock, ssl.SSLSocket) and sock.pending()):
        time.sleep(_REACTOR_SLEEP_S)
        return
    waker = _waker(dul)
    if not dul.to_provider_queue.empty() or not dul.event_queue.empty():
        return
    try:
        select.select([sock, waker.reader], [], [], MAX_WAIT_S)
    except (OSError, ValueError):  # socket closed under us: let the reactor find out
        return
    waker.drain()


def _assoc_wait(assoc: Any) -> None:
    """The association thread is idle: wait until its state machine has done something."""
    event = _event(assoc)
    dimse, dul = getattr(assoc, "dimse", None), getattr(assoc, "dul", None)
    if dimse is None or dul is None or not dimse.msg_queue.empty() or not dul.to_user_queue.empty():
        return
    event.wait(MAX_WAIT_S)
    event.clear()


def _is_dul_idle_sleep(thread: threading.Thread, seconds: float) -> bool:
    return isinstance(thread, _dul.DULServiceProvider) and seconds == thread._run_loop_delay


def _is_acceptor_poll(thread: threading.Thread, seconds: float) -> bool:
    # Acceptors only: a requestor's user thread pauses the reactor (send_c_store and the like
    # spin until it reaches its checkpoint), which must stay a 1 ms poll.
    return (isinstance(thread, _association.Association) and seconds == _REACTOR_SLEEP_S
            and thread.is_acceptor)


class _TimeFor:
    """``time`` as one pynetdicom module sees it: the one sleep ``matches`` recognises (a
    reactor's idle poll, on the reactor's own thread) becomes ``wait(thread)``; every other
    sleep and every other attribute is the real ``time`` module's."""

    def __init__(self, matches: Callable[[threading.Thread, float], bool],
                 wait: Callable[[Any], None]) -> None:
        self._matches = matches
        self._wait = wait

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    def sleep(self, seconds: float) -> None:
        thread = threading.current_thread()
        if self._matches(thread, seconds):
            self._wait(thread)
        else:
            time.sleep(seconds)


_ITEM_LENGTH = struct.Struct(">I")
_original_decode_pdu = getattr(_dul.DULServiceProvider, "_decode_pdu", None)


def decode_p_data(bytestream: bytearray) -> P_DATA_TF:
    """A P-DATA-TF PDU (header included) whose fragments are views of ``bytestream``; ValueError
    if an item is shorter than its header or runs past the end (pynetdicom: an assertion)."""
    view = memoryview(bytestream)
    end, offset = len(view), 6
    pdu = P_DATA_TF()
    while offset < end:
        if offset + 5 > end:
            raise ValueError(f"P-DATA item header truncated at offset {offset}")
        (length,) = _ITEM_LENGTH.unpack_from(view, offset)
        if length < 1 or offset + 4 + length > end:
            raise ValueError(f"P-DATA item at offset {offset} has an impossible length {length}")
        item = PresentationDataValueItem()
        item.presentation_context_id = view[offset + 4]
        item.presentation_data_value = view[offset + 5:offset + 4 + length]  # type: ignore[assignment]
        pdu.presentation_data_value_items.append(item)
        offset += 4 + length
    return pdu


def _decode_pdu(self: Any, bytestream: bytearray) -> tuple[Any, str]:
    if bytestream[0] != _P_DATA_TF or self.assoc.get_handlers(evt.EVT_DATA_RECV):
        return _original_decode_pdu(self, bytestream)  # type: ignore[misc]
    pdu = decode_p_data(bytestream)
    evt.trigger(self.assoc, evt.EVT_PDU_RECV, {"pdu": pdu})
    return pdu, "Evt10"  # P-DATA-TF PDU received


_original_send_pdu = getattr(_dul.DULServiceProvider, "send_pdu", None)
_original_do_action = getattr(_fsm.StateMachine, "do_action", None)


def _send_pdu(self: Any, primitive: Any) -> None:
    _original_send_pdu(self, primitive)
    _waker(self).wake()


def _assoc_has_work(assoc: Any, machine: Any) -> bool:
    """Whether the association thread has something to do after a state machine action: a
    complete DIMSE message or an ACSE primitive waiting, or a state other than data transfer
    (negotiation, release, abort).  A P-DATA fragment of a message still arriving is not: waking
    the thread for each of a radiograph's dozens of PDUs costs a GIL hand-off each, for nothing."""
    dimse = getattr(assoc, "dimse", None)
    if dimse is None or not dimse.msg_queue.empty() or not machine.dul.to_user_queue.empty():
        return True
    return machine.current_state != "Sta6"


def _do_action(self: Any, event: str) -> None:
    try:
        _original_do_action(self, event)
    finally:
        assoc = getattr(self.dul, "assoc", None)
        if assoc is not None and _assoc_has_work(assoc, self):
            _event(assoc).set()


def install() -> None:
    """Apply the changes (idempotent).  They are written against pynetdicom 3.0's internals;
    where those are not there, pynetdicom is left decoding and polling as it ships."""
    AssociationSocket.recv = _recv  # type: ignore[method-assign]
    _dul.DULServiceProvider._read_pdu_data = _read_pdu_data  # type: ignore[method-assign]
    if _original_run_reactor is not None:
        _dul.DULServiceProvider.run_reactor = _run_reactor  # type: ignore[method-assign]
    if _original_decode_pdu is not None:
        _dul.DULServiceProvider._decode_pdu = _decode_pdu  # type: ignore[method-assign]
    expected = (hasattr(_dul, "time") and hasattr(_association, "time")
                and hasattr(_dul.DULServiceProvider, "send_pdu") and hasattr(_fsm.StateMachine, "do_action"))
    if not expected:
        logging.getLogger(__name__).warning("pynetdicom internals differ from 3.0: reactors keep polling")
        return
    _dul.DULServiceProvider.send_pdu = _send_pdu  # type: ignore[method-assign]
    _fsm.StateMachine.do_action = _do_action  # type: ignore[method-assign]
    _dul.time = _TimeFor(_is_dul_idle_sleep, _dul_wait)  # type: ignore[attr-defined, assignment]
    _association.time = _TimeFor(_is_acceptor_poll, _assoc_wait)  # type: ignore[attr-defined, assignment]


install()
