"""``sdltag tag``: tag folders of photos with seen and zero-shot labels; CSV/JSON/JSONL/table, XMP, index."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer

from sdltag.commands._common import cli_errors, complete_model_dir, expand_stdin, info, install_sigterm
from sdltag.errors import SdltagError
from sdltag.writers import OutputFormat

if TYPE_CHECKING:
    from sdltag.api import Tagger


# long: the Typer signature declares every option; the body is a dozen lines of wiring
@cli_errors
def tag(
    paths: list[Path] = typer.Argument(..., help="Image files and folders to tag; `-` reads paths from stdin."),
    model_dir: Path = typer.Option(
        None, "--model", "-m", help="Model folder (default: the bundled model).", autocompletion=complete_model_dir
    ),
    labels_files: list[Path] = typer.Option(
        [], "--labels", "-l", help="Labels file, one label per line (repeatable). Adds zero-shot labels."
    ),
    label: list[str] = typer.Option([], "--label", help="One extra label, e.g. 'red car' (repeatable)."),
    embedder: str = typer.Option(None, "--embedder", help="Text embedder for new labels (default: the model's)."),
    cache_dir: Path = typer.Option(None, "--cache-dir", help="Label-vector cache folder (default: user cache)."),
    no_seen: bool = typer.Option(False, "--no-seen", help="Rank only your --labels/--label, not the model's own."),
    top: int = typer.Option(10, "--top-k", "-k", min=1, help="Tags per image (best first)."),
    threshold: float = typer.Option(None, "--threshold", "-t", help="Drop tags scoring below this."),
    threshold_seen: float = typer.Option(
        None, "--threshold-seen", help="Drop the model's own (seen) labels scoring below this (over --threshold)."
    ),
    threshold_unseen: float = typer.Option(
        None, "--threshold-unseen", help="Drop zero-shot (unseen) labels scoring below this (over --threshold)."
    ),
    block_files: list[Path] = typer.Option(
        [], "--block", help="Labels file of labels never to emit, one per line (repeatable)."
    ),
    raw_scores: bool = typer.Option(False, "--raw-scores", help="Raw SDL scores instead of calibrated confidences."),
    fmt: OutputFormat = typer.Option(
        None,
        "--format",
        "-f",
        help="Output format: paths0 is NUL-terminated (for xargs -0), html a contact sheet of thumbnails and tags "
        "to review (default: table on a terminal, else jsonl; with --output, from its extension).",
    ),
    output: Path = typer.Option(
        None, "--output", "-o", help="Write results to this file (atomically; `-` for stdout)."
    ),
    xmp: bool = typer.Option(
        False,
        "--xmp",
        help="Merge tags into XMP sidecars (dc:subject, sdltag|label); which tags: see --sidecar-threshold.",
    ),
    xmp_naming: str = typer.Option("ext", "--xmp-naming", help="Sidecar names: ext (IMG.jpg.xmp) or adobe (IMG.xmp)."),
    txt: bool = typer.Option(
        False, "--txt", help="Merge tags into IMG.txt caption files (comma-separated, as caption-training tools read)."
    ),
    sidecar_threshold: float = typer.Option(
        None,
        "--sidecar-threshold",
        min=0.0,
        help="Write only tags scoring at least this to XMP sidecars and caption files (default: the model's "
        "advice, e.g. 0.1 for the bundled photo-lite0; 0.5 for other calibrated models; none without "
        "calibration). The printed output keeps --top-k tags at any score.",
    ),
    sidecar_max: int = typer.Option(
        None,
        "--sidecar-max",
        min=1,
        help="At most this many keywords per photo in sidecars (default: the model's advice, e.g. 3 for "
        "photo-lite0; else 5).",
    ),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print results only: write no index, sidecar or file."),
    index_path: Path = typer.Option(None, "--index", help="Index file (default: in the user data folder)."),
    no_index: bool = typer.Option(False, "--no-index", help="Neither read nor write the index."),
    recursive: bool = typer.Option(True, "--recursive/--no-recursive", help="Walk sub-folders (default: yes)."),
    include_hidden: bool = typer.Option(
        False, "--include-hidden", help="Also tag hidden files, @eaDir, .git (never ._* resource forks)."
    ),
    exclude: list[str] = typer.Option(
        [],
        "--exclude",
        help="Leave out files matching this glob (repeatable): against the path relative to each input folder "
        "and the file name, e.g. '*/exports/*' or '*.thumb.jpg'.",
    ),
    null: bool = typer.Option(False, "--null", "-0", help="Paths on stdin are NUL-separated (find -print0)."),
    batch_size: int = typer.Option(32, "--batch-size", min=1, help="Images per inference batch."),
    threads: int = typer.Option(
        None, "--threads", min=1, help="Threads for decoding and for inference (default: all cores)."
    ),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda (cuda without CUDA is an error)."),
    precision: str = typer.Option(
        "auto",
        "--precision",
        help="auto (the model's 8-bit graph on CPUs with VNNI or Arm dot product, if it has one), float or int8.",
    ),
    max_megapixels: float = typer.Option(100.0, "--max-megapixels", min=0.01, help="Refuse larger images."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar, provider or summary line."),
    from_index: bool = typer.Option(
        False,
        "--from-index",
        help="Re-score the photos the index already holds under PATHS (folders) against the labels, from the "
        "index alone: the photos are not opened and the image model does not run (a million photos in about "
        "half a minute). CSV only (the columns of -f csv; scores within about 2e-4, the same best labels). "
        "It reports what the index holds: run `sdltag tag` on new photos first, `sdltag index prune` for "
        "deleted ones. Not with --xmp, --txt, --dry-run, --no-index, --exclude, --block or the per-kind thresholds.",
    ),
) -> None:
    """Tag images with the model's labels and your own (zero-shot).

    Walks folders (JPEG, PNG, WebP, TIFF, BMP, GIF, HEIC, camera RAW), runs the model
    only on images the index does not already hold, and writes the top-k tags per
    image to stdout (or --output) and optionally to XMP sidecars. Exit 0 when every
    input was tagged, 1 when some failed (each named on stderr), 2 for usage errors.
    """
    from sdltag.api import SidecarOptions, Tagger
    from sdltag.label_space import read_blocked
    from sdltag.log import set_quiet
    from sdltag.paths import default_index_path
    from sdltag.progress import ProgressBar
    from sdltag.tagger import TagOptions
    from sdltag.writers import choose_format, open_results, sheet_title, thumbnail_size

    set_quiet(quiet)  # -q: no provider, sidecar-policy or dry-run lines (warnings and errors stay)
    if from_index:  # refused before any work
        _check_from_index(paths, fmt, output, xmp=xmp, txt=txt, dry_run=dry_run, no_index=no_index)
        _check_from_index(paths, recursive=recursive, exclude=exclude, block=block_files)
        _check_from_index(paths, per_kind=(threshold_seen, threshold_unseen) != (None, None))
    fmt_name = "csv" if from_index else choose_format(fmt, output)
    options = TagOptions(
        top_k=top,
        threshold=threshold,
        threshold_seen=threshold_seen,
        threshold_unseen=threshold_unseen,
        blocked=read_blocked(block_files),
        raw_scores=raw_scores,
        batch_size=batch_size,
        decode_threads=threads,
        max_megapixels=max_megapixels,
        thumbnail_size=thumbnail_size(fmt_name),
    )
    tagger = Tagger(
        model_dir,
        label,
        label_files=labels_files,
        include_seen=not no_seen,
        embedder=embedder,
        cache_dir=cache_dir,
        index=None if no_index else (index_path or default_index_path()),
        dry_run=dry_run,
        options=options,
        sidecars=SidecarOptions(xmp, xmp_naming, txt, sidecar_threshold, sidecar_max),
        device=device,
        precision=precision,
        threads=threads,
    )
    install_sigterm()
    if from_index:
        _tag_from_index(tagger, paths, output, quiet)
        return
    with tagger:
        inputs = expand_stdin(paths, null)
        run = tagger.tag(inputs, recursive=recursive, include_hidden=include_hidden, exclude=exclude)
        title = sheet_title("sdltag tag", inputs) if fmt_name == "html" else ""
        with open_results(fmt_name, output, dry_run=dry_run, title=title, max_megapixels=max_megapixels) as out:
            for problem in run.problems:
                out.problem(problem.path, problem.reason)
            with ProgressBar("tagging", total=len(run.files), rate_unit="img/s", quiet=quiet or not run.files) as bar:
                for result in run.results(on_problem=lambda p: out.problem(p.path, p.reason), on_progress=bar.advance):
                    out.writer.write(result)
    if not quiet:
        info(run.summary.line())
    if run.summary.failures or out.failed:
        raise typer.Exit(1)


def _check_from_index(
    paths: list[Path],
    fmt: OutputFormat | None = None,
    output: Path | None = None,
    *,
    per_kind: bool = False,
    block: list[Path] | None = None,
    exclude: list[str] | None = None,
    recursive: bool = True,
    **flags: bool,
) -> None:
    """Refuse what ``--from-index`` cannot honour (``flags``: ``dry_run=True`` for ``--dry-run`` given, ...)."""
    from sdltag.writers import EXTENSION_FORMATS

    named = {f"--{name.replace('_', '-')}": given for name, given in flags.items()}
    fmt_value = fmt.value if isinstance(fmt, OutputFormat) else fmt
    named[f"--format {fmt_value}"] = fmt_value not in (None, "csv")
    suffix = "" if output is None or str(output) == "-" else output.suffix.lower()
    named[f"--output {output} (use a .csv name)"] = fmt_value is None and EXTENSION_FORMATS.get(suffix, "csv") != "csv"
    named.update({"--block": bool(block), "--exclude": bool(exclude), "--no-recursive": not recursive})
    named["--threshold-seen/--threshold-unseen"] = per_kind
    refused = next((name for name, given in named.items() if given), None)
    if refused:
        raise SdltagError(f"--from-index cannot be combined with {refused} (it writes CSV from the index alone).")
    if any(str(p) == "-" for p in paths):
        raise SdltagError("--from-index takes folders as arguments, not `-` (stdin).")


def _tag_from_index(tagger: Tagger, paths: list[Path], output: Path | None, quiet: bool) -> None:
    """``tag --from-index``: the indexed photos under ``paths`` as CSV on ``output`` (atomically) or stdout."""
    import time

    from sdltag.writers import open_output

    start = time.perf_counter()
    with tagger, open_output(output) as stream:
        written = tagger.retag_from_index(paths, stream)
        labels = len(tagger.labels.names)
    if not quiet:
        where = "" if output is None or str(output) == "-" else f" to {output}"
        info(
            f"re-scored {written} indexed photo{'s' if written != 1 else ''} against {labels} "
            f"label{'s' if labels != 1 else ''}{where} in {time.perf_counter() - start:.1f} s (from the index)"
        )


def register(app: typer.Typer) -> None:
    app.command("tag")(tag)
