"""Running the cases against a box: the two lanes, the watch on its processes, checkpoints."""
from __future__ import annotations

import contextlib
import hashlib
import random
import socket
import struct
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import psutil

from tests.helpers import CALLING_AE

from .datasets import (
    DATASET_CORPUS,
    KEY_TAGS,
    PDU_CORPUS,
    DatasetCase,
    dataset_case,
    requested_contexts,
)
from .elements import (
    MIB,
    fresh_uid,
    load_corpus,
    load_source,
    replace_value,
    top_element,
)
from .pdus import PduCase, pdu_case
from .protocol import (
    CALLED_AE,
    Aborted,
    Closed,
    PeerError,
    Refused,
    StoreAssociation,
    Timeout,
    connect,
    pdu,
    recv_pdu,
)


@dataclass
class Finding:
    """Something the box must not do, seen on one case."""

    case_id: str
    what: str
    detail: str
    case: str

    def __str__(self) -> str:
        return f"[{self.what}] {self.detail} -- {self.case}"


@dataclass
class Report:
    """What a run saw: outcome counts, findings, accepted datasets, timings."""

    counts: Counter = field(default_factory=Counter)
    findings: list[Finding] = field(default_factory=list)
    accepted: dict[str, str] = field(default_factory=dict)   # request SOP Instance UID -> sha256 of the dataset sent
    echo_seconds: list[float] = field(default_factory=list)
    close_seconds_max: float = 0.0
    phase_seconds: dict[str, float] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)  # outcome -> the first case ids that had it
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def count(self, key: str, case_id: str = "") -> None:
        with self.lock:
            self.counts[key] += 1
            if case_id and len(self.examples.setdefault(key, [])) < 5:
                self.examples[key].append(case_id)

    def find(self, case: object, what: str, detail: str) -> None:
        with self.lock:
            self.findings.append(Finding(case.case_id, what, detail, case.describe()))  # type: ignore[attr-defined]


STATUS_CLASSES_ALLOWED = (0xA7, 0xA9, 0xC0)  # out of resources, dataset mismatch, cannot understand
PDU_NAMES = {0x02: "AC", 0x03: "RJ", 0x04: "P-DATA", 0x05: "RELEASE-RQ", 0x06: "RELEASE-RP", 0x07: "ABORT"}
MAX_HANGS = 25  # after this many the box is stuck: stop instead of waiting out every case
# Before each echo: the box needs a moment to see the last connections of a chunk close.
SETTLE_S = 1.0


def _status_key(status: int) -> str:
    return "success" if status == 0 else f"0x{status:04X}"


class DatasetLane:
    """One association sending a share of the dataset cases one after another."""

    def __init__(self, port: int, pairs: list[tuple[str, str]], report: Report, answer_timeout: float,
                 refused_for: float):
        self.assoc = StoreAssociation(port, pairs, answer_timeout, refused_for)
        self.report = report

    def run(self, cases: list[DatasetCase]) -> None:
        try:
            for case in cases:
                if self.report.counts["hang"] >= MAX_HANGS or not self.send(case):
                    return
            self.assoc.release()
        finally:
            if self.assoc.refusals:
                with self.report.lock:
                    self.report.counts["dataset: refused (transient), retried"] += self.assoc.refusals
                self.assoc.refusals = 0

    def send(self, case: DatasetCase) -> bool:
        """Send one case and judge the answer; False when the box no longer takes associations."""
        report = self.report
        report.count("cases run: dataset")
        if self.assoc.sock is None:
            try:
                self.assoc.open()
            except (PeerError, OSError) as exc:
                report.find(case, "refused", f"a well-formed association failed: {type(exc).__name__}: {exc}")
                return False
        try:
            status = self.assoc.store(case.sop_class, case.request_uid, case.syntax, case.data)
        except Timeout as exc:
            report.count("hang")
            report.find(case, "hang", f"no C-STORE-RSP: {exc}")
            return True
        except (Aborted, Closed):
            report.count("dataset: aborted", case.case_id)
            return True
        except PeerError as exc:
            report.find(case, "malformed answer", str(exc))
            return True
        report.count(f"dataset: {_status_key(status)}", case.case_id)
        if status == 0:
            with report.lock:
                report.accepted[case.request_uid] = hashlib.sha256(case.data).hexdigest()
        elif status >> 8 not in STATUS_CLASSES_ALLOWED:
            report.find(case, "unexpected status", f"0x{status:04X}")
        return True


class PduLane:
    """Runs PDU-layer cases on connections of their own, several at once."""

    def __init__(self, port: int, report: Report, answer_timeout: float, close_timeout: float, refused_for: float):
        self.port = port
        self.report = report
        self.answer_timeout = answer_timeout
        self.close_timeout = close_timeout
        self.refused_for = refused_for
        self.huge = threading.Lock()

    def run(self, case: PduCase) -> None:
        if self.report.counts["hang"] >= MAX_HANGS:
            return
        self.report.count("cases run: pdu")
        if case.huge:
            with self.huge:
                self._run(case)
        else:
            self._run(case)

    def _run(self, case: PduCase) -> None:
        report = self.report
        give_up = time.monotonic() + self.refused_for
        while True:
            try:
                sock = connect(self.port, self.answer_timeout)
            except OSError as exc:
                report.find(case, "refused", f"the box did not take a TCP connection: {exc}")
                return
            try:
                received = self._exchange(sock, case)
            except Refused:
                if time.monotonic() < give_up:
                    report.count("pdu: refused (transient), retried")
                    time.sleep(0.05)
                    continue
                report.find(case, "refused", f"a well-formed association was refused for {self.refused_for} s")
                return
            except Timeout as exc:
                report.count("hang")
                report.find(case, "hang", str(exc))
                return
            except PeerError as exc:
                report.find(case, "malformed answer", str(exc))
                return
            finally:
                sock.close()
            break
        self._judge(case, received)

    def _exchange(self, sock: socket.socket, case: PduCase) -> bytes:
        """Send the case, end our side, and return everything the box sent until it closed."""
        received = b""
        try:
            sock.sendall(case.opening)
            if case.kind == "data":
                pdu_type, body = recv_pdu(sock, time.monotonic() + self.answer_timeout)
                if pdu_type == 0x03 and body[1] == 2:
                    raise Refused(body[1], body[2], body[3])
                received = pdu(pdu_type, body)
                if pdu_type == 0x02:
                    sock.sendall(case.payload)
                else:
                    self.report.find(case, "refused", f"answer to a well-formed A-ASSOCIATE-RQ was PDU type {pdu_type}")
            sock.shutdown(socket.SHUT_WR)
        except (Closed, OSError):
            pass  # the box closed or reset first: what it sent before that is still judged below
        ended = time.monotonic()
        deadline = ended + self.close_timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise Timeout(f"connection still open {self.close_timeout} s after the peer closed its side")
            sock.settimeout(remaining)
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:  # reset: the box closed with our bytes unread
                break
            if not chunk:
                break
            received += chunk
        with self.report.lock:
            self.report.close_seconds_max = max(self.report.close_seconds_max, time.monotonic() - ended)
        return received

    def _judge(self, case: PduCase, received: bytes) -> None:
        report = self.report
        types, off = [], 0
        while off + 6 <= len(received):
            pdu_type, _r, length = struct.unpack_from(">BBI", received, off)
            if pdu_type not in PDU_NAMES:
                report.find(case, "malformed answer", f"the box sent a PDU of type 0x{pdu_type:02X}")
                return
            types.append(pdu_type)
            off += 6 + length
        # The box's first answer to the mutation: after the A-ASSOCIATE-AC for "data" cases.
        replies = types[1:] if case.kind == "data" else types
        report.count(f"pdu {case.kind}: {PDU_NAMES[replies[0]] if replies else 'closed'}", case.case_id)
        if case.kind == "association" and types and types[0] == 0x02 and not case.calling_allowed:
            report.find(case, "allow-list bypass", "A-ASSOCIATE-AC for a calling AE title that is not allowed")


def echo_seconds(port: int, limit: float = 2.0) -> float:
    """How long dcmtk's echoscu takes to associate, echo and release (``inf`` if it failed or
    took longer than ``limit``)."""
    start = time.monotonic()
    try:
        done = subprocess.run(["echoscu", "-aet", CALLING_AE, "-aec", CALLED_AE, "127.0.0.1", str(port)],
                              capture_output=True, timeout=limit, check=False)
    except subprocess.TimeoutExpired:
        return float("inf")
    return time.monotonic() - start if done.returncode == 0 else float("inf")


class BoxWatch:
    """The box's processes: the same ones alive throughout, and the peak of their memory."""

    def __init__(self, pid: int, kill_above: int = 4096 * MIB, interval: float = 0.05):
        self.main = psutil.Process(pid)
        self.helpers = self._helpers()
        self.baseline = self.rss()
        self.peak = self.baseline
        self.baseline_threads = self.threads()
        self.kill_above = kill_above
        self.killed = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, args=(interval,), daemon=True)
        self._thread.start()

    def _helpers(self) -> dict[int, float]:
        """Receiving processes (multiprocessing's resource tracker, which comes and goes, aside)."""
        helpers = {}
        for child in self.main.children():
            with contextlib.suppress(psutil.Error):  # a child that just exited is not a helper
                if any("spawn_main" in part for part in child.cmdline()):
                    helpers[child.pid] = child.create_time()
        return helpers

    def _sum(self, measure: Callable[[psutil.Process], int]) -> int:
        total = 0
        for proc in [self.main, *self.main.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):  # a child exiting between listing and reading
                total += measure(proc)
        return total

    def rss(self) -> int:
        return self._sum(lambda proc: proc.memory_info().rss)

    def threads(self) -> int:
        return self._sum(lambda proc: proc.num_threads())

    def _sample(self, interval: float) -> None:
        while not self._stop.wait(interval):
            try:
                self.peak = max(self.peak, self.rss())
                if self.peak - self.baseline > self.kill_above:
                    # The machine is shared: a box that runs away with memory is stopped here,
                    # and the run fails on it (alive() reports the box gone).
                    self.killed = True
                    for proc in [*self.main.children(recursive=True), self.main]:
                        proc.kill()
                    return
            except psutil.Error:  # the box is gone; alive() says so
                return

    def alive(self) -> list[str]:
        """What is wrong with the box's processes (empty when nothing)."""
        problems = []
        if self.killed:
            return [f"the box grew by more than {self.kill_above // MIB} MiB and was killed"]
        if not self.main.is_running() or self.main.status() == "zombie":
            return [f"appliance serve (pid {self.main.pid}) is gone"]
        now = self._helpers()
        for pid, started in self.helpers.items():
            if now.get(pid) != started:
                problems.append(f"receiving process {pid} is gone (now {sorted(now)})")
        return problems

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


@dataclass
class FuzzRun:
    """``dataset_cases`` mutated datasets over ``dataset_lanes`` associations, then ``pdu_cases``
    PDU-layer cases on ``pdu_workers`` connections at a time, in chunks of ``chunk`` inputs; after
    every chunk the box must be whole and answer a C-ECHO within ``echo_limit`` seconds."""

    port: int
    pid: int
    seed: int = 20261211
    dataset_cases: int = 7000
    pdu_cases: int = 3000
    dataset_lanes: int = 2
    pdu_workers: int = 4
    chunk: int = 1000
    answer_timeout: float = 30.0
    close_timeout: float = 5.0
    refused_for: float = 10.0
    echo_limit: float = 2.0
    kill_above: int = 2048 * MIB  # the box is killed (and the run fails) past this growth: the machine is shared
    progress: Callable[[str], None] = lambda _line: None

    def run(self) -> tuple[Report, BoxWatch]:
        report = Report()
        corpus, small = load_corpus(DATASET_CORPUS), load_corpus(PDU_CORPUS)
        pairs = requested_contexts(corpus)
        watch = BoxWatch(self.pid, self.kill_above)
        lanes = [DatasetLane(self.port, pairs, report, self.answer_timeout, self.refused_for)
                 for _ in range(self.dataset_lanes)]
        pdu_lane = PduLane(self.port, report, self.answer_timeout, self.close_timeout, self.refused_for)
        try:
            with ThreadPoolExecutor(max(self.dataset_lanes, self.pdu_workers)) as pool:
                for layer, total in (("D", self.dataset_cases), ("P", self.pdu_cases)):
                    started = time.monotonic()
                    for first in range(0, total, self.chunk):
                        indexes = range(first, min(total, first + self.chunk))
                        if layer == "D":
                            cases = [dataset_case(self.seed, i, corpus) for i in indexes]
                            shares = [cases[n::len(lanes)] for n in range(len(lanes))]
                            list(pool.map(lambda pair: pair[0].run(pair[1]), zip(lanes, shares)))
                        else:
                            list(pool.map(pdu_lane.run, (pdu_case(self.seed, i, small) for i in indexes), chunksize=1))
                        if not self._checkpoint(report, watch, f"{layer}{indexes[-1]}"):
                            return report, watch
                    report.phase_seconds["dataset" if layer == "D" else "pdu"] = time.monotonic() - started
        finally:
            watch.stop()
        return report, watch

    def _checkpoint(self, report: Report, watch: BoxWatch, after: str) -> bool:
        """The box after a chunk: its processes, an echo; False to stop the run."""
        time.sleep(SETTLE_S)
        problems = watch.alive()
        seconds = echo_seconds(self.port, self.echo_limit) if not problems else float("inf")
        report.echo_seconds.append(seconds)
        ran = report.counts["cases run: dataset"] + report.counts["cases run: pdu"]
        self.progress(f"after {after}: echo {seconds:.2f} s, RSS peak +{(watch.peak - watch.baseline) / MIB:.0f} MiB, "
                      f"{ran} cases run, {len(report.findings)} findings")
        for problem in problems:
            report.findings.append(Finding(after, "crash", problem, f"seen after case {after}"))
        return not problems and report.counts["hang"] < MAX_HANGS


def control_store(port: int) -> tuple[str, str]:
    """A clean CT through the fuzzing peer, which must be stored: (SOP Instance UID, sha256 of
    the dataset sent).  Shows the peer itself speaks DICOM before its mutations count."""
    source = load_source("CT_small.dcm")
    uid = fresh_uid(random.Random("control"))
    sop = top_element(source.elements, KEY_TAGS["SOPInstanceUID"])
    data = replace_value(source.body, sop, uid.encode(), "<")
    assoc = StoreAssociation(port, requested_contexts([source]), 30, 10)
    try:
        status = assoc.store(source.sop_class, uid, source.syntax, data)
    finally:
        assoc.release()
    if status != 0x0000:
        raise AssertionError(f"a clean CT was answered 0x{status:04X}")
    return uid, hashlib.sha256(data).hexdigest()


def summary(report: Report, watch: BoxWatch) -> str:
    """The run in a few lines: timings, memory, and every outcome with example cases."""
    phases = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in report.phase_seconds.items())
    head = (f"cases: {report.counts['cases run: dataset']} dataset, {report.counts['cases run: pdu']} PDU ({phases}); "
            f"echo max {max(report.echo_seconds, default=0):.2f} s; RSS +{(watch.peak - watch.baseline) / MIB:.0f} MiB "
            f"at peak; slowest close after the peer's EOF {report.close_seconds_max:.2f} s; "
            f"{len(report.findings)} findings")
    lines = [head]
    for key, count in sorted(report.counts.items()):
        examples = report.examples.get(key)
        lines.append(f"  {key}: {count}" + (f"  e.g. {' '.join(examples)}" if examples else ""))
    return "\n".join(lines)
