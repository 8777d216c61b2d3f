"""The DICOM SCP: C-ECHO and C-STORE from the clinic's modalities.

Handlers are plain functions that return a status and never let an exception escape
(pynetdicom would otherwise answer with a generic failure and log a traceback that may contain
patient data).  Every rejection is logged with the calling AE and the reason, never with
patient names.
"""
from __future__ import annotations

import logging
import socket
import threading
from typing import Any, Callable

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
from pynetdicom import AE, _config, evt
from pynetdicom.presentation import AllStoragePresentationContexts
from pynetdicom.sop_class import Verification
from pynetdicom.transport import ThreadedAssociationServer

from ..config import Config
from ..errors import InvalidDatasetError, OutOfSpaceError
from ..store import InstanceStore, parse_part10
from . import netpatch  # noqa: F401 - installs its pynetdicom changes on import
from .part10 import encoded_part10

log = logging.getLogger(__name__)

# pynetdicom's own "standard" event log prints DIMSE details and, at debug level, whole
# datasets; our handlers log what is needed without patient data.
_config.LOG_HANDLER_LEVEL = "none"

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

STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_DATASET_MISMATCH = 0xA900
STATUS_CANNOT_UNDERSTAND = 0xC000
STATUS_PROCESSING_FAILURE = 0x0110


def _status(code: int, comment: str = "") -> Dataset:
    status = Dataset()
    status.Status = code
    if comment:
        # ErrorComment is LO: at most 64 characters.
        status.ErrorComment = comment[:64]
    return status


def _calling_ae(event: evt.Event) -> str:
    try:
        return str(event.assoc.requestor.ae_title).strip()
    except Exception:  # noqa: BLE001 - logging aid only
        return "?"


def make_store_handler(store: InstanceStore, on_stored: Callable[[Any], None] | None = None,
                       report_hook: Callable[[str, bytes, Dataset], Any] | None = None) -> Callable[[evt.Event], Dataset]:
    """Build the C-STORE handler bound to ``store``.

    ``report_hook(calling_ae, data, ds)`` (forwarding's report channel) may take an object over:
    it returns a store outcome when it stored the object itself, None to let it be stored as usual.
    """

    def handle_store(event: evt.Event) -> Dataset:
        calling = _calling_ae(event)
        staged = None
        try:
            data = encoded_part10(event)
            # The temp file is written and fsynced while the dataset is parsed and checked.
            staged = store.stage(data)
            ds = parse_part10(data)
            requested = str(getattr(event.request, "AffectedSOPInstanceUID", "") or "")
            if requested and str(ds.get("SOPInstanceUID", "")).strip() != requested:
                raise InvalidDatasetError("SOP Instance UID differs from the C-STORE request")
            outcome = report_hook(calling, data, ds) if report_hook is not None else None
            if outcome is None:
                outcome = store.commit(staged, ds, calling_ae=calling, source="dicom")
        except OutOfSpaceError as exc:
            log.warning("C-STORE from %s refused (out of resources): %s", calling, exc)
            return _status(STATUS_OUT_OF_RESOURCES, "Out of resources: storage floor reached")
        except InvalidDatasetError as exc:
            code = STATUS_CANNOT_UNDERSTAND if str(exc).startswith("cannot parse") else STATUS_DATASET_MISMATCH
            log.warning("C-STORE from %s rejected (0x%04X): %s", calling, code, exc)
            return _status(code, str(exc))
        except Exception as exc:  # noqa: BLE001 - a handler must answer, never raise
            log.error("C-STORE from %s failed: %s: %s", calling, type(exc).__name__, exc)
            return _status(STATUS_OUT_OF_RESOURCES if isinstance(exc, OSError) else STATUS_PROCESSING_FAILURE,
                           f"Storage failed: {type(exc).__name__}")
        finally:
            if staged is not None:
                staged.discard()
        log.info("C-STORE from %s: %s %s", calling, outcome.action, outcome.sop_instance_uid)
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


def _handle_rejected(event: evt.Event) -> None:
    log.warning("association from %s (%s) rejected", _calling_ae(event), event.assoc.requestor.address)


class AllowListAE(AE):
    """An AE whose calling-AE allow-list can be empty, meaning nobody.

    pynetdicom treats an empty ``require_calling_aet`` as "accept anybody", and refuses an
    impossible title in the setter; so an empty list is represented by a title no peer can send.
    """

    accept_nobody = False

    @property  # type: ignore[override]
    def require_calling_aet(self) -> list[str]:
        return ["\x00"] if self.accept_nobody else AE.require_calling_aet.fget(self)  # type: ignore[attr-defined]

    @require_calling_aet.setter
    def require_calling_aet(self, ae_titles: list[str]) -> None:
        AE.require_calling_aet.fset(self, ae_titles)  # type: ignore[attr-defined]


def make_ae(config: Config) -> AE:
    """An AE configured from ``[dicom]``: AE title, allow-list, contexts, limits."""
    dicom = config["dicom"]
    ae = AllowListAE(ae_title=dicom["ae_title"])
    ae.maximum_associations = dicom["max_associations"]
    ae.network_timeout = dicom["network_timeout_s"]
    ae.acse_timeout = dicom["network_timeout_s"]
    ae.dimse_timeout = dicom["network_timeout_s"]
    # Unlimited PDU size: fewer, larger reads for multi-megabyte radiographs.
    ae.maximum_pdu_size = 0
    allowed = dicom["allowed_calling_aes"]
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
        ae.add_supported_context(context.abstract_syntax, TRANSFER_SYNTAXES)
    return ae


class IngestActivity:
    """Counts open DICOM connections, so analysis can give way while images are arriving."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open = 0

    def opened(self, _event: evt.Event) -> None:
        with self._lock:
            self._open += 1

    def closed(self, _event: evt.Event) -> None:
        with self._lock:
            self._open = max(0, self._open - 1)

    def open_count(self) -> int:
        return self._open

    def busy(self) -> bool:
        return self._open > 0


class ReceivingServer(ThreadedAssociationServer):
    """The listening server.

    Nagle is disabled on accepted connections: a small response written behind a previous
    segment must not wait for the peer's delayed ACK (tens of milliseconds per C-STORE).

    ``dispatch(conn, address)`` (see :mod:`.receivers`) may hand an accepted connection to
    another receiving process; it returns False to keep it here.  A connection kept here is set
    up synchronously (that only creates the association, whose own thread then runs it), so
    EVT_CONN_OPEN has fired before the next connection is dispatched and the counts the
    dispatcher balances on are exact.
    """

    dispatch: Callable[[socket.socket, Any], bool] | None = None

    def get_request(self) -> Any:
        conn, address = super().get_request()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return conn, address

    def process_request(self, request: Any, client_address: Any) -> None:
        if self.dispatch is not None and self.dispatch(request, client_address):
            return
        self.finish_request(request, client_address)


class HandedOverServer(ThreadedAssociationServer):
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


def make_server(config: Config, store: InstanceStore, server_class: type[ThreadedAssociationServer],
                on_stored: Callable[[Any], None] | None = None,
                report_hook: Callable[[str, bytes, Dataset], Any] | None = None,
                activity: IngestActivity | None = None,
                on_closed: Callable[[evt.Event], None] | None = None) -> ThreadedAssociationServer:
    """The AE's association server with our handlers bound (not yet serving)."""
    ae = make_ae(config)
    handlers = [
        (evt.EVT_C_STORE, make_store_handler(store, on_stored, report_hook)),
        (evt.EVT_C_ECHO, handle_echo),
        (evt.EVT_REJECTED, _handle_rejected),
    ]
    if activity is not None:
        handlers += [(evt.EVT_CONN_OPEN, activity.opened), (evt.EVT_CONN_CLOSE, activity.closed)]
    if on_closed is not None:
        handlers.append((evt.EVT_CONN_CLOSE, on_closed))
    server = ae.make_server((config["dicom"]["host"], config["dicom"]["port"]), evt_handlers=handlers,
                            server_class=server_class)
    # What AE.start_server does for its own servers: shutdown() expects to find it in this list.
    ae._servers.append(server)
    return server


def start_scp(config: Config, store: InstanceStore, on_stored: Callable[[Any], None] | None = None,
              report_hook: Callable[[str, bytes, Dataset], Any] | None = None,
              activity: IngestActivity | None = None,
              dispatch: Callable[[socket.socket, Any], bool] | None = None) -> ThreadedAssociationServer:
    """Start listening in a background thread; call ``.shutdown()`` on the result to stop."""
    server = make_server(config, store, ReceivingServer, on_stored, report_hook, activity)
    server.dispatch = dispatch  # type: ignore[attr-defined]
    threading.Thread(target=server.serve_forever, name="dicom-scp", daemon=True).start()
    log.info("DICOM SCP %s listening on %s:%d", config["dicom"]["ae_title"], *server.server_address[:2])
    return server
