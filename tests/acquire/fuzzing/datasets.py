"""Dataset-layer cases: real files, a fresh SOP Instance UID each, mutated 1-3 times."""
from __future__ import annotations

import random
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import pydicom
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
)

from .elements import (
    ALL_VRS,
    ITEM,
    MIB,
    PIXEL_DATA,
    UNDEFINED,
    Element,
    Source,
    dictionary_vr,
    fresh_uid,
    pack_length,
    replace_value,
    top_element,
    walk,
)

# Real files of the modalities a clinic box receives, in every transfer syntax it accepts: CR,
# CT, MR, US, RT dose, SEG and SR; single- and multi-frame; native, JPEG, JPEG-LS, JPEG 2000, RLE,
# big endian, implicit VR and deflated.  All below 250 KB, so 7,000 of them fit the test budget.
DATASET_CORPUS = (
    "CT_small.dcm",                       # CT, explicit VR little endian
    "693_J2KI.dcm",                       # CT, JPEG 2000
    "MR_small_implicit.dcm",              # MR, implicit VR
    "MR_small_bigendian.dcm",             # MR, explicit VR big endian
    "MR_small_RLE.dcm",                   # MR, RLE
    "MR_small_jpeg_ls_lossless.dcm",      # MR, JPEG-LS
    "emri_small.dcm",                     # enhanced MR, 10 frames, native
    "emri_small_jpeg_2k_lossless.dcm",    # enhanced MR, 10 frames, JPEG 2000
    "RG3_J2KI.dcm",                       # CR, JPEG 2000 lossy
    "US1_J2KI.dcm",                       # US, JPEG 2000
    "OBXXXX1A_rle_2frame.dcm",            # US multi-frame, RLE
    "examples_ybr_color.dcm",             # US multi-frame, 30 frames, JPEG baseline
    "JPGExtended.dcm",                    # NM, JPEG extended
    "JPEG-LL.dcm",                        # NM, JPEG lossless
    "image_dfl.dcm",                      # SC, deflated
    "rtdose.dcm",                         # RT dose, 15 frames, implicit VR
    "liver_1frame.dcm",                   # SEG
    "test-SR.dcm",                        # SR, nested sequences
)
# Small ones for the PDU layer, where the framing is mutated and the dataset is only cargo.
PDU_CORPUS = ("CT_small.dcm", "MR_small_implicit.dcm", "SC_rgb_rle.dcm", "image_dfl.dcm", "test-SR.dcm")

UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian)
# Offered for every SOP class so that a dataset can be sent under a syntax it is not encoded in.
FOREIGN_SYNTAXES = (JPEG2000Lossless, JPEGBaseline8Bit)


def deflate(data: bytes) -> bytes:
    """Raw deflate (no zlib header or checksum), as the Deflated Explicit VR syntax carries it."""
    return zlib.compress(data)[2:-4]


def requested_contexts(corpus: list[Source]) -> list[tuple[str, str]]:
    """(SOP class, transfer syntax) pairs the dataset layer proposes: each file's own, and for
    each SOP class the uncompressed syntaxes and two compressed ones."""
    pairs = {(s.sop_class, s.syntax) for s in corpus}
    for sop_class in {s.sop_class for s in corpus}:
        pairs.update((sop_class, str(ts)) for ts in UNCOMPRESSED + FOREIGN_SYNTAXES)
    return sorted(pairs)


@dataclass
class DatasetCase:
    """One C-STORE of the dataset layer."""

    case_id: str
    source: str
    sop_class: str
    request_uid: str     # the C-STORE's Affected SOP Instance UID
    syntax: str          # the presentation context's transfer syntax
    data: bytes          # the dataset bytes sent
    ops: list[str]

    def describe(self) -> str:
        return (f"{self.case_id}: {self.source} as {pydicom.uid.UID(self.syntax).name}, {len(self.data)} bytes: "
                f"{'; '.join(self.ops)}")


KEY_TAGS = {
    "SOPInstanceUID": 0x00080018, "SOPClassUID": 0x00080016, "StudyInstanceUID": 0x0020000D,
    "SeriesInstanceUID": 0x0020000E, "PixelData": PIXEL_DATA, "Rows": 0x00280010, "Columns": 0x00280011,
    "BitsAllocated": 0x00280100, "BitsStored": 0x00280101, "SamplesPerPixel": 0x00280002,
    "NumberOfFrames": 0x00280008, "PixelRepresentation": 0x00280103, "PlanarConfiguration": 0x00280006,
    "PhotometricInterpretation": 0x00280004, "PatientName": 0x00100010, "SpecificCharacterSet": 0x00080005,
    "StudyDate": 0x00080020, "InstanceNumber": 0x00200013, "Modality": 0x00080060,
}
NASTY_TEXT = [b"", b"0", b"-1", b"99999999", b"\\\\\\\\", b"A" * 10000, b"../../../../etc/passwd",
              b"\0" * 8, b"\xff\xfe\xfd", "Gr\u00fc\u00df\u00e9 \u5c71\u7530".encode("utf-8"), b"1.2.3\\4.5.6",
              b"ISO 2022 IR 87", b"ISO_IR 192", b"NOT A CHARSET", b"%s%n%x" * 4, b"<script>x</script>"]


def _binary_values(endian: str) -> list[bytes]:
    return [b"", b"\x01", struct.pack(endian + "H", 0), struct.pack(endian + "H", 0xFFFF),
            struct.pack(endian + "I", 0xFFFFFFFF), struct.pack(endian + "H", 1) * 3]


class DatasetMutator:
    """Mutations of one source's dataset bytes, driven by one case's generator."""

    def __init__(self, rng: random.Random, source: Source):
        self.rng = rng
        self.source = source
        self.endian = "<" if source.little else ">"
        self.ops: list[str] = []

    def _elements(self, data: bytes) -> list[Element]:
        try:
            return walk(data, self.source.implicit, self.source.little)
        except (ValueError, struct.error):
            return []  # already damaged by an earlier operation: only byte-level ones apply

    def _pick(self, elements: list[Element], predicate: Callable[[Element], bool] = lambda e: True) -> Element | None:
        candidates = [e for e in elements if predicate(e)]
        return self.rng.choice(candidates) if candidates else None

    # Each operation returns the new bytes and appends what it did to self.ops.
    def bitflip(self, data: bytes, elements: list[Element]) -> bytes:
        out = bytearray(data)
        for _ in range(self.rng.randint(1, 8)):
            el = self._pick(elements) if elements and self.rng.random() < 0.5 else None
            if el is not None:  # a tag, VR or length byte, where the structure is
                pos = self.rng.randrange(el.start, el.value)
            else:
                pos = self.rng.randrange(min(len(out), 2048) if self.rng.random() < 0.6 else len(out))
            bit = self.rng.randrange(8)
            out[pos] ^= 1 << bit
            self.ops.append(f"flip bit {bit} at {pos}")
        return bytes(out)

    def insert(self, data: bytes, elements: list[Element]) -> bytes:
        el = self._pick(elements)
        pos = el.start if el is not None and self.rng.random() < 0.6 else self.rng.randrange(len(data) + 1)
        kind = self.rng.choice(["random", "item", "delimiter", "zeros"])
        count = self.rng.randint(1, 64)
        blob = {
            "random": bytes(self.rng.randrange(256) for _ in range(count)),
            "item": struct.pack(self.endian + "HHI", 0xFFFE, 0xE000, self.rng.choice([0, 8, UNDEFINED])),
            "delimiter": struct.pack(self.endian + "HHI", 0xFFFE, self.rng.choice([0xE00D, 0xE0DD]), 0),
            "zeros": b"\0" * count,
        }[kind]
        self.ops.append(f"insert {len(blob)} {kind} bytes at {pos}")
        return data[:pos] + blob + data[pos:]

    def delete(self, data: bytes, elements: list[Element]) -> bytes:
        pos = self.rng.randrange(len(data))
        count = self.rng.randint(1, 256)
        self.ops.append(f"delete {count} bytes at {pos}")
        return data[:pos] + data[pos + count:]

    def truncate(self, data: bytes, elements: list[Element]) -> bytes:
        el = self._pick(elements)
        if el is not None and self.rng.random() < 0.5:
            pos = max(0, min(len(data) - 1, self.rng.choice([el.start, el.value, el.end]) + self.rng.randint(-2, 2)))
        else:
            pos = self.rng.randrange(len(data))
        self.ops.append(f"truncate to {pos} bytes")
        return data[:pos]

    def length(self, data: bytes, elements: list[Element]) -> bytes:
        el = self._pick(elements)
        if el is None:
            return self.bitflip(data, elements)
        limit = 0xFFFF if el.length_size == 2 else 0xFFFFFFFF
        new = self.rng.choice([0, 1, el.length - 1, el.length + 1, el.length * 2, limit, limit - 1,
                               0x7FFFFFF0 & limit, self.rng.randrange(limit + 1)]) & limit
        self.ops.append(f"length of {el.tag:08X} (depth {el.depth}) {el.length} -> {new}")
        return self._set_length(data, el, new)

    def _set_length(self, data: bytes, el: Element, new: int) -> bytes:
        end = el.length_at + el.length_size
        return data[:el.length_at] + pack_length(new, el.length_size, self.endian) + data[end:]

    def huge(self, data: bytes, elements: list[Element]) -> bytes:
        el = self._pick(elements, lambda e: e.length_size == 4) or self._pick(elements)
        if el is None:
            return self.bitflip(data, elements)
        new = self.rng.choice([0xFFFFFFF0, 0x7FFFFFFF, 0x40000000, 100 * MIB])
        new &= 0xFFFF if el.length_size == 2 else 0xFFFFFFFF
        self.ops.append(f"huge length {new} for {el.tag:08X}")
        return self._set_length(data, el, new)

    def vr(self, data: bytes, elements: list[Element]) -> bytes:
        el = self._pick(elements, lambda e: e.vr is not None)
        if el is None:
            return self.length(data, elements)
        new = self.rng.choice([bytes([self.rng.randrange(256), self.rng.randrange(256)]), self.rng.choice(ALL_VRS),
                               el.vr.lower(), b"\0\0", b"UN", b"SQ"])
        self.ops.append(f"VR of {el.tag:08X} {el.vr!r} -> {new!r}")
        return data[:el.start + 4] + new + data[el.start + 6:]

    def duplicate(self, data: bytes, elements: list[Element]) -> bytes:
        el = self._pick(elements)
        if el is None:
            return self.insert(data, elements)
        blob = data[el.start:el.end]
        other = self._pick(elements)
        pos = el.end if other is None or self.rng.random() < 0.5 else other.start
        self.ops.append(f"duplicate {el.tag:08X} (depth {el.depth}) at {pos}")
        return data[:pos] + blob + data[pos:]

    def remove(self, data: bytes, elements: list[Element]) -> bytes:
        keys = set(KEY_TAGS.values())
        el = (self._pick(elements, lambda e: e.depth == 0 and e.tag in keys) if self.rng.random() < 0.5 else None) \
            or self._pick(elements)
        if el is None:
            return self.delete(data, elements)
        self.ops.append(f"remove {el.tag:08X} (depth {el.depth})")
        return data[:el.start] + data[el.end:]

    def swap(self, data: bytes, elements: list[Element]) -> bytes:
        top = sorted((e for e in elements if e.depth == 0), key=lambda e: e.start)
        if len(top) < 2:
            return self.bitflip(data, elements)
        i = self.rng.randrange(len(top) - 1)
        a, b = top[i], top[i + 1]
        self.ops.append(f"swap {a.tag:08X} and {b.tag:08X}")
        return data[:a.start] + data[b.start:b.end] + data[a.start:a.end] + data[b.end:]

    def value(self, data: bytes, elements: list[Element]) -> bytes:
        present = [(k, top_element(elements, t)) for k, t in KEY_TAGS.items() if k != "PixelData"]
        present = [(k, e) for k, e in present if e is not None]
        if not present:
            return self.bitflip(data, elements)
        keyword, el = self.rng.choice(present)
        binary = el.vr in (b"US", b"UL", b"SS", b"SL") or (el.vr is None and dictionary_vr(el.tag) in ("US", "UL"))
        new = self.rng.choice(_binary_values(self.endian) if binary else NASTY_TEXT)
        self.ops.append(f"{keyword} = {new[:24]!r}{'...' if len(new) > 24 else ''} ({len(new)} bytes)")
        return replace_value(data, el, new, self.endian)

    def fragments(self, data: bytes, elements: list[Element]) -> bytes:
        pixel = top_element(elements, PIXEL_DATA)
        frags = [e for e in elements if pixel is not None and e.tag == ITEM and pixel.value <= e.start < pixel.end]
        if not self.source.encapsulated or not frags or pixel is None:
            return self.huge(data, elements)
        el = self.rng.choice(frags)
        kind = self.rng.choice(["length", "tag", "drop delimiter", "offset table", "cut fragment"])
        self.ops.append(f"pixel data fragment {kind}")
        if kind == "length":
            new = self.rng.choice([0, el.length + 2, el.length - 2, UNDEFINED, 0x7FFFFFF0])
            return data[:el.length_at] + struct.pack("<I", new & 0xFFFFFFFF) + data[el.length_at + 4:]
        if kind == "tag":
            tag = struct.pack("<HH", 0xFFFE, self.rng.choice([0xE00D, 0xE0DD, 0x0000]))
            return data[:el.start] + tag + data[el.start + 4:]
        if kind == "drop delimiter":
            return data[:pixel.end - 8] + data[pixel.end:]
        if kind == "offset table":
            first = frags[0]  # the Basic Offset Table
            table = struct.pack("<4I", 0, 0xFFFFFFF0, 7, 0x7FFFFFFF)
            return data[:first.start] + struct.pack("<HHI", 0xFFFE, 0xE000, len(table)) + table + data[first.end:]
        return data[:el.value + max(0, el.length // 2)] + data[el.end:]

    def nesting(self, data: bytes, elements: list[Element]) -> bytes:
        """A private sequence nested thousands of levels deep (undefined lengths throughout)."""
        levels = self.rng.choice([64, 500, 2000, 5000])
        e = self.endian
        if self.source.implicit:
            opening = struct.pack(e + "HHI", 0x0009, 0x1001, UNDEFINED)
        else:
            opening = struct.pack(e + "HH2s2xI", 0x0009, 0x1001, b"SQ", UNDEFINED)
        item = struct.pack(e + "HHI", 0xFFFE, 0xE000, UNDEFINED)
        closing = struct.pack(e + "HHI", 0xFFFE, 0xE00D, 0) + struct.pack(e + "HHI", 0xFFFE, 0xE0DD, 0)
        creator_value = b"FUZZ NESTING"
        if self.source.implicit:
            creator = struct.pack(e + "HHI", 0x0009, 0x0010, len(creator_value)) + creator_value
        else:
            creator = struct.pack(e + "HH2sH", 0x0009, 0x0010, b"LO", len(creator_value)) + creator_value
        blob = creator + (opening + item) * levels + closing * levels
        later = [x.start for x in elements if x.depth == 0 and x.tag > 0x00091001]
        after = min(later, default=len(data))  # where the private element belongs in tag order
        self.ops.append(f"private sequence nested {levels} levels at {after}")
        return data[:after] + blob + data[after:]

    def tail(self, data: bytes, elements: list[Element]) -> bytes:
        count = self.rng.choice([1, 3, 7, 100, 4096])
        self.ops.append(f"{count} random bytes appended")
        return data + bytes(self.rng.randrange(256) for _ in range(count))

    OPERATIONS: tuple[tuple[str, int], ...] = (
        ("bitflip", 20), ("insert", 7), ("delete", 7), ("truncate", 10), ("length", 12), ("huge", 5),
        ("vr", 7), ("duplicate", 6), ("remove", 8), ("swap", 4), ("value", 10), ("fragments", 5),
        ("nesting", 1), ("tail", 3),
    )

    def mutate(self, data: bytes) -> bytes:
        names = [n for n, _ in self.OPERATIONS]
        weights = [w for _, w in self.OPERATIONS]
        for _ in range(self.rng.choices([1, 2, 3], [6, 3, 1])[0]):
            if not data:
                break
            op = self.rng.choices(names, weights)[0]
            data = getattr(self, op)(data, self._elements(data))
        return data


def dataset_case(seed: int, index: int, corpus: list[Source]) -> DatasetCase:
    """The dataset-layer case ``D<index>``: one source, a fresh SOP Instance UID, 1-3 mutations,
    sometimes a transfer syntax that does not match the bytes, a request UID that does not match
    the dataset, or a deflated stream mutated before or after deflating."""
    rng = random.Random(f"{seed}/D/{index}")
    source = rng.choice(corpus)
    endian = "<" if source.little else ">"
    uid = fresh_uid(rng)
    sop = top_element(source.elements, KEY_TAGS["SOPInstanceUID"])
    data = replace_value(source.body, sop, uid.encode(), endian) if sop is not None else source.body
    mutator = DatasetMutator(rng, source)
    syntax, request_uid = source.syntax, uid
    roll = rng.random()
    if roll < 0.05:  # the dataset as it is, in a syntax it is not encoded in
        syntax = rng.choice([str(ts) for ts in UNCOMPRESSED + FOREIGN_SYNTAXES if str(ts) != source.syntax])
        mutator.ops.append(f"sent under {pydicom.uid.UID(syntax).name}")
    elif roll < 0.08:  # the request and the dataset disagree, or the UID is hostile
        request_uid = rng.choice([fresh_uid(rng), "1.2.3." + "9" * 200, "1.2.840.10008..1", "1.2.3/../../x"])
        mutator.ops.append(f"request UID {request_uid[:30]!r}")
        if rng.random() < 0.5:
            sop = top_element(walk(data, source.implicit, source.little), KEY_TAGS["SOPInstanceUID"])
            data = replace_value(data, sop, request_uid.encode("latin-1"), endian)
            mutator.ops.append("dataset UID the same")
    deflate_first = False
    if roll >= 0.05 or rng.random() < 0.5:
        deflate_first = source.deflated and rng.random() < 0.3
        if deflate_first:  # the compressed stream itself is mutated
            data = deflate(data)
            mutator.ops.append("mutated after deflating:")
        data = mutator.mutate(data)
    if source.deflated and not deflate_first:
        data = deflate(data)
    return DatasetCase(f"D{index}", source.name, source.sop_class, request_uid, syntax, data, mutator.ops)
