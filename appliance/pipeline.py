"""The AI pipeline of the box: the analysis stage, then the results stage.

As a MONAI Deploy application connects an inference operator to its writer operators, this
module connects :class:`~appliance.analyze.worker.AnalysisWorker` (each image through the models
that apply, once; result rows committed with triage) to
:class:`~appliance.results.worker.ObjectsWorker` (each result row as an SR and a heatmap SC,
from what the row records).  The two stages share nothing but the ``analysis_results`` rows:
``appliance.analyze`` never imports ``appliance.results``.
"""
from __future__ import annotations

import time
from typing import Callable, Optional

from .analyze.worker import AnalysisWorker
from .config import Config
from .db import Database
from .results.worker import ObjectsWorker
from .store import InstanceStore


class Pipeline:
    """Both stages over one database and store, started, woken and stopped together."""

    def __init__(self, config: Config, database: Database, store: InstanceStore,
                 ingest_busy: Optional[Callable[[], bool]] = None):
        self.analysis = AnalysisWorker(config, database, store, ingest_busy=ingest_busy)
        self.objects = ObjectsWorker(config, database, store, ingest_busy=ingest_busy)

    def start(self) -> None:
        self.analysis.start()
        self.objects.start()

    def wake(self, *args: object) -> None:
        """An image arrived: the analysis threads look now (the objects thread follows them)."""
        self.analysis.wake(*args)

    def stop(self) -> None:
        self.analysis.stop()
        self.objects.stop()

    def run_until_idle(self, study_uid: Optional[str] = None, timeout_s: float = 600) -> None:
        """Here, in the foreground: analyse every waiting image (of one study, or all), then
        build every waiting result's objects."""
        deadline = time.monotonic() + timeout_s
        self.analysis.run_until_idle(study_uid, timeout_s)
        self.objects.run_until_idle(study_uid, max(0.0, deadline - time.monotonic()))
