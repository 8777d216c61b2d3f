"""Forwarding over a constrained link: the appliance's outbox vs dcmtk `storescu`, same files,
same link, same run.

The link is a loopback TCP proxy written here (this kernel has no `sch_netem`, so `tc netem`
cannot shape a namespace): a serialiser at ``--rate-kbps`` in each direction, ``--delay-ms``
one-way propagation delay in each direction, and a bounded queue so that senders feel TCP
back-pressure as on a real bottleneck.  Packet loss is not emulated (a TCP proxy cannot drop
segments).  Every run gets a fresh Orthanc (so no run is helped by the hub's de-duplication).

Figures: goodput = DICOM bytes delivered (as encoded on the wire) / time to drain, as a fraction
of the link rate; bytes on the wire (both directions, counted by the proxy) vs the raw files;
time to drain (first byte queued -> last instance confirmed, confirmation queries included).

    .venv/bin/python scripts/bench_forward.py [--studies 6] [--rate-kbps 2000] [--delay-ms 300] [--chest-size 512]
"""
from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import pydicom  # noqa: E402

from appliance.config import load_config  # noqa: E402
from appliance.db import open_database  # noqa: E402
from appliance.forward import request_forward, study_forwarding  # noqa: E402
from appliance.forward.service import Forwarder  # noqa: E402
from appliance.store import InstanceStore  # noqa: E402
from tests.forward.conftest import HUB_AE, PASSWORD, Orthanc  # noqa: E402
from tests.forward.util import destination_toml, new_study, small_chest, write_config  # noqa: E402
from tests.helpers import free_port, sample  # noqa: E402

QUEUE_BYTES = 64 * 1024  # the bottleneck's buffer beyond the bytes in flight


class Link:
    """A shaped TCP link from ``listen_port`` to ``target_port`` on loopback, run in a process of
    its own (so that neither sender shares an interpreter lock with the emulator).

    One bottleneck per direction, shared by every connection through the link (as on a real
    link): bytes of all connections queue for one serialiser, so parallel connections share the
    rate instead of each getting a link of their own."""

    def __init__(self, target_port: int, rate_kbps: int, delay_ms: int):
        self.target_port, self.listen_port = target_port, free_port()
        self._counter = multiprocessing.Value("q", 0)
        ready = multiprocessing.Event()
        self._process = multiprocessing.Process(
            target=_serve_link, args=(target_port, self.listen_port, rate_kbps * 1000 / 8, delay_ms / 1000,
                                      self._counter, ready), daemon=True)
        self._process.start()
        if not ready.wait(10):
            raise RuntimeError("link emulator did not start")

    @property
    def wire_bytes(self) -> int:
        return int(self._counter.value)

    def close(self) -> None:
        self._process.terminate()
        self._process.join(timeout=10)


@dataclass
class _Direction:
    """One direction of the link's bottleneck."""

    free_at: float  # when the serialiser is next free
    inflight: int = 0  # bytes accepted but not yet delivered
    drained: asyncio.Event = field(default_factory=asyncio.Event)  # set when inflight went down
    turn: asyncio.Lock = field(default_factory=asyncio.Lock)  # senders waiting for room take turns


def _serve_link(target_port: int, listen_port: int, rate: float, delay: float, counter, ready) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        # per direction: when the serialiser is next free, bytes accepted but not yet delivered
        # and a turnstile: connections waiting for room take turns (first come, first served), so
        # parallel connections interleave as packets of several flows do at a router; without it
        # the connection that last got room always gets it again and the others starve.
        bottleneck = {d: _Direction(free_at=loop.time()) for d in ("up", "down")}
        limit = int(rate * delay) + QUEUE_BYTES

        async def direction(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, name: str) -> None:
            queue: asyncio.Queue = asyncio.Queue()
            state = bottleneck[name]

            async def deliver() -> None:
                while True:
                    due, data = await queue.get()
                    if data is None:
                        writer.close()
                        return
                    wait = due - loop.time()
                    if wait > 0:
                        await asyncio.sleep(wait)
                    state.inflight -= len(data)
                    state.drained.set()
                    try:
                        writer.write(data)
                        await writer.drain()
                    except OSError:
                        return

            task = asyncio.ensure_future(deliver())
            while True:
                try:
                    data = await reader.read(4096)
                except OSError:
                    data = b""
                if not data:
                    await queue.put((0, None))
                    break
                async with state.turn:
                    while state.inflight > limit:
                        state.drained.clear()
                        await state.drained.wait()
                depart = max(loop.time(), state.free_at) + len(data) / rate
                state.free_at = depart
                state.inflight += len(data)
                with counter.get_lock():
                    counter.value += len(data)
                await queue.put((depart + delay, data))
            await task

        async def client(c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
            try:
                s_reader, s_writer = await asyncio.open_connection("127.0.0.1", target_port)
            except OSError:
                c_writer.close()
                return
            await asyncio.gather(direction(c_reader, s_writer, "up"), direction(s_reader, c_writer, "down"))

        server = await asyncio.start_server(client, "127.0.0.1", listen_port)
        ready.set()
        async with server:
            await server.serve_forever()

    asyncio.run(main())


def make_files(out: Path, n: int, chest_size: int = 512) -> list[Path]:
    """``n`` studies of a chest CR (area-resized to ``chest_size``; 0 = the full-size 7.2 MB CR)
    and a small CT slice each."""
    chest = small_chest(chest_size) if chest_size else pydicom.dcmread(sample("RG1_UNCR.dcm"))
    ct = pydicom.dcmread(sample("CT_small.dcm"))
    files = []
    for i in range(n):
        first = new_study(chest, out / f"{i:02d}-cr.dcm", PatientID=f"B{i:02d}")
        files += [first, new_study(ct, out / f"{i:02d}-ct.dcm", str(pydicom.dcmread(first).StudyInstanceUID))]
    return files


def run_storescu(hub: Orthanc, link: Link, files: list[Path]) -> dict:
    started = time.monotonic()
    subprocess.run(["storescu", "-aec", HUB_AE, "-aet", "EDGE", "127.0.0.1", str(link.listen_port), *map(str, files)],
                   check=True, capture_output=True)
    elapsed = time.monotonic() - started
    assert hub.instance_count() == len(files)
    return {"seconds": elapsed, "payload": sum(f.stat().st_size for f in files)}


def run_appliance(work: Path, hub: Orthanc, link: Link, files: list[Path], kind: str, compress: str) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    site = write_config(work / "site.toml", f'[storage]\ndata_dir = "{work / "data"}"\nmin_free_mb = 0\n',
                        destination_toml("hub", kind, hub, deidentify=False, compress=compress,
                                         attach_ai_results=False))
    text = site.read_text().replace(f":{hub.http_port}/", f":{link.listen_port}/")
    site.write_text(text.replace(f"port = {hub.dicom_port}", f"port = {link.listen_port}"))
    config = load_config(site, environ={"APPLIANCE_DESTINATIONS_HUB_PASSWORD": PASSWORD})
    database = open_database(config.data_dir)
    store = InstanceStore(config.data_dir, database)
    study_uids = sorted({store.store(f.read_bytes(), source="import").study_uid for f in files})
    forwarder = Forwarder(config, database, store)
    started = time.monotonic()
    for uid in study_uids:
        request_forward(database, config, uid, "hub", "routine", "bench")
    deadline = started + 3600
    while True:  # until everything is confirmed; a failed attempt is retried after its backoff, as in service
        items = [i for uid in study_uids for i in study_forwarding(database, uid)]
        if all(i["state"] == "confirmed" for i in items):
            break
        assert time.monotonic() < deadline, [i["last_error"] for i in items]
        if not forwarder.run_once():
            time.sleep(0.1)
    elapsed = time.monotonic() - started
    forwarder.stop()  # releases the associations / connections it keeps open between items
    assert hub.instance_count() == len(files)
    retries = sum(i["attempts"] - 1 for i in items)
    return {"seconds": elapsed, "payload": sum(i["bytes_sent"] for i in items), "retries": retries}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--studies", type=int, default=6)
    parser.add_argument("--rate-kbps", type=int, default=2000)
    parser.add_argument("--delay-ms", type=int, default=300)
    parser.add_argument("--chest-size", type=int, default=512, help="CR matrix size; 0 = full-size CR (7.2 MB)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        files = make_files(tmp_path / "files", args.studies, args.chest_size)
        raw = sum(f.stat().st_size for f in files)
        print(f"link: {args.rate_kbps} kbit/s each way, {args.delay_ms} ms one-way delay each way "
              f"(RTT {2 * args.delay_ms} ms), no loss; {len(files)} instances in {args.studies} studies, "
              f"{raw / 1e6:.2f} MB raw")
        runs = [("storescu (dcmtk, C-STORE)", "storescu", "", "none"),
                ("appliance C-STORE", "appliance", "dicom", "none"),
                ("appliance STOW-RS", "appliance", "dicomweb", "none"),
                ("appliance STOW-RS + JPEG-LS lossless", "appliance", "dicomweb", "jpegls-lossless")]
        results = {}
        print(f"{'sender':<40} {'drain s':>8} {'payload MB':>10} {'wire MB':>8} {'wire/raw':>8} {'goodput':>8}")
        for n, (label, tool, kind, compress) in enumerate(runs):
            hub = Orthanc(tmp_path / f"hub{n}").start()
            port = hub.dicom_port if tool == "storescu" or kind == "dicom" else hub.http_port
            link = Link(port, args.rate_kbps, args.delay_ms)
            try:
                if tool == "storescu":
                    r = run_storescu(hub, link, files)
                else:
                    r = run_appliance(tmp_path / f"box{n}", hub, link, files, kind, compress)
            finally:
                link.close()
                hub.stop()
            goodput = r["payload"] * 8 / r["seconds"] / (args.rate_kbps * 1000)
            results[label] = goodput
            print(f"{label:<40} {r['seconds']:>8.1f} {r['payload'] / 1e6:>10.2f} {link.wire_bytes / 1e6:>8.2f} "
                  f"{link.wire_bytes / raw:>8.2f} {goodput:>8.1%}  (raw MB delivered per second: "
                  f"{raw / r['seconds'] / 1e6:.3f}; retried attempts: {r.get('retries', '-')})")
        base = results["storescu (dcmtk, C-STORE)"]
        for label, value in results.items():
            print(f"{label}: goodput {value:.1%} of link, {value / base:.2f}x storescu")


if __name__ == "__main__":
    main()
