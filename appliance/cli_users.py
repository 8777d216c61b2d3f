"""``appliance users ...``: web UI accounts from the box's console (registered by cli.py).

The way to create the first administrator when the web set-up page is closed, and to clear
sign-in limits without a browser.  Secrets are always prompted for, never taken as arguments
(they would stay in the shell history and the process list).
"""
from __future__ import annotations

from typing import Any, Optional

import click

from .accounts import LANGUAGES, ROLES, AccountError, create_user, find_user, list_users, set_pin
from .cli_common import config_option, setup
from .db import open_database
from .login_throttle import client_key, lock_state, unlock, unlock_client


def _open(config_file: Optional[str], data_dir: Optional[str]) -> Any:
    return open_database(setup(config_file, {"storage.data_dir": data_dir}).data_dir)


@click.group("users")
def users() -> None:
    """Web UI accounts (there is no default password)."""


@users.command("add")
@config_option
@click.option("--role", type=click.Choice(ROLES), required=True)
@click.option("--language", type=click.Choice(LANGUAGES), default="en", show_default=True)
@click.argument("name")
def add_command(config_file: Optional[str], data_dir: Optional[str], role: str, language: str, name: str) -> None:
    """Add a user; asks for the password twice (never on the command line)."""
    database = _open(config_file, data_dir)
    password = click.prompt("Password", hide_input=True, confirmation_prompt=True)
    try:
        user = create_user(database, name, password, role, language)
    except AccountError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"added {user.username} ({user.role})")


@users.command("list")
@config_option
def list_command(config_file: Optional[str], data_dir: Optional[str]) -> None:
    """List users with their role and state."""
    database = _open(config_file, data_dir)
    rows = list_users(database)
    if not rows:
        click.echo("no users (the web UI asks for the first administrator)")
    for u in rows:
        lock = lock_state(database, u.username)
        state = "disabled" if u.disabled else "locked" if lock.wait_s else "active"
        pin = "blocked" if lock.pin_blocked else "yes" if u.has_pin else "no"
        click.echo(f"{u.username:<24} {u.role:<7} {state:<9} pin={pin} "
                   f"lang={u.language} last_login={u.last_login_at or '-'}")


@users.command("set-pin")
@config_option
@click.option("--remove", is_flag=True, help="Remove the PIN instead of setting one.")
@click.argument("name")
def set_pin_command(config_file: Optional[str], data_dir: Optional[str], remove: bool, name: str) -> None:
    """Set a touchscreen PIN (4-8 digits) for a staff or viewer user; asks for it twice."""
    database = _open(config_file, data_dir)
    user = find_user(database, name)
    if user is None:
        raise click.ClickException(f"no user {name!r}")
    try:
        if remove:
            set_pin(database, user.id, None)
            click.echo(f"PIN removed for {user.username}")
            return
        pin = click.prompt("PIN", hide_input=True, confirmation_prompt=True)
        set_pin(database, user.id, pin)
    except AccountError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"PIN set for {user.username}")


@users.command("unlock")
@config_option
@click.option("--client", "client", metavar="ADDRESS", help="Also clear this client address's attempts.")
@click.argument("name", required=False)
def unlock_command(config_file: Optional[str], data_dir: Optional[str], client: Optional[str],
                   name: Optional[str]) -> None:
    """Clear sign-in delays and the PIN block of user NAME (known or not), and/or of a client."""
    if not name and not client:
        raise click.UsageError("give a user NAME, --client ADDRESS, or both")
    database = _open(config_file, data_dir)
    if name:
        click.echo(f"{name}: {unlock(database, name)} counter(s) cleared")
    if client:
        click.echo(f"client {client_key(client)}: {unlock_client(database, client)} counter(s) cleared")
