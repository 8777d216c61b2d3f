"""The DICOM upper layer as bytes: PDUs, command sets, A-ASSOCIATE-RQ as a tree of items, and a
conforming requestor on a socket (the dataset layer's sender)."""
from __future__ import annotations

import socket
import struct
import time
from dataclasses import dataclass, field

from tests.helpers import CALLING_AE

from .elements import MIB

CALLED_AE = "EDGE"
VERIFICATION = "1.2.840.10008.1.1"
APPLICATION_CONTEXT = b"1.2.840.10008.3.1.1.1"
IMPLEMENTATION_UID = b"1.2.826.0.1.3680043.8.498.1"


def pdu(pdu_type: int, body: bytes, length: int | None = None, reserved: int = 0) -> bytes:
    return struct.pack(">BBI", pdu_type, reserved, len(body) if length is None else length & 0xFFFFFFFF) + body


def pdv(context_id: int, control: int, data: bytes, length: int | None = None) -> bytes:
    length = len(data) + 2 if length is None else length & 0xFFFFFFFF
    return struct.pack(">IBB", length, context_id & 0xFF, control & 0xFF) + data


def _implicit(tag: int, value: bytes) -> bytes:
    return struct.pack("<HHI", tag >> 16, tag & 0xFFFF, len(value)) + value


def ui(uid: str) -> bytes:
    raw = uid.encode("latin-1")
    return raw + b"\0" if len(raw) % 2 else raw


def command_set(command: int, message_id: int, sop_class: str, sop_instance: str = "", has_data: bool = True,
                extra: bytes = b"") -> bytes:
    """A DIMSE command set, implicit VR little endian, with its group length."""
    body = _implicit(0x00000002, ui(sop_class)) + _implicit(0x00000100, struct.pack("<H", command))
    body += _implicit(0x00000110, struct.pack("<H", message_id))
    if command == 0x0001:
        body += _implicit(0x00000700, struct.pack("<H", 0))
    body += _implicit(0x00000800, struct.pack("<H", 0x0000 if has_data else 0x0101))
    if sop_instance:
        body += _implicit(0x00001000, ui(sop_instance))
    body += extra
    return _implicit(0x00000000, struct.pack("<I", len(body))) + body


def parse_command(data: bytes) -> dict[int, bytes]:
    """Elements of an implicit VR little endian command set; ValueError if malformed."""
    out, off = {}, 0
    while off < len(data):
        if off + 8 > len(data):
            raise ValueError("command element header truncated")
        group, elem, length = struct.unpack_from("<HHI", data, off)
        if off + 8 + length > len(data):
            raise ValueError("command element runs past the end")
        out[group << 16 | elem] = data[off + 8:off + 8 + length]
        off += 8 + length
    return out


def _item(item_type: int, payload: bytes, length: int | None = None) -> bytes:
    # A payload longer than 65535 bytes (thousands of syntaxes) wraps round: one more lie to the box.
    return struct.pack(">BBH", item_type, 0, (len(payload) if length is None else length) & 0xFFFF) + payload


@dataclass
class Item:
    """An A-ASSOCIATE-RQ variable item or sub-item, kept as a tree so that any length can be
    corrupted after the fact."""

    item_type: int
    head: bytes = b""
    subs: list[Item] = field(default_factory=list)
    length: int | None = None

    def encode(self) -> bytes:
        return _item(self.item_type, self.head + b"".join(s.encode() for s in self.subs), self.length)

    def walk(self) -> list[Item]:
        return [self] + [x for s in self.subs for x in s.walk()]


@dataclass
class AssociateRequest:
    """An A-ASSOCIATE-RQ from the allowed calling AE proposing ``contexts`` (id, abstract syntax,
    transfer syntaxes); every field can be set to something false."""

    contexts: list[tuple[int, str, list[str]]]
    called: bytes = CALLED_AE.ljust(16).encode()
    calling: bytes = CALLING_AE.ljust(16).encode()
    version: int = 1
    max_pdu: int = 65536
    length: int | None = None
    extra_items: list[Item] = field(default_factory=list)

    def items(self) -> list[Item]:
        pcs = [Item(0x20, bytes([cid, 0, 0, 0]),
                    [Item(0x30, abstract.encode()), *(Item(0x40, ts.encode()) for ts in syntaxes)])
               for cid, abstract, syntaxes in self.contexts]
        user = Item(0x50, subs=[Item(0x51, struct.pack(">I", self.max_pdu)), Item(0x52, IMPLEMENTATION_UID)])
        return [Item(0x10, APPLICATION_CONTEXT)] + pcs + [user] + self.extra_items

    def encode(self, items: list[Item] | None = None) -> bytes:
        # AE titles are padded with spaces (struct's "16s" would pad with NULs).
        called, calling = self.called[:16].ljust(16), self.calling[:16].ljust(16)
        fixed = struct.pack(">H2x16s16s32x", self.version & 0xFFFF, called, calling)
        items = self.items() if items is None else items
        return pdu(0x01, fixed + b"".join(i.encode() for i in items), self.length)


def parse_associate_ac(body: bytes) -> dict[int, int]:
    """Presentation context id -> result (0 = acceptance) from an A-ASSOCIATE-AC body."""
    results, off = {}, 68
    while off + 4 <= len(body):
        item_type, _r, length = struct.unpack_from(">BBH", body, off)
        if item_type == 0x21 and length >= 4:
            results[body[off + 4]] = body[off + 6]
        off += 4 + length
    return results


class PeerError(Exception):
    """The box did not answer as a DICOM peer must where an answer was due."""


class Timeout(PeerError):
    """No answer (or no end of the connection) within the deadline."""


class Closed(PeerError):
    """The box closed or reset the connection."""


class Aborted(PeerError):
    """The box sent an A-ABORT."""


class Refused(PeerError):
    """The box sent an A-ASSOCIATE-RJ; ``transient`` for a limit (retry later)."""

    def __init__(self, result: int, source: int, reason: int):
        super().__init__(f"association rejected: result {result} source {source} reason {reason}")
        self.transient = result == 2


def recv_exact(sock: socket.socket, count: int, deadline: float) -> bytes:
    chunks, got = [], 0
    while got < count:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise Timeout(f"no answer within the deadline ({got} of {count} bytes)")
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(min(count - got, 1 << 20))
        except TimeoutError:
            raise Timeout(f"no answer within the deadline ({got} of {count} bytes)") from None
        except OSError as exc:
            raise Closed(f"connection reset: {exc}") from None
        if not chunk:
            raise Closed(f"closed after {got} of {count} bytes")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def recv_pdu(sock: socket.socket, deadline: float) -> tuple[int, bytes]:
    pdu_type, _reserved, length = struct.unpack(">BBI", recv_exact(sock, 6, deadline))
    if length > 16 * MIB:
        raise PeerError(f"the box sent a PDU of type {pdu_type} claiming {length} bytes")
    return pdu_type, recv_exact(sock, length, deadline)


def connect(port: int, timeout: float) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


class StoreAssociation:
    """The dataset layer's sender, a conforming requestor: one association proposing every
    (SOP class, syntax) pair, many C-STOREs over it."""

    FRAGMENT = 32 * 1024

    def __init__(self, port: int, pairs: list[tuple[str, str]], answer_timeout: float, refused_for: float):
        self.port = port
        self.pairs = pairs
        self.answer_timeout = answer_timeout
        self.refused_for = refused_for
        self.sock: socket.socket | None = None
        self.context_of: dict[tuple[str, str], int] = {}
        self.message_id = 0
        self.refusals = 0

    def open(self) -> None:
        """Associate; a transient refusal (a limit) is retried for ``refused_for`` seconds."""
        contexts = [(2 * i + 1, sop_class, [syntax]) for i, (sop_class, syntax) in enumerate(self.pairs)]
        give_up = time.monotonic() + self.refused_for
        while True:
            sock = connect(self.port, self.answer_timeout)
            try:
                sock.sendall(AssociateRequest(contexts).encode())
                pdu_type, body = recv_pdu(sock, time.monotonic() + self.answer_timeout)
            except (PeerError, OSError):
                sock.close()
                raise
            if pdu_type == 0x02:
                break
            sock.close()
            if pdu_type == 0x03 and body[1] == 2 and time.monotonic() < give_up:
                self.refusals += 1
                time.sleep(0.05)
                continue
            if pdu_type == 0x03:
                raise Refused(body[1], body[2], body[3])
            raise PeerError(f"answer to a well-formed A-ASSOCIATE-RQ was PDU type {pdu_type}")
        results = parse_associate_ac(body)
        refused = [self.pairs[(cid - 1) // 2] for cid, _a, _s in contexts if results.get(cid) != 0]
        if refused:
            sock.close()
            raise PeerError(f"presentation contexts refused: {refused[:3]}")
        self.context_of = {pair: 2 * i + 1 for i, pair in enumerate(self.pairs)}
        self.sock = sock

    def store(self, sop_class: str, sop_instance: str, syntax: str, data: bytes) -> int:
        """The C-STORE-RSP status; raises Aborted, Closed or Timeout."""
        if self.sock is None:
            self.open()
        assert self.sock is not None
        cid = self.context_of[(sop_class, syntax)]
        self.message_id = self.message_id % 65535 + 1
        out = [pdu(0x04, pdv(cid, 0x03, command_set(0x0001, self.message_id, sop_class, sop_instance)))]
        for off in range(0, max(len(data), 1), self.FRAGMENT):
            last = off + self.FRAGMENT >= len(data)
            out.append(pdu(0x04, pdv(cid, 0x02 if last else 0x00, data[off:off + self.FRAGMENT])))
        try:
            self.sock.sendall(b"".join(out))
            return self._response(time.monotonic() + self.answer_timeout)
        except OSError as exc:
            self.drop()
            raise Closed(f"connection failed while sending: {exc}") from None
        except PeerError:
            self.drop()
            raise

    def _response(self, deadline: float) -> int:
        assert self.sock is not None
        command = b""
        while True:
            pdu_type, body = recv_pdu(self.sock, deadline)
            if pdu_type == 0x07:
                raise Aborted(f"A-ABORT source {body[2]} reason {body[3]}")
            if pdu_type != 0x04:
                raise PeerError(f"PDU type {pdu_type} where a C-STORE-RSP was due")
            off = 0
            while off + 6 <= len(body):
                (length,) = struct.unpack_from(">I", body, off)
                control = body[off + 5]
                command += body[off + 6:off + 4 + length]
                off += 4 + length
                if control & 0x03 == 0x03:
                    return self._status(command)

    def _status(self, command: bytes) -> int:
        try:
            elements = parse_command(command)
            responded = struct.unpack("<H", elements[0x00000120])[0]
            status = struct.unpack("<H", elements[0x00000900])[0]
        except (KeyError, ValueError, struct.error) as exc:
            raise PeerError(f"malformed C-STORE-RSP: {type(exc).__name__}: {exc}") from None
        if responded != self.message_id:
            raise PeerError(f"response to message {responded}, expected {self.message_id}")
        return status

    def drop(self) -> None:
        if self.sock is not None:
            self.sock.close()
        self.sock = None

    def release(self) -> None:
        if self.sock is None:
            return
        try:
            self.sock.sendall(pdu(0x05, b"\0\0\0\0"))
            recv_pdu(self.sock, time.monotonic() + self.answer_timeout)
        except (PeerError, OSError):
            pass  # the box may answer a release with an abort or a close; either ends it
        self.drop()
