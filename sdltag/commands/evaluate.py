"""``sdltag eval``: the paper's ZSL and GZSL metrics of a model folder on a labeled folder."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from sdltag.commands._common import cli_errors, error, info
from sdltag.errors import SdltagError


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
    fmt: str = typer.Option("table", "--format", "-f", help="Output: table or json."),
    data_format: str = typer.Option(
        "auto", "--data-format", help="Folder layout: auto, manifest, sidecar, folders, xmp."
    ),
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

    if fmt not in ("table", "json"):
        raise SdltagError(f"--format {fmt}: choose table or json.")
    if empty_labels not in ("skip", "zero"):
        raise SdltagError(f"--empty-labels {empty_labels}: choose skip or zero.")
    if report_path is not None:
        from sdltag.report import require_matplotlib

        require_matplotlib()  # before the evaluation, not after it
    from sdltag.runtime import resolve_precision

    model, _ = resolve_precision(load_model_folder(model_dir), precision, device)
    progress = None
    bar = None
    if not quiet:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        bar = Progress(
            TextColumn("evaluating"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            transient=True,
        )
        task = bar.add_task("eval", total=None)

        def progress(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        bar.start()
    try:
        report = run_eval(
            model,
            data_dir,
            unseen_file=unseen,
            data_format=data_format,
            batch_size=batch_size,
            device=device,
            threads=threads,
            embedder=embedder,
            cache_dir=cache_dir,
            empty=empty_labels,
            progress=progress,
            exclude=exclude,
        )
    finally:
        if bar is not None:
            bar.stop()
    if fmt == "json":
        typer.echo(json.dumps(report.to_json(), indent=2))
    else:
        typer.echo(format_table(report))
    if report_path is not None:
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
