"""A DICOM destination: C-STORE SCU to send, C-FIND to confirm (pynetdicom), optional TLS.

Associations are kept open between outbox items (each released after ``idle_s`` without use,
which is below the peer's idle timeout, or all when other presentation contexts are needed), and
the C-FIND that confirms runs on the same association as the C-STOREs (Study Root FIND is
proposed with the storage contexts).  Instances go over
``lanes`` associations at once: each C-STORE still waits for its own response status before that
association sends the next, but on a long round trip another association keeps the link busy
(pynetdicom has no asynchronous operations window).

Transfer syntaxes are negotiated per SOP class with one presentation context per syntax, so the
peer's answer tells exactly which encodings it takes: the destination's lossless compression if
accepted, else the instance's stored syntax, else uncompressed.

C-STORE status classes: success and warnings (0x0000, 0xB000, 0xB006, 0xB007) mean stored;
"out of resources" (0xA7xx) and processing failure (0x0110) are the peer's temporary trouble
(retry); any other failure (0xA9xx dataset/SOP class mismatch, 0xCxxx cannot understand, 0x0122
SOP class not supported...) is an explicit refusal of that dataset.
"""
from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from typing import Any, Callable, Optional, Sequence

from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.presentation import build_context
# pynetdicom makes its SOP classes with globals() at import, where mypy cannot see them.
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind  # type: ignore[attr-defined]

from .compress import target_syntax
from ..config import Destination
from .errors import PolicyBlocked, TransientSendError
from .pacing import Pacer
from .transfer import Outcome, Outgoing, Report, ShouldStop, encode, run_lanes, with_syntax

log = logging.getLogger(__name__)

MAX_CONTEXTS = 126  # 128 allowed; two kept for verification and C-FIND
SLOWEST_LINK_BYTES_PER_S = 8_000  # 64 kbit/s: a poor satellite or 2G link
# Associations sending at once: several keep the link busy while one waits a round trip for its
# response (bench_forward.py: 61% of a 2 Mbit/s, 600 ms RTT link with one, as storescu; see
# docs/BENCHMARKS.md).  More than three gain little and hold more of the peer's threads.
LANES = 3
IDLE_S = 20.0     # below Orthanc's default DicomScpTimeout (30 s)
FIND_UIDS = 32    # studies per C-FIND (UID list matching)
FIND = StudyRootQueryRetrieveInformationModelFind
TRANSIENT_STATUSES = {0x0110, 0x0111, 0x0212, 0xA700, 0xA701, 0xA702, 0xA7FF}


def status_class(code: int) -> str:
    """``stored``, ``transient`` or ``refused`` for a C-STORE response status."""
    if code == 0x0000 or (code & 0xF000) == 0xB000:
        return "stored"
    if code in TRANSIENT_STATUSES or (code & 0xFF00) == 0xA700:
        return "transient"
    return "refused"


def tls_problem(context: ssl.SSLContext, host: str, port: int, timeout_s: float = 5.0) -> str:
    """Why a TLS connection to the peer fails; '' if it does not, or the peer is unreachable.
    pynetdicom only logs a failed handshake, so this asks once more after an association failed."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as raw:
            with context.wrap_socket(raw, server_hostname=host) as conn:
                conn.settimeout(1.0)  # TLS 1.3: a refused client certificate arrives as an alert on the first read
                try:
                    conn.recv(1)
                except (socket.timeout, TimeoutError):
                    pass
    except ssl.SSLCertVerificationError as exc:
        return f"certificate verify failed: {exc.verify_message}"
    except ssl.SSLError as exc:
        return f"{exc.reason or exc}".replace("_", " ").lower()
    except OSError:
        return ""
    return ""


def tls_context(dest: Destination) -> Optional[ssl.SSLContext]:
    """A client TLS context from ``tls_ca`` / ``tls_cert`` / ``tls_key``; None when TLS is off."""
    if not (dest.tls_ca or dest.tls_cert):
        return None
    try:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=dest.tls_ca or None)
        if dest.tls_cert:
            context.load_cert_chain(dest.tls_cert, dest.tls_key or None)
    except (OSError, ssl.SSLError) as exc:
        raise TransientSendError(f"TLS set-up for {dest.name} failed: {exc}") from exc
    return context


class DicomPeer:
    """C-STORE / C-FIND peer for one ``kind = "dicom"`` destination."""

    def __init__(self, dest: Destination, calling_ae: str, timeout_s: int = 30,
                 ae_factory: Callable[[str], AE] = AE, pacer: Optional[Pacer] = None,
                 lanes: int = LANES, idle_s: float = IDLE_S, clock: Callable[[], float] = time.monotonic):
        self.dest = dest
        self.pacer = pacer or Pacer(0)
        self.calling_ae = dest.calling_ae or calling_ae
        self.timeout_s = timeout_s
        self.lanes = max(1, lanes)
        self.idle_s = idle_s
        self._ae_factory = ae_factory
        self._clock = clock
        self._assocs: list[Any] = []               # open associations, all with the same contexts
        self._pairs: list[tuple[str, str]] = []    # (SOP class, transfer syntax) proposed on them
        self._used: dict[Any, float] = {}          # association -> when it last carried a request
        self._prepare_lock = threading.Lock()      # loading / de-identifying is not thread-safe
        self.opened = 0                            # associations opened so far (for tests)

    # -- associations -------------------------------------------------------------------------
    def _associate(self, pairs: list[tuple[str, str]]) -> Any:
        ae = self._ae_factory(self.calling_ae)
        for attr in ("acse_timeout", "dimse_timeout", "network_timeout", "connection_timeout"):
            setattr(ae, attr, self.timeout_s)
        ae.maximum_pdu_size = 0
        tls = tls_context(self.dest)
        contexts = [build_context(c, t) for c, t in pairs] + [build_context(FIND)]
        kwargs: dict[str, Any] = {"ae_title": self.dest.called_ae, "contexts": contexts}
        if tls is not None:
            kwargs["tls_args"] = (tls, self.dest.host)
        try:
            assoc = ae.associate(self.dest.host, int(self.dest.port), **kwargs)
        except (OSError, ValueError, RuntimeError) as exc:
            raise TransientSendError(f"cannot connect to {self.dest.name}: {exc}") from exc
        if not assoc.is_established:
            problem = tls_problem(tls, self.dest.host, int(self.dest.port)) if tls and not assoc.is_rejected else ""
            if problem:
                raise TransientSendError(f"{self.dest.name} ({self.dest.host}:{self.dest.port}): TLS handshake "
                                         f"failed: {problem} (check tls_ca, tls_cert and tls_key)")
            why = "rejected the association (check called_ae and the peer's allowed AE titles)" \
                if assoc.is_rejected else "is unreachable or aborted the association"
            raise TransientSendError(f"{self.dest.name} ({self.dest.host}:{self.dest.port}) {why}")
        self.opened += 1
        return assoc

    def _open(self, pairs: list[tuple[str, str]], count: int) -> list[Any]:
        """``count`` established associations proposing (at least) ``pairs``: the open ones if
        they fit and have not idled out, else new ones (opened in parallel: one round trip).
        An association idle for ``idle_s`` (say a lane that had nothing to send while another
        carried a large radiograph) is released before the peer's idle timeout would drop it."""
        now = self._clock()
        for assoc in self._assocs:
            if assoc.is_established and now - self._used.get(assoc, now) > self.idle_s:
                assoc.release()
        self._assocs = [a for a in self._assocs if a.is_established]
        self._used = {a: t for a, t in self._used.items() if a in self._assocs}
        if not self._assocs:
            self._pairs = list(pairs)
        elif not set(pairs) <= set(self._pairs):
            self.close()
            merged = self._pairs + [p for p in pairs if p not in self._pairs]
            self._pairs = merged if len(merged) <= MAX_CONTEXTS else list(pairs)
        missing = count - len(self._assocs)
        if missing > 0:
            opened: list[Any] = []
            errors: list[BaseException] = []

            def one() -> None:
                try:
                    opened.append(self._associate(self._pairs))
                except BaseException as exc:  # noqa: BLE001 - re-raised below
                    errors.append(exc)

            threads = [threading.Thread(target=one, daemon=True) for _ in range(missing)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            self._assocs += opened
            if not self._assocs:
                raise errors[0]
        chosen = self._assocs[:count]
        self._used.update((a, now) for a in chosen)
        return chosen

    def _abort(self) -> None:
        for assoc in self._assocs:
            if assoc.is_established:
                assoc.abort()
        self._assocs, self._used = [], {}

    def close(self) -> None:
        """Release the open associations (they are kept between items until ``idle_s``)."""
        for assoc in self._assocs:
            if assoc.is_established:
                assoc.release()
        self._assocs, self._used = [], {}

    # -- C-STORE --------------------------------------------------------------------------------
    def _batches(self, outgoing: list[Outgoing]) -> list[tuple[list[Outgoing], list[tuple[str, str]]]]:
        """Split into groups of at most MAX_CONTEXTS presentation contexts each."""
        wanted = target_syntax(self.dest.compress)
        batches: list[tuple[list[Outgoing], list[tuple[str, str]]]] = []
        current: list[Outgoing] = []
        pairs: list[tuple[str, str]] = []
        for o in outgoing:
            options = ([str(wanted)] if wanted else []) + [o.transfer_syntax, ExplicitVRLittleEndian,
                                                           ImplicitVRLittleEndian]
            new = [(o.sop_class_uid, str(ts)) for ts in dict.fromkeys(options) if (o.sop_class_uid, str(ts)) not in pairs]
            if current and len(pairs) + len(new) > MAX_CONTEXTS:
                batches.append((current, pairs))
                current, pairs = [], [(o.sop_class_uid, str(ts)) for ts in dict.fromkeys(options)]
            else:
                pairs.extend(new)
            current.append(o)
        if current:
            batches.append((current, pairs))
        return batches

    def send(self, outgoing: list[Outgoing], report: Report, should_stop: ShouldStop) -> None:
        for batch, pairs in self._batches(outgoing):
            if should_stop():
                return
            lanes = self._open(pairs, min(self.lanes, len(batch)))
            try:
                run_lanes(lanes, batch, self._send_one, report, should_stop)
            except TransientSendError:
                self._abort()  # a lane's link is gone: do not wait for polite releases
                raise

    def _prepare(self, assoc: Any, o: Outgoing) -> Any:
        """The dataset in a syntax the association accepts, or the Outcome that stops it."""
        accepted = {str(cx.transfer_syntax[0]) for cx in assoc.accepted_contexts
                    if str(cx.abstract_syntax) == o.sop_class_uid}
        with self._prepare_lock:
            try:
                ds = o.load()
            except PolicyBlocked as exc:
                return Outcome(o.sop_instance_uid, "blocked", reason=str(exc))
            if not accepted:
                return Outcome(o.sop_instance_uid, "refused",
                               reason=f"{self.dest.name} does not accept SOP class {o.sop_class_uid}")
            ready = with_syntax(ds, accepted, self.dest.compress)
            if ready is None:
                return Outcome(o.sop_instance_uid, "refused",
                               reason=f"{self.dest.name} accepts no transfer syntax this instance can be sent in")
            return ready

    def response_timeout_s(self, size: int) -> float:
        """How long to wait for a C-STORE response.  It can only come once the whole dataset has
        crossed the link, and after pynetdicom has handed the last PDU to the kernel, socket and
        network buffers may still hold megabytes of it; on a slow link (shared by the lanes) that
        takes far longer than the usual timeout.  Allow for the slowest link the box is meant for."""
        return self.timeout_s + size * self.lanes / SLOWEST_LINK_BYTES_PER_S

    def _send_one(self, assoc: Any, o: Outgoing) -> Outcome:
        ready = self._prepare(assoc, o)
        if isinstance(ready, Outcome):
            return ready
        size = len(encode(ready))
        # Both timers: the response wait, and the idle timer, which only hears what the peer
        # sends (nothing while a large dataset is still going out) and would abort the association.
        assoc.dimse_timeout = assoc.network_timeout = self.response_timeout_s(size)
        try:
            status = assoc.send_c_store(ready)
        except (OSError, RuntimeError, ValueError) as exc:
            raise TransientSendError(f"C-STORE to {self.dest.name} failed: {type(exc).__name__}: {exc}") from exc
        finally:
            self._used[assoc] = self._clock()
        if "Status" not in status:
            raise TransientSendError(f"{self.dest.name}: no C-STORE response (connection lost or timed out)")
        code = int(status.Status)
        verdict = status_class(code)
        if verdict == "transient":
            raise TransientSendError(f"{self.dest.name} is temporarily unable to store (status 0x{code:04X})")
        self.pacer.sent(size)
        syntax = str(ready.file_meta.TransferSyntaxUID)
        if verdict == "refused":
            comment = str(status.get("ErrorComment", "") or "")
            return Outcome(o.sop_instance_uid, "refused", size, syntax,
                           f"{self.dest.name} refused the dataset: status 0x{code:04X} {comment}".strip())
        return Outcome(o.sop_instance_uid, "sent", size, syntax)

    # -- C-FIND ---------------------------------------------------------------------------------
    def present(self, remote_study_uids: Sequence[str]) -> set[str]:
        """SOP Instance UIDs the peer holds in these studies (C-FIND, study root, IMAGE level, UID
        list matching), on an open association when there is one."""
        uids = list(dict.fromkeys(remote_study_uids))
        found: set[str] = set()
        if not uids:
            return found
        (assoc,) = self._open(self._pairs, 1)
        try:
            for start in range(0, len(uids), FIND_UIDS):
                found |= self._find(assoc, uids[start:start + FIND_UIDS])
        except TransientSendError:
            self._abort()
            raise
        finally:
            self._used[assoc] = self._clock()
        return found

    def _find(self, assoc: Any, study_uids: list[str]) -> set[str]:
        query = Dataset()
        query.QueryRetrieveLevel = "IMAGE"
        query.StudyInstanceUID = study_uids if len(study_uids) > 1 else study_uids[0]
        query.SeriesInstanceUID = ""
        query.SOPInstanceUID = ""
        found: set[str] = set()
        try:
            for status, identifier in assoc.send_c_find(query, FIND):
                if not status or "Status" not in status:
                    raise TransientSendError(f"{self.dest.name}: C-FIND got no response")
                code = int(status.Status)
                if code in (0xFF00, 0xFF01) and identifier is not None:
                    found.add(str(identifier.get("SOPInstanceUID", "")))
                elif code != 0x0000:
                    raise TransientSendError(f"{self.dest.name}: C-FIND failed with status 0x{code:04X}")
        except (OSError, RuntimeError, ValueError) as exc:
            raise TransientSendError(f"C-FIND to {self.dest.name} failed: {exc}") from exc
        return found
