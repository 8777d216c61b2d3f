"""A real Orthanc (with its DICOMweb plugin) on loopback, one per test, stopped at the end."""
from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path
from typing import Iterator, Optional

import pytest
import requests

from tests.helpers import free_port

ORTHANC = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
HUB_AE = "HUB"
USER, PASSWORD = "box", "s3cret-test"


class Orthanc:
    """Orthanc with its own config, storage and free loopback ports; basic auth on HTTP."""

    def __init__(self, workdir: Path, modalities: Optional[dict[str, list]] = None):
        self.workdir = workdir
        self.dicom_port, self.http_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.dicomweb_url = self.url + "/dicom-web"
        self.auth = (USER, PASSWORD)
        self.config_path = workdir / "orthanc.json"
        workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(json.dumps({
            "Name": "test-hub", "StorageDirectory": str(workdir / "storage"),
            "IndexDirectory": str(workdir / "storage"), "DicomAet": HUB_AE, "DicomPort": self.dicom_port,
            "HttpPort": self.http_port, "RemoteAccessAllowed": False, "AuthenticationEnabled": True,
            "RegisteredUsers": {USER: PASSWORD}, "DicomAlwaysAllowFind": True, "DicomAlwaysAllowStore": True,
            "DicomCheckCalledAet": False, "Plugins": [DICOMWEB_PLUGIN], "StorageCompression": False,
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "StudiesMetadata": "MainDicomTags"},
            "DicomModalities": modalities or {}, "HttpTimeout": 60, "StableAge": 1,
        }))
        self.proc: Optional[subprocess.Popen] = None

    def start(self) -> "Orthanc":
        self.log = open(self.workdir / "orthanc.log", "ab")
        self.proc = subprocess.Popen([ORTHANC, str(self.config_path)], stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if requests.get(self.url + "/system", auth=self.auth, timeout=1).ok:
                    return self
            except requests.RequestException:
                pass
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        raise RuntimeError("Orthanc did not start: " + (self.workdir / "orthanc.log").read_text()[-2000:])

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None
            self.log.close()

    def get(self, path: str) -> requests.Response:
        r = requests.get(self.url + path, auth=self.auth, timeout=30)
        r.raise_for_status()
        return r

    def instance_ids(self) -> list[str]:
        return self.get("/instances").json()

    def instance_count(self) -> int:
        return int(self.get("/statistics").json()["CountInstances"])

    def instance_file(self, orthanc_id: str) -> bytes:
        return self.get(f"/instances/{orthanc_id}/file").content

    def tags(self, orthanc_id: str) -> dict:
        return self.get(f"/instances/{orthanc_id}/simplified-tags").json()

    def upload(self, data: bytes) -> dict:
        r = requests.post(self.url + "/instances", data=data, auth=self.auth, timeout=30)
        r.raise_for_status()
        return r.json()


@pytest.fixture
def orthanc_factory(tmp_path: Path) -> Iterator:
    started: list[Orthanc] = []

    def make(name: str = "hub", **kwargs) -> Orthanc:
        hub = Orthanc(tmp_path / name, **kwargs)
        started.append(hub)
        return hub

    yield make
    for hub in started:
        hub.stop()


@pytest.fixture
def orthanc(orthanc_factory) -> Orthanc:
    return orthanc_factory().start()
