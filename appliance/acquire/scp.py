"""The DICOM SCP: C-ECHO and C-STORE from the clinic's modalities.

Handlers are plain functions that return a status and never let an exception escape
(pynetdicom would otherwise answer with a generic failure and log a traceback that may contain
patient data).  Every rejection is logged with the calling AE and the reason, never with
patient names.
"""
from __future__ import annotations

import contextlib
import logging
import re
import socket
import sys
import threading
import zlib
from copy import deepcopy
from datetime import datetime
from typing import Any, Callable, TypeVar, cast

from pydicom.dataset import Dataset
from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, _config, evt, register_uid, sop_class
from pynetdicom._globals import MODE_ACCEPTOR
from pynetdicom.presentation import AllStoragePresentationContexts
from pynetdicom.service_class import StorageServiceClass
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]  # made with globals() at import
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer

from ..config import Config
from ..errors import InvalidDatasetError, OutOfSpaceError, StoreError
from ..lifecycle import Source
from ..store import InstanceStore, parse_part10
from . import netpatch
from .guard import GATE_THREAD, AssociationGate, AssociationRefused, admission_refusal, peer_host
from .limits import Limits, RefusalLog, inflated_size_exceeds, peer_text
from .part10 import encoded_part10

log = logging.getLogger(__name__)
_refusals = RefusalLog(log)

# pynetdicom's own "standard" event log prints DIMSE details and, at debug level, whole
# datasets; our handlers log what is needed without patient data.
_config.LOG_HANDLER_LEVEL = "none"


class _PeerSafeLog(logging.Handler):
    """pynetdicom's own log lines, made safe before they reach the application log: no
    tracebacks (a malformed request is a peer's doing, and exception texts quote what it sent),
    each message escaped and cut like any peer text, and its bare "Rejecting Association" left
    to :func:`_handle_rejected`'s one line with the reason."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a record that cannot be formatted is dropped
            return
        if message == "Rejecting Association" or record.threadName == GATE_THREAD:
            # The gate decodes requests with pynetdicom and logs its own line for a bad one.
            return
        record.msg, record.args = peer_text(_QUOTED.sub(_shorten_quoted, message), 300), None
        record.exc_info = record.exc_text = record.stack_info = None
        logging.getLogger().handle(record)


# pynetdicom quotes the values it complains about in single quotes ('1.2.33...').
_QUOTED = re.compile(r"'([^']{64})([^']{16,})'")


def _shorten_quoted(match: re.Match[str]) -> str:
    return f"'{match.group(1)}...({len(match.group(1)) + len(match.group(2))} chars)'"


def _route_pynetdicom_logs() -> None:
    pynetdicom_log = logging.getLogger("pynetdicom")
    if not any(isinstance(h, _PeerSafeLog) for h in pynetdicom_log.handlers):
        pynetdicom_log.addHandler(_PeerSafeLog())
        pynetdicom_log.propagate = False


_route_pynetdicom_logs()

# Order matters: pynetdicom accepts, per presentation context, the first syntax of *this* list
# that the sender proposed.  Senders propose a file's own (often compressed) syntax plus
# uncompressed fallbacks; taking the compressed one first keeps what we store exactly what the
# modality produced, and explicit before implicit keeps the VRs.
TRANSFER_SYNTAXES = [
    JPEG2000Lossless,
    JPEG2000,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    RLELossless,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ImplicitVRLittleEndian,
]

# Retired storage SOP classes still sent by older ultrasound units (PS3.4 retired them in
# favour of ...1.1.6.1 and ...1.1.3.1, which AllStoragePresentationContexts lists).  pynetdicom
# serves a C-STORE only for a class registered with its storage service.  An SCP may support any
# number of presentation contexts; the limit of 128 is on what one requestor proposes.
RETIRED_STORAGE_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.6": "UltrasoundImageStorageRetired",
    "1.2.840.10008.5.1.4.1.1.3": "UltrasoundMultiFrameImageStorageRetired",
}


def _register_retired_classes() -> None:
    for uid, keyword in RETIRED_STORAGE_CLASSES.items():
        if not hasattr(sop_class, keyword):
            register_uid(uid, keyword, StorageServiceClass)


_register_retired_classes()

STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = OutOfSpaceError.dicom_status
STATUS_PROCESSING_FAILURE = StoreError.dicom_status


def store_failure(exc: StoreError) -> tuple[int, str]:
    """The C-STORE status and ErrorComment for a store that failed with ``exc``: its class's
    DICOM status (never its message's words), and what was wrong with the peer's dataset, or
    only the kind of failure when it is the box's own (no paths or disk details to the peer)."""
    if isinstance(exc, InvalidDatasetError):
        return exc.dicom_status, str(exc)
    if isinstance(exc, OutOfSpaceError):
        return exc.dicom_status, "Out of resources: storage floor reached"
    return exc.dicom_status, f"Storage failed ({exc.code})"


def _status(code: int, comment: str = "") -> Dataset:
    status = Dataset()
    status.Status = code
    if comment:
        # ErrorComment is LO: at most 64 characters.
        status.ErrorComment = comment[:64]
    return status


def _calling_ae(event: evt.Event) -> str:
    """The calling AE title, escaped for the log."""
    try:
        return peer_text(str(event.assoc.requestor.ae_title).strip(), 16)
    except Exception:  # noqa: BLE001 - logging aid only
        return "?"


def _deflate_refusal(event: evt.Event, limit: int) -> str | None:
    """Why a Deflated Explicit VR Little Endian dataset is refused before it is inflated (it
    would inflate past ``limit`` bytes, or is no deflate stream), or None."""
    if event.context.transfer_syntax != DeflatedExplicitVRLittleEndian:
        return None
    with cast(Any, event.request).DataSet.getbuffer() as deflated:
        try:
            too_big = inflated_size_exceeds(deflated, limit)
        except zlib.error as exc:
            return f"cannot inflate the deflated dataset: {exc}"
    return f"deflated dataset inflates past {limit // (1024 * 1024)} MB (dicom.max_inflated_mb)" if too_big else None


def make_store_handler(store: InstanceStore, on_stored: Callable[[Any], None] | None = None,
                       report_hook: Callable[[str, bytes, Dataset], Any] | None = None,
                       limits: Limits | None = None) -> Callable[[evt.Event], Dataset]:
    """Build the C-STORE handler bound to ``store``.

    ``report_hook(calling_ae, data, ds)`` (forwarding's report channel) may take an object over:
    it returns a store outcome when it stored the object itself, None to let it be stored as usual.
    """
    max_inflated = (limits or Limits()).max_inflated_bytes

    def handle_store(event: evt.Event) -> Dataset:
        calling = _calling_ae(event)
        staged = None
        try:
            refusal = _deflate_refusal(event, max_inflated)
            if refusal is not None:
                log.warning("C-STORE from %s refused (0x%04X): %s", calling, STATUS_OUT_OF_RESOURCES, refusal)
                return _status(STATUS_OUT_OF_RESOURCES, refusal)
            data = encoded_part10(event)
            # The temp file is written and fsynced while the dataset is parsed and checked.
            staged = store.stage(data)
            ds = parse_part10(data)
            requested = str(getattr(event.request, "AffectedSOPInstanceUID", "") or "")
            if requested and str(ds.get("SOPInstanceUID", "")).strip() != requested:
                raise InvalidDatasetError("SOP Instance UID differs from the C-STORE request")
            outcome = report_hook(calling, data, ds) if report_hook is not None else None
            if outcome is None:
                outcome = store.commit(staged, ds, calling_ae=calling, source=Source.DICOM)
        except StoreError as exc:
            status, comment = store_failure(exc)
            log.warning("C-STORE from %s refused (0x%04X, %s): %s", calling, status, exc.code, peer_text(exc, 200))
            return _status(status, comment)
        except Exception as exc:  # noqa: BLE001 - a handler must answer, never raise
            log.error("C-STORE from %s failed: %s: %s", calling, type(exc).__name__, peer_text(exc, 200))
            return _status(STATUS_OUT_OF_RESOURCES if isinstance(exc, OSError) else STATUS_PROCESSING_FAILURE,
                           f"Storage failed: {type(exc).__name__}")
        finally:
            if staged is not None:
                staged.discard()
        log.info("C-STORE from %s: %s %s", calling, outcome.action, peer_text(outcome.sop_instance_uid))
        if on_stored is not None:
            try:
                on_stored(outcome)
            except Exception:  # noqa: BLE001 - notification must not undo a durable store
                log.exception("post-store notification failed")
        return _status(STATUS_SUCCESS)

    return handle_store


def handle_echo(event: evt.Event) -> int:
    log.info("C-ECHO from %s", _calling_ae(event))
    return STATUS_SUCCESS


# Keyed by (result source, diagnostic); looked up with whatever an A-ASSOCIATE-RJ carried.
_REJECT_REASONS: dict[tuple[object, object], str] = {
    (0x01, 0x01): "no reason given",
    (0x01, 0x02): "application context not supported",
    (0x01, 0x03): "calling AE title not allowed (dicom.allowed_calling_aes)",
    (0x01, 0x07): "called AE title is not this box's",
    (0x02, 0x01): "no reason given",
    (0x02, 0x02): "protocol version not supported",
    (0x03, 0x01): "temporary congestion",
    (0x03, 0x02): "local limit exceeded (dicom.max_associations)",
}


def _handle_rejected(event: evt.Event) -> None:
    """One line per rejected association, with pynetdicom's reason in words."""
    requestor = event.assoc.requestor
    answer = getattr(event.assoc.acceptor, "primitive", None)
    key = (getattr(answer, "result_source", None), getattr(answer, "diagnostic", None))
    reason = _REJECT_REASONS.get(key, f"source {key[0]}, reason {key[1]}")
    _refusals.refused(str(requestor.address), "rejected", "association from %s (%s) rejected: %s",
                      _calling_ae(event), requestor.address, reason)


class AllowListAE(AE):
    """An AE whose calling-AE allow-list can be empty, meaning nobody.

    pynetdicom treats an empty ``require_calling_aet`` as "accept anybody", and refuses an
    impossible title in the setter; so an empty list is represented by a title no peer can send.
    """

    accept_nobody = False
    # Read by netpatch's DUL: what a peer of this AE may cost (see limits.py).
    edge_limits: Limits = Limits()

    @property
    def require_calling_aet(self) -> list[str]:
        return ["\x00"] if self.accept_nobody else super().require_calling_aet

    @require_calling_aet.setter
    def require_calling_aet(self, ae_titles: list[str]) -> None:
        # super() cannot assign a property; mypy types the class attribute as the getter's value.
        AE.require_calling_aet.fset(self, ae_titles)  # type: ignore[attr-defined]


def make_ae(config: Config) -> AllowListAE:
    """An AE configured from ``[dicom]``: AE title, allow-list, contexts, limits."""
    dicom = config.dicom
    limits = Limits.from_config(config)
    ae = AllowListAE(ae_title=dicom.ae_title)
    ae.edge_limits = limits
    # The main process admits associations against the limits over all processes (guard.py);
    # pynetdicom's own count, per process, can only be reached when those are.
    ae.maximum_associations = limits.max_associations
    ae.network_timeout = dicom.network_timeout_s
    ae.acse_timeout = limits.association_timeout_s
    ae.dimse_timeout = dicom.network_timeout_s
    # Advertised as the Maximum Length Received: senders cut P-DATA PDUs to this size.
    ae.maximum_pdu_size = limits.max_pdu_bytes
    allowed = dicom.allowed_calling_aes
    if "*" in allowed:
        log.warning("dicom.allowed_calling_aes contains '*': any calling AE title is accepted (set-up mode)")
    else:
        if not allowed:
            log.warning("dicom.allowed_calling_aes is empty: every association will be rejected "
                        "(set your modality's AE title in the site configuration)")
            ae.accept_nobody = True
        else:
            ae.require_calling_aet = list(allowed)
    ae.add_supported_context(Verification)
    for context in AllStoragePresentationContexts:
        ae.add_supported_context(cast(str, context.abstract_syntax), TRANSFER_SYNTAXES)
    for uid in RETIRED_STORAGE_CLASSES:
        ae.add_supported_context(uid, TRANSFER_SYNTAXES)
    return ae


class IngestActivity:
    """Counts the associations open in this process, by peer address: so analysis can give
    way while images are arriving, and so the association limits can be applied.

    It is the ``tracker`` of the server (see :class:`_TrackedRequestHandler`): an association
    counts from the moment its thread is started until that thread has ended, whichever way it
    ended, so a count can never be left behind by a path that skips a close event.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open: dict[str, int] = {}

    def started(self, host: str) -> None:
        with self._lock:
            self._open[host] = self._open.get(host, 0) + 1

    def ended(self, host: str) -> None:
        with self._lock:
            left = self._open.get(host, 0) - 1
            if left > 0:
                self._open[host] = left
            else:
                self._open.pop(host, None)

    def open_count(self, host: str | None = None) -> int:
        """Open associations, all of them or those from ``host``."""
        with self._lock:
            return sum(self._open.values()) if host is None else self._open.get(host, 0)

    def busy(self) -> bool:
        return self.open_count() > 0


class _TrackedRequestHandler(RequestHandler):
    """pynetdicom's request handler, making the server's ``association_class`` (the box's own
    upper layer, :mod:`.netpatch`) and telling the server's ``tracker`` (``started(host)``,
    ``ended(host)``) when the association's thread starts and when it has ended."""

    def _create_association(self) -> Any:
        """pynetdicom 3.0's ``RequestHandler._create_association``, with the server's class."""
        server: Any = self.server
        assoc = server.association_class(self.ae, MODE_ACCEPTOR)
        assoc._server = server
        assoc.name = f"AcceptorThread@{datetime.now():%Y%m%d%H%M%S}"
        assoc.set_socket(AssociationSocket(assoc, client_socket=self.request))
        assoc.acceptor.maximum_length = self.ae.maximum_pdu_size
        assoc.acceptor.ae_title = server.ae_title
        assoc.acceptor.address_info = self.local
        assoc.acceptor.implementation_class_uid = self.ae.implementation_class_uid
        assoc.acceptor.implementation_version_name = self.ae.implementation_version_name
        assoc.acceptor.supported_contexts = deepcopy(server.contexts)
        assoc.requestor.address_info = self.remote
        for event, handlers in server._handlers.items():
            if event.is_intervention and handlers:
                assoc.bind(event, *handlers)
            elif isinstance(event, evt.NotificationEvent):
                for handler in handlers:
                    assoc.bind(event, handler[0], handler[1])
        return assoc

    def handle(self) -> None:
        # socketserver types the server as BaseServer; this handler serves only make_server's.
        tracker = cast(BoxServer, self.server).tracker
        assoc = self._create_association()
        # Trigger must be after binding the events (as pynetdicom's own handle does).
        evt.trigger(assoc, evt.EVT_CONN_OPEN, {"address": self.client_address})
        host = str(assoc.requestor.address)
        run = assoc.run

        def run_then_report() -> None:
            try:
                run()
            except Exception as exc:  # noqa: BLE001 - pynetdicom's negotiation raises on some malformed input
                _refusals.refused(host, "association error", "DICOM association from %s (calling AE %s) aborted: "
                                  "pynetdicom failed on what it was sent (%s: %s)", host,
                                  peer_text(str(assoc.requestor.ae_title).strip(), 16), type(exc).__name__,
                                  peer_text(exc, 120))
                assoc.dul.kill_dul()
                netpatch.close_transport(assoc.dul)
            finally:
                tracker.ended(host)

        assoc.run = run_then_report
        tracker.started(host)
        try:
            assoc.start()
        except Exception as exc:  # noqa: BLE001 - no thread (RuntimeError): the count is undone here
            tracker.ended(host)
            log.error("DICOM association from %s could not be started: %s: %s", host, type(exc).__name__, exc)
            with contextlib.suppress(OSError):  # already closed: nothing more to release
                self.request.close()


class BoxServer(ThreadedAssociationServer):
    """What :func:`make_server` gives each of the box's association servers."""

    ae: AllowListAE  # the AE of make_ae (pynetdicom declares its base)
    tracker: Any  # started(host), ended(host)
    association_class: type[netpatch.LimitedAssociation]  # read by _TrackedRequestHandler


_Server = TypeVar("_Server", bound=BoxServer)


class ReceivingServer(BoxServer):
    """The listening server of the main process.

    A new connection goes to the :class:`~.guard.AssociationGate` first; once its whole
    A-ASSOCIATE-RQ has arrived the gate calls :meth:`serve_connection`, which hands it to
    ``dispatch(conn, address)`` (see :mod:`.receivers`: another receiving process, or False to
    keep it here, or AssociationRefused over the association limits).  A connection kept here is
    set up synchronously (that only creates the association, whose own thread then runs it), so
    the tracker has counted it before the next connection is dispatched and the counts the
    dispatcher balances on are exact.

    Nagle is disabled on accepted connections: a small response written behind a previous
    segment must not wait for the peer's delayed ACK (tens of milliseconds per C-STORE).
    """

    # The listen backlog: socketserver's 5 drops connection attempts (the sender retries a
    # second or more later) as soon as a burst of connections arrives at once.
    request_queue_size = 256
    dispatch: Callable[[socket.socket, Any], bool] | None = None
    tracker: IngestActivity  # set by make_server
    gate: AssociationGate | None = None

    def get_request(self) -> Any:
        conn, address = super().get_request()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return conn, address

    def process_request(self, request: Any, client_address: Any) -> None:
        if self.gate is not None:
            self.gate.add(request, client_address)
        else:
            self.serve_connection(request, client_address)

    def serve_connection(self, conn: socket.socket, address: Any) -> None:
        if self.dispatch is not None:
            if self.dispatch(conn, address):
                return
        else:  # this process serves every association itself: apply the limits here
            limits = self.ae.edge_limits
            refusal = admission_refusal(limits, self.tracker.open_count(), self.tracker.open_count(peer_host(address)))
            if refusal is not None:
                raise AssociationRefused(refusal)
        self.finish_request(conn, address)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """socketserver prints a traceback to stderr; one line in the log instead."""
        error = sys.exc_info()[1]
        log.error("DICOM connection from %s could not be accepted: %s: %s", client_address,
                  type(error).__name__, peer_text(error, 120))

    def server_close(self) -> None:
        if self.gate is not None:
            self.gate.stop()
        super().server_close()


class HandedOverServer(BoxServer):
    """In a helper receiving process: serves connections accepted by the main process (passed
    to :meth:`take`); it never binds or listens itself."""

    def server_bind(self) -> None:
        pass

    def server_activate(self) -> None:
        pass

    def take(self, conn: socket.socket, address: Any) -> None:
        self.finish_request(conn, address)

    def abort_all(self) -> None:
        for assoc in self.active_associations:
            assoc.abort()


def fast_reactor(config: Config) -> bool:
    """``dicom.fast_reactor``: the SCP's associations wait instead of polling (:mod:`.netpatch`)."""
    return bool(config.dicom.fast_reactor)


def make_server(config: Config, store: InstanceStore, server_class: type[_Server],
                on_stored: Callable[[Any], None] | None = None,
                report_hook: Callable[[str, bytes, Dataset], Any] | None = None,
                *, tracker: Any) -> _Server:
    """The AE's association server with our handlers bound (not yet serving).

    ``tracker`` (``started(host)``, ``ended(host)``) is told of every association's thread.
    """
    ae = make_ae(config)
    handlers: list[Any] = [
        (evt.EVT_C_STORE, make_store_handler(store, on_stored, report_hook, ae.edge_limits)),
        (evt.EVT_C_ECHO, handle_echo),
        (evt.EVT_REJECTED, _handle_rejected),
    ]
    # AE.make_server builds an instance of server_class; its signature promises only the base.
    server = cast(_Server, ae.make_server((config.dicom.host, config.dicom.port), evt_handlers=handlers,
                                          server_class=server_class, request_handler=_TrackedRequestHandler))
    server.tracker = tracker
    server.association_class = netpatch.association_class(fast_reactor(config))
    # What AE.start_server does for its own servers: shutdown() expects to find it in this list.
    ae._servers.append(server)
    return server


def start_scp(config: Config, store: InstanceStore, on_stored: Callable[[Any], None] | None = None,
              report_hook: Callable[[str, bytes, Dataset], Any] | None = None,
              activity: IngestActivity | None = None,
              dispatch: Callable[[socket.socket, Any], bool] | None = None) -> ReceivingServer:
    """Start listening in a background thread; call ``.shutdown()`` on the result to stop.

    ``activity`` counts the associations served in this process (a new one is made if None);
    ``dispatch`` hands connections to other receiving processes (:mod:`.receivers`).
    """
    server = make_server(config, store, ReceivingServer, on_stored, report_hook,
                         tracker=activity or IngestActivity())
    server.dispatch = dispatch
    server.gate = AssociationGate(server.ae.edge_limits, server.serve_connection)
    server.gate.start()
    threading.Thread(target=server.serve_forever, name="dicom-scp", daemon=True).start()
    log.info("DICOM receiver: fast reactor %s", "on" if fast_reactor(config) else "off")
    log.info("DICOM SCP %s listening on %s:%d", config.dicom.ae_title, *server.server_address[:2])
    return server
