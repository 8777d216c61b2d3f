"""`appliance forward` and `appliance outbox` as an operator types them: good input, and bad input
(unknown destination, study, item id; a state that does not allow the action) ending with a non-zero
exit code and a one-line message, never a traceback and never a change in the outbox."""
from __future__ import annotations

import json

import pytest

from tests.forward.local_peers import make_box
from tests.helpers import run_cli, sample

ITEM_KEYS = {"id", "study_uid", "destination", "priority", "state", "origin", "requested_by", "created_at",
             "updated_at", "confirmed_at", "attempts", "last_error", "reason", "next_attempt_at", "instances",
             "bytes_original", "bytes_sent", "bytes_pending"}
DESTINATION_KEYS = {"name", "kind", "deidentify", "compress", "send_window", "queue_length", "failed_items",
                    "bytes_pending", "last_success_at", "last_attempt_at", "next_retry_at", "consecutive_failures",
                    "last_error"}


@pytest.fixture
def box(tmp_path):
    """A box with one stored study and a destination nobody listens on (nothing is sent here)."""
    b = make_box(tmp_path, '[[destinations]]\nname = "hub"\nkind = "dicomweb"\nurl = "http://127.0.0.1:9/dicom-web"\n'
                           'compress = "jpegls-lossless"\n')
    outcome = b.store.store(sample("CT_small.dcm").read_bytes(), source="dicom")
    b.study = outcome.study_uid  # type: ignore[attr-defined]
    return b


def cli(box, *args: str):
    return run_cli(*args, "--data-dir", str(box.config.data_dir), "--config", str(box.site))


def outbox(box, *extra: str) -> dict:
    result = cli(box, "outbox", "--json", *extra)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def refused(result, message: str) -> None:
    assert result.returncode != 0, result.stdout
    assert message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_forward_and_list_in_the_documented_schema(box):
    first = cli(box, "forward", box.study, "--to", "hub", "--user", "nurse1")
    assert first.returncode == 0, first.stderr
    item_id = int(first.stdout.strip())
    # Again, urgent: the same item, upgraded.
    again = cli(box, "forward", box.study, "--to", "hub", "--priority", "urgent")
    assert again.returncode == 0 and int(again.stdout.strip()) == item_id

    listing = outbox(box)
    assert listing["schema_version"] == 1
    (item,) = listing["items"]
    assert set(item) == ITEM_KEYS and set(item["instances"]) == {"pending", "sent", "confirmed", "refused",
                                                                 "blocked", "total"}
    assert (item["id"], item["study_uid"], item["destination"], item["priority"], item["state"], item["origin"],
            item["requested_by"]) == (item_id, box.study, "hub", "urgent", "queued", "manual", "nurse1")
    # Nothing attempted yet, and still the study's instance counts as pending, with its size.
    size = box.db.query("SELECT size FROM instances WHERE study_uid = ?", (box.study,))[0]["size"]
    assert item["instances"]["pending"] == item["instances"]["total"] == 1
    assert item["bytes_pending"] == item["bytes_original"] == size and item["bytes_sent"] == 0
    (dest,) = listing["destinations"]
    assert set(dest) == DESTINATION_KEYS and dest["bytes_pending"] == size
    assert (dest["name"], dest["kind"], dest["compress"], dest["queue_length"]) == ("hub", "dicomweb",
                                                                                   "jpegls-lossless", 1)
    text = cli(box, "outbox")
    assert text.returncode == 0 and f"{item_id:>5} queued" in text.stdout and "urgent" in text.stdout
    assert "destination hub: 1 queued" in text.stdout and "last success never" in text.stdout
    assert outbox(box) == json.loads(cli(box, "outbox", "list", "--json").stdout)


def test_forward_bad_input_is_a_clear_message(box):
    refused(cli(box, "forward", box.study, "--to", "nowhere"), "no destination named 'nowhere' (known: hub)")
    refused(cli(box, "forward", "1.2.3.4.5", "--to", "hub"), "no study 1.2.3.4.5")
    refused(cli(box, "forward", box.study, "--to", "hub", "--priority", "whenever"), "Invalid value for '--priority'")
    refused(cli(box, "forward", box.study), "Missing option '--to'")
    assert outbox(box, "--all")["items"] == []


def test_cancel_and_retry_by_id(box):
    item_id = int(cli(box, "forward", box.study, "--to", "hub").stdout)
    for command in ("retry", "cancel"):
        refused(cli(box, "outbox", command, "999"), "no outbox item 999")
        refused(cli(box, "outbox", command, "seven"), "is not a valid integer")

    done = cli(box, "outbox", "cancel", str(item_id), "--user", "admin")
    assert done.returncode == 0 and f"outbox item {item_id} cancelled" in done.stdout
    assert outbox(box)["items"] == []  # the default list leaves cancelled items out...
    assert [i["state"] for i in outbox(box, "--all")["items"]] == ["cancelled"]  # ...--all shows them
    assert outbox(box)["destinations"][0]["queue_length"] == 0
    refused(cli(box, "outbox", "cancel", str(item_id)), f"outbox item {item_id} is already cancelled")

    back = cli(box, "outbox", "retry", str(item_id))
    assert back.returncode == 0 and f"outbox item {item_id} queued" in back.stdout
    assert [(i["id"], i["state"]) for i in outbox(box)["items"]] == [(item_id, "queued")]
    actions = [(r["actor"], r["action"]) for r in box.db.query("SELECT actor, action FROM audit_log WHERE action "
                                                                "LIKE 'forward%' ORDER BY id")]
    assert actions == [("cli", "forward_request"), ("admin", "forward_cancel"), ("cli", "forward_retry")]


def test_a_confirmed_item_cannot_be_cancelled_or_retried(box):
    item_id = int(cli(box, "forward", box.study, "--to", "hub").stdout)
    with box.db.atomic() as tx:  # as the sender leaves it once the hub lists every instance
        tx.execute("UPDATE outbox_items SET state = 'confirmed' WHERE id = ?", (item_id,))
    refused(cli(box, "outbox", "cancel", str(item_id)), f"outbox item {item_id} is already confirmed")
    refused(cli(box, "outbox", "retry", str(item_id)), f"outbox item {item_id} is already confirmed")
    # A new request for the same study and destination is a new item (the old one is done).
    assert int(cli(box, "forward", box.study, "--to", "hub").stdout) != item_id
