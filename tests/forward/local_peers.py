"""Peers and plumbing for the forwarding tests that Orthanc alone cannot provide, all on 127.0.0.1.

- :func:`make_pki`: a throwaway CA (and a second, unrelated one) with server and client
  certificates, made by the ``openssl`` command at test time.
- :func:`tls_orthanc`: Orthanc with DICOM TLS switched on (client certificate required).
- :class:`HttpsProxy`: a small HTTPS front for Orthanc's DICOMweb that either passes the box's
  credentials through (Orthanc checks basic auth) or demands a bearer token, as hub gateways do.
- :class:`StoreScp`: a pynetdicom Storage + C-FIND SCP whose C-STORE answer can be chosen per
  SOP Instance UID (refusals such as 0xA900 / 0xC000, "out of resources" 0xA700).
- :class:`StowPeer`: a minimal STOW-RS / QIDO-RS server that lists chosen instances in
  FailedSOPSequence (or answers an HTTP error), as a PACS that refuses a dataset does.
- :func:`make_box`: configuration, database and store for driving the real Forwarder in-process.
"""
from __future__ import annotations

import json
import ssl
import subprocess
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from io import BytesIO
from pathlib import Path
from typing import Any

import pydicom
import requests
from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.presentation import StoragePresentationContexts
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind  # type: ignore[attr-defined]

from appliance.config import Config, load_config
from appliance.db import Database, open_database
from appliance.forward.service import Forwarder
from appliance.store import InstanceStore
from tests.helpers import free_port


# -- certificates ---------------------------------------------------------------------------------
@dataclass
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path  # an unrelated CA: trusting it instead of ``ca`` must fail the handshake


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


def make_pki(directory: Path) -> Pki:
    directory.mkdir(parents=True, exist_ok=True)
    ext = directory / "leaf.cnf"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n"
                   "keyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth,clientAuth\n")
    for name, subject in (("ca", "Test Hub CA"), ("other-ca", "Unrelated CA")):
        _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN={subject}",
                 "-keyout", str(directory / f"{name}.key"), "-out", str(directory / f"{name}.pem"),
                 "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    for name, subject in (("server", "127.0.0.1"), ("client", "clinic-box")):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={subject}",
                 "-keyout", str(directory / f"{name}.key"), "-out", str(directory / f"{name}.csr"))
        _openssl("x509", "-req", "-in", str(directory / f"{name}.csr"), "-CA", str(directory / "ca.pem"),
                 "-CAkey", str(directory / "ca.key"), "-CAcreateserial", "-days", "2", "-extfile", str(ext),
                 "-out", str(directory / f"{name}.pem"))
    return Pki(directory / "ca.pem", directory / "server.pem", directory / "server.key", directory / "client.pem",
               directory / "client.key", directory / "other-ca.pem")


def tls_orthanc(orthanc_factory: Any, pki: Pki, name: str = "tls-hub") -> Any:
    """Orthanc whose DICOM port speaks only TLS and requires a client certificate from our CA."""
    hub = orthanc_factory(name)
    config = json.loads(hub.config_path.read_text())
    config.update({"DicomTlsEnabled": True, "DicomTlsCertificate": str(pki.server_cert),
                   "DicomTlsPrivateKey": str(pki.server_key), "DicomTlsTrustedCertificates": str(pki.ca),
                   "DicomTlsRemoteCertificateRequired": True})
    hub.config_path.write_text(json.dumps(config))
    return hub.start()


# -- an HTTPS front for Orthanc's DICOMweb ----------------------------------------------------------
class HttpsProxy:
    """HTTPS on a free loopback port, forwarding to an Orthanc's plain-HTTP DICOMweb.

    ``token`` set: only ``Authorization: Bearer <token>`` passes (401 otherwise) and Orthanc is
    reached with its own credentials.  ``token`` None: the box's Authorization header is passed
    through unchanged, so Orthanc itself checks the basic-auth credentials.
    """

    def __init__(self, hub: Any, pki: Pki, token: str | None = None):
        self.hub, self.token = hub, token
        self.requests: list[tuple[str, str, int]] = []  # (method, path, status) as seen over TLS
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _forward(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                headers = {k: v for k, v in self.headers.items() if k.lower() in ("content-type", "accept")}
                auth: Any = None
                if proxy.token is not None:
                    if self.headers.get("Authorization") != f"Bearer {proxy.token}":
                        return self._answer(401, b'{"error": "invalid token"}', "application/json")
                    auth = proxy.hub.auth
                elif self.headers.get("Authorization"):
                    headers["Authorization"] = self.headers["Authorization"]
                upstream = requests.request(self.command, proxy.hub.url + self.path, data=body, headers=headers,
                                            auth=auth, timeout=60)
                self._answer(upstream.status_code, upstream.content, upstream.headers.get("Content-Type", ""))

            def _answer(self, status: int, body: bytes, content_type: str) -> None:
                proxy.requests.append((self.command, self.path, status))
                self.send_response(status)
                if content_type:
                    self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = _forward

        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(pki.server_cert, pki.server_key)
        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.url = f"https://127.0.0.1:{self.server.server_address[1]}/dicom-web"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# -- a pynetdicom Storage SCP with chosen answers --------------------------------------------------
class StoreScp:
    """C-STORE and C-FIND (study root, IMAGE level) on 127.0.0.1.

    ``answers[sop_instance_uid]`` is a list of C-STORE statuses used one per attempt (the last
    one repeats); instances without an entry are stored (0x0000).  Only stored instances are
    listed by C-FIND.
    """

    AE_TITLE = "REFUSER"

    def __init__(self, port: int | None = None):
        self.port = port or free_port()
        self.answers: dict[str, list[int]] = {}
        self.stored: dict[str, dict[str, Dataset]] = {}  # study uid -> sop uid -> dataset
        self.attempts: dict[str, int] = {}
        self.server: Any = None

    def _store(self, event: Any) -> Dataset:
        ds = event.dataset
        ds.file_meta = event.file_meta
        uid = str(ds.SOPInstanceUID)
        self.attempts[uid] = self.attempts.get(uid, 0) + 1
        planned = self.answers.get(uid, [0x0000])
        code = planned[min(self.attempts[uid], len(planned)) - 1]
        status = Dataset()
        status.Status = code
        if code != 0x0000:
            status.ErrorComment = f"test peer answers 0x{code:04X}"
            return status
        self.stored.setdefault(str(ds.StudyInstanceUID), {})[uid] = ds
        return status

    def _find(self, event: Any) -> Any:
        query = event.identifier
        for uid, ds in self.stored.get(str(query.StudyInstanceUID), {}).items():
            match = Dataset()
            match.QueryRetrieveLevel = "IMAGE"
            match.StudyInstanceUID = query.StudyInstanceUID
            match.SeriesInstanceUID = ds.SeriesInstanceUID
            match.SOPInstanceUID = uid
            yield 0xFF00, match

    def start(self) -> StoreScp:
        ae = AE(self.AE_TITLE)
        ae.supported_contexts = StoragePresentationContexts
        ae.add_supported_context(StudyRootQueryRetrieveInformationModelFind)
        self.server = ae.start_server(("127.0.0.1", self.port), block=False,
                                      evt_handlers=[(evt.EVT_C_STORE, self._store), (evt.EVT_C_FIND, self._find)])
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server = None


# -- a minimal STOW-RS / QIDO-RS peer ------------------------------------------------------------
@dataclass
class StowPeer:
    """``refuse[sop_instance_uid] = FailureReason`` lists an instance in FailedSOPSequence;
    ``http_status`` (e.g. 503) makes every STOW-RS answer that HTTP error instead."""

    refuse: dict[str, int] = field(default_factory=dict)
    http_status: int = 0
    stored: dict[str, set[str]] = field(default_factory=dict)  # study uid -> sop uids
    posts: int = 0

    def start(self) -> StowPeer:
        peer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _answer(self, status: int, payload: Any) -> None:
                body = json.dumps(payload).encode() if payload is not None else b""
                self.send_response(status)
                self.send_header("Content-Type", "application/dicom+json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                peer.posts += 1
                if peer.http_status:
                    return self._answer(peer.http_status, None)
                referenced, failed = [], []
                for data in _multipart_bodies(self.headers["Content-Type"], body):
                    ds = pydicom.dcmread(BytesIO(data))
                    entry = {"00081150": {"vr": "UI", "Value": [str(ds.SOPClassUID)]},
                             "00081155": {"vr": "UI", "Value": [str(ds.SOPInstanceUID)]}}
                    reason = peer.refuse.get(str(ds.SOPInstanceUID))
                    if reason is None:
                        peer.stored.setdefault(str(ds.StudyInstanceUID), set()).add(str(ds.SOPInstanceUID))
                        referenced.append(entry)
                    else:
                        failed.append({**entry, "00081197": {"vr": "US", "Value": [reason]}})
                answer: dict[str, Any] = {}
                if referenced:
                    answer["00081199"] = {"vr": "SQ", "Value": referenced}
                if failed:
                    answer["00081198"] = {"vr": "SQ", "Value": failed}
                self._answer(200 if not failed else 202 if referenced else 409, answer)

            def do_GET(self) -> None:
                parts = self.path.split("?")[0].strip("/").split("/")  # dicom-web/studies/<uid>/instances
                uids = sorted(peer.stored.get(parts[2], ())) if len(parts) == 4 and parts[3] == "instances" else []
                if not uids:
                    return self._answer(204, None)
                self._answer(200, [{"0020000D": {"vr": "UI", "Value": [parts[2]]},
                                    "00080018": {"vr": "UI", "Value": [u]}} for u in uids])

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/dicom-web"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _multipart_bodies(content_type: str, body: bytes) -> list[bytes]:
    """The parts of a multipart/related body, written independently of the box's parser."""
    import email.parser
    import email.policy

    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + body)
    return [part.get_payload(decode=True) for part in message.iter_parts()]


# -- the box, in-process ------------------------------------------------------------------------
@dataclass
class Box:
    config: Config
    db: Database
    store: InstanceStore
    site: Path

    def forwarder(self) -> Forwarder:
        return Forwarder(self.config, self.db, self.store)

    def drain(self, limit: int = 20) -> int:
        """Run attempts until nothing may be sent now (done, or backed off); returns how many ran."""
        forwarder = self.forwarder()
        try:
            for n in range(limit):
                if not forwarder.run_once():
                    return n
        finally:
            forwarder.stop()
        raise AssertionError(f"the outbox still had work after {limit} attempts")


def make_box(directory: Path, *tables: str, environ: dict[str, str] | None = None,
             data_dir: Path | None = None) -> Box:
    data = data_dir or directory / "data"
    directory.mkdir(parents=True, exist_ok=True)
    site = directory / "site.toml"
    site.write_text(f'[storage]\ndata_dir = "{data}"\nmin_free_mb = 0\n' + "\n".join(tables))
    config = load_config(site, environ=environ or {})
    database = open_database(config.data_dir)
    return Box(config, database, InstanceStore(config.data_dir, database), site)
