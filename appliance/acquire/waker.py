"""A wake-up for a thread blocked in select(): the gate's selector and pynetdicom's DUL reactor."""
from __future__ import annotations

import contextlib
import socket


class Waker:
    """A socket pair: writing to one end makes the other readable, for select()."""

    def __init__(self) -> None:
        self.reader, self.writer = socket.socketpair()
        self.reader.setblocking(False)
        self.writer.setblocking(False)

    def wake(self) -> None:
        # A full buffer means a wake-up is already pending; a closed one, that nobody waits.
        with contextlib.suppress(OSError):
            self.writer.send(b"\0")

    def drain(self) -> None:
        # Ends at the first empty read: nothing left (non-blocking), or closed.
        with contextlib.suppress(OSError):
            while self.reader.recv(4096):
                continue

    def close(self) -> None:
        self.reader.close()
        self.writer.close()
