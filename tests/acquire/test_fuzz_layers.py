"""Ten thousand mutated inputs at the DICOM door, at two layers (issue 11).

7,000 real datasets (CR, CT, MR, US, RT dose, SEG, SR; single- and multi-frame; native, JPEG,
JPEG-LS, JPEG 2000, RLE, big endian, implicit VR, deflated), each mutated 1-3 times (bit flips,
inserted and deleted bytes, truncation, false and huge lengths, false VRs, duplicated, removed
and swapped elements, hostile values, broken pixel data fragments, deep nesting, a wrong
transfer syntax, mismatched or hostile UIDs), as C-STOREs over two long associations; then 3,000
PDU-layer cases on raw connections, four at a time: a third mutated A-ASSOCIATE-RQs, the rest a
valid association followed by a mutated C-STORE stream (false PDU and PDV lengths, unknown
context ids, control headers, fragments out of order, unknown and out-of-place PDU types,
broken command sets, cut streams).  Fixed seed; the cases are in :mod:`tests.acquire.fuzzing`,
and ``scripts/bench_fuzz.py --replay P123`` replays one.

The box must come out whole: the same processes, no thread dead of an unhandled exception, no
hang, memory bounded, every C-STORE answered with a status (or an abort), every connection
closed once the peer has closed its side, every stored file complete and readable, the index
consistent, and a C-ECHO answered within 2 s after every 1,000 inputs and at the end.  The
analysis engines are left out (an empty engines directory): this is about the door, and the
models would take the two cores for minutes.
"""
from __future__ import annotations

import json
import time

import pydicom
import pytest

from tests.acquire.fuzzing.elements import MIB
from tests.acquire.fuzzing.run import (
    SETTLE_S,
    FuzzRun,
    control_store,
    echo_seconds,
    summary,
)
from tests.acquire.fuzzing.stored import check_stored_files, log_exceptions
from tests.helpers import dcmsend, run_cli, sample

SEED = 20261211
DATASET_CASES = 7000
PDU_CASES = 3000
ECHO_LIMIT_S = 2.0
# The box at rest is ~200 MiB over its processes and grows ~60 MiB in this run; a door that
# allocates what a header claims, or keeps what it was sent, shows up as hundreds of MiB to GiB.
RSS_GROWTH_LIMIT = 300 * MIB
# Threads the box may have above its start once the run is over (its staging pools fill lazily);
# associations that never ended would be two threads each, hundreds in all.
THREAD_SLACK = 24


def _the_box_after(server, report, watch) -> list[str]:
    """What is wrong with the box's processes, threads and log after the run."""
    problems = []
    if server.proc.poll() is not None:
        problems.append(f"appliance serve exited with {server.proc.returncode}")
    problems += watch.alive()
    if watch.peak - watch.baseline > RSS_GROWTH_LIMIT:
        problems.append(f"the box grew by {(watch.peak - watch.baseline) / MIB:.0f} MiB at its peak")
    deadline = time.monotonic() + 15
    while watch.threads() > watch.baseline_threads + THREAD_SLACK and time.monotonic() < deadline:
        time.sleep(0.5)
    if watch.threads() > watch.baseline_threads + THREAD_SLACK:
        problems.append(f"{watch.threads()} threads in the box after the run, {watch.baseline_threads} before")
    for exception, count in log_exceptions(server.log_path.read_text(errors="replace")).items():
        problems.append(f"the box logged a traceback {count}x: {exception}")
    return problems


def _what_it_stored(server, accepted: dict[str, str]) -> list[str]:
    """Every stored file complete and readable, and the index listing as many instances."""
    problems, stored = check_stored_files(server.data_dir, accepted)
    print(f"stored: {dict(stored)}")
    listing = run_cli("studies", "--json", "--data-dir", str(server.data_dir), env=server.env)
    if listing.returncode != 0:
        problems.append(f"appliance studies --json failed: {listing.stderr[-500:]}")
    else:
        indexed = sum(study["instance_count"] for study in json.loads(listing.stdout)["studies"])
        if indexed != stored["files"]:
            problems.append(f"appliance studies lists {indexed} instances, {stored['files']} files are stored")
    return problems


def _still_serving(server, report) -> list[str]:
    """An echo within 2 s (after every chunk and now), and a real file stored by dcmtk."""
    problems = []
    slow = [s for s in report.echo_seconds if s > ECHO_LIMIT_S]
    if slow:
        problems.append(f"{len(slow)} echoes between chunks failed or took over {ECHO_LIMIT_S} s")
    time.sleep(SETTLE_S)
    echo = echo_seconds(server.dicom_port, ECHO_LIMIT_S)
    if echo > ECHO_LIMIT_S:
        problems.append(f"echoscu after the run failed or took over {ECHO_LIMIT_S} s")
    real = pydicom.dcmread(sample("CT_small.dcm"), stop_before_pixels=True)
    sent = dcmsend(server.dicom_port, [sample("CT_small.dcm")], timeout=60)
    where = server.data_dir / "instances" / real.StudyInstanceUID / real.SeriesInstanceUID
    if sent.returncode != 0 or not (where / f"{real.SOPInstanceUID}.dcm").is_file():
        problems.append(f"dcmsend after the run (exit {sent.returncode}) did not store its file: {sent.stdout[-300:]}")
    return problems


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_ten_thousand_mutated_inputs_leave_the_box_whole(server_factory, tmp_path):
    engines = tmp_path / "no-engines"
    engines.mkdir()
    server = server_factory(extra_env={"APPLIANCE_ANALYZE_ENGINES_DIR": str(engines)}).start()
    control_uid, control_sha = control_store(server.dicom_port)

    started = time.monotonic()
    report, watch = FuzzRun(server.dicom_port, server.proc.pid, seed=SEED, dataset_cases=DATASET_CASES,
                            pdu_cases=PDU_CASES, echo_limit=ECHO_LIMIT_S, progress=print).run()
    text = f"{summary(report, watch)}\nrun: {time.monotonic() - started:.0f} s"
    print(text)

    problems = [str(finding) for finding in report.findings]
    # Every case ran (none skipped because the box was stuck), and the mutations reached both the
    # parser's acceptance and its refusals: the run was not trivially one-sided.
    ran = report.counts["cases run: dataset"], report.counts["cases run: pdu"]
    if ran != (DATASET_CASES, PDU_CASES):
        problems.append(f"{ran[0]} dataset and {ran[1]} PDU cases ran, not all of them")
    refused = sum(count for key, count in report.counts.items() if key.startswith("dataset: 0x"))
    if report.counts["dataset: success"] < 500 or refused < 3000:
        problems.append(f"one-sided mutations: {report.counts['dataset: success']} stored, {refused} refused")
    if report.counts["pdu data: ABORT"] + report.counts["pdu association: ABORT"] < 500:
        problems.append("fewer than 500 PDU cases were aborted: the PDU mutations did not reach the box's checks")

    problems += _the_box_after(server, report, watch)
    problems += _what_it_stored(server, {**report.accepted, control_uid: control_sha})
    problems += _still_serving(server, report)
    code = server.stop()
    if code != 0:
        problems.append(f"appliance serve stopped with exit code {code}")
    assert not problems, f"{len(problems)} problems:\n" + "\n".join(problems[:60]) + "\n" + text
