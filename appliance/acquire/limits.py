"""What a DICOM peer may cost the box, and how peer-controlled text reaches the log.

Every limit here comes from ``[dicom]`` (see firmware_config/appliance.toml); :class:`Limits`
gathers them once per process.  The fixed sizes below are protocol facts rather than site
choices, and are documented with the keys.
"""
from __future__ import annotations

import logging
import threading
import time
import zlib
from dataclasses import dataclass
from typing import Any

KIB = 1024
MIB = 1024 * KIB

# A-ASSOCIATE-RQ/AC/RJ, A-RELEASE and A-ABORT PDUs: a request proposing 128 presentation
# contexts with a dozen transfer syntaxes each is about 40 KiB.
ASSOCIATION_PDU_MAX = 64 * KIB
# A peer may ignore the maximum length the box advertises; PDUs up to this multiple of it are
# still read (in pieces, as they arrive), a longer one aborts the association.
PDU_HARD_CAP_FACTOR = 4
# A DIMSE command set is a few hundred bytes.
COMMAND_SET_MAX = 64 * KIB
# Inflated in steps of this size, so that checking a deflated dataset costs this much memory.
_INFLATE_STEP = MIB
_DEFLATED_INPUT_STEP = 64 * KIB


@dataclass(frozen=True)
class Limits:
    """The limits of one receiving process, from ``[dicom]``."""

    association_timeout_s: float = 10.0
    pdu_timeout_s: float = 30.0
    max_association_s: float = 14400.0
    max_pdu_bytes: int = 1024 * KIB
    max_dataset_bytes: int = 1024 * MIB
    max_inflated_bytes: int = 256 * MIB
    max_pending: int = 256
    max_associations: int = 16
    max_per_peer: int = 8

    @classmethod
    def from_config(cls, config: Any) -> "Limits":
        dicom = config.dicom
        return cls(
            association_timeout_s=float(dicom.association_timeout_s),
            pdu_timeout_s=float(dicom.pdu_timeout_s),
            max_association_s=float(dicom.max_association_s),
            max_pdu_bytes=int(dicom.max_pdu_kb) * KIB,
            max_dataset_bytes=int(dicom.max_dataset_mb) * MIB,
            max_inflated_bytes=int(dicom.max_inflated_mb) * MIB,
            max_pending=int(dicom.max_pending_connections),
            max_associations=int(dicom.max_associations),
            max_per_peer=int(dicom.max_associations_per_peer),
        )

    def pdu_cap(self, pdu_type: int) -> int:
        """The longest PDU (length field) of ``pdu_type`` that is read at all."""
        return self.max_pdu_bytes * PDU_HARD_CAP_FACTOR if pdu_type == 0x04 else ASSOCIATION_PDU_MAX


def peer_text(value: Any, limit: int = 64) -> str:
    """``value`` (sent by a peer) fit for one log line: escaped like ``repr`` (no newlines,
    no control characters, no terminal escapes) and cut to ``limit`` characters."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        text = bytes(value[: limit * 4]).decode("latin-1")
    else:
        text = str(value)
    # Escaping at most quadruples a character, so limit * 4 of them are enough to fill the line.
    escaped = text[: limit * 4].encode("unicode_escape").decode("ascii")
    if len(escaped) > limit:
        return f"{escaped[:limit]}...({len(text)} chars)"
    return escaped


def inflated_size_exceeds(deflated: Any, limit: int) -> bool:
    """Whether a Deflated Explicit VR Little Endian dataset inflates to more than ``limit``
    bytes.  The output is counted and dropped, step by step, so the check costs
    :data:`_INFLATE_STEP` of memory whatever the dataset claims; zlib.error if the stream is
    not deflate data."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    view = memoryview(deflated)
    total = 0
    for start in range(0, len(view), _DEFLATED_INPUT_STEP):
        pending: Any = view[start:start + _DEFLATED_INPUT_STEP]
        while pending:
            total += len(inflater.decompress(pending, _INFLATE_STEP))
            if total > limit:
                return True
            pending = inflater.unconsumed_tail
        if inflater.eof:
            break
    while True:  # output still held back after the last input
        step = inflater.decompress(b"", _INFLATE_STEP)
        total += len(step)
        if total > limit:
            return True
        if not step:
            return False


class RefusalLog:
    """One warning line per refused connection or association, with the reason, but at most
    :attr:`burst` lines per peer address and kind of refusal a minute: a peer that repeats
    itself thousands of times a second must not fill the SD card.  What was held back is
    counted in one line when the minute is over (at the next refusal from anyone)."""

    window_s = 60.0
    burst = 5

    def __init__(self, logger: logging.Logger):
        self._log = logger
        self._lock = threading.Lock()
        self._counts: dict[tuple[str, str], int] = {}
        self._window_start = time.monotonic()

    def refused(self, host: str, kind: str, message: str, *args: Any) -> None:
        """Log ``message % args`` unless ``host`` was refused for ``kind`` too often."""
        with self._lock:
            summary = self._roll_window()
            key = (host, kind)
            count = self._counts.get(key, 0) + 1
            self._counts[key] = count
        for (peer, what), held_back in summary:
            self._log.warning("DICOM peer %s: %d more refusals (%s) in the last %d s were not logged",
                              peer, held_back, what, int(self.window_s))
        if count <= self.burst:
            self._log.warning(message, *args)

    def _roll_window(self) -> list[tuple[tuple[str, str], int]]:
        now = time.monotonic()
        if now - self._window_start < self.window_s:
            return []
        summary = [(key, n - self.burst) for key, n in self._counts.items() if n > self.burst]
        self._counts.clear()
        self._window_start = now
        return summary
