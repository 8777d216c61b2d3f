"""The box's own DICOM upper layer, for its SCP only: pynetdicom 3.0's association and DUL
service provider, subclassed.  Nothing of pynetdicom is patched: its classes and modules stay
as they ship, so the box's own requests (forwarding to a PACS, report polling) and anything
else in the process run plain pynetdicom.  The SCP's request handler makes its associations
with :func:`association_class` (``scp._TrackedRequestHandler``).

Two levels; ``dicom.fast_reactor`` (default true) chooses between them, once per server:

:class:`LimitedAssociation` (always: the security limits of docs/SECURITY.md do not depend on
the switch).  Reading (:meth:`LimitedDUL._read_pdu_data`, in place of pynetdicom's):
pynetdicom believes a PDU header and allocates what it claims (a 6-byte header claiming 4 GiB
cost 4 GiB), and blocks on a peer that stops or trickles mid-PDU for as long as it keeps
sending.  Here, with the :class:`~appliance.acquire.limits.Limits` the receiving AE carries
(``edge_limits``):

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
closed connection.  An exception in the DUL thread (pynetdicom's state machine and DIMSE
decoder raise on some malformed input) is one log line and an aborted association too.

:class:`FastAssociation` (``dicom.fast_reactor = true``) adds speed, not limits:

pynetdicom copies every received byte five times before a C-STORE handler sees it (the PDU as
bytes for an event nobody here listens to, each fragment out of the PDU, each fragment minus its
header byte, into the dataset buffer, out again); a P-DATA PDU is decoded here with its fragments
as views of the received buffer, so that they are copied once, into the dataset buffer, when no
handler is bound to the raw-data event (EVT_DATA_RECV; with one, pynetdicom's own decoding runs).

pynetdicom runs two polling loops per association: the DUL thread checks the socket and its send
queue, sleeping 1 ms whenever there is nothing to do, and the association thread checks for
decoded messages the same way.  Four idle associations cost a quarter of a CPU core that way,
and the box has two to six cores shared with image analysis.  Here those two loops
(:meth:`FastDUL.run_loop`, :meth:`FastAssociation._run_reactor`, pynetdicom 3.0's own with
only their 1 ms sleeps replaced) wait until there is work:

* the DUL thread waits on its socket and on a wake-up socket that ``send_pdu`` writes to;
* the association thread waits on an event that its state machine sets after an action that
  leaves it work.

Every wait is capped (:data:`MAX_WAIT_S`), so a condition nobody signals (a timer, a kill flag)
is still seen within that time, as it was seen within 1 ms before: behaviour is the same,
only later by at most the cap in those rare cases.
"""
from __future__ import annotations

import contextlib
import logging
import queue
import select
import socket
import ssl
import struct
import threading
import time
from typing import Any, cast

from pynetdicom import evt
from pynetdicom.association import LOGGER as _ASSOC_LOGGER
from pynetdicom.association import Association
from pynetdicom.dul import LOGGER as _DUL_LOGGER
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ABORT_RQ, P_DATA_TF
from pynetdicom.pdu_items import PresentationDataValueItem
from pynetdicom.transport import AssociationSocket

from .limits import COMMAND_SET_MAX, Limits, RefusalLog, peer_text
from .waker import Waker

MAX_WAIT_S = 0.05

_FIRST_READ = 256 * 1024
_P_DATA_TF = 0x04
_PDU_HEADER = struct.Struct(">BBI")
_PDU_NAMES = {0x01: "A-ASSOCIATE-RQ", 0x02: "A-ASSOCIATE-AC", 0x03: "A-ASSOCIATE-RJ", 0x04: "P-DATA-TF",
              0x05: "A-RELEASE-RQ", 0x06: "A-RELEASE-RP", 0x07: "A-ABORT"}
_A_ABORT_PDU = b"\x07\x00\x00\x00\x00\x04\x00\x00\x02\x00"  # source: service provider
_ITEM_LENGTH = struct.Struct(">I")
log = logging.getLogger(__name__)
_refusals = RefusalLog(log)


class PeerViolation(Exception):
    """Internal to the DUL thread: the peer broke one of the limits; ``kind`` (for the log's
    rate limit) and a message.  Always caught in :meth:`LimitedDUL._read_pdu_data`, which
    aborts the connection."""

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
        # A view, not a copy, of the PDU: pynetdicom declares bytes but only reads [0] and writes [1:].
        item.presentation_data_value = view[offset + 5:offset + 4 + length]  # type: ignore[assignment]
        pdu.presentation_data_value_items.append(item)
        offset += 4 + length
    return pdu


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


class LimitedDUL(DULServiceProvider):
    """pynetdicom's DUL service provider, reading within the limits of the module docstring."""

    def __init__(self, assoc: Association) -> None:
        super().__init__(assoc)
        self._connection_started: float | None = None
        self._message_bytes = [0, 0]  # [command set, dataset] of the DIMSE message arriving

    @property
    def limits(self) -> Limits:
        # edge_limits is scp.AllowListAE's (scp imports this module); pynetdicom declares AE.
        return cast(Limits, self.assoc.ae.edge_limits)  # type: ignore[attr-defined]

    def run_reactor(self) -> None:
        """The DUL thread, whose unhandled exceptions are one log line and an aborted
        association, not a traceback and a connection nobody serves."""
        try:
            self.run_loop()
        except Exception as exc:  # noqa: BLE001 - the thread ends here either way
            address, title = self._remote()
            _refusals.refused(address.rsplit(":", 1)[0], "upper layer error",
                              "DICOM association from %s (AE %s) aborted: the upper layer failed on what it was "
                              "sent (%s: %s)", address, title, type(exc).__name__, peer_text(exc, 120))
            close_transport(self)
            assoc = self.assoc
            assoc.is_aborted, assoc.is_established = True, False
            assoc._kill = True  # what pynetdicom's own handler of a reactor error does

    def run_loop(self) -> None:
        """The reactor loop itself: pynetdicom's."""
        DULServiceProvider.run_reactor(self)

    def _remote(self) -> tuple[str, str]:
        """(address, calling or called AE title) of the peer, escaped for the log."""
        assoc = self.assoc
        user = assoc.requestor if assoc.is_acceptor else assoc.acceptor
        try:
            address = f"{user.address}:{user.port}"
        except Exception:  # noqa: BLE001 - logging aid only
            address = "?"
        return address, peer_text(getattr(user, "ae_title", "") or "?", 16)

    def _read_pdu_data(self) -> None:
        """pynetdicom's ``_read_pdu_data`` (one PDU from the socket onto the event queue),
        within the limits."""
        sock = cast(AssociationSocket, self.socket)
        limits = self.limits
        now = time.monotonic()
        if self._connection_started is None:
            self._connection_started = now
        started = self._connection_started
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
                self._count_message_bytes(pdu_object, limits)
        except TimeoutError:
            if time.monotonic() >= started + limits.max_association_s:
                self._abort_connection("lifetime", f"association open longer than {limits.max_association_s:g} s "
                                       "(dicom.max_association_s)")
            else:
                self._abort_connection("pdu timeout", f"PDU not complete within {limits.pdu_timeout_s:g} s of "
                                       "its first byte (dicom.pdu_timeout_s)")
            return
        except PeerViolation as exc:
            self._abort_connection(exc.kind, str(exc))
            return
        except OSError:  # reset by the peer, or closed under us
            sock.close()
            return
        except Exception as exc:  # noqa: BLE001 - pynetdicom's decoders raise many types on garbage
            self._abort_connection("undecodable",
                                   f"undecodable PDU ({type(exc).__name__}: {peer_text(exc, 80)})")
            return
        self.event_queue.put(event)
        self._recv_pdu.put(pdu_object)

    def _count_message_bytes(self, pdu: Any, limits: Limits) -> None:
        """Add a P-DATA PDU's fragments to the DIMSE message they belong to; PeerViolation when
        its command set or dataset grows past its limit (before pynetdicom buffers them)."""
        counts = self._message_bytes
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

    def _abort_connection(self, kind: str, reason: str) -> None:
        """Log ``reason``, send an A-ABORT (best effort) and close the connection: the state
        machine sees a closed transport and ends the association."""
        address, title = self._remote()
        _refusals.refused(address.rsplit(":", 1)[0], kind, "DICOM association from %s (AE %s) aborted: %s",
                          address, title, reason)
        close_transport(self)


class FastDUL(LimitedDUL):
    """:class:`LimitedDUL` that decodes P-DATA without copies and waits instead of polling."""

    def __init__(self, assoc: Association) -> None:
        super().__init__(assoc)
        self.waker = Waker()

    def _decode_pdu(self, bytestream: bytearray) -> tuple[Any, str]:
        if bytestream[0] != _P_DATA_TF or self.assoc.get_handlers(evt.EVT_DATA_RECV):
            return super()._decode_pdu(bytestream)
        pdu = decode_p_data(bytestream)
        evt.trigger(self.assoc, evt.EVT_PDU_RECV, {"pdu": pdu})
        return pdu, "Evt10"  # P-DATA-TF PDU received

    def send_pdu(self, primitive: Any) -> None:
        super().send_pdu(primitive)
        self.waker.wake()

    def run_reactor(self) -> None:
        try:
            super().run_reactor()
        finally:
            self.waker.close()

    def wait_for_work(self) -> None:
        """The DUL thread is idle: wait for incoming data or a primitive to send."""
        sock = getattr(self.socket, "socket", None) if self.socket is not None else None
        if sock is None or (isinstance(sock, ssl.SSLSocket) and sock.pending()):
            time.sleep(self._run_loop_delay)
            return
        if not self.to_provider_queue.empty() or not self.event_queue.empty():
            return
        try:
            select.select([sock, self.waker.reader], [], [], MAX_WAIT_S)
        except (OSError, ValueError):  # socket closed under us: let the reactor find out
            return
        self.waker.drain()

    def _assoc_has_work(self) -> bool:
        """Whether the association thread has something to do after a state machine action: a
        complete DIMSE message or an ACSE primitive waiting, or a state other than data transfer
        (negotiation, release, abort).  A P-DATA fragment of a message still arriving is not:
        waking the thread for each of a radiograph's dozens of PDUs costs a GIL hand-off each,
        for nothing."""
        dimse = getattr(self.assoc, "dimse", None)
        if dimse is None or not dimse.msg_queue.empty() or not self.to_user_queue.empty():
            return True
        return self.state_machine.current_state != "Sta6"

    def run_loop(self) -> None:
        """pynetdicom 3.0's ``DULServiceProvider.run_reactor``, with its idle sleep replaced by
        :meth:`wait_for_work` and the association thread woken after a state machine action
        that leaves it work."""
        self._idle_timer.start()
        self.socket = cast(AssociationSocket, self.socket)
        sleep = False
        while True:
            if not self.assoc._dul_ready.is_set():
                self.assoc._dul_ready.set()
                sleep = True
            if sleep:
                self.wait_for_work()
            if self._kill_thread:
                break
            if self.artim_timer.expired:
                self.event_queue.put("Evt18")
            try:
                # A primitive from the user side first; only without one is the transport looked at.
                if not self._process_recv_primitive() and self._is_transport_event():
                    self._idle_timer.restart()
            except Exception as exc:
                _DUL_LOGGER.error("Exception in DUL.run(), aborting association")
                _DUL_LOGGER.exception(exc)
                abort_pdu = A_ABORT_RQ()
                abort_pdu.source = 0x02
                abort_pdu.reason_diagnostic = 0x00
                self.socket.send(abort_pdu.encode())
                self.assoc.is_aborted = True
                self.assoc.is_established = False
                self.assoc._kill = True
                self._kill_thread = True
                return
            try:
                event = self.event_queue.get(block=False)
            except queue.Empty:
                sleep = True
                continue
            try:
                self.state_machine.do_action(event)
            finally:
                if self._assoc_has_work():
                    cast(FastAssociation, self.assoc).work.set()
            sleep = False


class LimitedAssociation(Association):
    """An acceptor association of the box's SCP whose DUL is :attr:`dul_class`."""

    dul_class: type[LimitedDUL] = LimitedDUL

    def __init__(self, ae: Any, mode: str) -> None:
        super().__init__(ae, mode)
        # pynetdicom makes its own DUL in __init__ and then sets the DUL's timers through these
        # two properties; ours replaces it before anything has used it.
        self.dul = self.dul_class(self)
        self.acse_timeout = self.acse_timeout
        self.network_timeout = self.network_timeout


class FastAssociation(LimitedAssociation):
    """:class:`LimitedAssociation` with :class:`FastDUL`, whose thread waits for work."""

    dul_class = FastDUL
    dul: FastDUL

    def __init__(self, ae: Any, mode: str) -> None:
        self.work = threading.Event()  # set by the DUL thread when this thread has work
        super().__init__(ae, mode)

    def wait_for_work(self) -> None:
        """The association thread is idle: wait until its state machine has done something."""
        dimse, dul = getattr(self, "dimse", None), getattr(self, "dul", None)
        if dimse is None or dul is None or not dimse.msg_queue.empty() or not dul.to_user_queue.empty():
            return
        self.work.wait(MAX_WAIT_S)
        self.work.clear()

    def _run_reactor(self) -> None:
        """pynetdicom 3.0's acceptor reactor loop, with its 1 ms sleep replaced by
        :meth:`wait_for_work`."""
        self._is_paused = False
        while not self._kill:
            self.wait_for_work()
            # pynetdicom's checkpoint: its send_*() methods pause the reactor here.
            self._is_paused = True
            self._reactor_checkpoint.wait()
            self._is_paused = False
            context_id, msg = self.dimse.get_msg(block=False)
            if msg:
                self._serve_request(msg, cast(int, context_id))
            if self.is_established and self.acse.is_release_requested():
                self.acse.send_release(is_response=True)
                _ASSOC_LOGGER.info("Association Released")
                self.is_released = True
                self.is_established = False
                evt.trigger(self, evt.EVT_RELEASED, {})
                self.kill()
                return
            if self.acse.is_aborted():
                log_msg = "Association Aborted"
                if self.acse.is_aborted("a-p-abort"):
                    log_msg += " (A-P-ABORT)"
                _ASSOC_LOGGER.info(log_msg)
                self.dul.receive_pdu(wait=False)  # so that EVT_ACSE_RECV fires for subscribers
                self.is_aborted = True
                self.is_established = False
                evt.trigger(self, evt.EVT_ABORTED, {})
                self.kill()
                return
            if not self.dul.is_alive():
                self.kill()
                return
            if self.dul.idle_timer_expired():
                _ASSOC_LOGGER.error("Network timeout reached")
                if self.network_timeout_response == "A-RELEASE":
                    self._is_paused = True
                    self._reactor_checkpoint.wait()
                    self.release()
                    self._is_paused = False
                else:
                    self.abort()
                self.kill()
                return


def association_class(fast_reactor: bool) -> type[LimitedAssociation]:
    """The class of the SCP's associations for ``dicom.fast_reactor``."""
    return FastAssociation if fast_reactor else LimitedAssociation
