"""SIGKILL the server repeatedly while it analyzes a burst: exactly one result per image and model."""
from __future__ import annotations

import random
import sqlite3
import time
from collections import Counter
from pathlib import Path

import pydicom
import pytest

from tests.helpers import dcmsend, resized_copy, sample, write_fresh_copies
from tests.pipeline.test_pipeline_e2e import wait_until_analyzed

N_CHEST, N_US, N_CT = 120, 60, 20
KILLS = 10
EXPECTED_MODEL = {"CR": "cxr-pneumonia", "US": "us-breast-lesion", "CT": "router"}


def burst(out: Path) -> list[Path]:
    chest = resized_copy(pydicom.dcmread(sample("RG1_UNCR.dcm")), 512)  # small: hundreds stay cheap
    us = pydicom.dcmread(sample("US1_UNCR.dcm"))
    ct = pydicom.dcmread(sample("CT_small.dcm"))
    return write_fresh_copies([chest] * N_CHEST + [us] * N_US + [ct] * N_CT, out)


@pytest.mark.slow
def test_sigkill_during_analysis_burst(server_factory, tmp_path):
    rng = random.Random(11)
    files = burst(tmp_path / "burst")
    server = server_factory().start()
    assert dcmsend(server.dicom_port, files, timeout=600).returncode == 0
    for _ in range(KILLS):
        time.sleep(rng.uniform(0.3, 1.5))
        server.kill()
        server.start()
    wait_until_analyzed(server.data_dir, len(files), timeout=600)
    server.stop()

    conn = sqlite3.connect(server.data_dir / "appliance.db")
    modality = {uid: m for uid, m in conn.execute(
        "SELECT i.sop_instance_uid, s.modality FROM instances i JOIN series s USING (series_uid) WHERE i.source != 'ai'")}
    assert len(modality) == len(files)
    results = Counter(conn.execute("SELECT sop_instance_uid, model_id FROM analysis_results").fetchall())
    assert all(n == 1 for n in results.values()), "duplicated results"
    assert set(results) == {(uid, EXPECTED_MODEL[m]) for uid, m in modality.items()}, "missing results"
    # Every DICOM result object exists once, and every stored AI object belongs to a result.
    referenced = {p for sr, hm in conn.execute("SELECT sr_path, heatmap_path FROM analysis_results")
                  for p in (sr, hm) if p}
    ai_objects = {p for (p,) in conn.execute("SELECT file_path FROM instances WHERE source = 'ai'")}
    assert referenced == ai_objects
    assert all(Path(p).is_file() for p in ai_objects)
    states = Counter(s for (s,) in conn.execute("SELECT state FROM analysis_jobs"))
    assert set(states) == {"done"}, states
    conn.close()
