"""`appliance serve`: run the DICOM SCP and the HTTP server in the foreground until a signal."""
from __future__ import annotations

import logging
import signal
import threading
from typing import Any

from waitress.server import create_server

from web.clinic import create_app

from .acquire.receivers import ReceiverPool, process_count
from .acquire.scp import IngestActivity, start_scp
from .config import Config
from .db import open_database
from .forward.reports import scp_hook
from .forward.service import Forwarder
from .pipeline import Pipeline
from .store import InstanceStore

log = logging.getLogger(__name__)


class Appliance:
    """The running box: storage, DICOM SCP and web server, started and stopped together."""

    def __init__(self, config: Config):
        self.config = config
        # The full quick_check once, here: the box must not serve from a damaged file.
        self.database = open_database(config.data_dir, check_integrity=True)
        self.store = InstanceStore(config.data_dir, self.database, config.storage.min_free_mb)
        self._scp: Any = None
        self.receivers: Any = None
        self.worker: Any = None
        self.forwarder: Any = None
        self._http: Any = None
        self._http_thread: threading.Thread | None = None
        self._stop = threading.Event()

    def start(self) -> None:
        report = self.store.recover()
        log.info("start-up recovery: %s", report)
        activity = IngestActivity()
        self.receivers = ReceiverPool(self.config, process_count(self.config) - 1, activity.open_count)
        self.worker = Pipeline(self.config, self.database, self.store,
                               ingest_busy=lambda: activity.busy() or self.receivers.busy())
        self.receivers.on_stored = self.worker.wake
        self.receivers.start()
        self.worker.start()
        self.forwarder = Forwarder(self.config, self.database, self.store)
        self.forwarder.start()
        self._scp = start_scp(self.config, self.store, on_stored=self.worker.wake,
                              report_hook=scp_hook(self.config, self.database, self.store), activity=activity,
                              dispatch=self.receivers.dispatch)
        http = self.config.http
        app = create_app(self.config)
        self._http = create_server(app, host=http.host, port=http.port, threads=http.threads)
        self._http_thread = threading.Thread(target=self._http.run, name="http", daemon=True)
        self._http_thread.start()
        log.info("HTTP listening on %s:%s", http.host, self._http.effective_port)

    def stop(self) -> None:
        if self._scp is not None:
            self._scp.shutdown()
            self._scp = None
        if self.receivers is not None:
            self.receivers.stop()
            self.receivers = None
        if self.worker is not None:
            self.worker.stop()
            self.worker = None
        if self.forwarder is not None:
            self.forwarder.stop()
            self.forwarder = None
        if self._http is not None:
            self._http.close()
            self._http = None
        self.database.close()
        log.info("stopped")

    def run_forever(self) -> None:
        """Start, then block until SIGTERM/SIGINT, then stop cleanly."""

        def _on_signal(signum: int, _frame: Any) -> None:
            log.info("received %s, stopping", signal.Signals(signum).name)
            self._stop.set()

        signal.signal(signal.SIGTERM, _on_signal)
        signal.signal(signal.SIGINT, _on_signal)
        self.start()
        try:
            while not self._stop.wait(1.0):
                pass
        finally:
            self.stop()
