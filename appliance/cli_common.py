"""What every `appliance` command shares: the ``--config``/``--data-dir`` options and set-up.

Kept apart from ``cli.py`` so that command groups living in sub-packages (``forward``,
``analyze``) can import these without importing the ``main`` group that registers them.
"""
from __future__ import annotations

import logging
import sqlite3
import sys
import warnings
from pathlib import Path
from typing import Any, Callable

import click

from .config import Config, load_config
from .dbguard import DatabaseCorruptError, DatabaseUnusableError, last_opened, translate
from .errors import ApplianceError

# Exit status of a command refused because of the database: restarting will not help (the
# systemd unit can say RestartPreventExitStatus=3).
EXIT_DATABASE = 3


class DatabaseRefused(click.ClickException):
    """A command stopped because the database cannot be used; one message, no traceback."""

    exit_code = EXIT_DATABASE


class ApplianceGroup(click.Group):
    """The ``appliance`` group: whatever the command, an unusable database ends it with the
    guard's message (exit status 3), and an SQLite error met later is translated once, here."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except DatabaseUnusableError as exc:
            raise DatabaseRefused(str(exc)) from exc
        except sqlite3.DatabaseError as exc:
            translated = translate(exc, last_opened() or Path("appliance.db"))
            if not isinstance(translated, DatabaseCorruptError):
                raise  # not damage (a lock, a bug): the traceback is the useful answer
            raise DatabaseRefused(str(translated)) from exc


def config_option(func: Callable[..., Any]) -> Callable[..., Any]:
    """``--config FILE`` (or ``APPLIANCE_CONFIG``) and ``--data-dir``, shared by every command."""
    func = click.option(
        "--data-dir", type=click.Path(file_okay=False), default=None, help="Override [storage] data_dir."
    )(func)
    func = click.option(
        "--config", "config_file", type=click.Path(dir_okay=False), envvar="APPLIANCE_CONFIG",
        default=None, help="Site configuration file (TOML).",
    )(func)
    return func


def setup(config_file: str | None, overrides: dict[str, Any] | None = None) -> Config:
    """Load configuration and logging, turning configuration errors into a CLI message."""
    try:
        config = load_config(config_file, overrides)
    except ApplianceError as exc:
        raise click.ClickException(f"configuration error: {exc}") from exc
    configure_logging(config)
    return config


def configure_logging(config: Config, tag: str = "") -> None:
    """Log to stderr at the configured level; ``tag`` names a helper process in each line."""
    # DICOM libraries' warnings quote element values (patient and physician names, for one):
    # they must never reach the application log.
    warnings.filterwarnings("ignore", module=r"(highdicom|pydicom)(\..*)?$")
    name = f"%(name)s[{tag}]" if tag else "%(name)s"
    logging.basicConfig(
        level=config.log.level.upper(),
        format=f"%(asctime)s %(levelname)s {name}: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("pydicom").setLevel(logging.ERROR)
