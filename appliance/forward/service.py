"""The forwarder inside `appliance serve`: a sender thread over the outbox and a report poller.

One sender thread sends one batch at a time, most pressing first: an item plus further items of
the same destination and priority (``outbox.claim_batch``), so that on a long round trip several
small studies share one STOW-RS request and one confirming query.  A routine batch yields between
instances when an urgent item is waiting.  Each attempt:

1. adds each study's instances the item does not list yet (late images, AI results);
2. if anything may already be on the hub (an earlier attempt, a crash), asks the hub which
   instances it holds and marks those confirmed, so only the rest is sent;
3. sends the pending instances, committing each peer acknowledgement as it arrives;
4. asks the hub again (one query for the batch's studies) and confirms what it lists; each item
   settles (confirmed / failed).

A transient error ends the attempt and backs the destination off; nothing is ever dropped.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable, Optional

import pydicom
import pydicom.errors

from ..background import BackgroundService
from ..config import Config, Destination
from ..db import Database
from ..lifecycle import OUTBOX_ACTIVE, OutboxInstanceState, OutboxState, marks, words
from ..store import InstanceStore
from . import outbox, reports, rules
from .deid import UidMap, deidentify
from .dicom_peer import DicomPeer
from .dicomweb import DicomWebPeer
from .errors import PolicyBlocked, TransientSendError
from .pacing import Pacer
from .transfer import Outcome, Outgoing, Peer

log = logging.getLogger(__name__)

RULES_EVERY_S = 2.0
PEER_IDLE_S = 20.0  # open connections/associations to a destination are closed after this idle time
PeerFactory = Callable[[Destination, threading.Event], Peer]


class Forwarder(BackgroundService):
    """Sender and report-poller threads for every configured destination."""

    def __init__(self, config: Config, database: Database, store: InstanceStore,
                 peer_factory: Optional[PeerFactory] = None):
        super().__init__()
        self.config = config
        self.db = database
        self.store = store
        self._peer_factory = peer_factory or self._default_peer
        self._uids: Optional[UidMap] = None
        self._last_rules = 0.0
        # Peers are kept between items of the same destination: on a long-delay link a new TCP
        # connection (handshake, slow start) per study costs seconds.  Dropped after any error.
        self._peers: dict[str, Peer] = {}
        self._peer_used: dict[str, float] = {}

    @property
    def uids(self) -> UidMap:
        if self._uids is None:
            self._uids = UidMap(self.db)
        return self._uids

    def _default_peer(self, dest: Destination, stop: threading.Event) -> Peer:
        pacer = Pacer(int(dest.max_rate_kbps), stop)
        if dest.kind == "dicom":
            return DicomPeer(dest, self.config.dicom.ae_title, pacer=pacer)
        return DicomWebPeer(dest, pacer=pacer)

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        if not self.config.destinations:
            log.info("forwarding: no destinations configured")
            return
        self._spawn("forward-sender", self._send_loop)
        self._spawn("forward-reports", self._report_loop)

    def stop(self) -> None:
        super().stop()
        for peer in self._peers.values():
            peer.close()
        self._peers.clear()

    def _send_loop(self) -> None:
        while not self._stop.is_set():
            worked = False
            try:
                if time.monotonic() - self._last_rules >= RULES_EVERY_S:
                    self._last_rules = time.monotonic()
                    rules.evaluate(self.db, self.config)
                worked = self.run_once()
            except Exception:  # noqa: BLE001 - the sender thread must survive anything
                log.exception("forwarder error")
            if not worked:
                self.close_idle_peers()
                self._wake.wait(1.0)
                self._wake.clear()

    def _report_loop(self) -> None:
        last: dict[str, float] = {}
        while not self._stop.wait(1.0):
            for dest in self.config.destinations:
                if dest.kind != "dicomweb" or time.monotonic() - last.get(dest.name, -1e9) < dest.poll_reports_s:
                    continue
                last[dest.name] = time.monotonic()
                try:
                    reports.poll(self.db, self.store, self.uids, dest, DicomWebPeer(dest))
                except TransientSendError as exc:
                    log.warning("report poll of %s: %s", dest.name, exc)
                except Exception:  # noqa: BLE001 - keep polling the other destinations
                    log.exception("report poll of %s failed", dest.name)

    # -- one attempt -------------------------------------------------------------------------
    def run_once(self) -> bool:
        """Claim and attempt one batch; False when nothing may be sent now."""
        batch = outbox.claim_batch(self.db, self.config)
        if not batch:
            return False
        self.attempt_batch(batch)
        return True

    def attempt(self, item: dict[str, Any]) -> str:
        return self.attempt_batch([item])[item["id"]]

    def _peer(self, dest: Destination) -> Peer:
        peer = self._peers.get(dest.name) or self._peer_factory(dest, self._stop)
        self._peers[dest.name] = peer
        self._peer_used[dest.name] = time.monotonic()
        return peer

    def close_idle_peers(self, idle_s: float = PEER_IDLE_S) -> None:
        for name, used in list(self._peer_used.items()):
            if time.monotonic() - used > idle_s:
                del self._peer_used[name]
                peer = self._peers.pop(name, None)
                if peer is not None:
                    peer.close()

    def attempt_batch(self, items: list[dict[str, Any]]) -> dict[int, str]:
        """Attempt items of one destination together; returns each item's state afterwards
        (or ``retry`` / ``interrupted``)."""
        dest = self.config.destination(items[0]["destination"])
        remote: dict[int, str] = {}
        for item in items:
            outbox.refresh_instances(self.db, item, dest.attach_ai_results)
            remote[item["id"]] = self.uids.uid(item["study_uid"]) if dest.deidentify else item["study_uid"]
            if remote[item["id"]] != item["remote_study_uid"]:
                self.uids.flush()
                outbox.set_remote_study(self.db, item["id"], remote[item["id"]])
        ids = [item["id"] for item in items]
        peer = self._peer(dest)
        try:
            recheck = []
            for item in items:
                rows = outbox.instances(self.db, item["id"])
                self._assign_remote_uids(item, rows, dest)
                if item["attempts"] > 1 or any(r["state"] == OutboxInstanceState.SENT for r in rows):
                    recheck.append(item["id"])
            if recheck:
                self._confirm(peer, recheck, remote)
            owner: dict[str, int] = {}
            todo: list[Outgoing] = []
            for item in items:
                for r in outbox.instances(self.db, item["id"], (OutboxInstanceState.PENDING,)):
                    owner[r["sop_instance_uid"]] = item["id"]
                    todo.append(self._outgoing(r, dest))
            stopped = False

            def should_stop() -> bool:
                nonlocal stopped
                stopped = stopped or self._stop.is_set() or self._interrupted(items)
                return stopped

            if todo:
                peer.send(todo, lambda outcomes: self._record(owner, outcomes), should_stop)
            if stopped:
                return {i: "interrupted" for i in ids}
            confirmed = self._confirm(peer, ids, remote)
            outbox.note_success(self.db, dest.name)
        except TransientSendError as exc:
            self._peers.pop(dest.name, None)
            peer.close()
            delay = outbox.note_failure(self.db, ids, dest.name, str(exc), dest.retry_max_s)
            log.warning("outbox items %s: %s; retry in %.0fs", ids, exc, delay)
            return {i: "retry" for i in ids}
        except BaseException:
            self._peers.pop(dest.name, None)
            peer.close()
            raise
        states = {i: outbox.settle(self.db, i, dest.attach_ai_results) for i in ids}
        unlisted = [i for i, state in states.items() if state in (OutboxState.SENDING, OutboxState.DELIVERED)]
        if unlisted:
            # Acknowledged but not listed by the hub: not confirmed, so try again later.
            outbox.note_failure(self.db, unlisted, dest.name,
                                f"{dest.name} does not list every acknowledged instance yet", dest.retry_max_s)
        log.info("outbox items to %s: %s (%d instances confirmed)", dest.name, states, confirmed)
        return states

    def _confirm(self, peer: Peer, item_ids: list[int], remote: dict[int, str]) -> int:
        """One query for the studies of ``item_ids``; instances listed become confirmed.  Should a
        many-study query miss acknowledged instances (a peer without UID list matching, or one
        that truncates answers), their studies are asked one by one before anything is resent."""
        present = peer.present([remote[i] for i in item_ids])
        confirmed = 0
        for i in item_ids:
            if len(item_ids) > 1 and any(r["remote_sop_instance_uid"] not in present
                                         for r in outbox.instances(self.db, i, (OutboxInstanceState.SENT,))):
                present |= peer.present([remote[i]])
            confirmed += outbox.confirm_present(self.db, i, present)
        return confirmed

    def _interrupted(self, items: list[dict[str, Any]]) -> bool:
        """An item cancelled meanwhile, or a routine batch with an urgent item waiting."""
        ids = [item["id"] for item in items]
        id_marks = marks(ids)
        active_in = f"state IN ({marks(OUTBOX_ACTIVE)})"
        active = self.db.query(f"SELECT COUNT(*) AS n FROM outbox_items WHERE id IN ({id_marks}) AND {active_in}",
                               (*ids, *words(OUTBOX_ACTIVE)))[0]["n"]
        if active < len(ids):
            return True
        if min(item["priority_rank"] for item in items) > 0:
            urgent = self.db.query(f"SELECT 1 FROM outbox_items WHERE {active_in} AND priority_rank = 0 "
                                   f"AND id NOT IN ({id_marks}) LIMIT 1", (*words(OUTBOX_ACTIVE), *ids))
            return bool(urgent)
        return False

    def _assign_remote_uids(self, item: dict[str, Any], rows: list[dict[str, Any]], dest: Destination) -> None:
        """Record each instance's UID on the hub before anything is sent, so a crash right after
        the hub stored it can still be recognised by the next attempt's query."""
        updates = []
        for r in rows:
            if not r["remote_sop_instance_uid"]:
                remote = self.uids.uid(r["sop_instance_uid"]) if dest.deidentify else r["sop_instance_uid"]
                updates.append({"sop_instance_uid": r["sop_instance_uid"], "state": r["state"],
                                "remote_sop_instance_uid": remote})
                r["remote_sop_instance_uid"] = remote
        self.uids.flush()
        if updates:
            outbox.mark_instances(self.db, item["id"], updates)

    def _outgoing(self, row: dict[str, Any], dest: Destination) -> Outgoing:
        def load() -> pydicom.Dataset:
            try:
                ds: pydicom.Dataset = pydicom.dcmread(row["file_path"])
            except (OSError, pydicom.errors.InvalidDicomError) as exc:
                raise PolicyBlocked(f"stored file unreadable on the box: {type(exc).__name__}") from exc
            if dest.deidentify:
                ds = deidentify(ds, self.uids, dest.allow_burned_in)
                self.uids.flush()
            return ds

        return Outgoing(row["sop_instance_uid"], row["remote_sop_instance_uid"], row["sop_class_uid"],
                        row["transfer_syntax"], load)

    def _record(self, owner: dict[str, int], outcomes: list[Outcome]) -> None:
        """Commit the outcomes, each under the item its instance belongs to, in one transaction."""
        outbox.mark_instances(self.db, None, [
            {"item_id": owner[o.sop_instance_uid], "sop_instance_uid": o.sop_instance_uid, "state": o.state,
             "bytes_sent": o.bytes_sent, "transfer_syntax_sent": o.transfer_syntax, "reason": o.reason}
            for o in outcomes])
        for o in outcomes:
            if o.state != OutboxInstanceState.SENT:
                log.warning("outbox item %d: instance %s %s: %s", owner[o.sop_instance_uid], o.sop_instance_uid,
                            o.state, o.reason)
