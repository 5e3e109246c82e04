"""``sdltag tag``: tag folders of photos with seen and zero-shot labels; CSV/JSON/JSONL/table, XMP, index."""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import IO, Any

import typer

from sdltag.commands._common import cli_errors, complete_model_dir, error, info, warn
from sdltag.errors import SdltagError

FORMATS = ("table", "csv", "json", "jsonl", "paths", "paths0", "html")
_EXT_FORMATS = {
    ".csv": "csv",
    ".json": "json",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".txt": "paths",
    ".html": "html",
    ".htm": "html",
}


def load_model(model_dir: Path | None):
    """The model folder from ``--model``, or the bundled default."""
    from sdltag.modelfolder import default_model_dir, load_model_folder

    return load_model_folder(model_dir if model_dir is not None else default_model_dir())


def resolve_label_space(
    model,
    label_files: list[Path],
    inline: list[str],
    *,
    no_seen: bool = False,
    embedder: str | None = None,
    cache_dir: Path | None = None,
    warn_fn: Callable[[str], None] = warn,
    background: bool = False,
    thresholds: dict[str, float] | None = None,
):
    """The labels to score: the model's own, plus the user's (``--labels``/``--label``) via ``label_space``.

    ``thresholds``, when given, receives the labels files' per-label thresholds (``label_key`` -> value).
    With ``background``, the labels files are read and checked here and the embedding
    runs on a thread: the result is then a ``Future`` of the ``LabelSpace``.
    """
    from sdltag.tagger import LabelSpace

    if not label_files and not inline:
        if no_seen:
            raise SdltagError("--no-seen leaves no labels to rank. Add --labels FILE or --label TEXT.")
        return LabelSpace.from_model(model)
    from sdltag.labels import build_vocabulary

    entries = build_vocabulary(label_files, inline, warn=warn_fn)
    if thresholds is not None:
        thresholds.update((e.key, e.threshold) for e in entries if e.threshold is not None)
    try:
        from sdltag.label_space import resolve_labels
    except ModuleNotFoundError as exc:  # pragma: no cover - the module ships with sdltag
        raise SdltagError(f"user labels need sdltag.label_space, which is missing here ({exc}).") from None

    def embed() -> LabelSpace:
        label_set = resolve_labels(
            model, entries, include_seen=not no_seen, embedder=embedder or None, cache_dir=cache_dir, warn=warn_fn
        )
        return LabelSpace.from_label_set(label_set)

    if background:
        # The label file was read and checked above; embedding (an onnxruntime session, which
        # releases the GIL) overlaps finding the files and reading the index.
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sdltag-labels")
        future = pool.submit(embed)
        pool.shutdown(wait=False)
        return future
    return embed()


def read_stdin_paths(null: bool, stream: IO[bytes] | None = None) -> list[Path]:
    """Paths from stdin, newline- (or with ``null`` NUL-) separated; bytes kept exact via ``os.fsdecode``."""
    data = (stream or sys.stdin.buffer).read()
    parts = data.split(b"\0") if null else data.split(b"\n")
    paths = []
    for part in parts:
        if not null:
            part = part.rstrip(b"\r")
        if part:
            paths.append(Path(os.fsdecode(part)))
    return paths


def _thumbnail_size(fmt: str) -> int:
    """The contact sheet's thumbnails are made from the tagging decode; no other format needs one."""
    if fmt != "html":
        return 0
    from sdltag.contact_sheet import THUMB_SIZE

    return THUMB_SIZE


def _format_for(fmt: str | None, output: Path | None) -> str:
    if fmt is not None:
        if fmt not in FORMATS:
            raise SdltagError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}.")
        return fmt
    if output is not None:
        return _EXT_FORMATS.get(output.suffix.lower(), "jsonl")
    return "table" if sys.stdout.isatty() else "jsonl"


class _ImageModelFactory:
    """Creates the onnxruntime session on first use and says which execution provider is active."""

    def __init__(self, model, device: str, threads: int | None, quiet: bool, graph: str = "") -> None:
        from sdltag.runtime import available_providers, choose_providers

        choose_providers(device, available_providers())  # refuse an impossible --device before any work
        self.model, self.device, self.threads, self.quiet, self.graph = model, device, threads, quiet, graph
        self.instance = None
        self._lock = threading.Lock()  # the tagger may warm the session up from a decode thread

    def __call__(self):
        with self._lock:
            if self.instance is None:
                from sdltag.runtime import ImageModel

                self.instance = ImageModel(self.model, device=self.device, threads=self.threads)
                threads = self.threads or os.cpu_count() or 1
                if self.quiet:
                    return self.instance
                info(
                    f"model {self.model.manifest.name or self.model.path.name} on onnxruntime "
                    f"{self.instance.provider} ({threads} thread{'s' if threads != 1 else ''})"
                    + (f", {self.graph}" if self.graph else "")
                )
            return self.instance


def _open_index(no_index: bool, index_path: Path | None, dry_run: bool):
    from sdltag.index import ImageIndex, NotAnIndexError
    from sdltag.paths import default_index_path

    if no_index:
        return None
    path = Path(index_path).expanduser() if index_path else default_index_path()
    if dry_run:
        if not path.exists():
            return None
        try:
            return ImageIndex.open_readonly(path)
        except NotAnIndexError:
            raise
        except SdltagError as exc:
            warn(f"{exc} (--dry-run: tagging without the index)")
            return None
    return ImageIndex.open(path)


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
    fmt: str = typer.Option(
        None,
        "--format",
        "-f",
        help="table, csv, json, jsonl, paths, paths0 (NUL-terminated, for xargs -0) or html (a contact sheet "
        "of thumbnails and tags to review) (default: table on a terminal, else jsonl; with --output, from its "
        "extension).",
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
) -> None:
    """Tag images with the model's labels and your own (zero-shot).

    Walks folders (JPEG, PNG, WebP, TIFF, BMP, GIF, HEIC, camera RAW), runs the model
    only on images the index does not already hold, and writes the top-k tags per
    image to stdout (or --output) and optionally to XMP sidecars. Exit 0 when every
    input was tagged, 1 when some failed (each named on stderr), 2 for usage errors.
    """
    fmt = _format_for(fmt, output)
    model = load_model(model_dir)
    # First the labels, whose embedding (on a thread) is the longest step of a re-tag; the
    # imports below and finding the files then overlap it.
    label_thresholds: dict[str, float] = {}
    label_space = resolve_label_space(
        model,
        labels_files,
        label,
        no_seen=no_seen,
        embedder=embedder,
        cache_dir=cache_dir,
        background=True,
        thresholds=label_thresholds,
    )
    blocked = _blocked(block_files)
    from sdltag.images import discover
    from sdltag.tagger import LabelSpace, TagOptions, tag_files
    from sdltag.writers import make_writer, open_output, stdout_stream
    from sdltag.xmp import NAMINGS, XmpError, sidecar_path, write_keywords

    if xmp_naming not in NAMINGS:
        raise SdltagError(f"--xmp-naming {xmp_naming!r} is not one of {', '.join(NAMINGS)}.")
    from sdltag.runtime import resolve_precision

    model, graph = resolve_precision(model, precision, device)  # the index keeps each graph's vectors apart
    from sdltag.sidecars import sidecar_policy

    policy = sidecar_policy(
        model.manifest.sidecar,
        calibrated=model.manifest.calibration is not None,
        raw_scores=raw_scores,
        threshold=sidecar_threshold,
        max_keywords=sidecar_max,
    )
    if (xmp or txt) and not quiet:
        info(policy.describe())
    factory = _ImageModelFactory(model, device, threads, quiet, graph)

    inputs: list[Path] = []
    for path in paths:
        if str(path) == "-":
            inputs.extend(read_stdin_paths(null))
        else:
            inputs.append(path)
    found = discover(inputs, recursive=recursive, include_hidden=include_hidden, exclude=exclude)
    failures = 0
    for where, reason in found.problems:
        error(f"{where}: {reason}")
        failures += 1
    files = found.files
    if not files and not found.problems and not found.excluded:
        where = ", ".join(str(p) for p in inputs) or "stdin"
        warn(f"no images found in {where}; nothing to tag (hidden files are skipped unless --include-hidden)")

    sidecars: dict[Path, Path] = {}
    if xmp:
        owners: dict[Path, Path] = {}
        for path in files:
            sidecar = sidecar_path(path, xmp_naming)
            if sidecar in owners:
                warn(
                    f"{path} and {owners[sidecar]} would share the sidecar {sidecar.name}; writing it for "
                    f"{owners[sidecar].name} only (use --xmp-naming ext to give each its own)"
                )
                continue
            owners[sidecar] = path
            sidecars[path] = sidecar

    captions = _caption_files(files) if txt else {}
    options = TagOptions(
        top_k=top,
        threshold=threshold,
        threshold_seen=threshold_seen,
        threshold_unseen=threshold_unseen,
        label_thresholds=label_thresholds,
        blocked=blocked,
        raw_scores=raw_scores,
        batch_size=batch_size,
        decode_threads=threads,
        max_megapixels=max_megapixels,
        thumbnail_size=_thumbnail_size(fmt),
    )
    xmp_failures = 0
    xmp_changed = 0
    txt_counts = {"changed": 0, "failed": 0}

    _install_sigterm()
    with ExitStack() as stack:
        index = _open_index(no_index, index_path, dry_run)
        if index is not None:
            stack.callback(index.close)
        stream = None
        if output is not None and dry_run:
            info(f"--dry-run: not writing {output}; results go to stdout")
        elif output is not None:
            try:
                stream = stack.enter_context(open_output(output))
            except OSError as exc:
                error(
                    f"{output}: cannot write the output ({exc.strerror or exc}); writing the results to stdout "
                    "instead. Pass --output somewhere writable."
                )
                failures += 1
        sheet: dict[str, Any] = {}  # the contact sheet's options
        if fmt == "html":  # thumbnails go beside --output when too many to embed; none when on stdout
            from sdltag.contact_sheet import display_path

            shown = ", ".join(display_path(p) for p in inputs[:3]) + (", ..." if len(inputs) > 3 else "")
            sheet = {"output": None if stream is None else output, "title": f"sdltag tag {shown}"}
            sheet.update(max_megapixels=max_megapixels)
        if stream is None:
            stream = stdout_stream()
        writer = make_writer(fmt, stream, **sheet)
        sheet_problem = getattr(writer, "problem", None)  # the contact sheet lists the files that failed
        if sheet_problem is not None:
            for where, reason in found.problems:
                sheet_problem(where, reason)

        def on_result(result) -> None:
            nonlocal xmp_failures, xmp_changed
            writer.write(result)
            keywords = policy.keywords(result.tags)
            _caption(captions.get(result.path), keywords, dry_run, txt_counts)
            sidecar = sidecars.get(result.path)
            if sidecar is None:
                return
            try:
                if write_keywords(sidecar, keywords, dry_run=dry_run):
                    xmp_changed += 1
                    if dry_run:
                        info(f"--dry-run: would update {sidecar}")
            except XmpError as exc:
                error(str(exc))
                xmp_failures += 1

        def on_problem(problem) -> None:
            error(f"{problem.path}: {problem.reason}")
            if sheet_problem is not None:
                sheet_problem(problem.path, problem.reason)

        from sdltag.progress import ProgressBar

        with ProgressBar("tagging", total=len(files), rate_unit="img/s", quiet=quiet or not files) as progress:
            summary = tag_files(
                files,
                model=model,
                labels=label_space,
                image_model=factory,
                on_result=on_result,
                on_problem=on_problem,
                options=options,
                index=index,
                index_writable=not dry_run,
                on_progress=progress.advance if progress.shown else None,
            )
        if not isinstance(label_space, LabelSpace):
            label_space = label_space.result()  # a run that scored nothing still reports a label problem
        _warn_unknown_blocked(blocked, label_space)
        writer.close()
        if index is not None and not dry_run:
            # rows of files deleted or renamed since: search must not list them
            index.prune_missing([p for p in inputs if str(p) != "-" and p.is_dir()])
    if found.skipped_raw:
        summary.skipped["RAW with a same-name JPEG"] += len(found.skipped_raw)
    if found.excluded:
        summary.skipped["excluded by --exclude"] += found.excluded
    if found.problems:
        summary.skipped["missing or unreadable inputs"] += len(found.problems)
    if not quiet:
        extra = (
            f"; {xmp_changed} sidecar{'s' if xmp_changed != 1 else ''} {'to update' if dry_run else 'updated'}"
            if xmp
            else ""
        )
        if txt:
            changed = txt_counts["changed"]
            extra += f"; {changed} caption{'s' if changed != 1 else ''} {'to update' if dry_run else 'updated'}"
        info(summary.line() + extra)
    failures += len(summary.failed) + xmp_failures + txt_counts["failed"]
    if failures:
        raise typer.Exit(1)


def _caption_files(files: list[Path]) -> dict[Path, Path]:
    """Each image's caption file (``sdltag.captions.caption_path``); a file two images would share goes to the first."""
    from sdltag.captions import caption_path

    owners: dict[Path, Path] = {}
    captions: dict[Path, Path] = {}
    for path in files:
        caption = caption_path(path)
        if caption in owners:
            warn(
                f"{path} and {owners[caption]} would share the caption file {caption.name}; writing it for "
                f"{owners[caption].name} only"
            )
            continue
        owners[caption] = path
        captions[path] = caption
    return captions


def _caption(caption: Path | None, keywords: list[str], dry_run: bool, counts: dict[str, int]) -> None:
    """Merge one result's sidecar keywords into its caption file; a problem is one error line and counted."""
    if caption is None:
        return
    from sdltag.captions import CaptionError, write_caption

    try:
        if write_caption(caption, keywords, dry_run=dry_run):
            counts["changed"] += 1
            if dry_run:
                info(f"--dry-run: would update {caption}")
    except CaptionError as exc:
        error(str(exc))
        counts["failed"] += 1


def _blocked(files: list[Path]) -> frozenset[str]:
    """The ``label_key`` of every label in the ``--block`` files (thresholds and descriptions ignored)."""
    from sdltag.labels import read_labels_file

    keys: set[str] = set()
    for path in files:
        try:
            keys.update(entry.key for entry in read_labels_file(path))
        except SdltagError as exc:
            raise SdltagError(str(exc).replace("the --labels path", "the --block path")) from None
    return frozenset(keys)


def _warn_unknown_blocked(blocked: frozenset[str], label_space) -> None:
    from sdltag.labels import label_key

    unknown = sorted(blocked - {label_key(name) for name in label_space.names})
    if unknown:
        shown = ", ".join(repr(k) for k in unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        warn(f"--block: {shown} {'is' if len(unknown) == 1 else 'are'} not among the labels scored (a typo?)")


def _install_sigterm() -> None:
    """``kill`` ends the run like Ctrl-C: the index keeps every finished batch."""
    if threading.current_thread() is not threading.main_thread():
        return

    def handler(signum, frame):  # noqa: ARG001
        raise KeyboardInterrupt

    try:
        signal.signal(signal.SIGTERM, handler)
    except (ValueError, OSError):
        pass


def register(app: typer.Typer) -> None:
    app.command("tag")(tag)
