"""PDU-layer cases: mutated A-ASSOCIATE-RQs, and valid associations followed by a mutated C-STORE stream."""
from __future__ import annotations

import copy
import random
import struct
from dataclasses import dataclass, field

from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from tests.helpers import CALLING_AE

from .datasets import KEY_TAGS, deflate
from .elements import MIB, Source, fresh_uid, replace_value, top_element
from .protocol import VERIFICATION, AssociateRequest, Item, command_set, pdu, pdv, ui

# A claimed PDU length above this needs the "huge" lock (see PduLane): a box that allocates the
# claimed length up front would otherwise hold several of them at once on a shared machine.
HUGE_CLAIM = 64 * MIB
RAW = -1  # a "PDU" of raw bytes: garbage between PDUs, or a stream cut short


@dataclass
class Pdv:
    """A presentation data value item; ``length`` overrides the true one."""

    context_id: int
    control: int
    data: bytes
    length: int | None = None

    def encode(self) -> bytes:
        return pdv(self.context_id, self.control, self.data, self.length)


@dataclass
class Pdu:
    """A PDU of the stream sent after association: P-DATA with its PDVs, or any other type with
    a raw body."""

    pdu_type: int
    pdvs: list[Pdv] = field(default_factory=list)
    body: bytes = b""
    length: int | None = None
    reserved: int = 0

    def encode(self) -> bytes:
        if self.pdu_type == RAW:
            return self.body
        body = b"".join(p.encode() for p in self.pdvs) if self.pdu_type == 0x04 and self.pdvs else self.body
        return pdu(self.pdu_type, body, self.length, self.reserved)


@dataclass
class PduCase:
    """One connection of the PDU layer."""

    case_id: str
    kind: str                # "association": a mutated A-ASSOCIATE-RQ; "data": mutated PDUs after a valid one
    opening: bytes           # what is sent first
    payload: bytes           # sent after the A-ASSOCIATE-AC ("data" only)
    ops: list[str]
    calling_allowed: bool    # whether the calling AE title of ``opening`` is the allowed one
    huge: bool = False       # some length claims more than HUGE_CLAIM bytes

    def describe(self) -> str:
        return f"{self.case_id} ({self.kind}, {len(self.opening)}+{len(self.payload)} bytes): {'; '.join(self.ops)}"


def _claims(rng: random.Random, actual: int, limit: int = 0xFFFFFFFF) -> int:
    """A false length: mostly near the truth or small, sometimes 16 MiB, rarely 100 MiB, 4 GiB
    or anything (one in 25): enough to find a box that allocates what is claimed."""
    choices = [0, 1, 2, 5, max(0, actual - 1), actual + 1, actual + 1000, 16 * MIB, 100 * MIB, 0xFFFFFFFF,
               rng.randrange(limit + 1)]
    return rng.choices(choices, [10, 10, 10, 10, 10, 10, 10, 3, 1, 1, 1])[0] & limit


def _store_stream(rng: random.Random, source: Source, context_id: int) -> list[Pdu]:
    """A well-formed C-STORE (command, then the dataset in fragments of a random size)."""
    uid = fresh_uid(rng)
    sop = top_element(source.elements, KEY_TAGS["SOPInstanceUID"])
    data = source.body if sop is None else replace_value(source.body, sop, uid.encode(), "<" if source.little else ">")
    if source.deflated:
        data = deflate(data)
    size = rng.choice([512, 4096, 16384, 65536])
    pdus = [Pdu(0x04, [Pdv(context_id, 0x03, command_set(0x0001, 1, source.sop_class, uid))])]
    for off in range(0, len(data), size):
        last = off + size >= len(data)
        pdus.append(Pdu(0x04, [Pdv(context_id, 0x02 if last else 0x00, data[off:off + size])]))
    return pdus


class PduMutator:
    """Mutations of the PDU stream after a valid association."""

    def __init__(self, rng: random.Random, source: Source):
        self.rng = rng
        self.source = source
        self.ops: list[str] = []
        self.huge = False

    def _claim(self, actual: int) -> int:
        value = _claims(self.rng, actual)
        self.huge = self.huge or value > HUGE_CLAIM
        return value

    def _data_pdus(self, pdus: list[Pdu]) -> list[int]:
        return [i for i, p in enumerate(pdus) if p.pdu_type == 0x04 and p.pdvs]

    def _any_pdu(self, pdus: list[Pdu]) -> int:
        return self.rng.choice([i for i, p in enumerate(pdus) if p.pdu_type != RAW])

    def pdu_length(self, pdus: list[Pdu]) -> None:
        i = self._any_pdu(pdus)
        actual = len(pdus[i].encode()) - 6
        pdus[i].length = self._claim(actual)
        self.ops.append(f"PDU {i} claims {pdus[i].length} bytes (has {actual})")

    def pdv_length(self, pdus: list[Pdu]) -> None:
        i = self.rng.choice(self._data_pdus(pdus))
        item = self.rng.choice(pdus[i].pdvs)
        item.length = self._claim(len(item.data) + 2)
        self.ops.append(f"PDV in PDU {i} claims {item.length} bytes (has {len(item.data) + 2})")

    def context(self, pdus: list[Pdu]) -> None:
        i = self.rng.choice(self._data_pdus(pdus))
        item = self.rng.choice(pdus[i].pdvs)
        item.context_id = self.rng.choice([0, 2, 4, 7, 9, 127, 255, 3, 5])
        self.ops.append(f"PDV in PDU {i} on context {item.context_id}")

    def control(self, pdus: list[Pdu]) -> None:
        i = self.rng.choice(self._data_pdus(pdus))
        item = self.rng.choice(pdus[i].pdvs)
        item.control = self.rng.choice([0x00, 0x01, 0x02, 0x03, 0x04, 0x80, 0xFF, item.control ^ 1, item.control ^ 2])
        self.ops.append(f"PDV in PDU {i} control header 0x{item.control:02X}")

    def order(self, pdus: list[Pdu]) -> None:
        kind = self.rng.choice(["dataset first", "shuffle", "drop", "repeat", "command twice", "echo inside"])
        data = list(range(1, len(pdus)))
        if kind == "dataset first":
            pdus.append(pdus.pop(0))
        elif kind == "shuffle":
            tail = pdus[1:]
            self.rng.shuffle(tail)
            pdus[1:] = tail
        elif kind == "drop" and data:
            del pdus[self.rng.choice(data)]
        elif kind == "repeat" and data:
            j = self.rng.choice(data)
            pdus.insert(j, Pdu(0x04, [Pdv(p.context_id, p.control, p.data) for p in pdus[j].pdvs]))
        elif kind == "command twice":
            commands = [p.pdvs[0].data for p in pdus if p.pdvs and p.pdvs[0].control & 0x01]
            again = commands[0] if commands else command_set(0x0001, 1, self.source.sop_class, "1.2.3")
            pdus.insert(self.rng.randrange(1, len(pdus) + 1), Pdu(0x04, [Pdv(1, 0x03, again)]))
        else:
            echo = command_set(0x0030, 2, VERIFICATION, has_data=False)
            pdus.insert(self.rng.randrange(1, len(pdus) + 1), Pdu(0x04, [Pdv(3, 0x03, echo)]))
        self.ops.append(f"order: {kind}")

    def pdu_type(self, pdus: list[Pdu]) -> None:
        i = self._any_pdu(pdus)
        new = self.rng.choice([0x00, 0x08, 0x09, 0x10, 0x41, 0x7F, 0xFF, 0x01, 0x02, 0x03, 0x06])
        body = pdus[i].encode()[6:]
        pdus[i] = Pdu(new, body=body)
        self.ops.append(f"PDU {i} type 0x{new:02X}")

    def interrupt(self, pdus: list[Pdu]) -> None:
        kind = self.rng.choice([(0x05, b"\0\0\0\0", "A-RELEASE-RQ"), (0x07, b"\0\0\0\0", "A-ABORT"),
                                (0x06, b"\0\0\0\0", "A-RELEASE-RP"), (0x05, b"\0" * 40, "long A-RELEASE-RQ")])
        pos = self.rng.randrange(len(pdus) + 1)
        pdus.insert(pos, Pdu(kind[0], body=kind[1]))
        self.ops.append(f"{kind[2]} at {pos}")

    def reserved(self, pdus: list[Pdu]) -> None:
        i = self._any_pdu(pdus)
        pdus[i].reserved = self.rng.randrange(1, 256)
        self.ops.append(f"PDU {i} reserved byte 0x{pdus[i].reserved:02X}")

    def tiny(self, pdus: list[Pdu]) -> None:
        i = self.rng.choice(self._data_pdus(pdus)[1:] or self._data_pdus(pdus))
        item = pdus[i].pdvs[0]
        size = self.rng.choice([1, 2, 7])
        pieces = [item.data[o:o + size] for o in range(0, len(item.data), size)] or [b""]
        pdus[i].pdvs = [Pdv(item.context_id, item.control & ~0x02, p) for p in pieces]
        pdus[i].pdvs[-1].control = item.control
        self.ops.append(f"PDU {i} split into {len(pieces)} PDVs of {size} bytes")

    def empty(self, pdus: list[Pdu]) -> None:
        kind = self.rng.choice(["no PDVs", "PDV header only", "PDV of one byte"])
        blob = {"no PDVs": b"", "PDV header only": pdv(1, 0x00, b""), "PDV of one byte": struct.pack(">IB", 1, 1)}[kind]
        pdus.insert(self.rng.randrange(len(pdus) + 1), Pdu(0x04, body=blob))
        self.ops.append(f"P-DATA with {kind}")

    def command(self, pdus: list[Pdu]) -> None:
        cmd_pdus = [p for p in pdus if p.pdvs and p.pdvs[0].control & 0x01]
        if not cmd_pdus:
            return self.pdv_length(pdus)
        item = cmd_pdus[0].pdvs[0]
        kind = self.rng.choice(["flip", "cut", "field", "no data flag", "group length", "huge element", "wrong class",
                                "no class"])
        sop_uid = fresh_uid(self.rng)
        if kind == "flip":
            raw = bytearray(item.data)
            for _ in range(self.rng.randint(1, 4)):
                raw[self.rng.randrange(len(raw))] ^= 1 << self.rng.randrange(8)
            item.data = bytes(raw)
        elif kind == "cut":
            item.data = item.data[:self.rng.randrange(len(item.data))]
        elif kind == "field":
            field_value = self.rng.choice([0x0020, 0x0FFF, 0x8001, 0x0120, 0x0000, 0x0FFF, 0x0010, 0x0021])
            item.data = command_set(field_value, 1, self.source.sop_class, sop_uid)
            kind += f" 0x{field_value:04X}"
        elif kind == "no data flag":
            item.data = command_set(0x0001, 1, self.source.sop_class, sop_uid, has_data=False)
        elif kind == "group length":
            group_length = self.rng.choice([0, 1, 0xFFFFFFFF, len(item.data) * 3])
            item.data = item.data[:8] + struct.pack("<I", group_length) + item.data[12:]
        elif kind == "huge element":
            item.data = item.data + struct.pack("<HHI", 0x0000, 0x0902, self.rng.choice([0xFFFFFFF0, 1 << 24, 3]))
        elif kind == "wrong class":
            item.data = command_set(0x0001, 1, "1.2.840.10008.5.1.4.1.1.481.5", sop_uid)
        else:
            item.data = item.data[:8 + 4] + item.data[8 + 4 + 8 + len(ui(self.source.sop_class)):]
        self.ops.append(f"command: {kind}")

    def cut(self, pdus: list[Pdu]) -> None:
        raw = _encode_stream(pdus)
        pos = self.rng.randrange(len(raw))
        pdus[:] = [Pdu(RAW, body=raw[:pos])]
        self.ops.append(f"stream cut at {pos} of {len(raw)} bytes")

    def garbage(self, pdus: list[Pdu]) -> None:
        count = self.rng.choice([1, 6, 100, 4096])
        pos = self.rng.randrange(len(pdus) + 1)
        pdus.insert(pos, Pdu(RAW, body=bytes(self.rng.randrange(256) for _ in range(count))))
        self.ops.append(f"{count} random bytes before PDU {pos}")

    def echo_with_data(self, pdus: list[Pdu]) -> None:
        echo = Pdv(3, 0x03, command_set(0x0030, 2, VERIFICATION))
        dataset = Pdv(3, 0x02, b"\x08\x00\x16\x00\x02\x00\x00\x00AB")
        pdus.insert(self.rng.randrange(len(pdus) + 1), Pdu(0x04, [echo, dataset]))
        self.ops.append("C-ECHO with a dataset")

    OPERATIONS: tuple[tuple[str, int], ...] = (
        ("pdu_length", 14), ("pdv_length", 14), ("context", 9), ("control", 10), ("order", 9), ("pdu_type", 8),
        ("interrupt", 5), ("reserved", 3), ("tiny", 4), ("empty", 4), ("command", 10), ("cut", 6),
        ("garbage", 4), ("echo_with_data", 2),
    )

    def mutate(self, pdus: list[Pdu]) -> None:
        names = [n for n, _ in self.OPERATIONS]
        weights = [w for _, w in self.OPERATIONS]
        for _ in range(self.rng.choices([1, 2], [7, 3])[0]):
            if all(p.pdu_type == RAW for p in pdus):
                break  # already cut to raw bytes
            op = self.rng.choices(names, weights)[0]
            if op in ("pdv_length", "context", "control", "tiny") and not self._data_pdus(pdus):
                op = "pdu_length"
            getattr(self, op)(pdus)


def _encode_stream(pdus: list[Pdu]) -> bytes:
    return b"".join(p.encode() for p in pdus)


class AssociateMutator:
    """Mutations of an A-ASSOCIATE-RQ."""

    def __init__(self, rng: random.Random, request: AssociateRequest):
        self.rng = rng
        self.request = request
        self.items = request.items()
        self.ops: list[str] = []
        self.raw: bytes | None = None   # set once a byte-level operation has run
        self.huge = False

    def rq_length(self) -> None:
        actual = len(self.request.encode(self.items)) - 6
        self.request.length = _claims(self.rng, actual)
        self.huge = self.request.length > HUGE_CLAIM
        self.ops.append(f"A-ASSOCIATE-RQ claims {self.request.length} bytes (has {actual})")

    def version(self) -> None:
        self.request.version = self.rng.choice([0, 2, 0x8000, 0xFFFF])
        self.ops.append(f"protocol version {self.request.version}")

    def titles(self) -> None:
        which = self.rng.choice(["called", "calling"])
        value = self.rng.choice([b" " * 16, b"\0" * 16, b"ATTACKER", CALLING_AE.lower().encode(), b"MODALITY\\X",
                                 bytes(self.rng.randrange(256) for _ in range(16)), b"\xc3\xa9CHO", b"EDGE"])
        setattr(self.request, which, value)
        self.ops.append(f"{which} AE {value!r}")

    def item_length(self) -> None:
        target = self.rng.choice([x for i in self.items for x in i.walk()])
        actual = len(target.encode()) - 4
        target.length = self.rng.choice([0, 1, 3, max(0, actual - 1), actual + 1, actual + 64, 0xFFFF,
                                         self.rng.randrange(0x10000)])
        self.ops.append(f"item 0x{target.item_type:02X} claims {target.length} bytes (has {actual})")

    def item_type(self) -> None:
        target = self.rng.choice([x for i in self.items for x in i.walk()])
        old, target.item_type = target.item_type, self.rng.choice([0x00, 0x11, 0x21, 0x31, 0x41, 0x5F, 0x60, 0xFF])
        self.ops.append(f"item 0x{old:02X} typed 0x{target.item_type:02X}")

    def drop_item(self) -> None:
        kind = self.rng.choice(["application context", "presentation contexts", "user information",
                                "abstract syntax", "transfer syntaxes", "maximum length"])
        if kind == "application context":
            self.items = [i for i in self.items if i.item_type != 0x10]
        elif kind == "presentation contexts":
            self.items = [i for i in self.items if i.item_type != 0x20]
        elif kind == "user information":
            self.items = [i for i in self.items if i.item_type != 0x50]
        else:
            wanted = {"abstract syntax": 0x30, "transfer syntaxes": 0x40, "maximum length": 0x51}[kind]
            for i in self.items:
                i.subs = [s for s in i.subs if s.item_type != wanted]
        self.ops.append(f"no {kind}")

    def dup_item(self) -> None:
        i = self.rng.randrange(len(self.items))
        self.items.insert(i, copy.deepcopy(self.items[i]))
        self.ops.append(f"item 0x{self.items[i].item_type:02X} twice")

    def many(self) -> None:
        kind = self.rng.choice(["contexts", "syntaxes"])
        pc = next((i for i in self.items if i.item_type == 0x20), None)
        if kind == "contexts" or pc is None:
            kind = "contexts"
            count = self.rng.choice([127, 128, 129, 255, 400])
            syntaxes = [Item(0x30, b"1.2.840.10008.5.1.4.1.1.2"), Item(0x40, b"1.2.840.10008.1.2")]
            pcs = [Item(0x20, bytes([(2 * n + 1) & 0xFF, 0, 0, 0]), copy.deepcopy(syntaxes)) for n in range(count)]
            self.items = [self.items[0]] + pcs + self.items[1:]
        else:
            count = self.rng.choice([100, 1000, 5000])
            pc.subs += [Item(0x40, f"1.2.3.{n}".encode()) for n in range(count)]
        self.ops.append(f"{count} {kind}")

    def uid_value(self) -> None:
        target = self.rng.choice([x for i in self.items for x in i.walk() if x.item_type in (0x10, 0x30, 0x40, 0x52)])
        target.head = self.rng.choice([b"", b"\0", b"1." * 32, b"9" * 10000,
                                       bytes(self.rng.randrange(256) for _ in range(64)),
                                       "1.2.\u00e9".encode(), b"1.2.840.10008.1.2\0\0\0\0"])
        self.ops.append(f"item 0x{target.item_type:02X} value of {len(target.head)} bytes")

    def user_info(self) -> None:
        user = next((i for i in self.items if i.item_type == 0x50), None)
        if user is None:
            return self.item_type()
        kind = self.rng.choice(["max length", "max length field", "implementation", "identity", "async", "role",
                                "extended"])
        if kind == "max length":
            _sub(user, 0x51).head = struct.pack(">I", self.rng.choice([0, 1, 6, 0xFFFFFFFF]))
        elif kind == "max length field":
            _sub(user, 0x51).head = self.rng.choice([b"", b"\0\1", b"\0" * 8])
        elif kind == "implementation":
            _sub(user, 0x52).head = self.rng.choice([b"", b"1" * 65, b"9" * 5000])
        elif kind == "identity":
            identity_type, length = self.rng.choice([1, 2, 5, 0xFF]), self.rng.choice([0, 4, 0xFFFF])
            user.subs.append(Item(0x58, bytes([identity_type, 1]) + struct.pack(">H", length) + b"user"))
        elif kind == "async":
            user.subs.append(Item(0x53, self.rng.choice([b"", b"\0\0\0\0", b"\xff\xff\xff\xff", b"\1"])))
        elif kind == "role":
            user.subs.append(Item(0x54, struct.pack(">H", self.rng.choice([0, 3, 0xFFFF])) + b"1.2.3" + b"\1\1"))
        else:
            item_type, length = self.rng.choice([0x56, 0x57]), self.rng.choice([0, 0xFFFF])
            user.subs.append(Item(item_type, struct.pack(">H", length) + b"1.2" + b"\0" * 3))
        self.ops.append(f"user information: {kind}")

    def bitflip(self) -> None:
        raw = bytearray(self.encode())
        for _ in range(self.rng.randint(1, 8)):
            pos = self.rng.randrange(6, len(raw)) if len(raw) > 6 else self.rng.randrange(len(raw))
            raw[pos] ^= 1 << self.rng.randrange(8)
            self.ops.append(f"flip at {pos}")
        self.raw = bytes(raw)

    def truncate(self) -> None:
        raw = self.encode()
        pos = self.rng.randrange(1, len(raw)) if len(raw) > 1 else 0
        self.raw = raw[:pos]
        self.ops.append(f"cut at {pos} of {len(raw)}")

    def first_pdu(self) -> None:
        kind = self.rng.choice([(0x04, pdv(1, 0x03, b"\0" * 8), "P-DATA"), (0x05, b"\0" * 4, "A-RELEASE-RQ"),
                                (0x07, b"\0" * 4, "A-ABORT"), (0x02, self.encode()[6:], "A-ASSOCIATE-AC"),
                                (0x03, b"\0\1\1\1", "A-ASSOCIATE-RJ"), (0x06, b"\0" * 4, "A-RELEASE-RP"),
                                (0x42, b"\0" * 10, "unknown type 0x42"), (0x00, b"", "type 0 empty")])
        self.raw = pdu(kind[0], kind[1]) + (self.encode() if self.rng.random() < 0.5 else b"")
        self.ops.append(f"{kind[2]} first")

    def trailing(self) -> None:
        extra = self.rng.choice([self.encode(), bytes(self.rng.randrange(256) for _ in range(64)), pdu(0x04, b""),
                                 b"\x01"])
        self.raw = self.encode() + extra
        self.ops.append(f"{len(extra)} bytes straight after the request")

    def encode(self) -> bytes:
        return self.raw if self.raw is not None else self.request.encode(self.items)

    OPERATIONS: tuple[tuple[str, int], ...] = (
        ("rq_length", 12), ("version", 4), ("titles", 8), ("item_length", 16), ("item_type", 8), ("drop_item", 8),
        ("dup_item", 4), ("many", 4), ("uid_value", 8), ("user_info", 10), ("bitflip", 12), ("truncate", 6),
        ("first_pdu", 6), ("trailing", 4),
    )
    BYTE_LEVEL = frozenset({"bitflip", "truncate", "first_pdu", "trailing"})

    def mutate(self) -> bytes:
        names = [n for n, _ in self.OPERATIONS]
        weights = [w for _, w in self.OPERATIONS]
        for _ in range(self.rng.choices([1, 2], [7, 3])[0]):
            op = self.rng.choices(names, weights)[0]
            if self.raw is not None and op not in self.BYTE_LEVEL:
                continue  # the structure is gone: item-level operations no longer apply
            getattr(self, op)()
        return self.encode()


def _sub(item: Item, sub_type: int) -> Item:
    """``item``'s first sub-item of ``sub_type``, added if an earlier mutation dropped it."""
    found = next((s for s in item.subs if s.item_type == sub_type), None)
    if found is None:
        found = Item(sub_type)
        item.subs.append(found)
    return found


def calling_title_allowed(opening: bytes) -> bool:
    """Whether a box could read ``opening`` as an A-ASSOCIATE-RQ from the allowed calling AE."""
    if len(opening) < 42 or opening[0] != 0x01:
        return False
    return opening[26:42].decode("latin-1").strip() == CALLING_AE


def pdu_case(seed: int, index: int, corpus: list[Source]) -> PduCase:
    """The PDU-layer case ``P<index>``: a third are mutated A-ASSOCIATE-RQs, the rest a valid
    association followed by a mutated C-STORE stream."""
    rng = random.Random(f"{seed}/P/{index}")
    source = rng.choice(corpus)
    contexts = [(1, source.sop_class, [source.syntax]), (3, VERIFICATION, [str(ImplicitVRLittleEndian)]),
                (5, source.sop_class, [str(ExplicitVRLittleEndian)])]
    request = AssociateRequest(contexts, max_pdu=rng.choice([0, 16384, 65536]))
    if rng.random() < 1 / 3:
        mutator = AssociateMutator(rng, request)
        opening = mutator.mutate()
        return PduCase(f"P{index}", "association", opening, b"", mutator.ops, calling_title_allowed(opening),
                       mutator.huge)
    pdus = _store_stream(rng, source, 1)
    pdus.append(Pdu(0x05, body=b"\0\0\0\0"))
    stream_mutator = PduMutator(rng, source)
    stream_mutator.mutate(pdus)
    stream_mutator.ops.insert(0, f"C-STORE of {source.name}")
    return PduCase(f"P{index}", "data", request.encode(), _encode_stream(pdus), stream_mutator.ops, True,
                   stream_mutator.huge)
