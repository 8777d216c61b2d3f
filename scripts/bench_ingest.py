#!/usr/bin/env python3
"""Ingest benchmark (issue 2): DICOM C-STORE throughput of `appliance serve` against real peers.

The same set of real instances (copies of pydicom / pydicom-data files: chest CR, ultrasound,
CT, MR, ... each copy with fresh Study/Series/SOP Instance UIDs and its original transfer syntax)
is sent with dcmtk's ``dcmsend`` (which proposes each file's own transfer syntax) over K
parallel associations on 127.0.0.1 to, in one run and each with fresh empty storage:

  sink          dcmtk ``storescp --ignore``: receives and discards; the senders' own ceiling
  appliance     ``appliance serve`` as configured by default (``dicom.processes`` = one
                receiving process per core): temp file, fsync file, rename, directories made
                durable (fsync, or one syncfs for several), SQLite commit (WAL,
                synchronous=FULL) before answering success
  storescp      dcmtk ``storescp +B --fork``: writes each file as received, no fsync
  orthanc       Orthanc with its SQLite index and filesystem storage (``SyncStorageArea``)
  orthanc-nagle the same Orthanc without TCP_NODELAY, i.e. as Debian ships it (see below)

TCP_NODELAY: Debian's dcmtk (and Orthanc, which uses dcmtk's network layer) leaves Nagle's
algorithm on unless the environment variable ``TCP_NODELAY=1`` is set.  dcmtk writes a PDU's
header and body with separate ``write()`` calls, so with Nagle on every C-STORE request and
response can wait for the peer's delayed ACK (~40 ms on Linux): one dcmsend then manages only
~15-20 instances/s whatever the receiver does.  The senders, the sink, storescp and ``orthanc``
therefore run with ``TCP_NODELAY=1``; ``orthanc-nagle`` shows Orthanc as shipped.  pynetdicom
(the appliance) writes each PDU with one ``sendall`` and is not affected on its side.

``appliance`` runs as configured by default, so its analysis worker runs the installed models
(engines/) on what arrives while ingest goes on; ``appliance-nomodel`` points the worker at an
empty engines directory, leaving the ingest path alone (what storescp and Orthanc do).

Each run is checked: every instance must have arrived (appliance: its database rows received over
DICOM, their files and transfer syntaxes; storescp: its files; Orthanc: ``/statistics`` over HTTP
on loopback) and the senders must report every C-STORE successful, so a fast-but-failing run
cannot pass.  Target: appliance >= 0.8x Orthanc (the faster of the two Orthanc runs).  Every
target runs ``--repeat`` times (fresh storage each time, rounds interleaved, the order rotating
from round to round); medians are reported.

Run: ``.venv/bin/python scripts/bench_ingest.py [--instances N] [--senders K] [--repeat R]``
(about 5 minutes on 2 cores with the defaults 600 / 4 / 5: a run of a few seconds per target
varies by ±10 % on a shared virtual machine, so the set is long enough for the steady state to
dominate and the median is over five interleaved rounds).  Exit status 0 when every run
delivered every instance, whether or not the target is met; 1 otherwise.
"""
from __future__ import annotations

import abc
import argparse
import json
import os
import platform
import re
import resource
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pydicom
import requests
from pydicom.uid import generate_uid

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.helpers import CALLING_AE, ServerProcess, free_port, sample  # noqa: E402

TARGET_RATIO = 0.8
MB = 1_000_000
# dcmtk reads this at run time; "1" disables Nagle's algorithm (see the module docstring).
NODELAY_ENV = {"TCP_NODELAY": "1"}
SEND_TIMEOUT_S = 600
ORTHANC = shutil.which("Orthanc") or "/usr/sbin/Orthanc"

# The mix: (file, weight).  Mostly what a clinic's X-ray and ultrasound units send -- chest CR
# (J2K lossless, uncompressed, J2K lossy), single- and multi-frame ultrasound (J2K, RLE, JPEG
# baseline 120 frames) -- plus a few small CT/MR/NM images in other syntaxes.  About 1.3 MB per
# instance on average.
MIX: list[tuple[str, int]] = [
    ("RG1_J2KR.dcm", 2),               # CR 4.3 MB, JPEG 2000 lossless
    ("RG1_UNCR.dcm", 1),               # CR 7.2 MB, explicit VR little endian
    ("RG1_J2KI.dcm", 1),               # CR 0.7 MB, JPEG 2000 lossy
    ("RG3_J2KR.dcm", 2),               # CR 0.8 MB, JPEG 2000 lossless
    ("US1_J2KR.dcm", 3),               # US 0.15 MB, JPEG 2000 lossless (colour)
    ("US1_UNCR.dcm", 1),               # US 0.9 MB, explicit VR little endian
    ("OBXXXX1A_rle.dcm", 3),           # US 0.05 MB, RLE (palette)
    ("OBXXXX1A_rle_2frame.dcm", 1),    # US multi-frame, RLE
    ("color3d_jpeg_baseline.dcm", 1),  # US multi-frame 6.1 MB, JPEG baseline, 120 frames
    ("CT_small.dcm", 1),               # CT, explicit VR little endian
    ("MR_small.dcm", 1),               # MR, explicit VR little endian
    ("JPEG-LL.dcm", 1),                # NM/SC, JPEG lossless SV1
    ("MR_small_jpeg_ls_lossless.dcm", 1),  # MR, JPEG-LS lossless
]


def dcmtk(name: str) -> str:
    """A dcmtk tool: the system one, not a same-named script in a virtualenv (pynetdicom ships
    an ``echoscu`` with different options)."""
    for directory in ("/usr/bin", "/usr/local/bin", "/usr/sbin"):
        candidate = Path(directory) / name
        if candidate.exists():
            return str(candidate)
    found = shutil.which(name)
    if not found:
        sys.exit(f"bench_ingest: {name} not found (install the Debian package dcmtk / orthanc: make setup)")
    return found


# --------------------------------------------------------------------------- corpus
@dataclass
class Corpus:
    slices: list[Path]                # one directory per sender, disjoint
    sop_uids: set[str]
    total_bytes: int
    by_syntax: dict[str, int]         # transfer syntax UID -> instance count

    @property
    def count(self) -> int:
        return len(self.sop_uids)


def build_corpus(root: Path, instances: int, senders: int) -> Corpus:
    """``instances`` copies of the MIX files with fresh UIDs, dealt round-robin to ``senders``
    directories so that every sender gets (nearly) the same mix."""
    cycle = [name for name, weight in MIX for _ in range(weight)]
    templates = {name: pydicom.dcmread(sample(name)) for name, _ in MIX}
    slices = [root / f"slice{k}" for k in range(senders)]
    for d in slices:
        d.mkdir(parents=True)
    sop_uids: set[str] = set()
    by_syntax: dict[str, int] = {}
    total = 0
    for i in range(instances):
        name = cycle[i % len(cycle)]
        ds = templates[name]
        ds.StudyInstanceUID = generate_uid()
        ds.SeriesInstanceUID = generate_uid()
        sop = generate_uid()
        ds.SOPInstanceUID = sop
        ds.file_meta.MediaStorageSOPInstanceUID = sop
        path = slices[i % senders] / f"{i:05d}_{name}"
        # Written in the file's own transfer syntax; encapsulated pixel data is copied as is.
        ds.save_as(path, enforce_file_format=True)
        sop_uids.add(sop)
        syntax = str(ds.file_meta.TransferSyntaxUID)
        by_syntax[syntax] = by_syntax.get(syntax, 0) + 1
        total += path.stat().st_size
    return Corpus(slices, sop_uids, total, by_syntax)


# --------------------------------------------------------------------------- targets
def wait_echo(port: int, called_ae: str, proc: subprocess.Popen | None, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} before answering C-ECHO")
        r = subprocess.run([dcmtk("echoscu"), "-aet", CALLING_AE, "-aec", called_ae, "127.0.0.1", str(port)],
                           capture_output=True, timeout=30)
        if r.returncode == 0:
            return
        time.sleep(0.1)
    raise RuntimeError(f"{what} did not answer C-ECHO on port {port} within {timeout}s")


class Target(abc.ABC):
    """A storage SCP on loopback: start, answer C-ECHO, count what arrived, stop."""

    name = ""
    called_ae = ""
    durability = ""
    nodelay = True  # run a dcmtk-based server with TCP_NODELAY=1

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.workdir.mkdir(parents=True)
        self.port = free_port()

    def storage(self) -> list[Path]:
        """What to delete after the run (the logs stay)."""
        return []

    @abc.abstractmethod
    def start(self) -> None: ...

    @abc.abstractmethod
    def pid(self) -> int: ...

    @abc.abstractmethod
    def verify(self, corpus: Corpus) -> tuple[int, int, list[str]]:
        """(instances found, bytes stored, problems)."""

    @abc.abstractmethod
    def stop(self) -> None: ...


class _Subprocess(Target):
    """A target that is one program started in its own process group."""

    def __init__(self, workdir: Path):
        super().__init__(workdir)
        self.proc: subprocess.Popen | None = None
        self.log_path = self.workdir / "server.log"

    @abc.abstractmethod
    def command(self) -> list[str]: ...

    def start(self) -> None:
        log = open(self.log_path, "wb")
        # Own session so that forked children (storescp --fork) are stopped with it.
        env = dict(os.environ)
        env.pop("TCP_NODELAY", None)
        if self.nodelay:
            env.update(NODELAY_ENV)
        self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir,
                                     env=env, start_new_session=True)
        log.close()
        wait_echo(self.port, self.called_ae, self.proc, self.name)

    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None


class Sink(_Subprocess):
    name = "sink"
    called_ae = "SINK"
    durability = "nothing stored (senders' ceiling)"

    def command(self) -> list[str]:
        return [dcmtk("storescp"), "--fork", "+xa", "--ignore", "-aet", self.called_ae, str(self.port)]

    def verify(self, corpus: Corpus) -> tuple[int, int, list[str]]:
        return corpus.count, 0, []  # nothing is stored; the senders' success count is the check


class StoreScp(_Subprocess):
    name = "storescp"
    called_ae = "STORESCP"
    durability = "none: files written, never fsynced"

    def __init__(self, workdir: Path):
        super().__init__(workdir)
        self.out = self.workdir / "files"

    def storage(self) -> list[Path]:
        return [self.out]

    def command(self) -> list[str]:
        self.out.mkdir()
        return [dcmtk("storescp"), "--fork", "+xa", "+B", "-od", str(self.out), "-aet", self.called_ae,
                str(self.port)]

    def verify(self, corpus: Corpus) -> tuple[int, int, list[str]]:
        files = [p for p in self.out.iterdir() if p.is_file()]
        # Default file names are <modality>.<SOP Instance UID>.
        found = {p.name.split(".", 1)[1] for p in files if "." in p.name}
        problems = []
        if found != corpus.sop_uids:
            problems.append(f"storescp: {len(corpus.sop_uids - found)} instances missing, "
                            f"{len(found - corpus.sop_uids)} unexpected")
        return len(found & corpus.sop_uids), sum(p.stat().st_size for p in files), problems


class Orthanc(_Subprocess):
    name = "orthanc"
    called_ae = "ORTHANC"
    durability = "file fdatasync; no dir fsync; index commit not synced (WAL, synchronous=NORMAL)"

    def storage(self) -> list[Path]:
        return [self.workdir / "storage", self.workdir / "index"]

    def command(self) -> list[str]:
        self.http_port = free_port()
        config = {
            "Name": "bench-ingest",
            "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "index"),
            "StorageCompression": False,
            "Plugins": [],
            "HttpServerEnabled": True,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomServerEnabled": True,
            "DicomAet": self.called_ae,
            "DicomPort": self.port,
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowEcho": True,
            # Orthanc 1.10 cannot bind its DICOM port to loopback only: accept C-STORE only from
            # our calling AE on 127.0.0.1 (a declared modality), not from anyone.
            "DicomAlwaysAllowStore": False,
            "DicomCheckModalityHost": True,
            "DicomModalities": {"bench": [CALLING_AE, "127.0.0.1", 104]},
            "UnknownSopClassAccepted": True,
            # Orthanc's defaults, stated so the comparison is explicit: fsync every stored file,
            # store as received (no ingest transcoding), 4 DICOM server threads.
            "SyncStorageArea": True,
            "DicomThreadsCount": 4,
            "OverwriteInstances": False,
        }
        path = self.workdir / "orthanc.json"
        path.write_text(json.dumps(config, indent=2))
        return [ORTHANC, str(path)]

    def start(self) -> None:
        super().start()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if requests.get(f"http://127.0.0.1:{self.http_port}/system", timeout=2).ok:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.1)
        raise RuntimeError("Orthanc's HTTP server did not answer")

    def verify(self, corpus: Corpus) -> tuple[int, int, list[str]]:
        stats = requests.get(f"http://127.0.0.1:{self.http_port}/statistics", timeout=30).json()
        count = int(stats["CountInstances"])
        problems = []
        if count != corpus.count:
            problems.append(f"orthanc: {count} instances indexed, expected {corpus.count}")
        return count, int(stats["TotalDiskSize"]), problems


class OrthancNagle(Orthanc):
    name = "orthanc-nagle"
    nodelay = False


# The source tree `appliance serve` runs from: this checkout, or --appliance-root (e.g. a
# `git archive` snapshot of a commit, to measure it while the working tree is being edited).
APPLIANCE_ROOT = ROOT


class _RootedServer(ServerProcess):
    """tests.helpers.ServerProcess, run with the package from APPLIANCE_ROOT."""

    def start(self, wait: bool = True) -> "_RootedServer":
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.command(), env=self.env, stdout=self.log, stderr=subprocess.STDOUT,
                                     cwd=APPLIANCE_ROOT)
        if wait:
            self.wait_ready()
        return self


class Appliance(Target):
    """``appliance serve`` as configured by default: its analysis worker runs the installed
    models (engines/) on what arrives, in the same process, while ingest goes on."""

    name = "appliance"
    called_ae = "EDGE"
    durability = "file fsync, rename, dir fsync/syncfs, index commit synced (WAL, synchronous=FULL)"

    def __init__(self, workdir: Path):
        super().__init__(workdir)
        self.data_dir = self.workdir / "data"

    def storage(self) -> list[Path]:
        return [self.data_dir]

    def extra_env(self) -> dict[str, str]:
        return {}

    def start(self) -> None:
        self.server = _RootedServer(self.data_dir, allowed=CALLING_AE, dicom_port=self.port,
                                    extra_env=self.extra_env())
        self.server.start()

    def pid(self) -> int:
        assert self.server.proc is not None
        return self.server.proc.pid

    def verify(self, corpus: Corpus) -> tuple[int, int, list[str]]:
        # Read-only: the analysis worker may still be writing its results (source 'ai').
        con = sqlite3.connect(f"file:{self.data_dir / 'appliance.db'}?mode=ro", uri=True)
        try:
            (count,) = con.execute("SELECT COUNT(*) FROM instances WHERE source = 'dicom'").fetchone()
            rows = con.execute("SELECT sop_instance_uid, file_path, size, transfer_syntax FROM instances "
                               "WHERE source = 'dicom'").fetchall()
        finally:
            con.close()
        problems = []
        found = {r[0] for r in rows}
        if count != corpus.count or found != corpus.sop_uids:
            problems.append(f"{self.name}: {count} rows received over DICOM, expected {corpus.count}; "
                            f"{len(corpus.sop_uids - found)} instances missing")
        missing_files = [r for r in rows if not Path(r[1]).is_file() or Path(r[1]).stat().st_size != r[2]]
        if missing_files:
            problems.append(f"{self.name}: {len(missing_files)} rows without a matching file")
        by_syntax: dict[str, int] = {}
        for r in rows:
            by_syntax[r[3]] = by_syntax.get(r[3], 0) + 1
        if by_syntax != corpus.by_syntax:
            problems.append(f"{self.name}: stored transfer syntaxes differ from those sent: {by_syntax}")
        return len(found & corpus.sop_uids), sum(r[2] for r in rows), problems

    def stop(self) -> None:
        server = getattr(self, "server", None)
        if server is not None:
            server.stop()


class ApplianceNoModels(Appliance):
    """The same with an empty engines directory: the worker finds no applicable model, so this
    is the ingest path alone (what Orthanc and storescp do)."""

    name = "appliance-nomodel"

    def extra_env(self) -> dict[str, str]:
        empty = self.workdir / "no-engines"
        empty.mkdir(exist_ok=True)
        return {"APPLIANCE_ANALYZE_ENGINES_DIR": str(empty)}


# --------------------------------------------------------------------------- one run
@dataclass
class Result:
    target: str
    seconds: float
    found: int
    stored_bytes: int
    sender_ok: int
    server_cpu: float
    sender_cpu: float
    problems: list[str] = field(default_factory=list)


SUCCESS_RE = re.compile(r"with status SUCCESS\s*:\s*(\d+)")


def _server_cpu(pid: int) -> float:
    """CPU seconds used so far by the server and its reaped children (storescp --fork)."""
    try:
        proc = psutil.Process(pid)
        t = proc.cpu_times()
        total = t.user + t.system + t.children_user + t.children_system
        for child in proc.children(recursive=True):  # forks still serving an association
            try:
                ct = child.cpu_times()
                total += ct.user + ct.system
            except psutil.NoSuchProcess:
                pass
        return total
    except psutil.NoSuchProcess:
        return float("nan")


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_target(target: Target, corpus: Corpus) -> Result:
    """Start ``target`` on fresh storage, send the corpus over K parallel associations, verify."""
    try:
        target.start()
        os.sync()  # flush what earlier runs left dirty so that it is not charged to this one
        time.sleep(0.3)
        cpu0 = _server_cpu(target.pid())
        child_cpu0 = _children_cpu()
        env = dict(os.environ)
        env.update(NODELAY_ENV)
        logs = [open(target.workdir / f"sender{k}.log", "w+") for k in range(len(corpus.slices))]
        procs: list[subprocess.Popen] = []
        try:
            t0 = time.perf_counter()
            for d, log in zip(corpus.slices, logs):
                procs.append(subprocess.Popen(
                    [dcmtk("dcmsend"), "-v", "-nh", "-aet", CALLING_AE, "-aec", target.called_ae,
                     "127.0.0.1", str(target.port), "+sd", str(d)],
                    stdout=log, stderr=subprocess.STDOUT, env=env))
            for p in procs:
                p.wait(timeout=SEND_TIMEOUT_S)
            seconds = time.perf_counter() - t0
        finally:
            for p in procs:  # only if something went wrong: a sender still running
                if p.poll() is None:
                    p.kill()
                    p.wait()
        sender_cpu = _children_cpu() - child_cpu0
        time.sleep(0.2)  # let forked storescp children finish and be reaped
        server_cpu = _server_cpu(target.pid()) - cpu0
        sender_ok = 0
        problems = []
        for k, (p, log) in enumerate(zip(procs, logs)):
            log.seek(0)
            m = SUCCESS_RE.search(log.read())
            log.close()
            sender_ok += int(m.group(1)) if m else 0
            if p.returncode != 0:
                problems.append(f"{target.name}: sender {k} exited with {p.returncode}")
        if sender_ok != corpus.count:
            problems.append(f"{target.name}: senders report {sender_ok} of {corpus.count} C-STOREs successful")
        found, stored, verify_problems = target.verify(corpus)
        return Result(target.name, seconds, found, stored, sender_ok, server_cpu, sender_cpu,
                      problems + verify_problems)
    finally:
        target.stop()
        for path in target.storage():
            shutil.rmtree(path, ignore_errors=True)
        settle()


# Removing a run's storage (up to ~0.9 GB) frees its blocks, and on a file system mounted with
# `discard` (as here) that work goes out with later journal commits: each run starts only after it
# is done, so that no target is charged for the previous one's clean-up.  A position effect
# remained even so (the target that ran first in a round, right after Orthanc, was ~5-10 % slower
# whichever it was: swapping appliance and appliance-nomodel swapped their figures), so the order
# of the targets also rotates from round to round (see main).
SETTLE_S = 2.0


def settle() -> None:
    os.sync()
    time.sleep(SETTLE_S)
    os.sync()


# --------------------------------------------------------------------------- report
def machine() -> str:
    cpu = platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = psutil.virtual_memory().total / 2**30
    return f"{os.cpu_count()} cores ({cpu}), {mem:.0f} GiB RAM, {platform.system()} {platform.release()}"


def versions() -> str:
    def first_line(cmd: list[str]) -> str:
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout
        except OSError:
            return "?"
        return next((ln for ln in out.splitlines() if ln.strip()), "?").strip()

    import pynetdicom

    dcm = first_line([dcmtk("dcmsend"), "--version"]).replace("$dcmtk: ", "").rstrip(" $")
    orthanc = first_line([ORTHANC, "--version"]).rsplit("/", 1)[-1]
    return (f"{dcm}; {orthanc}; pynetdicom {pynetdicom.__version__}; pydicom {pydicom.__version__}; "
            f"Python {platform.python_version()}")


def describe_tree(root: Path) -> str:
    """Which appliance code ran: the commit and whether the tree had local changes."""
    r = subprocess.run(["git", "-C", str(root), "log", "-1", "--format=%h %s"], capture_output=True, text=True)
    if r.returncode != 0:
        return f"{root} (not a git checkout)"
    dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no", "--", "appliance"],
                           capture_output=True, text=True).stdout.strip()
    return f"{root} at {r.stdout.strip()}" + (" + uncommitted changes under appliance/" if dirty else "")


def median(values: list[float]) -> float:
    return statistics.median(values)


def print_report(results: dict[str, list[Result]], corpus: Corpus, senders: int) -> None:
    n = corpus.count
    mb = corpus.total_bytes / MB
    secs = {name: median([r.seconds for r in runs]) for name, runs in results.items()}
    repeats = max(len(runs) for runs in results.values())
    print()
    print(f"{n} instances, {mb:.1f} MB, {senders} parallel dcmsend associations on 127.0.0.1, "
          f"median of {repeats} run(s) per target")
    print()
    print("| target | instances/s | MB/s | range inst/s | of ceiling | server CPU s | sender CPU s | arrived | durability before success |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for name, runs in results.items():
        rates = [n / r.seconds for r in runs]
        vs_sink = f"{secs['sink'] / secs[name]:.0%}" if "sink" in secs else "-"
        arrived = min(r.found for r in runs)
        print(f"| {name} | {n / secs[name]:.1f} | {mb / secs[name]:.1f} | {min(rates):.0f}-{max(rates):.0f} | "
              f"{vs_sink} | {median([r.server_cpu for r in runs]):.1f} | {median([r.sender_cpu for r in runs]):.1f} | "
              f"{arrived}/{n} | {TARGETS[name].durability} |")
    print()
    orthancs = [k for k in ("orthanc", "orthanc-nagle") if k in secs]
    best: str | None = min(orthancs, key=lambda k: secs[k]) if orthancs else None
    for app in (k for k in ("appliance", "appliance-nomodel") if k in secs):
        for k in orthancs + (["storescp"] if "storescp" in secs else []):
            note = "  (storescp does not fsync)" if k == "storescp" else ""
            print(f"{app} / {k:<13} = {secs[k] / secs[app]:.2f}x{note}")
        if best:
            ratio = secs[best] / secs[app]
            print(f"  target {app} >= {TARGET_RATIO}x Orthanc (the faster Orthanc run, {best}) with the durability "
                  f"guarantee: {ratio:.2f}x -> {'MET' if ratio >= TARGET_RATIO else 'NOT MET'}")
    if "sink" in secs:
        compared = [k for k in secs if k.startswith(("appliance", "orthanc"))]
        line = f"sender ceiling: {n / secs['sink']:.1f} instances/s ({mb / secs['sink']:.0f} MB/s) into the sink"
        if compared:
            top = max(secs["sink"] / secs[k] for k in compared)
            line += (f"; appliance and Orthanc runs reach at most {top:.0%} of it: "
                     + ("the senders are not the bottleneck" if top < 0.8 else "CAUTION: the senders may be limiting"))
        print(line)


TARGETS: dict[str, type[Target]] = {
    t.name: t for t in (Sink, Appliance, ApplianceNoModels, StoreScp, Orthanc, OrthancNagle)
}


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--instances", type=int, default=600, help="instances in the set (default 600)")
    parser.add_argument("--senders", type=int, default=4, help="parallel dcmsend associations (default 4)")
    parser.add_argument("--repeat", type=int, default=5, help="runs per target, median reported (default 5)")
    parser.add_argument("--targets", default=",".join(TARGETS),
                        help=f"comma-separated subset/order of {','.join(TARGETS)}")
    parser.add_argument("--appliance-root", type=Path, default=ROOT,
                        help="run `appliance serve` from this source tree (default: this checkout)")
    parser.add_argument("--workdir", type=Path,
                        help="keep the corpus and the logs here (default: a temp dir, removed at the end)")
    args = parser.parse_args()
    if args.instances < 1 or args.senders < 1 or args.repeat < 1:
        parser.error("--instances, --senders and --repeat must be positive")
    order = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = [t for t in order if t not in TARGETS]
    if unknown:
        parser.error(f"unknown targets: {', '.join(unknown)}")
    for tool in ("dcmsend", "storescp", "echoscu"):
        dcmtk(tool)
    if any(t.startswith("orthanc") for t in order) and not Path(ORTHANC).exists():
        sys.exit(f"bench_ingest: {ORTHANC} not found (install the Debian package orthanc: make setup)")

    global APPLIANCE_ROOT
    APPLIANCE_ROOT = args.appliance_root.resolve()
    if not (APPLIANCE_ROOT / "appliance" / "cli.py").is_file():
        parser.error(f"--appliance-root {APPLIANCE_ROOT}: no appliance/cli.py there")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench_ingest_"))
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"machine: {machine()}")
    print(f"software: {versions()}")
    print(f"appliance: {describe_tree(APPLIANCE_ROOT)}")
    try:
        t = time.perf_counter()
        corpus = build_corpus(workdir / "corpus", args.instances, args.senders)
        syntaxes = ", ".join(f"{pydicom.uid.UID(k).name} {v}" for k, v in sorted(corpus.by_syntax.items()))
        print(f"corpus: {corpus.count} instances, {corpus.total_bytes / MB:.1f} MB ({syntaxes}); "
              f"built in {time.perf_counter() - t:.1f}s")
        results: dict[str, list[Result]] = {name: [] for name in order}
        for round_ in range(1, args.repeat + 1):
            shift = (round_ - 1) % len(order)  # every target takes its turn at each position
            for name in order[shift:] + order[:shift]:
                target = TARGETS[name](workdir / f"{name}-{round_}")
                print(f"round {round_} {name:<14}", end=" ", flush=True)
                try:
                    r = run_target(target, corpus)
                except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
                    print(f"\nFAILED: {name} could not be measured: {exc}")
                    return 1
                results[name].append(r)
                print(f"{r.seconds:6.2f}s {corpus.count / r.seconds:7.1f} instances/s  {r.found}/{corpus.count} arrived"
                      f"  {r.stored_bytes / MB:.0f} MB stored"
                      + (f"  PROBLEMS: {'; '.join(r.problems)}" if r.problems else ""), flush=True)
        print_report(results, corpus, args.senders)
        failed = [p for runs in results.values() for r in runs for p in r.problems]
        if failed:
            print("\nFAILED: not every instance arrived:\n  " + "\n  ".join(failed))
            return 1
        return 0
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
