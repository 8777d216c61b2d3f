"""Receiving DICOM in several processes.

pynetdicom runs each association in a Python thread, so within one process only one association
at a time can run Python code (the GIL): parsing, hashing and indexing of concurrent C-STOREs
queue behind each other on one core while the others idle.  ``dicom.processes`` spreads the
associations over several processes.

The main process keeps the one listening socket.  It hands each accepted connection to the
receiving process with the fewest open connections (itself included; helpers first on a tie),
passing the file descriptor over a Unix socket (SCM_RIGHTS).  Every process stores through its
own :class:`~appliance.store.InstanceStore` into the same data directory and database, and a
C-STORE is answered only after its own commit, so the durability promise is the same whichever
process took the association.

A connection reaches the dispatcher only once its A-ASSOCIATE-RQ is complete (the gate in
:mod:`.guard`), and the dispatcher is where the association limits over all processes are
applied: ``dicom.max_associations`` in total and ``dicom.max_associations_per_peer`` per peer
address (:class:`~.guard.AssociationRefused`, answered with an A-ASSOCIATE-RJ).  It counts a
connection it hands over until the helper says its association's thread has ended.

Helpers hold no listening socket and die with the main process (``PR_SET_PDEATHSIG``, and their
channel closing): after a SIGKILL of ``appliance serve`` nothing is left holding the port or a
connection, and an association in flight simply drops (its sender never got a success).  A
helper that dies on its own is restarted.  Helpers tell the main process when a connection
closes (with the peer address: for the balance, the limits, and so analysis can give way while
images arrive) and when an instance was stored (to wake the analysis worker).
"""
from __future__ import annotations

import ctypes
import json
import logging
import multiprocessing
import os
import signal
import socket
import threading
import time
from collections import Counter
from typing import Any, Callable, Optional

from ..config import Config
from .guard import AssociationRefused, admission_refusal, peer_host
from .limits import Limits

log = logging.getLogger(__name__)

CLOSED = b"c"
STORED = b"s"
MAX_AUTO_PROCESSES = 4
RESTART_DELAY_S = 1.0


def process_count(config: Config) -> int:
    """``dicom.processes``: 0 means one per CPU core, at most :data:`MAX_AUTO_PROCESSES`."""
    configured = int(config.dicom.processes)
    if configured > 0:
        return configured
    return max(1, min(os.cpu_count() or 1, MAX_AUTO_PROCESSES))


class _Helper:
    """The main process's view of one helper: its process, channel and open connections (in
    all, and by peer address)."""

    def __init__(self, index: int, process: Any, channel: socket.socket):
        self.index = index
        self.process = process
        self.channel = channel
        self.open = 0
        self.peers: Counter[str] = Counter()
        self.alive = True

    def closed(self, host: str) -> None:
        self.open = max(0, self.open - 1)
        if self.peers[host] > 1:
            self.peers[host] -= 1
        else:
            self.peers.pop(host, None)


class ReceiverPool:
    """Helper receiving processes and the dispatcher that balances connections over them."""

    def __init__(self, config: Config, helpers: int, local_open: Callable[..., int],
                 on_stored: Optional[Callable[[Any], None]] = None):
        """``local_open()`` / ``local_open(host)``: associations open in the main process, all
        of them or those from ``host`` (:meth:`~.scp.IngestActivity.open_count`)."""
        self.config = config
        self.limits = Limits.from_config(config)
        self.count = helpers
        self.local_open = local_open
        self.on_stored = on_stored
        self._helpers: list[_Helper] = []
        self._lock = threading.Lock()
        self._stopping = False
        self._context = multiprocessing.get_context("spawn")

    # -- lifecycle ----------------------------------------------------------------------
    def start(self) -> None:
        for index in range(1, self.count + 1):
            self._helpers.append(self._spawn(index))
        if self.count:
            log.info("DICOM associations are spread over %d processes", self.count + 1)

    def _spawn(self, index: int) -> _Helper:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        process = self._context.Process(target=helper_main, args=(self.config, theirs, index),
                                        name=f"dicom-receiver-{index}", daemon=True)
        process.start()
        theirs.close()
        helper = _Helper(index, process, ours)
        threading.Thread(target=self._listen, args=(helper,), name=f"receiver-{index}-events", daemon=True).start()
        return helper

    def stop(self, timeout: float = 10.0) -> None:
        """Close the channels (helpers abort what they still run and exit), then reap them."""
        self._stopping = True
        with self._lock:
            helpers = list(self._helpers)
        for helper in helpers:
            helper.alive = False
            _close_quietly(helper.channel)
        deadline = time.monotonic() + timeout
        for helper in helpers:
            helper.process.join(max(0.0, deadline - time.monotonic()))
            if helper.process.is_alive():
                helper.process.kill()
                helper.process.join()

    def _listen(self, helper: _Helper) -> None:
        while True:
            try:
                message = helper.channel.recv(1024)
            except OSError:
                message = b""
            if not message:
                break
            # One message per datagram (SOCK_SEQPACKET): a code, for CLOSED the peer's address.
            if message[:1] == CLOSED:
                with self._lock:
                    helper.closed(message[1:].decode("utf-8", "replace"))
            elif message[:1] == STORED and self.on_stored is not None:
                self.on_stored(None)
        if self._stopping or not helper.alive:
            return
        helper.alive = False
        helper.process.join(5)
        log.error("DICOM receiving process %d exited (code %s); starting a new one", helper.index,
                  helper.process.exitcode)
        time.sleep(RESTART_DELAY_S)
        if self._stopping:
            return
        replacement = self._spawn(helper.index)
        with self._lock:
            self._helpers[self._helpers.index(helper)] = replacement

    # -- dispatch -----------------------------------------------------------------------
    def open_connections(self) -> int:
        """Connections open in the helpers (the main process's own are ``local_open()``)."""
        with self._lock:
            return sum(h.open for h in self._helpers if h.alive)

    def busy(self) -> bool:
        return self.open_connections() > 0

    def dispatch(self, conn: socket.socket, address: Any) -> bool:
        """Hand ``conn`` to the least busy helper, or return False to keep it in this process;
        AssociationRefused if the association limits (over all processes) say no."""
        host = peer_host(address)
        with self._lock:
            alive = [h for h in self._helpers if h.alive]
            local = self.local_open()
            refusal = admission_refusal(self.limits, local + sum(h.open for h in alive),
                                        self.local_open(host) + sum(h.peers[host] for h in alive))
            if refusal is not None:
                raise AssociationRefused(refusal)
            if not alive:
                return False
            helper = min(alive, key=lambda h: h.open)
            if helper.open > local:
                return False
            helper.open += 1
            helper.peers[host] += 1
        try:
            socket.send_fds(helper.channel, [json.dumps(list(address)).encode()], [conn.fileno()])
        except OSError as exc:
            log.error("cannot hand a connection to receiving process %d (%s); serving it here", helper.index, exc)
            with self._lock:
                helper.closed(host)
            return False
        # The descriptor now lives on in the helper; close ours without shutting the connection down.
        conn.close()
        return True


# -- the helper process -----------------------------------------------------------------
def _die_with_parent() -> None:
    """Linux: SIGKILL this process when the process that started it dies."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the closed channel still ends the helper
        pass


def _close_quietly(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:  # already disconnected
        pass
    sock.close()


class _Teller:
    """A helper's association tracker: the main process counted the connection when it handed
    it over, and is told (CLOSED + peer address) when its association's thread has ended."""

    def __init__(self, tell: Callable[[bytes], None]):
        self._tell = tell

    def started(self, host: str) -> None:
        pass

    def ended(self, host: str) -> None:
        self._tell(CLOSED + host.encode())


def helper_main(config: Config, channel: socket.socket, index: int) -> None:
    """Entry point of a helper: serve the connections the main process hands over until the
    channel closes, then abort whatever still runs and exit."""
    parent = os.getppid()
    _die_with_parent()
    if os.getppid() != parent:  # the parent died before the line above took effect
        os._exit(1)
    # Ctrl-C and systemd's SIGTERM reach the whole process group: the main process decides
    # when helpers stop, by closing their channels.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)

    from ..cli_common import configure_logging
    from ..db import open_database
    from ..forward.reports import scp_hook
    from ..store import InstanceStore
    from .scp import HandedOverServer, make_server

    configure_logging(config, tag=f"receiver-{index}")
    database = open_database(config.data_dir)
    store = InstanceStore(config.data_dir, database, config.storage.min_free_mb)
    send_lock = threading.Lock()

    def tell(code: bytes) -> None:
        with send_lock:
            try:
                channel.send(code)
            except OSError:  # the main process is gone; the receive loop ends this process
                pass

    server = make_server(config, store, HandedOverServer, on_stored=lambda _outcome: tell(STORED),
                         report_hook=scp_hook(config, database, store), tracker=_Teller(tell))
    while True:
        try:
            message, fds, _flags, _address = socket.recv_fds(channel, 1024, 1)
        except OSError:
            break
        if not message:
            break
        for fd in fds:
            conn = socket.socket(fileno=fd)
            address = tuple(json.loads(message))
            try:
                server.take(conn, address)
            except Exception as exc:  # noqa: BLE001 - the association never started: no thread will end
                log.error("cannot serve a handed-over connection: %s: %s", type(exc).__name__, exc)
                _close_quietly(conn)
                tell(CLOSED + peer_host(address).encode())
    server.abort_all()
    os._exit(0)
