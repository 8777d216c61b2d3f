"""InstanceStore without a network: the cached free-space check, staged files, syncfs fallback."""
from __future__ import annotations

import shutil
from collections import namedtuple

import pytest

from appliance import store as store_module
from appliance.db import open_database
from appliance.errors import InvalidDatasetError, OutOfSpaceError
from appliance.store import MIB, SPACE_MARGIN, InstanceStore
from tests.helpers import sample

Usage = namedtuple("Usage", "total used free")


@pytest.fixture
def box(tmp_path):
    return InstanceStore(tmp_path / "data", open_database(tmp_path / "data"), min_free_mb=100)


def _fake_disk(monkeypatch, free: list[int]) -> list[int]:
    calls = []

    def disk_usage(_path):
        calls.append(1)
        return Usage(0, 0, free[0])

    monkeypatch.setattr(shutil, "disk_usage", disk_usage)
    return calls


def test_free_space_is_measured_once_a_second_while_far_above_the_floor(box, monkeypatch):
    free = [100 * MIB + SPACE_MARGIN + 50 * MIB]
    calls = _fake_disk(monkeypatch, free)
    box.check_space(10 * MIB)
    box.check_space(10 * MIB)
    assert len(calls) == 1
    # Accepted bytes count against the estimate: 40 MiB more brings it within the margin.
    box.check_space(40 * MIB)
    assert len(calls) == 2


def test_near_the_floor_every_check_measures_and_refuses_below_it(box, monkeypatch):
    free = [100 * MIB + 5 * MIB]
    calls = _fake_disk(monkeypatch, free)
    box.check_space(MIB)
    box.check_space(MIB)
    assert len(calls) == 2
    with pytest.raises(OutOfSpaceError, match="below the floor of 100 MiB"):
        box.check_space(6 * MIB)
    free[0] = 100 * MIB + SPACE_MARGIN * 2  # space freed: accepted at once, not after a delay
    box.check_space(6 * MIB)


def test_a_rejected_dataset_leaves_no_staged_file(box):
    staged = box.stage(b"not dicom at all" * 100)
    tmp, _sha = staged.result()
    assert tmp.exists()
    with pytest.raises(InvalidDatasetError):
        box.store(b"not dicom at all" * 100)
    staged.discard()
    assert list(box.tmp_dir.iterdir()) == []


def test_without_syncfs_each_directory_is_fsynced(box, monkeypatch):
    synced = []
    monkeypatch.setattr(store_module, "_SYNCFS", None)
    monkeypatch.setattr(store_module, "fsync_dir", lambda path: synced.append(path))
    outcome = box.store(sample("CT_small.dcm").read_bytes())
    # A new study: the instances directory, the study directory and the series directory.
    assert set(synced) == {box.instances_dir, outcome.path.parent.parent, outcome.path.parent}
