"""Changes to pynetdicom's transport, installed on import: receive PDUs into one buffer, decode
P-DATA PDUs without copying their fragments, and let its reactor threads wait for something to
happen instead of polling every millisecond.

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

MAX_WAIT_S = 0.05
_REACTOR_SLEEP_S = 0.001  # the association reactor's own poll interval (association.py)


def _recv_exact(self: AssociationSocket, nr_bytes: int) -> bytearray:
    """Read ``nr_bytes`` from the socket straight into one buffer.

    pynetdicom's own ``AssociationSocket.recv`` reads in 4 KiB pieces and appends each to a
    bytearray: for a 7 MB radiograph that is ~1,800 Python-level calls holding the GIL, which
    profiling showed to be the largest single cost of receiving.  Same contract: blocks until
    ``nr_bytes`` are read, returns what was read so far if the peer closes the connection.
    """
    buffer = bytearray(nr_bytes)
    view = memoryview(buffer)
    nr_read = 0
    while nr_read < nr_bytes:
        count = self.socket.recv_into(view[nr_read:], nr_bytes - nr_read)  # type: ignore[union-attr]
        if not count:
            del view
            return buffer[:nr_read]
        nr_read += count
    return buffer


class _Waker:
    """A socket pair: writing to one end makes the other readable, for select()."""

    def __init__(self) -> None:
        self.reader, self.writer = socket.socketpair()
        self.reader.setblocking(False)
        self.writer.setblocking(False)

    def wake(self) -> None:
        try:
            self.writer.send(b"\0")
        except OSError:  # buffer full (already awake) or closed
            pass

    def drain(self) -> None:
        try:
            while self.reader.recv(4096):
                pass
        except OSError:  # nothing left to read (non-blocking), or closed
            pass


_create_lock = threading.Lock()


def _waker(dul: Any) -> _Waker:
    waker = dul.__dict__.get("_edge_waker")
    if waker is None:
        with _create_lock:
            waker = dul.__dict__.setdefault("_edge_waker", _Waker())
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


_P_DATA_TF = 0x04
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
    AssociationSocket.recv = _recv_exact  # type: ignore[method-assign]
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
