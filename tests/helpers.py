"""Shared test helpers: free ports, real sample files, and `appliance serve` as a subprocess."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests
from pydicom.data import get_testdata_file

PROJECT_ROOT = Path(__file__).resolve().parent.parent
# The validation data sets sit beside the project on every development machine and in CI; the
# configuration has no default for them (analyze.shared_data_dir), so tests pass this one.
SHARED_DATA = PROJECT_ROOT.parent / "shared" / "data"
CALLING_AE = "MODALITY"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sample(name: str) -> Path:
    """A real DICOM file shipped by pydicom or pydicom-data."""
    path = get_testdata_file(name)
    if path is None:
        raise FileNotFoundError(f"sample {name} is not installed (pydicom-data missing?)")
    return Path(path)


# One real file per transfer syntax the SCP must accept (name -> transfer syntax).
SAMPLES_BY_SYNTAX = {
    "RG1_UNCR.dcm": "Explicit VR Little Endian (chest CR)",
    "RG1_J2KR.dcm": "JPEG 2000 lossless (chest CR)",
    "RG1_J2KI.dcm": "JPEG 2000 lossy (chest CR)",
    "MR_small_implicit.dcm": "Implicit VR Little Endian",
    "image_dfl.dcm": "Deflated Explicit VR Little Endian",
    "MR_small_bigendian.dcm": "Explicit VR Big Endian",
    "color3d_jpeg_baseline.dcm": "JPEG baseline (120-frame ultrasound)",
    "JPGExtended.dcm": "JPEG extended",
    "JPEG-LL.dcm": "JPEG lossless process 14 SV1",
    "JPGLosslessP14SV1_1s_1f_8b.dcm": "JPEG lossless (ultrasound)",
    "MR_small_jpeg_ls_lossless.dcm": "JPEG-LS lossless",
    "US1_J2KR.dcm": "JPEG 2000 lossless (colour ultrasound)",
    "OBXXXX1A_rle.dcm": "RLE (palette ultrasound)",
    "OBXXXX1A_rle_2frame.dcm": "RLE (ultrasound multi-frame)",
    "SC_rgb_rle.dcm": "RLE (secondary capture)",
    "test-SR.dcm": "SR",
}


class ServerProcess:
    """`appliance serve` in a subprocess on free loopback ports."""

    def __init__(self, data_dir: Path, extra_env: dict[str, str] | None = None, config_file: Path | None = None,
                 allowed: str = CALLING_AE, dicom_port: int | None = None, http_port: int | None = None):
        self.data_dir = data_dir
        self.dicom_port = dicom_port or free_port()
        self.http_port = http_port or free_port()
        self.log_path = data_dir.parent / f"{data_dir.name}-serve.log"
        env = dict(os.environ)
        env.update({
            "APPLIANCE_DICOM_ALLOWED_CALLING_AES": allowed,
            "APPLIANCE_STORAGE_MIN_FREE_MB": "0",
        })
        env.update(extra_env or {})
        self.env = env
        self.config_file = config_file
        self.proc: subprocess.Popen | None = None

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "appliance.cli", "serve", "--data-dir", str(self.data_dir), "--host", "127.0.0.1",
               "--dicom-port", str(self.dicom_port), "--http-port", str(self.http_port)]
        if self.config_file:
            cmd += ["--config", str(self.config_file)]
        return cmd

    def start(self, wait: bool = True) -> "ServerProcess":
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.command(), env=self.env, stdout=self.log, stderr=subprocess.STDOUT,
                                     cwd=PROJECT_ROOT)
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.log_path.read_text()[-3000:]}")
            try:
                if requests.get(f"http://127.0.0.1:{self.http_port}/healthz", timeout=1).ok and self.echo():
                    return
            except requests.RequestException:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"server not ready in {timeout}s: {self.log_path.read_text()[-3000:]}")

    def echo(self, aet: str = CALLING_AE) -> bool:
        r = subprocess.run(["echoscu", "-aet", aet, "-aec", "EDGE", "127.0.0.1", str(self.dicom_port)],
                           capture_output=True, timeout=30)
        return r.returncode == 0

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)
        if self.proc is not None:
            self.log.close()
        self.proc = None

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        code = self.proc.returncode
        self.proc = None
        self.log.close()
        return code


def dcmsend(port: int, files: list[Path], aet: str = CALLING_AE, timeout: float = 300) -> subprocess.CompletedProcess:
    """dcmtk's dcmsend: proposes each file's own transfer syntax, no conversion."""
    return subprocess.run(
        ["dcmsend", "-v", "-nh", "-aet", aet, "-aec", "EDGE", "127.0.0.1", str(port), *map(str, files)],
        capture_output=True, text=True, timeout=timeout,
    )


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "appliance.cli", *args], capture_output=True, text=True,
                          env=full_env, timeout=timeout, cwd=PROJECT_ROOT)


def dataset_body(path: Path) -> bytes:
    """The encoded dataset after the Part 10 preamble and file meta: what DIMSE carries."""
    from pydicom.filereader import _read_file_meta_info, read_preamble

    with open(path, "rb") as fh:
        read_preamble(fh, False)
        _read_file_meta_info(fh)
        return fh.read()


def paediatric_chest(ds) -> None:
    """Give a chest radiograph with no Patient's Age but a birth date the age 003Y, in place.

    RG1's birth date (1940) makes it a 64-year-old at its study date, outside the reference
    pneumonia model's population (children aged 1–5): copies made here stay analysable. Tests of
    the population gate set Patient's Age themselves (or remove the birth date too)."""
    if str(ds.get("BodyPartExamined", "")).upper() == "CHEST" and "PatientAge" not in ds \
            and ds.get("PatientBirthDate"):
        ds.PatientAge = "003Y"


def paediatric_sample_bytes(name: str = "RG1_UNCR.dcm") -> bytes:
    """A chest sample as Part 10 bytes with Patient's Age 003Y (same UIDs): analysable by the
    reference pneumonia model, which abstains on RG1 as shipped (a 64-year-old)."""
    import io

    import pydicom

    ds = pydicom.dcmread(sample(name))
    ds.PatientAge = "003Y"
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def paediatric_sample(directory: Path, name: str = "RG1_UNCR.dcm") -> Path:
    """:func:`paediatric_sample_bytes` written as ``directory/name``."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_bytes(paediatric_sample_bytes(name))
    return path


def resized_copy(ds, size: int):
    """A copy of an image dataset with its (single-frame, grey) pixels area-resized to size×size."""
    import cv2
    import numpy as np

    out = ds.copy()
    pixels = cv2.resize(ds.pixel_array, (size, size), interpolation=cv2.INTER_AREA).astype(ds.pixel_array.dtype)
    out.Rows = out.Columns = size
    out.PixelData = np.ascontiguousarray(pixels).tobytes()
    paediatric_chest(out)
    return out


def write_fresh_copies(templates: list, out: Path, per_study: int = 1) -> list[Path]:
    """Write one file per template with new Study/Series/SOP Instance UIDs (``per_study``
    consecutive files share a study and series), as distinct instances a modality would send."""
    from pydicom.uid import generate_uid

    out.mkdir(parents=True)
    files = []
    study = series = ""
    for i, template in enumerate(templates):
        if i % per_study == 0:
            study, series = generate_uid(), generate_uid()
        ds = template.copy()
        paediatric_chest(ds)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.InstanceNumber = i % per_study + 1
        path = out / f"{i:04d}.dcm"
        ds.save_as(path)
        files.append(path)
    return files
