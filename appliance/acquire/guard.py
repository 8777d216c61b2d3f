"""The door of the DICOM port: connections wait here until they have asked for an association.

pynetdicom gives every accepted connection two threads and counts it against the association
limit from the moment it is accepted, and its deadline for the A-ASSOCIATE-RQ never fires on a
peer that trickles a byte at a time.  So a few dozen idle, trickling or malformed connections
used to lock every modality out.  Here a new connection costs a file descriptor and a few bytes
of bookkeeping in one thread of the main process until its whole A-ASSOCIATE-RQ has arrived:

* the request is looked at in the kernel's receive buffer (``MSG_PEEK``, with ``SO_RCVLOWAT``
  so the socket only reads as ready once the announced length is there) and never read here:
  pynetdicom, in whichever process takes the connection, reads it as if it had just arrived;
* a connection must deliver its request within ``dicom.association_timeout_s`` of being
  accepted, whatever it trickles meanwhile;
* at most ``dicom.max_pending_connections`` wait at once; a new one beyond that pushes out the
  oldest waiting connection of the address that has the most of them, so a flood from one
  address pushes out its own connections and not a modality's;
* anything but a well-formed A-ASSOCIATE-RQ of at most 64 KiB is closed at once, with an
  A-ABORT, and logged in one line;
* only then is the connection admitted (``release``), which may still refuse it with an
  A-ASSOCIATE-RJ (the association limits: :func:`admission_refusal`).
"""
from __future__ import annotations

import contextlib
import logging
import queue
import selectors
import socket
import struct
import threading
import time
from collections import OrderedDict
from typing import Any, Callable

from pynetdicom.pdu import A_ASSOCIATE_RQ
from pynetdicom.transport import AddressInformation

from .limits import ASSOCIATION_PDU_MAX, Limits, RefusalLog, peer_text
from .waker import Waker

log = logging.getLogger(__name__)

_HEADER = struct.Struct(">BBI")
_A_ASSOCIATE_RQ = 0x01
# A-ABORT, source: service provider; A-ASSOCIATE-RJ, transient, service provider (presentation),
# local limit exceeded (PS3.8 9.3.4, 9.3.8).
A_ABORT_PDU = b"\x07\x00\x00\x00\x00\x04\x00\x00\x02\x00"
A_ASSOCIATE_RJ_BUSY = b"\x03\x00\x00\x00\x00\x04\x00\x02\x03\x02"
_SO_RCVLOWAT = getattr(socket, "SO_RCVLOWAT", 18)
_MAX_SELECT_S = 1.0
GATE_THREAD = "dicom-gate"


class AssociationRefused(Exception):
    """The box will not take this association now (the message says why); answered with an
    A-ASSOCIATE-RJ, transient, local limit exceeded: the modality tries again later."""


def peer_host(address: Any) -> str:
    """The peer's address as pynetdicom records it (``Association.requestor.address``), the key
    the associations are counted by."""
    try:
        return AddressInformation.from_tuple(tuple(address)).address
    except (OSError, ValueError, TypeError, IndexError):
        return str(address[0]) if isinstance(address, (tuple, list)) and address else str(address)


def admission_refusal(limits: Limits, open_total: int, open_from_peer: int) -> str | None:
    """Why a new association may not start, given the associations open now; None if it may."""
    if open_total >= limits.max_associations:
        return f"{open_total} associations already open (dicom.max_associations = {limits.max_associations})"
    if open_from_peer >= limits.max_per_peer:
        return (f"{open_from_peer} associations from this address already open "
                f"(dicom.max_associations_per_peer = {limits.max_per_peer})")
    return None


class _Pending:
    __slots__ = ("conn", "address", "host", "deadline", "needed", "have_header")

    def __init__(self, conn: socket.socket, address: Any, deadline: float):
        self.conn = conn
        self.address = address
        self.host = str(address[0])
        self.deadline = deadline
        self.needed = _HEADER.size  # bytes to wait for: the PDU header, then the whole PDU
        self.have_header = False


def _where(address: Any) -> str:
    return f"{address[0]}:{address[1]}" if isinstance(address, tuple) and len(address) > 1 else str(address)


class AssociationGate:
    """Holds accepted connections until their A-ASSOCIATE-RQ is complete, then calls
    ``release(conn, address)`` in the gate's thread (which may raise AssociationRefused)."""

    def __init__(self, limits: Limits, release: Callable[[socket.socket, Any], None],
                 refusals: RefusalLog | None = None):
        self.limits = limits
        self._release = release
        self._refusals = refusals or RefusalLog(log)
        self._selector = selectors.DefaultSelector()
        self._incoming: queue.SimpleQueue[tuple[socket.socket, Any]] = queue.SimpleQueue()
        self._waker = Waker()
        self._selector.register(self._waker.reader, selectors.EVENT_READ, None)
        # Accept order is deadline order: the first entry is always the next to expire.
        self._pending: OrderedDict[int, _Pending] = OrderedDict()
        self._by_host: dict[str, OrderedDict[int, _Pending]] = {}
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name=GATE_THREAD, daemon=True)

    # -- called from other threads ---------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def add(self, conn: socket.socket, address: Any) -> None:
        """A connection just accepted (by the listening thread)."""
        self._incoming.put((conn, address))
        self._waker.wake()

    def waiting(self) -> int:
        return len(self._pending)

    def stop(self) -> None:
        self._stopping.set()
        self._waker.wake()
        if self._thread.is_alive():
            self._thread.join(5)

    # -- the gate's thread -----------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._stopping.is_set():
                self._take_incoming()
                for key, _events in self._selector.select(self._select_timeout()):
                    if key.data is None:
                        self._waker.drain()
                    elif key.data.conn.fileno() == key.fd:
                        self._readable(key.data)
                self._expire()
        finally:
            self._close_all()

    def _select_timeout(self) -> float:
        if not self._pending:
            return _MAX_SELECT_S
        first = next(iter(self._pending.values()))
        return min(_MAX_SELECT_S, max(0.0, first.deadline - time.monotonic()))

    def _take_incoming(self) -> None:
        while True:
            try:
                conn, address = self._incoming.get_nowait()
            except queue.Empty:
                return
            if len(self._pending) >= self.limits.max_pending:
                self._evict()
            entry = _Pending(conn, address, time.monotonic() + self.limits.association_timeout_s)
            try:
                conn.setblocking(False)
                conn.setsockopt(socket.SOL_SOCKET, _SO_RCVLOWAT, entry.needed)
                self._selector.register(conn, selectors.EVENT_READ, entry)
            except (OSError, ValueError):  # the peer is already gone
                _close(conn)
                continue
            self._pending[conn.fileno()] = entry
            self._by_host.setdefault(entry.host, OrderedDict())[conn.fileno()] = entry

    def _evict(self) -> None:
        """Make room: the oldest waiting connection of the address with the most of them."""
        host = max(self._by_host, key=lambda h: len(self._by_host[h]))
        victim = next(iter(self._by_host[host].values()))
        self._refuse(victim, "evicted", "no A-ASSOCIATE-RQ yet and %d connections waiting "
                     "(dicom.max_pending_connections); the oldest from the busiest address goes",
                     len(self._pending))

    def _expire(self) -> None:
        now = time.monotonic()
        while self._pending:
            entry = next(iter(self._pending.values()))
            if entry.deadline > now:
                return
            self._refuse(entry, "timeout", "no complete A-ASSOCIATE-RQ within %s s (dicom.association_timeout_s)",
                         _seconds(self.limits.association_timeout_s))

    def _readable(self, entry: _Pending) -> None:
        try:
            data = entry.conn.recv(entry.needed, socket.MSG_PEEK)
        except BlockingIOError:
            return
        except OSError:
            self._forget(entry)
            return
        if len(data) < entry.needed:
            # SO_RCVLOWAT: ready with fewer bytes than that means the peer closed (or reset).
            self._forget(entry)
            return
        if not entry.have_header:
            pdu_type, _, length = _HEADER.unpack(data)
            if pdu_type != _A_ASSOCIATE_RQ:
                self._refuse(entry, "protocol", "sent a PDU of type 0x%02X before any A-ASSOCIATE-RQ", pdu_type,
                             abort=True)
            elif length > ASSOCIATION_PDU_MAX:
                self._refuse(entry, "too long", "its A-ASSOCIATE-RQ claims %d bytes (at most %d are read)", length,
                             ASSOCIATION_PDU_MAX, abort=True)
            else:
                entry.have_header = True
                entry.needed += length
                entry.conn.setsockopt(socket.SOL_SOCKET, _SO_RCVLOWAT, entry.needed)
            return
        try:
            request = A_ASSOCIATE_RQ()
            request.decode(data)
            request.to_primitive()
        except Exception as exc:  # noqa: BLE001 - pynetdicom raises many types on garbage
            self._refuse(entry, "malformed", "malformed A-ASSOCIATE-RQ (%s: %s)", type(exc).__name__,
                         peer_text(exc, 80), abort=True)
            return
        self._hand_on(entry, request)

    def _hand_on(self, entry: _Pending, request: A_ASSOCIATE_RQ) -> None:
        self._forget(entry, close=False)
        conn = entry.conn
        try:
            conn.setsockopt(socket.SOL_SOCKET, _SO_RCVLOWAT, 1)
            conn.setblocking(True)
            self._release(conn, entry.address)
        except AssociationRefused as exc:
            self._refusals.refused(entry.host, "limit", "DICOM association from %s (calling AE %s) refused: %s",
                                   _where(entry.address), peer_text(request.calling_ae_title, 16), exc)
            _answer_and_close(conn, entry.needed, A_ASSOCIATE_RJ_BUSY)
        except Exception as exc:  # noqa: BLE001 - one bad connection must not stop the gate
            log.error("DICOM connection from %s could not be served: %s: %s", _where(entry.address),
                      type(exc).__name__, peer_text(exc, 120))
            _close(conn)

    def _refuse(self, entry: _Pending, kind: str, reason: str, *args: Any, abort: bool = False) -> None:
        self._refusals.refused(entry.host, kind, "DICOM connection from %s refused: " + reason,
                               _where(entry.address), *args)
        if abort:
            with contextlib.suppress(OSError):  # the peer's window is full or it is gone: closing is enough
                entry.conn.send(A_ABORT_PDU)
        self._forget(entry)

    def _forget(self, entry: _Pending, close: bool = True) -> None:
        fd = entry.conn.fileno()
        self._pending.pop(fd, None)
        peers = self._by_host.get(entry.host)
        if peers is not None:
            peers.pop(fd, None)
            if not peers:
                del self._by_host[entry.host]
        with contextlib.suppress(KeyError, ValueError):  # never registered, or its socket is closed
            self._selector.unregister(entry.conn)
        if close:
            _close(entry.conn)

    def _close_all(self) -> None:
        for entry in list(self._pending.values()):
            self._forget(entry)
        self._selector.close()
        self._waker.close()


def _seconds(value: float) -> str:
    return f"{value:g}"


def _close(conn: socket.socket) -> None:
    with contextlib.suppress(OSError):  # already closed: nothing more to release
        conn.close()


def _answer_and_close(conn: socket.socket, request_length: int, answer: bytes) -> None:
    """Read the request the gate only looked at (closing on unread data would reset the
    connection, and the peer might never see the answer), answer, close."""
    try:
        conn.settimeout(1.0)
        remaining = request_length
        while remaining > 0:
            chunk = conn.recv(min(remaining, 65536))
            if not chunk:
                break
            remaining -= len(chunk)
        conn.sendall(answer)
        conn.shutdown(socket.SHUT_WR)
    except OSError:  # the peer is gone or too slow to read its answer: closing is all that is left
        pass
    _close(conn)
