"""`appliance forward` and `appliance outbox` (list / retry / cancel).

These commands only change the database; a running `appliance serve` picks the change up within
a second or two (its sender thread polls the outbox).
"""
from __future__ import annotations

import json
from typing import Any

import click

from ..cli_common import config_option, setup
from ..errors import ConfigError
from ..lifecycle import OutboxState
from .errors import ForwardRequestError

SCHEMA_VERSION = 1


def _open(config_file: str | None, data_dir: str | None) -> tuple[Any, Any]:
    from ..db import open_database

    config = setup(config_file, {"storage.data_dir": data_dir})
    return config, open_database(config.data_dir)


@click.command()
@config_option
@click.argument("study_uid")
@click.option("--to", "destination", required=True, help="Destination name ([[destinations]] name).")
@click.option("--priority", type=click.Choice(["routine", "urgent"]), default="routine", show_default=True)
@click.option("--user", default="cli", show_default=True, help="Recorded in the audit trail as the requester.")
def forward(config_file: str | None, data_dir: str | None, study_uid: str, destination: str, priority: str,
            user: str) -> None:
    """Queue STUDY_UID for sending to a destination; prints the outbox item id."""
    from .outbox import request_forward

    config, database = _open(config_file, data_dir)
    try:
        item_id = request_forward(database, config, study_uid, destination, priority, requested_by=user)
    except (ConfigError, ForwardRequestError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(item_id)


@click.group(invoke_without_command=True)
@config_option
@click.option("--json", "as_json", is_flag=True, help="Print the documented JSON schema.")
@click.option("--all", "show_all", is_flag=True, help="Include confirmed and cancelled items.")
@click.pass_context
def outbox(ctx: click.Context, config_file: str | None, data_dir: str | None, as_json: bool, show_all: bool) -> None:
    """The send queue (default: list it)."""
    if ctx.invoked_subcommand is None:
        _list(config_file, data_dir, as_json, show_all)


@outbox.command("list")
@config_option
@click.option("--json", "as_json", is_flag=True, help="Print the documented JSON schema.")
@click.option("--all", "show_all", is_flag=True, help="Include confirmed and cancelled items.")
def list_(config_file: str | None, data_dir: str | None, as_json: bool, show_all: bool) -> None:
    """List outbox items, most pressing first, and the destinations' state."""
    _list(config_file, data_dir, as_json, show_all)


def _list(config_file: str | None, data_dir: str | None, as_json: bool, show_all: bool) -> None:
    from .status import destination_status, list_items

    config, database = _open(config_file, data_dir)
    items = list_items(database, include_done=show_all, config=config)
    destinations = destination_status(database, config)
    if as_json:
        click.echo(json.dumps({"schema_version": SCHEMA_VERSION, "items": items, "destinations": destinations},
                              indent=2))
        return
    if not items:
        click.echo("outbox empty")
    for i in items:
        n = i["instances"]
        click.echo(f"{i['id']:>5} {i['state']:<10} {i['priority']:<7} {i['destination']:<12} {i['study_uid'][:40]:<40} "
                   f"{n['confirmed']}/{n['total']} confirmed  {i['bytes_sent']}/{i['bytes_original']} B"
                   + (f"  next {i['next_attempt_at']}" if i["next_attempt_at"] and i["state"] != OutboxState.CONFIRMED else "")
                   + (f"  error: {i['last_error']}" if i["last_error"] else "")
                   + (f"  reason: {i['reason']}" if i["reason"] else ""))
    for d in destinations:
        click.echo(f"destination {d['name']}: {d['queue_length']} queued, {d['bytes_pending']} B pending, "
                   f"last success {d['last_success_at'] or 'never'}"
                   + (f", next retry {d['next_retry_at']}" if d["next_retry_at"] else "")
                   + (f", last error: {d['last_error']}" if d["last_error"] else ""))


@outbox.command()
@config_option
@click.argument("item_id", type=int)
@click.option("--user", default="cli", show_default=True)
def retry(config_file: str | None, data_dir: str | None, item_id: int, user: str) -> None:
    """Send a failed or cancelled item again, or a waiting one now."""
    from .outbox import retry_item

    _, database = _open(config_file, data_dir)
    try:
        retry_item(database, item_id, actor=user)
    except ForwardRequestError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"outbox item {item_id} queued")


@outbox.command()
@config_option
@click.argument("item_id", type=int)
@click.option("--user", default="cli", show_default=True)
def cancel(config_file: str | None, data_dir: str | None, item_id: int, user: str) -> None:
    """Stop sending an item (what the hub already holds stays there)."""
    from .outbox import cancel_item

    _, database = _open(config_file, data_dir)
    try:
        cancel_item(database, item_id, actor=user)
    except ForwardRequestError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"outbox item {item_id} cancelled")
