"""A DICOMweb destination: STOW-RS to send, QIDO-RS to confirm and to find reports, WADO-RS to
fetch them (requests; HTTPS with ``tls_ca``/``tls_cert``/``tls_key``; basic auth or a bearer token).

STOW-RS answers per instance (PS3.18 10.5.3): ReferencedSOPSequence lists what was stored and
FailedSOPSequence what was not, with a FailureReason.  HTTP status classes: 5xx, 408, 429 and
401/403 (credentials can be fixed while the queue waits) are transient; a failure listed for an
instance is a refusal of that dataset.  A 4xx that does not say which instance it is about is
narrowed down by sending the batch's instances one at a time.
"""
from __future__ import annotations

import json
import logging
import uuid
from typing import Any, Optional, Sequence

import requests

from ..config import Destination
from .errors import PolicyBlocked, TransientSendError
from .pacing import Pacer
from .transfer import Outcome, Outgoing, Report, ShouldStop, encode, with_syntax

log = logging.getLogger(__name__)
Entry = tuple[Outgoing, bytes, str]  # an instance ready to go: what, its Part 10 bytes, its syntax

BATCH_BYTES = 8 * 1024 * 1024
SLICE_BYTES = 64 * 1024  # a request body is written (and paced) in slices of at most this size
QIDO_UIDS = 24  # studies per QIDO-RS query (keeps the URL under ~2 kB)
TIMEOUT = (10, 600)  # (connect, read) seconds: a large batch over a slow link takes minutes
REFERENCED_SOP_SEQ, FAILED_SOP_SEQ = "00081199", "00081198"
REFERENCED_SOP_UID, FAILURE_REASON = "00081155", "00081197"
SOP_INSTANCE_UID, SOP_CLASS_UID, SERIES_UID = "00080018", "00080016", "0020000E"
ANY_SYNTAX = {"1.2.840.10008.1.2.1", "1.2.840.10008.1.2", "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.90"}


def make_session(dest: Destination) -> requests.Session:
    session = requests.Session()
    if dest.token:
        session.headers["Authorization"] = f"Bearer {dest.token}"
    elif dest.username:
        session.auth = (dest.username, dest.password)
    if dest.tls_ca:
        session.verify = dest.tls_ca
    if dest.tls_cert:
        session.cert = (dest.tls_cert, dest.tls_key) if dest.tls_key else dest.tls_cert
    return session


def _value(item: dict[str, Any], tag: str) -> str:
    values = item.get(tag, {}).get("Value") or [""]
    return str(values[0])


class DicomWebPeer:
    """STOW-RS / QIDO-RS / WADO-RS peer for one ``kind = "dicomweb"`` destination."""

    def __init__(self, dest: Destination, session: Optional[requests.Session] = None,
                 pacer: Optional[Pacer] = None, batch_bytes: int = BATCH_BYTES):
        self.dest = dest
        self.base = dest.url.rstrip("/")
        self.session = session or make_session(dest)
        self.pacer = pacer or Pacer(0)
        self.batch_bytes = batch_bytes

    # -- HTTP boundary: every requests exception becomes a TransientSendError here --------------
    def _request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        try:
            # verify is passed per request: requests lets REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE
            # override a session's verify, which would silently replace the destination's tls_ca.
            verify = getattr(self.session, "verify", True)
            response = self.session.request(method, self.base + path, timeout=TIMEOUT, verify=verify, **kwargs)
        except requests.RequestException as exc:
            raise TransientSendError(f"{self.dest.name}: {method} failed: {type(exc).__name__}") from exc
        if response.status_code >= 500 or response.status_code in (401, 403, 407, 408, 429):
            raise TransientSendError(f"{self.dest.name}: {method} {path.split('?')[0]} answered HTTP "
                                     f"{response.status_code}")
        return response

    # -- STOW-RS --------------------------------------------------------------------------------
    def send(self, outgoing: list[Outgoing], report: Report, should_stop: ShouldStop) -> None:
        """STOW-RS requests of up to about ``batch_bytes`` each (several studies may share one)."""
        batch: list[Entry] = []
        size = 0
        for o in outgoing:
            if should_stop():
                break
            try:
                ds = o.load()
            except PolicyBlocked as exc:
                report([Outcome(o.sop_instance_uid, "blocked", reason=str(exc))])
                continue
            # DICOMweb has no negotiation: the stored syntax or the configured lossless one.
            ready = with_syntax(ds, ANY_SYNTAX | {str(ds.file_meta.TransferSyntaxUID)},
                                self.dest.compress) or ds
            data = encode(ready)
            batch.append((o, data, str(ready.file_meta.TransferSyntaxUID)))
            size += len(data)
            if size >= self.batch_bytes:
                self._stow(batch, report)
                batch, size = [], 0
        if batch:
            self._stow(batch, report)

    def _stow(self, batch: list[Entry], report: Report) -> None:
        boundary = uuid.uuid4().hex.encode()
        parts = [b"--" + boundary + b"\r\nContent-Type: application/dicom\r\n\r\n" + data + b"\r\n"
                 for _, data, _ in batch] + [b"--" + boundary + b"--\r\n"]
        response = self._request("POST", "/studies", data=PacedBody(parts, self.pacer), headers={
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary.decode()}',
            "Accept": "application/dicom+json"})
        stored, failed = self._parse_stow(response)
        outcomes: list[Outcome] = []
        unknown: list[Entry] = []
        for o, data, syntax in batch:
            uid = o.remote_sop_instance_uid
            if uid in stored:
                outcomes.append(Outcome(o.sop_instance_uid, "sent", len(data), syntax))
            elif uid in failed:
                outcomes.append(Outcome(o.sop_instance_uid, "refused", len(data), syntax,
                                        f"{self.dest.name} refused the dataset (STOW-RS FailureReason {failed[uid]})"))
            else:
                unknown.append((o, data, syntax))
        report(outcomes)
        if not unknown:
            return
        if response.status_code >= 400 and len(batch) == 1:
            o, data, syntax = batch[0]
            report([Outcome(o.sop_instance_uid, "refused", len(data), syntax,
                            f"{self.dest.name} refused the dataset (HTTP {response.status_code})")])
        elif response.status_code >= 400:
            for entry in unknown:  # find out which instance the peer objects to
                self._stow([entry], report)
        else:
            raise TransientSendError(f"{self.dest.name}: STOW-RS answered {response.status_code} without "
                                     f"listing {len(unknown)} instances")

    @staticmethod
    def _parse_stow(response: requests.Response) -> tuple[set[str], dict[str, str]]:
        try:
            body = response.json() if response.content else {}
        except ValueError:
            body = {}
        if isinstance(body, list):  # some servers wrap the response dataset in an array
            body = body[0] if body else {}
        stored = {_value(i, REFERENCED_SOP_UID) for i in body.get(REFERENCED_SOP_SEQ, {}).get("Value", [])}
        failed = {_value(i, REFERENCED_SOP_UID): _value(i, FAILURE_REASON)
                  for i in body.get(FAILED_SOP_SEQ, {}).get("Value", [])}
        return stored, failed

    # -- QIDO-RS / WADO-RS ----------------------------------------------------------------------
    def instances(self, remote_study_uid: str) -> list[dict[str, str]]:
        """The study's instances on the peer: sop_instance_uid, sop_class_uid, series_uid."""
        return self._qido(f"/studies/{remote_study_uid}/instances")

    def _qido(self, path: str, params: Optional[dict[str, str]] = None) -> list[dict[str, str]]:
        response = self._request("GET", path, params=params, headers={"Accept": "application/dicom+json"})
        if response.status_code in (204, 404) or not response.content:
            return []
        if response.status_code >= 400:
            raise TransientSendError(f"{self.dest.name}: QIDO-RS answered HTTP {response.status_code}")
        try:
            rows = response.json()
        except (ValueError, json.JSONDecodeError) as exc:
            raise TransientSendError(f"{self.dest.name}: QIDO-RS answer is not JSON") from exc
        return [{"sop_instance_uid": _value(r, SOP_INSTANCE_UID), "sop_class_uid": _value(r, SOP_CLASS_UID),
                 "series_uid": _value(r, SERIES_UID)} for r in rows]

    def present(self, remote_study_uids: Sequence[str]) -> set[str]:
        """Instances listed in any of these studies: one QIDO-RS query per QIDO_UIDS studies
        (UID list matching, PS3.18 8.3.4.1: comma-separated UIDs)."""
        uids = list(dict.fromkeys(remote_study_uids))
        if len(uids) == 1:
            return {r["sop_instance_uid"] for r in self.instances(uids[0])}
        found: set[str] = set()
        for start in range(0, len(uids), QIDO_UIDS):
            chunk = uids[start:start + QIDO_UIDS]
            found |= {r["sop_instance_uid"] for r in self._qido("/instances", {"StudyInstanceUID": ",".join(chunk)})}
        return found

    def retrieve(self, study_uid: str, series_uid: str, sop_uid: str) -> bytes:
        """One instance as Part 10 bytes (WADO-RS, multipart/related)."""
        response = self._request("GET", f"/studies/{study_uid}/series/{series_uid}/instances/{sop_uid}",
                                 headers={"Accept": 'multipart/related; type="application/dicom"'})
        if response.status_code >= 400:
            raise TransientSendError(f"{self.dest.name}: WADO-RS answered HTTP {response.status_code}")
        parts = split_multipart(response.headers.get("Content-Type", ""), response.content)
        if not parts:
            raise TransientSendError(f"{self.dest.name}: WADO-RS answer holds no instance")
        return parts[0]

    def close(self) -> None:
        self.session.close()


class PacedBody:
    """A request body of known length (so the request carries a Content-Length, as every server
    takes) that the HTTP library reads slice by slice; the rate cap is applied per slice, so a
    large STOW-RS request is sent at the capped rate instead of in one burst followed by a pause."""

    def __init__(self, parts: list[bytes], pacer: Pacer):
        self._parts = parts
        self._length = sum(len(p) for p in parts)
        self._pacer = pacer
        self._part = self._offset = 0

    def __len__(self) -> int:
        return self._length

    def read(self, size: int = -1) -> bytes:
        if self._part >= len(self._parts):
            return b""
        limit = SLICE_BYTES if size is None or size < 0 else min(size, SLICE_BYTES)
        current = self._parts[self._part]
        piece = current[self._offset:self._offset + limit]
        self._offset += len(piece)
        if self._offset >= len(current):
            self._part, self._offset = self._part + 1, 0
        self._pacer.sent(len(piece))
        return piece


def split_multipart(content_type: str, body: bytes) -> list[bytes]:
    """The bodies of a multipart/related payload (headers stripped)."""
    boundary = ""
    for param in content_type.split(";"):
        key, _, value = param.strip().partition("=")
        if key.lower() == "boundary":
            boundary = value.strip().strip('"')
    if not boundary:
        return []
    delimiter = b"--" + boundary.encode()
    parts = []
    for chunk in body.split(delimiter)[1:]:
        if chunk.startswith(b"--"):
            break
        _headers, sep, payload = chunk.partition(b"\r\n\r\n")
        if sep:
            parts.append(payload[:-2] if payload.endswith(b"\r\n") else payload)
    return parts
