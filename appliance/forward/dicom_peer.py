"""A DICOM destination: C-STORE SCU to send, C-FIND to confirm (pynetdicom), optional TLS.

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
import ssl
from typing import Any, Callable, Optional

from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.presentation import build_context
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind  # type: ignore[attr-defined]

from .compress import target_syntax
from .errors import PolicyBlocked, TransientSendError
from .pacing import Pacer
from .transfer import Outcome, Outgoing, Report, ShouldStop, encode, with_syntax

log = logging.getLogger(__name__)

MAX_CONTEXTS = 126  # 128 allowed; two kept for verification and C-FIND
TRANSIENT_STATUSES = {0x0110, 0x0111, 0x0212, 0xA700, 0xA701, 0xA702, 0xA7FF}


def status_class(code: int) -> str:
    """``stored``, ``transient`` or ``refused`` for a C-STORE response status."""
    if code == 0x0000 or (code & 0xF000) == 0xB000:
        return "stored"
    if code in TRANSIENT_STATUSES or (code & 0xFF00) == 0xA700:
        return "transient"
    return "refused"


def tls_context(dest: dict[str, Any]) -> Optional[ssl.SSLContext]:
    """A client TLS context from ``tls_ca`` / ``tls_cert`` / ``tls_key``; None when TLS is off."""
    if not (dest.get("tls_ca") or dest.get("tls_cert")):
        return None
    try:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=dest.get("tls_ca") or None)
        if dest.get("tls_cert"):
            context.load_cert_chain(dest["tls_cert"], dest.get("tls_key") or None)
    except (OSError, ssl.SSLError) as exc:
        raise TransientSendError(f"TLS set-up for {dest['name']} failed: {exc}") from exc
    return context


class DicomPeer:
    """C-STORE / C-FIND peer for one ``kind = "dicom"`` destination."""

    def __init__(self, dest: dict[str, Any], calling_ae: str, timeout_s: int = 30,
                 ae_factory: Callable[[str], AE] = AE, pacer: Optional[Pacer] = None):
        self.dest = dest
        self.pacer = pacer or Pacer(0)
        self.calling_ae = dest.get("calling_ae") or calling_ae
        self.timeout_s = timeout_s
        self._ae_factory = ae_factory

    def _associate(self, contexts: list) -> Any:
        ae = self._ae_factory(self.calling_ae)
        for attr in ("acse_timeout", "dimse_timeout", "network_timeout", "connection_timeout"):
            setattr(ae, attr, self.timeout_s)
        ae.maximum_pdu_size = 0
        tls = tls_context(self.dest)
        kwargs: dict[str, Any] = {"ae_title": self.dest["called_ae"], "contexts": contexts}
        if tls is not None:
            kwargs["tls_args"] = (tls, self.dest["host"])
        try:
            assoc = ae.associate(self.dest["host"], int(self.dest["port"]), **kwargs)
        except (OSError, ValueError, RuntimeError) as exc:
            raise TransientSendError(f"cannot connect to {self.dest['name']}: {exc}") from exc
        if not assoc.is_established:
            why = "rejected the association (check called_ae and the peer's allowed AE titles)" \
                if assoc.is_rejected else "is unreachable or aborted the association"
            raise TransientSendError(f"{self.dest['name']} ({self.dest['host']}:{self.dest['port']}) {why}")
        return assoc

    def _batches(self, outgoing: list[Outgoing]) -> list[tuple[list[Outgoing], list]]:
        """Split into associations of at most MAX_CONTEXTS presentation contexts each."""
        wanted = target_syntax(self.dest.get("compress", "none"))
        batches: list[tuple[list[Outgoing], list]] = []
        current: list[Outgoing] = []
        pairs: list[tuple[str, str]] = []
        for o in outgoing:
            options = ([str(wanted)] if wanted else []) + [o.transfer_syntax, ExplicitVRLittleEndian,
                                                           ImplicitVRLittleEndian]
            new = [(o.sop_class_uid, str(ts)) for ts in dict.fromkeys(options) if (o.sop_class_uid, str(ts)) not in pairs]
            if current and len(pairs) + len(new) > MAX_CONTEXTS:
                batches.append((current, [build_context(c, t) for c, t in pairs]))
                current, pairs = [], [(o.sop_class_uid, str(ts)) for ts in dict.fromkeys(options)]
            else:
                pairs.extend(new)
            current.append(o)
        if current:
            batches.append((current, [build_context(c, t) for c, t in pairs]))
        return batches

    def send(self, outgoing: list[Outgoing], report: Report, should_stop: ShouldStop) -> None:
        for batch, contexts in self._batches(outgoing):
            if should_stop():
                return
            self._send_batch(batch, contexts, report, should_stop)

    def _send_batch(self, outgoing: list[Outgoing], contexts: list, report: Report, should_stop: ShouldStop) -> None:
        assoc = self._associate(contexts)
        try:
            accepted: dict[str, set[str]] = {}
            for cx in assoc.accepted_contexts:
                accepted.setdefault(str(cx.abstract_syntax), set()).add(str(cx.transfer_syntax[0]))
            for o in outgoing:
                if should_stop():
                    return
                report([self._send_one(assoc, o, accepted.get(o.sop_class_uid, set()))])
        finally:
            if assoc.is_established:
                assoc.release()

    def _send_one(self, assoc: Any, o: Outgoing, accepted: set[str]) -> Outcome:
        try:
            ds = o.load()
        except PolicyBlocked as exc:
            return Outcome(o.sop_instance_uid, "blocked", reason=str(exc))
        if not accepted:
            return Outcome(o.sop_instance_uid, "refused",
                           reason=f"{self.dest['name']} does not accept SOP class {o.sop_class_uid}")
        ready = with_syntax(ds, accepted, self.dest.get("compress", "none"))
        if ready is None:
            return Outcome(o.sop_instance_uid, "refused",
                           reason=f"{self.dest['name']} accepts no transfer syntax this instance can be sent in")
        size = len(encode(ready))
        try:
            status = assoc.send_c_store(ready)
        except (OSError, RuntimeError, ValueError) as exc:
            raise TransientSendError(f"C-STORE to {self.dest['name']} failed: {type(exc).__name__}: {exc}") from exc
        if "Status" not in status:
            raise TransientSendError(f"{self.dest['name']}: no C-STORE response (connection lost or timed out)")
        code = int(status.Status)
        verdict = status_class(code)
        if verdict == "transient":
            raise TransientSendError(f"{self.dest['name']} is temporarily unable to store (status 0x{code:04X})")
        self.pacer.sent(size)
        syntax = str(ready.file_meta.TransferSyntaxUID)
        if verdict == "refused":
            comment = str(status.get("ErrorComment", "") or "")
            return Outcome(o.sop_instance_uid, "refused", size, syntax,
                           f"{self.dest['name']} refused the dataset: status 0x{code:04X} {comment}".strip())
        return Outcome(o.sop_instance_uid, "sent", size, syntax)

    def present(self, remote_study_uid: str) -> set[str]:
        """SOP Instance UIDs the peer holds in the study (C-FIND, study root, IMAGE level)."""
        assoc = self._associate([build_context(StudyRootQueryRetrieveInformationModelFind)])
        found: set[str] = set()
        try:
            query = Dataset()
            query.QueryRetrieveLevel = "IMAGE"
            query.StudyInstanceUID = remote_study_uid
            query.SeriesInstanceUID = ""
            query.SOPInstanceUID = ""
            for status, identifier in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind):
                if not status or "Status" not in status:
                    raise TransientSendError(f"{self.dest['name']}: C-FIND got no response")
                code = int(status.Status)
                if code in (0xFF00, 0xFF01) and identifier is not None:
                    found.add(str(identifier.get("SOPInstanceUID", "")))
                elif code != 0x0000:
                    raise TransientSendError(f"{self.dest['name']}: C-FIND failed with status 0x{code:04X}")
        except (OSError, RuntimeError, ValueError) as exc:
            raise TransientSendError(f"C-FIND to {self.dest['name']} failed: {exc}") from exc
        finally:
            if assoc.is_established:
                assoc.release()
        return found

    def close(self) -> None:
        """Associations are per attempt; nothing stays open."""
