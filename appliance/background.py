"""Threads that run inside `appliance serve` until it stops (analysis, forwarding)."""
from __future__ import annotations

import threading
from typing import Any, Callable


class BackgroundService:
    """A set of daemon threads sharing a stop event and a wake-up event."""

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._threads: list[threading.Thread] = []

    def _spawn(self, name: str, target: Callable[..., None], *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def wake(self, *_args: Any) -> None:
        """Something arrived: let an idle thread look now instead of at its next poll."""
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        for thread in self._threads:
            thread.join(timeout=60)
        self._threads.clear()
