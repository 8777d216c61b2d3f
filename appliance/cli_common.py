"""What every `appliance` command shares: the ``--config``/``--data-dir`` options and set-up.

Kept apart from ``cli.py`` so that command groups living in sub-packages (``forward``,
``analyze``) can import these without importing the ``main`` group that registers them.
"""
from __future__ import annotations

import logging
import sys
import warnings
from typing import Any, Callable

import click

from .config import Config, load_config
from .errors import ApplianceError


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
        level=config["log"]["level"].upper(),
        format=f"%(asctime)s %(levelname)s {name}: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("pydicom").setLevel(logging.ERROR)
