"""``sdltag eval``: the paper's ZSL and GZSL metrics of a model folder on a labeled folder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from sdltag.commands._common import LAYOUTS, cli_errors, error, info, merge_alias
from sdltag.errors import SdltagError
from sdltag.writers import ReportFormat

if TYPE_CHECKING:
    from sdltag.evaluation import EvalReport


@cli_errors
def evaluate(
    model_dir: Path = typer.Argument(..., help="Model folder (written by `sdltag train` or `sdltag export`)."),
    data_dir: Path = typer.Argument(
        ..., help="Labeled image folder (labels.csv/jsonl, IMG.txt or XMP sidecars, or one sub-folder per label)."
    ),
    unseen: Path | None = typer.Option(
        None,
        "--unseen",
        help="Labels file of extra zero-shot labels to evaluate as unseen (with the model's own unseen labels).",
    ),
    fmt: ReportFormat = typer.Option(ReportFormat.table, "--format", "-f", help="Output: table or json."),
    layout: str = typer.Option("auto", "--layout", help=f"Folder layout: {', '.join(LAYOUTS)}."),
    layout_alias: str | None = typer.Option(None, "--data-format", hidden=True, help="Old spelling of --layout."),
    exclude: list[str] = typer.Option(
        [],
        "--exclude",
        help="Leave out image files matching this glob (repeatable), e.g. '*/exports/*' or '*.thumb.jpg'.",
    ),
    empty_labels: str = typer.Option(
        "skip",
        "--empty-labels",
        help="mAP rule for labels with no positive image: skip (default) or zero (the official SDL code).",
    ),
    embedder: str | None = typer.Option(
        None, "--embedder", help="Text embedder for --unseen labels (default: the model's)."
    ),
    cache_dir: Path | None = typer.Option(None, "--cache-dir", help="Label-vector cache folder (default: user cache)."),
    batch_size: int = typer.Option(32, "--batch-size", min=1, help="Images per inference batch."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    precision: str = typer.Option(
        "float",
        "--precision",
        help="Graph to evaluate: float (default: the model as trained, the same on every machine), int8 "
        "(its attached 8-bit graph) or auto (what `sdltag tag` runs here).",
    ),
    threads: int | None = typer.Option(None, "--threads", min=1, help="Threads for decoding and inference."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress display."),
    report_path: Path | None = typer.Option(
        None,
        "--report",
        help="Also write an HTML report to this file: the table, per-label AP, precision-recall and reliability "
        "charts, the worst-ranked images (needs matplotlib: pip install 'sdltag[report]').",
    ),
) -> None:
    """Evaluate a model on labeled images: ZSL and GZSL mAP and P/R/F1 at K=3 and K=5 (micro), as in the SDL paper.

    Images count when they have at least one ground-truth label among the ranked labels (ZSL: the
    unseen ones; GZSL: seen + unseen). Scores come from the ONNX model exactly as `sdltag tag` computes
    them (from the float graph unless --precision says otherwise). Labels of the folder that the model
    neither saw nor lists as unseen are ignored (name them in --unseen to evaluate them zero-shot).
    """
    from sdltag.evaluation import evaluate as run_eval
    from sdltag.evaluation import format_table
    from sdltag.modelfolder import load_model_folder
    from sdltag.progress import ProgressBar
    from sdltag.runtime import resolve_precision

    layout = merge_alias(layout, layout_alias)
    _check_options(layout, empty_labels, report_path)
    model, _ = resolve_precision(load_model_folder(model_dir), precision, device)
    with ProgressBar("evaluating", quiet=quiet) as bar:
        report = run_eval(
            model,
            data_dir,
            unseen_file=unseen,
            data_format=layout,
            batch_size=batch_size,
            device=device,
            threads=threads,
            embedder=embedder,
            cache_dir=cache_dir,
            empty=empty_labels,
            progress=lambda done, total: bar.update(completed=done, total=total),
            exclude=exclude,
        )
    typer.echo(json.dumps(report.to_json(), indent=2) if fmt is ReportFormat.json else format_table(report))
    if report_path is not None:
        _write_report(report, report_path, quiet)


def _check_options(layout: str, empty_labels: str, report_path: Path | None) -> None:
    """Refuse bad choices before the model loads; with --report, matplotlib must be there."""
    if layout not in LAYOUTS:
        raise SdltagError(f"--layout {layout}: choose {', '.join(LAYOUTS[:-1])} or {LAYOUTS[-1]}.")
    if empty_labels not in ("skip", "zero"):
        raise SdltagError(f"--empty-labels {empty_labels}: choose skip or zero.")
    if report_path is not None:
        from sdltag.report import require_matplotlib

        require_matplotlib()  # before the evaluation, not after it


def _write_report(report: EvalReport, report_path: Path, quiet: bool) -> None:
    from sdltag.report import write_report

    try:
        write_report(report, report_path)
    except OSError as exc:
        error(f"{report_path}: cannot write the report ({exc.strerror or exc}). Pass --report somewhere writable.")
        raise typer.Exit(1) from None
    if not quiet:
        info(f"report written to {report_path}")


def register(app: typer.Typer) -> None:
    app.command("eval")(evaluate)
