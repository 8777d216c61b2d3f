"""``appliance models ...`` and ``appliance engines ...`` (registered by appliance/cli.py).

Output discipline: results go to stdout (``--json`` prints exactly one JSON object there);
progress and logs go to stderr.  Every failure the operator can fix ends in a one-line message
and a non-zero exit status, never a traceback.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Optional

import click

from ..cli_common import config_option, setup
from ..errors import ApplianceError, BackendUnavailableError, ManifestError
from .manifest import Manifest, discover_models, find_model


def _err(message: str) -> None:
    click.echo(message, err=True)


@click.group()
def models() -> None:
    """Model packages: list, validate on local images, quantize to INT8."""


@models.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@config_option
def list_models(as_json: bool, config_file: Optional[str], data_dir: Optional[str]) -> None:
    """List the model packages under analyze.engines_dir and whether they load."""
    config = setup(config_file, {"storage.data_dir": data_dir})
    found = discover_models(config.analyze.engines_dir)
    rows: dict[str, Any] = {}
    for model_id, item in found.items():
        if isinstance(item, Manifest):
            rows[model_id] = {"ok": True, "version": item.version, "name": item.name,
                              "findings": [f.code for f in item.findings],
                              "precisions": ["fp32"] + (["int8"] if item.has_int8 else [])}
        else:
            rows[model_id] = {"ok": False, "error": str(item)}
    if as_json:
        click.echo(json.dumps({"engines_dir": str(config.analyze.engines_dir), "models": rows}))
        return
    if not rows:
        click.echo(f"no model packages under {config.analyze.engines_dir}")
        return
    for model_id, row in rows.items():
        if row["ok"]:
            click.echo(f"{model_id:24} {row['version']:8} {','.join(row['precisions']):10} "
                       f"{','.join(row['findings'])}  {row['name']}")
        else:
            click.echo(f"{model_id:24} REFUSED  {row['error']}")


@models.command("validate")
@click.option("--model", "model_id", required=True, help="Model package id.")
@click.argument("directory", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print exactly one JSON object on stdout.")
@click.option("--report", "report_path", type=click.Path(dir_okay=False), help="Write an HTML report.")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "int8"]), default=None,
              help="Default: what the worker uses (fp32 on ONNX Runtime, int8/fp16 on TensorRT).")
@click.option("--finding", "finding_code", default=None, help="Finding code (default: the first).")
@config_option
def validate_cmd(model_id: str, directory: str, as_json: bool, report_path: Optional[str],
                 precision: Optional[str], finding_code: Optional[str], config_file: Optional[str], data_dir: Optional[str]) -> None:
    """Run MODEL over DIRECTORY (images + labels.csv) through the full run-time path."""
    from .runner import get_runner
    from .validate import read_labels, render_html, validate_folder

    config = setup(config_file, {"storage.data_dir": data_dir})
    folder = Path(directory)
    try:
        read_labels(folder)  # fail on a bad set before loading any model
        runner = get_runner(model_id, config, precision)
        _err(f"validating {model_id} {runner.manifest.version} ({runner.backend_label}, {runner.precision})")

        def progress(done: int, total: int) -> None:
            if done == total or done % 50 == 0:
                _err(f"  {done}/{total}")

        report = validate_folder(runner, folder, finding_code, progress)
    except ApplianceError as exc:
        raise click.ClickException(str(exc)) from exc
    summary = report.summary()
    if report_path:
        Path(report_path).write_text(render_html(report), encoding="utf-8")
        _err(f"report written to {report_path}")
    if as_json:
        click.echo(json.dumps(summary))
        return
    click.echo(f"model        {report.model} {report.model_version} (finding {report.finding})")
    click.echo(f"images       {summary['n']} (abstained {summary['abstained']})")
    auc, ci = report.auc, report.auc_ci
    interval = f" (95% CI {ci[0]:.3f}-{ci[1]:.3f})" if ci is not None else ""  # none if no resample had both labels
    click.echo("AUC          " + ("n/a (needs both labels among analysed images)" if auc is None else
                                  f"{auc:.3f}{interval}"))
    for key in ("sensitivity", "specificity"):
        value = summary[key]
        click.echo(f"{key:12} " + ("n/a" if value is None else f"{value:.3f}") + f" at threshold {report.threshold:.3f}")
    click.echo("confusion    predicted+  predicted-")
    click.echo(f"  actual+    {summary['tp']:10}  {summary['fn']:10}")
    click.echo(f"  actual-    {summary['fp']:10}  {summary['tn']:10}")


@models.command("quantize")
@click.option("--model", "model_id", required=True, help="Model package id.")
@click.option("--max-auc-drop", default=0.01, show_default=True, type=float)
@config_option
def quantize_cmd(model_id: str, max_auc_drop: float, config_file: Optional[str], data_dir: Optional[str]) -> None:
    """Write model.int8.onnx (QDQ) unless validation AUC drops by more than --max-auc-drop."""
    from .quantize import quantize_model

    config = setup(config_file, {"storage.data_dir": data_dir})
    package = Path(config.analyze.engines_dir) / model_id
    try:
        find_model(config.analyze.engines_dir, model_id)
        result = quantize_model(package, config.analyze.require_shared_data_dir(), max_auc_drop=max_auc_drop)
    except ApplianceError as exc:  # QuantizeRefusedError included: a refusal is a failure exit
        raise click.ClickException(str(exc)) from exc
    click.echo(json.dumps(result, default=str))


@click.group()
def engines() -> None:
    """TensorRT engines (device only): build into the engine cache and self-test."""


@engines.command("build")
@click.option("--model", "model_id", default=None, help="One model (default: every package).")
@click.option("--precision", type=click.Choice(["fp16", "int8"]), default=None,
              help="Default: fp16, plus int8 when the package has model.int8.onnx.")
@click.option("--force", is_flag=True, help="Rebuild even when the cached engine is valid.")
@config_option
def build_cmd(model_id: Optional[str], precision: Optional[str], force: bool, config_file: Optional[str], data_dir: Optional[str]) -> None:
    """Build (or reuse) engines for this GPU, then self-test each against its golden outputs."""
    from .engines import device_identity, ensure_engine

    config = setup(config_file, {"storage.data_dir": data_dir})
    try:
        trt_version, capability = device_identity()
    except BackendUnavailableError as exc:
        raise click.ClickException(f"cannot build TensorRT engines on this machine: {exc}") from exc
    _err(f"TensorRT {trt_version}, GPU compute capability {capability}")
    engines_dir = config.analyze.engines_dir
    try:
        manifests = [find_model(engines_dir, model_id)] if model_id else \
            [m for m in discover_models(engines_dir).values() if isinstance(m, Manifest)]
    except ManifestError as exc:
        raise click.ClickException(str(exc)) from exc
    if not manifests:
        raise click.ClickException(f"no loadable model packages under {engines_dir}")
    failures = 0
    for manifest in manifests:
        wanted = [precision] if precision else ["fp16"] + (["int8"] if manifest.has_int8 else [])
        for prec in wanted:
            try:
                path = ensure_engine(manifest, prec, config.data_dir, report=_err, force=force)
                click.echo(f"{manifest.id:24} {prec:5} ok      {path}")
            except ApplianceError as exc:
                failures += 1
                click.echo(f"{manifest.id:24} {prec:5} FAILED  {exc}")
    if failures:
        sys.exit(1)
