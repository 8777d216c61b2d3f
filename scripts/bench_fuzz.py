#!/usr/bin/env python3
"""Fuzz benchmark (issue 11): mutated inputs at the DICOM door, a longer run than the test's.

Starts ``appliance serve`` (fresh data directory, loopback ports; the analysis engines left out
unless ``--analysis``) and runs the cases of :mod:`tests.acquire.fuzzing` against it: by default
14,000 dataset-layer and 6,000 PDU-layer cases from seed 1 (tests/acquire/test_fuzz_layers.py
runs 7,000 + 3,000 from its own seed, so the two cover different cases).  Then it reads back
every stored file and the box's log.  It prints the rate of each layer, every outcome with
example case ids, the echo times between chunks, the box's memory peak, and every finding with
the case that caused it.

``--analysis`` keeps the installed models and, after the run, waits for the analysis queue to
drain while watching the box's memory (what the fuzzed images cost the analysis worker).

``--replay D123 P45 ...`` sends single cases to a fresh box instead and prints, for each, what
the box answered and the warnings and exceptions it logged: the reproducer for a finding.

Run: ``.venv/bin/python scripts/bench_fuzz.py [--dataset N] [--pdu N] [--seed S]`` (about 4
minutes on 2 idle cores with the defaults).  Exit status 0 when the run completed, findings or
not (they are printed; the test is the gate), unless ``--strict``.
"""
from __future__ import annotations

import argparse
import sqlite3
import sys
import tempfile
import time
from pathlib import Path
from typing import TextIO

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.acquire.fuzzing.datasets import (  # noqa: E402
    DATASET_CORPUS,
    PDU_CORPUS,
    dataset_case,
    requested_contexts,
)
from tests.acquire.fuzzing.elements import MIB, load_corpus  # noqa: E402
from tests.acquire.fuzzing.pdus import pdu_case  # noqa: E402
from tests.acquire.fuzzing.run import (  # noqa: E402
    BoxWatch,
    DatasetLane,
    FuzzRun,
    PduLane,
    Report,
    summary,
)
from tests.acquire.fuzzing.stored import check_stored_files, log_exceptions  # noqa: E402
from tests.helpers import ServerProcess  # noqa: E402


def start_box(workdir: Path, analysis: bool) -> ServerProcess:
    env = {}
    if not analysis:
        (workdir / "no-engines").mkdir(exist_ok=True)
        env["APPLIANCE_ANALYZE_ENGINES_DIR"] = str(workdir / "no-engines")
    return ServerProcess(workdir / "data", extra_env=env).start()


def _count(data_dir: Path, query: str) -> int:
    con = sqlite3.connect(f"file:{data_dir / 'appliance.db'}?mode=ro", uri=True, timeout=10)
    try:
        (count,) = con.execute(query).fetchone()
    finally:
        con.close()
    return count


def indexed_instances(data_dir: Path) -> int:
    return _count(data_dir, "SELECT COUNT(*) FROM instances")


def analysis_backlog(data_dir: Path) -> int:
    return _count(data_dir, "SELECT COUNT(*) FROM analysis_jobs WHERE state IN ('pending', 'running')")


def wait_for_analysis(server: ServerProcess, limit_s: float) -> None:
    """Watch the box while its analysis worker takes the fuzzed images that were stored."""
    watch = BoxWatch(server.proc.pid, kill_above=2048 * MIB)
    started = time.monotonic()
    try:
        while time.monotonic() - started < limit_s and not watch.killed:
            backlog = analysis_backlog(server.data_dir)
            print(f"  analysis: {backlog} jobs waiting after {time.monotonic() - started:.0f} s, "
                  f"RSS +{(watch.peak - watch.baseline) / MIB:.0f} MiB at peak", flush=True)
            if backlog == 0:
                break
            time.sleep(10)
    finally:
        watch.stop()
    if watch.killed:
        print(f"  the box grew by more than {watch.kill_above // MIB} MiB during analysis and was killed")


def run(args: argparse.Namespace, workdir: Path) -> int:
    server = start_box(workdir, args.analysis)
    findings: list[str] = []
    try:
        started = time.monotonic()
        report, watch = FuzzRun(server.dicom_port, server.proc.pid, seed=args.seed, dataset_cases=args.dataset,
                                pdu_cases=args.pdu, pdu_workers=args.pdu_workers, chunk=args.chunk,
                                progress=lambda line: print(f"  {line}", flush=True)).run()
        elapsed = time.monotonic() - started
        print(summary(report, watch))
        for layer, count in (("dataset", args.dataset), ("pdu", args.pdu)):
            seconds = report.phase_seconds.get(layer)
            if seconds:
                print(f"{layer} layer: {count} cases in {seconds:.0f} s, {count / seconds:.0f} cases/s")
        print(f"run: {elapsed:.0f} s, echo after each chunk: {', '.join(f'{s:.2f}' for s in report.echo_seconds)} s")
        problems, stored = check_stored_files(server.data_dir, report.accepted)
        print(f"stored: {dict(stored)}")
        indexed = indexed_instances(server.data_dir)
        if indexed != stored["files"]:
            problems.append(f"{stored['files']} files stored, {indexed} instances in the index")
        findings += [str(f) for f in report.findings] + problems
        findings += [f"traceback {count}x: {line}" for line, count in
                     log_exceptions(server.log_path.read_text(errors="replace")).items()]
        if args.analysis and server.proc.poll() is None:
            wait_for_analysis(server, args.analysis_wait)
    finally:
        code = server.stop()
    print(f"appliance serve exit code: {code}")
    print(f"{len(findings)} findings" + (":" if findings else ""))
    for line in findings:
        print(f"  {line}")
    return 1 if args.strict and (findings or code != 0) else 0


def replay(args: argparse.Namespace, workdir: Path) -> int:
    server = start_box(workdir, args.analysis)
    corpus, small = load_corpus(DATASET_CORPUS), load_corpus(PDU_CORPUS)
    with open(server.log_path, errors="replace") as log:
        log.seek(0, 2)
        try:
            return _replay_each(args, server, log, corpus, small)
        finally:
            server.stop()


def _replay_each(args: argparse.Namespace, server: ServerProcess, log: TextIO, corpus: list, small: list) -> int:
    for case_id in args.replay:
        report = Report()
        index = int(case_id[1:])
        if case_id[0] == "D":
            case = dataset_case(args.seed, index, corpus)
            DatasetLane(server.dicom_port, requested_contexts(corpus), report, 30, 10).run([case])
        else:
            case = pdu_case(args.seed, index, small)
            PduLane(server.dicom_port, report, 30, 5, 10).run(case)
        time.sleep(0.5)
        logged = log.read().splitlines()
        print(case.describe()[:1000])
        print("  outcome: " + ", ".join(f"{k} {v}" for k, v in report.counts.items() if not k.startswith("cases")))
        for finding in report.findings:
            print(f"  finding: [{finding.what}] {finding.detail}")
        noted = [line for line in logged if " WARNING " in line or " ERROR " in line]
        for line in noted[:10]:
            print(f"  log: {line[:300]}")
        for line, count in log_exceptions("\n".join(logged)).items():
            print(f"  traceback {count}x: {line}")
        if server.proc.poll() is not None:
            print(f"  appliance serve exited with {server.proc.returncode}")
            return 1
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--dataset", type=int, default=14000, help="dataset-layer cases (default 14000)")
    parser.add_argument("--pdu", type=int, default=6000, help="PDU-layer cases (default 6000)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the cases (default 1; the test uses 20261211)")
    parser.add_argument("--pdu-workers", type=int, default=4, help="PDU-layer connections at a time (default 4)")
    parser.add_argument("--chunk", type=int, default=1000, help="cases between two checks of the box (default 1000)")
    parser.add_argument("--analysis", action="store_true", help="keep the analysis engines, and wait for the queue")
    parser.add_argument("--analysis-wait", type=float, default=600, help="longest wait for the analysis queue (s)")
    parser.add_argument("--replay", nargs="+", metavar="CASE", help="replay these cases (D123, P45) one by one")
    parser.add_argument("--workdir", type=Path, help="keep the box's data and log here (default: a temporary dir)")
    parser.add_argument("--strict", action="store_true", help="exit 1 when there is any finding")
    args = parser.parse_args()
    if args.workdir:
        args.workdir.mkdir(parents=True, exist_ok=True)
        return (replay if args.replay else run)(args, args.workdir)
    with tempfile.TemporaryDirectory(prefix="bench-fuzz-") as tmp:
        return (replay if args.replay else run)(args, Path(tmp))


if __name__ == "__main__":
    sys.exit(main())
