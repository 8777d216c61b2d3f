"""The `appliance` command."""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import click

from .cli_common import ApplianceGroup, config_option, setup
from .errors import ImportPathError, OutOfSpaceError

log = logging.getLogger("appliance")


@click.group(cls=ApplianceGroup)
@click.version_option(package_name="clinic-edge-appliance")
def main() -> None:
    """Clinic edge AI appliance."""


@main.command()
@config_option
@click.option("--host", default=None, help="Bind address for DICOM and HTTP.")
@click.option("--dicom-port", type=int, default=None)
@click.option("--http-port", type=int, default=None)
def serve(config_file: str | None, data_dir: str | None, host: str | None, dicom_port: int | None,
          http_port: int | None) -> None:
    """Run the box in the foreground (DICOM SCP + web UI) until SIGTERM or Ctrl-C."""
    from .server import Appliance

    config = setup(config_file, {
        "storage.data_dir": data_dir, "dicom.host": host, "http.host": host,
        "dicom.port": dicom_port, "http.port": http_port,
    })
    config.log_effective()
    try:
        Appliance(config).run_forever()
    except OSError as exc:
        raise click.ClickException(f"cannot start: {exc}") from exc


@main.command("import")
@config_option
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def import_(config_file: str | None, data_dir: str | None, paths: tuple[Path, ...], as_json: bool) -> None:
    """Import DICOM files from folders, files or a DICOMDIR (USB stick, CD)."""
    from .acquire.importer import collect_files, import_files
    from .db import open_database
    from .store import InstanceStore

    config = setup(config_file, {"storage.data_dir": data_dir})
    try:
        files = collect_files(paths)
    except ImportPathError as exc:
        raise click.ClickException(str(exc)) from exc
    database = open_database(config.data_dir, check_integrity=True)
    store = InstanceStore(config.data_dir, database, config.storage.min_free_mb)
    try:
        with click.progressbar(length=len(files), label="importing", file=sys.stderr) as bar:
            summary = import_files(store, files, progress=lambda _p: bar.update(1))
    except OutOfSpaceError as exc:
        raise click.ClickException(f"import stopped: {exc}") from exc
    if as_json:
        click.echo(json.dumps(summary.as_dict(), indent=2))
    else:
        click.echo(f"imported: {summary.imported}  replaced: {summary.replaced}  "
                   f"duplicate: {summary.duplicate}  rejected: {len(summary.rejected)}")
        for file, reason in summary.rejected:
            click.echo(f"  rejected {file}: {reason}")
    if summary.imported + summary.replaced + summary.duplicate == 0:
        raise click.ClickException("nothing imported")


@main.command()
@config_option
@click.option("--json", "as_json", is_flag=True, help="Print the documented JSON schema.")
def studies(config_file: str | None, data_dir: str | None, as_json: bool) -> None:
    """List stored studies."""
    from .catalog import SCHEMA_VERSION, list_studies
    from .db import open_database

    config = setup(config_file, {"storage.data_dir": data_dir})
    rows = list_studies(open_database(config.data_dir, check_integrity=True))
    if as_json:
        click.echo(json.dumps({"schema_version": SCHEMA_VERSION, "studies": rows}, indent=2))
        return
    if not rows:
        click.echo("no studies")
        return
    click.echo(f"{'patient':<24} {'study':<40} {'mod':<6} {'ser':>3} {'inst':>5} {'state':<10} received")
    for s in rows:
        patient = f"{s['patient']['name']} ({s['patient']['id']})"[:24]
        click.echo(f"{patient:<24} {s['study_uid'][:40]:<40} {','.join(s['modalities'])[:6]:<6} "
                   f"{s['series_count']:>3} {s['instance_count']:>5} {s['state']:<10} {s['last_received_at']}")


@main.command()
@config_option
@click.option("--study", "study_uid", required=True, help="Study Instance UID to (re-)analyze.")
def analyze(config_file: str | None, data_dir: str | None, study_uid: str) -> None:
    """Re-analyze a study with the installed models, keeping earlier results.

    Images already analyzed by the installed version of a model are skipped; a newer model
    version adds its results next to the old ones.  Runs here, in the foreground; a running
    `appliance serve` may take some of the jobs, which is safe.
    """
    from .analyze.worker import enqueue_study
    from .db import open_database
    from .pipeline import Pipeline
    from .store import InstanceStore

    config = setup(config_file, {"storage.data_dir": data_dir})
    database = open_database(config.data_dir, check_integrity=True)
    if not database.query("SELECT 1 FROM studies WHERE study_uid = ?", (study_uid,)):
        raise click.ClickException(f"no study {study_uid}")
    added = enqueue_study(database, study_uid)
    click.echo(f"queued {added} images", err=True)
    store = InstanceStore(config.data_dir, database, config.storage.min_free_mb)
    Pipeline(config, database, store).run_until_idle(study_uid)
    rows = database.query(
        "SELECT model_id, model_version, status, COUNT(*) AS n FROM analysis_results WHERE study_uid = ? "
        "GROUP BY model_id, model_version, status ORDER BY model_id, model_version", (study_uid,))
    for row in rows:
        click.echo(f"{row['model_id']} {row['model_version']}: {row['n']} {row['status']}")


def _register_groups() -> None:
    from .analyze.commands import engines, models
    from .cli_users import users
    from .dbrebuild import db
    from .forward.commands import forward, outbox

    main.add_command(models)
    main.add_command(engines)
    main.add_command(forward)
    main.add_command(outbox)
    main.add_command(users)
    main.add_command(db)


_register_groups()

if __name__ == "__main__":  # pragma: no cover
    main()
