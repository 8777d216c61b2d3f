"""Worklist server time with 10,000 studies (target: first page under 200 ms).

Fills a temporary database with 10,000 analysed studies (patient, series, image, job and an AI
result each, priorities spread like a busy clinic), signs in through the real login form, and
times the whole request for the worklist's first page through Flask's test client (auth gate,
queries, template rendering: everything except the network), plus the JSON polling endpoint
and a search.  Baseline, measured in the same run: the bare SQL query for the first page's
studies (what any worklist must at least do), and the ratio of each figure to it.

    .venv/bin/python scripts/bench_worklist.py [--studies 10000] [--repeat 200]
"""
from __future__ import annotations

import argparse
import json
import random
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from appliance import accounts, triage  # noqa: E402
from appliance.config import load_config  # noqa: E402
from appliance.db import open_database  # noqa: E402

TARGET_MS = 200.0
PRIORITIES = [("urgent", 0.03), ("review", 0.12), ("routine", 0.6), ("not_analyzed", 0.25)]


def fill(database: Any, n: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    now = "2026-11-28T08:00:00.000+00:00"
    patients, studies, series, instances, jobs, results = [], [], [], [], [], []
    for i in range(n):
        priority = rng.choices([p for p, _ in PRIORITIES], [w for _, w in PRIORITIES])[0]
        p = round(rng.random(), 4)
        study, ser, sop = f"1.2.826.0.1.{i}", f"1.2.826.0.1.{i}.1", f"1.2.826.0.1.{i}.1.1"
        received = f"2026-11-{1 + i % 27:02d}T{i % 24:02d}:{i % 60:02d}:00.000+00:00"
        patients.append((i + 1, f"P{i:06d}", f"FAMILY{i}^GIVEN{i % 97}", f"19{40 + i % 60}0{1 + i % 9}15", "FM"[i % 2]))
        studies.append((study, i + 1, f"ACC{i}", "20261128", "CHEST PA", "analyzed", received, received,
                        priority, triage.PRIORITY_RANK[priority], p if priority != "not_analyzed" else 0.0))
        series.append((ser, study, "CR" if i % 5 else "US"))
        instances.append((sop, ser, study, f"/data/instances/{study}/{ser}/{sop}.dcm", received))
        jobs.append((sop, study, received, received))
        finding = {"code": "pneumonia", "label": "Pneumonia suspected", "probability": p,
                   "positive": priority in ("urgent", "review"), "threshold": 0.31, "severity": "urgent"}
        status = "abstained" if priority == "not_analyzed" else "analyzed"
        results.append((sop, study, "cxr-pneumonia", "1.0.0", status,
                        json.dumps([finding] if status == "analyzed" else []),
                        "WRONG_BODY_PART" if status == "abstained" else "", now))
    with database.atomic() as tx:
        tx.conn.executemany("INSERT INTO patients (id, patient_id, name, birth_date, sex) VALUES (?, ?, ?, ?, ?)", patients)
        tx.conn.executemany("INSERT INTO studies (study_uid, patient_pk, accession, study_date, description, state, "
                       "first_received_at, last_received_at, priority, priority_rank, score) "
                       "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", studies)
        tx.conn.executemany("INSERT INTO series (series_uid, study_uid, modality) VALUES (?, ?, ?)", series)
        tx.conn.executemany("INSERT INTO instances (sop_instance_uid, series_uid, study_uid, sop_class_uid, file_path, size, "
                       "sha256, transfer_syntax, received_at) VALUES (?, ?, ?, '1.2.840.10008.5.1.4.1.1.1', ?, 0, "
                       "'', '1.2.840.10008.1.2.1', ?)", instances)
        tx.conn.executemany("INSERT INTO analysis_jobs (sop_instance_uid, study_uid, state, created_at, updated_at) "
                       "VALUES (?, ?, 'done', ?, ?)", jobs)
        tx.conn.executemany("INSERT INTO analysis_results (sop_instance_uid, study_uid, model_id, model_version, status, "
                       "findings_json, abstention_code, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)", results)
    database.db.execute("ANALYZE")


def timed(fn: Callable[[], Any], repeat: int) -> list[float]:
    fn()  # warm-up: template compilation, first connection
    out = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        out.append((time.perf_counter() - start) * 1000.0)
    return out


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=200)
    args = parser.parse_args()
    from web import create_app

    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp) / "data"
        database = open_database(data_dir)
        started = time.perf_counter()
        fill(database, args.studies)
        print(f"filled {args.studies} studies in {time.perf_counter() - started:.1f} s")
        accounts.create_user(database, "bench", "bench-password", "staff")
        config = load_config(overrides={"storage.data_dir": str(data_dir)}, environ={})
        app = create_app(config)
        client = app.test_client()
        token = re.search(r'name="csrf-token" content="([^"]+)"', client.get("/login").text).group(1)  # type: ignore[union-attr]
        client.post("/login", data={"csrf_token": token, "username": "bench", "password": "bench-password"})

        def page(url: str) -> Callable[[], Any]:
            def run() -> None:
                response = client.get(url)
                if response.status_code != 200:
                    raise SystemExit(f"{url} answered {response.status_code}")
            return run

        def bare_sql() -> None:
            database.query(
                "SELECT s.*, p.patient_id, p.name, p.birth_date, p.sex FROM studies s JOIN patients p ON "
                f"p.id = s.patient_pk ORDER BY {triage.WORKLIST_ORDER}, s.study_uid LIMIT 25")

        runs = {
            "bare SQL first page (baseline)": timed(bare_sql, args.repeat),
            "GET / (worklist page 1, HTML)": timed(page("/"), args.repeat),
            "GET /api/worklist (poll, JSON)": timed(page("/api/worklist"), args.repeat),
            "GET /?q=FAMILY4242 (search)": timed(page("/?q=FAMILY4242"), args.repeat),
            "GET /?priority=urgent&page=2": timed(page("/?priority=urgent&page=2"), args.repeat),
        }
    baseline = statistics.median(runs["bare SQL first page (baseline)"])
    print(f"{args.studies} studies, {args.repeat} repetitions each, Flask test client (server time, no network)")
    print(f"{'measurement':<34} {'p50 ms':>8} {'p95 ms':>8} {'x baseline':>11}")
    for name, values in runs.items():
        p50 = statistics.median(values)
        print(f"{name:<34} {p50:8.2f} {pct(values, 0.95):8.2f} {p50 / baseline:11.1f}")
    first = runs["GET / (worklist page 1, HTML)"]
    verdict = "PASS" if pct(first, 0.95) < TARGET_MS else "FAIL"
    print(f"worklist first page p95 {pct(first, 0.95):.1f} ms vs target {TARGET_MS:.0f} ms: {verdict}")
    return 0 if verdict == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
