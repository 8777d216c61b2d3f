"""When and how fast to send: send windows, the rate cap, and retry backoff."""
from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from datetime import datetime, time as dtime

BACKOFF_BASE_S = 1.0


def in_window(window: str, now: datetime | None = None) -> bool:
    """True if local time ``now`` is inside ``"HH:MM-HH:MM"`` (may cross midnight); ``""`` = always."""
    if not window:
        return True
    start_text, end_text = window.split("-")
    start, end = _hm(start_text), _hm(end_text)
    current = (now or datetime.now()).time()
    if start == end:
        return True
    if start < end:
        return start <= current < end
    return current >= start or current < end  # e.g. 22:00-06:00


def _hm(text: str) -> dtime:
    hours, minutes = text.strip().split(":")
    return dtime(int(hours), int(minutes))


def backoff_s(failures: int, cap_s: float, rng: random.Random | None = None) -> float:
    """Capped exponential backoff with "equal jitter": half fixed, half random, so a fleet of boxes
    coming back after the same outage does not hit the hub in lock-step."""
    # The exponent is bounded: 2 ** 1024 overflows a float (a destination down for days reaches
    # it), and 2 ** 60 seconds is beyond any cap.
    ceiling = min(float(cap_s), BACKOFF_BASE_S * 2.0 ** min(max(0, failures - 1), 60))
    half = ceiling / 2
    uniform = rng.uniform if rng is not None else random.uniform
    return half + uniform(0, half)


class Pacer:
    """Keeps the average send rate at or below ``rate_kbps`` (0 = unlimited).

    Pacing is applied between datasets (after each C-STORE or STOW batch): the DICOM and HTTP
    libraries own the sockets, and on the slow links this is for, the average over a few datasets
    is what shares the link with the clinic's other traffic.  Thread-safe: parallel senders
    (several associations) share one budget.
    """

    def __init__(self, rate_kbps: int, stop: threading.Event | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.bytes_per_s = rate_kbps * 1000 / 8 if rate_kbps > 0 else 0.0
        self._stop = stop or threading.Event()
        self._clock = clock
        self._due = clock()
        self._lock = threading.Lock()

    def sent(self, nbytes: int) -> None:
        """Account ``nbytes`` just sent and sleep until the average rate is back under the cap.

        The transfer is taken to have started no earlier than ``nbytes / rate`` ago, so an idle
        period earns no credit for a later burst.
        """
        if not self.bytes_per_s:
            return
        duration = nbytes / self.bytes_per_s
        with self._lock:
            self._due = max(self._due, self._clock() - duration) + duration
            delay = self._due - self._clock()
        if delay > 0:
            self._stop.wait(delay)
