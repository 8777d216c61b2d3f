from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest

from tests.helpers import ServerProcess


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator:
    """Start `appliance serve` processes; every one is stopped at the end of the test."""
    started: list[ServerProcess] = []

    def make(data_dir: Path | None = None, **kwargs) -> ServerProcess:
        server = ServerProcess(data_dir or tmp_path / "data", **kwargs)
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()
