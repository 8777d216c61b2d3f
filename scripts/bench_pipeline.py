#!/usr/bin/env python3
"""Benchmark the analysis pipeline end to end against the bare model loop, in one run.

1. Latency: 100 single-image chest CR studies (full resolution, 1955×1841) sent one by one with
   dcmtk dcmsend to `appliance serve`; latency = from the end of the C-STORE association (dcmsend
   returning) to the analysis result row being queryable. Prints p50 / p95 (target p95 ≤ 1 s).
2. Burst: 500 chest CR images (area-resized to 512×512 to keep the burst's disk use sane) sent by
   4 parallel dcmsend processes.  Queue drain rate = the jobs still queued when the last image is
   stored / (last result time − that moment): what the analysis queue sustains on a backlog.
   Also printed: the receive rate and the end-to-end rate (first C-STORE to last result), which
   include durable ingest (measured on its own by bench_ingest.py), and the drain including the
   AI objects (the last SR and heatmap SC stored), which the results stage builds from the
   result rows without running the model again.
3. Baseline, same images, same process budget: decode + preprocess + inference of each image in
   one loop (`ModelRunner.analyze` without the heatmap), i.e. what the model work alone costs.
   The ratio queue drain / bare shows what the queue, database and files cost (target ≥ 0.85:
   one inference per image, the rest is bookkeeping).

Usage: .venv/bin/python scripts/bench_pipeline.py [--latency-n 100] [--burst-n 500] [--senders 4] [--workers 2]
"""
from __future__ import annotations

import argparse
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pydicom

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from appliance.analyze.runner import get_runner  # noqa: E402
from appliance.config import load_config  # noqa: E402
from tests.helpers import CALLING_AE, ServerProcess, resized_copy, sample, write_fresh_copies  # noqa: E402

MODEL = "cxr-pneumonia"


def send(port: int, files: list[Path]) -> None:
    result = subprocess.run(["dcmsend", "-nh", "-aet", CALLING_AE, "-aec", "EDGE", "127.0.0.1", str(port), *map(str, files)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"dcmsend failed: {result.stderr[-500:]}")


def result_count(db: sqlite3.Connection, uids: list[str] | None = None) -> int:
    if uids is None:
        return db.execute("SELECT COUNT(*) FROM analysis_results").fetchone()[0]
    marks = ",".join("?" * len(uids))
    return db.execute(f"SELECT COUNT(*) FROM analysis_results WHERE sop_instance_uid IN ({marks})", uids).fetchone()[0]


def objects_pending(db: sqlite3.Connection) -> int:
    return db.execute("SELECT COUNT(*) FROM analysis_results WHERE objects_state IN ('pending', 'building')").fetchone()[0]


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


def bench_latency(work: Path, n: int, workers: int) -> list[float]:
    files = write_fresh_copies([pydicom.dcmread(sample("RG1_UNCR.dcm"))] * n, work / "latency")
    server = ServerProcess(work / "data-latency", allowed=CALLING_AE,
                           extra_env={"APPLIANCE_ANALYZE_WORKERS": str(workers)}).start()
    latencies = []
    try:
        db = sqlite3.connect(server.data_dir / "appliance.db")
        for path in files:
            uid = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
            send(server.dicom_port, [path])
            t0 = time.perf_counter()
            while result_count(db, [uid]) == 0:
                if time.perf_counter() - t0 > 60:
                    raise SystemExit(f"no result for {uid} after 60 s")
                time.sleep(0.005)
            latencies.append(time.perf_counter() - t0)
        db.close()
    finally:
        server.stop()
    return latencies


def bench_burst(files: list[Path], work: Path, senders: int, workers: int) -> dict[str, float]:
    """Send the burst; time the whole (first C-STORE to last result) and the queue's drain
    (from the moment every image is stored and queued to the last result)."""
    server = ServerProcess(work / "data-burst", allowed=CALLING_AE, extra_env={"APPLIANCE_ANALYZE_WORKERS": str(workers)}).start()
    try:
        db = sqlite3.connect(server.data_dir / "appliance.db")
        t0 = time.perf_counter()
        procs = [subprocess.Popen(["dcmsend", "-nh", "-aet", CALLING_AE, "-aec", "EDGE", "127.0.0.1",
                                   str(server.dicom_port), *map(str, files[i::senders])],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for i in range(senders)]
        for p in procs:
            if p.wait() != 0:
                raise SystemExit("dcmsend failed during the burst")
        received = time.perf_counter()
        done_at_received = result_count(db)
        while result_count(db) < len(files):
            if time.perf_counter() - t0 > 1200:
                raise SystemExit("burst did not drain in 20 minutes")
            time.sleep(0.02)
        finished = time.perf_counter()
        while objects_pending(db):
            if time.perf_counter() - t0 > 2400:
                raise SystemExit("the burst's AI objects were not built in 40 minutes")
            time.sleep(0.05)
        objects_finished = time.perf_counter()
        db.close()
    finally:
        server.stop()
    return {
        "receive_rate": len(files) / (received - t0),
        "end_to_end_rate": len(files) / (finished - t0),
        "queued": len(files) - done_at_received,
        "drain_rate": (len(files) - done_at_received) / (finished - received),
        "objects_rate": (len(files) - done_at_received) / (objects_finished - received),
    }


def bench_bare(files: list[Path]) -> float:
    config = load_config(environ={})
    runner = get_runner(MODEL, config)
    runner.analyze(files[0], make_heatmap=False)  # load / warm up
    t0 = time.perf_counter()
    for path in files:
        result = runner.analyze(path, make_heatmap=False)
        assert result.analyzed, result.abstention
    return len(files) / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--latency-n", type=int, default=100)
    parser.add_argument("--burst-n", type=int, default=500)
    parser.add_argument("--senders", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2, help="analyze.workers of the served box (default 2)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-pipeline-") as tmp:
        work = Path(tmp)
        print(f"latency: {args.latency_n} single-image chest CR studies (1955x1841), sent one by one", flush=True)
        lat = bench_latency(work, args.latency_n, args.workers) if args.latency_n else []
        burst_files = write_fresh_copies([resized_copy(pydicom.dcmread(sample("RG1_UNCR.dcm")), 512)] * args.burst_n,
                                         work / "burst")
        print(f"bare loop: decode + preprocess + infer of {len(burst_files)} images, one process", flush=True)
        bare = bench_bare(burst_files)
        print(f"burst: {len(burst_files)} images, {args.senders} parallel dcmsend, analyze.workers = {args.workers}",
              flush=True)
        burst = bench_burst(burst_files, work, args.senders, args.workers)
    print()
    print(f"{'measure':<44} {'value':>10}")
    if lat:
        p50, p95 = pct(lat, 50), pct(lat, 95)
        print(f"{'latency p50 (end of association -> result)':<44} {p50 * 1000:>8.0f}ms")
        print(f"{'latency p95':<44} {p95 * 1000:>8.0f}ms   target <= 1000 ms: {'MET' if p95 <= 1.0 else 'NOT MET'}")
        print(f"{'latency max':<44} {max(lat) * 1000:>8.0f}ms   mean {statistics.mean(lat) * 1000:.0f} ms")
    print(f"{'bare decode+preprocess+infer rate':<44} {bare:>8.1f}/s")
    print(f"{'burst receive rate (C-STORE, durable)':<44} {burst['receive_rate']:>8.1f}/s")
    print(f"{'burst end to end (first C-STORE -> last result)':<44} {burst['end_to_end_rate']:>8.1f}/s"
          f"   ratio to bare {burst['end_to_end_rate'] / bare:.2f}")
    print(f"{'queue drain (all stored -> last result)':<44} {burst['drain_rate']:>8.1f}/s"
          f"   ({burst['queued']:.0f} jobs queued when the burst was in)")
    print(f"{'drain incl. AI objects (-> last SR/SC)':<44} {burst['objects_rate']:>8.1f}/s")
    ratio = burst["drain_rate"] / bare
    print(f"{'ratio queue drain / bare':<44} {ratio:>9.2f}   target >= 0.85: {'MET' if ratio >= 0.85 else 'NOT MET'}")


if __name__ == "__main__":
    main()
