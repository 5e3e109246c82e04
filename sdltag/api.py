"""The library entry point: ``Tagger`` tags paths and searches the index, as ``sdltag tag`` and ``sdltag search`` do.

A ``Tagger`` owns what a tagging run needs: the model folder and the graph it runs, the
onnxruntime session (created on first use, so a re-tag from the index never loads it), the
label set (embedded on a thread while files are found), the index and the sidecar policy::

    from sdltag import Tagger

    with Tagger(labels=["red car"], index="photos.sdltag") as tagger:
        run = tagger.tag(["photos/"])
        for result in run:
            print(result.path, [tag.label for tag in result.tags])
        print(run.summary.line())
        hits = tagger.search("red car", top_k=5)

Messages (a file that cannot be read, the model in use) go to ``logging.getLogger("sdltag")``;
results are returned, never printed.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future
from contextlib import closing
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, TYPE_CHECKING

from sdltag.errors import SdltagError
from sdltag.label_space import LabelSet, labels_for, query_labels, warn_unknown_blocked
from sdltag.modelfolder import ModelFolder
from sdltag.results import Problem, SearchHit, TagResult, TagSummary
from sdltag.tagger import TagOptions, iter_tags

if TYPE_CHECKING:
    from collections.abc import Callable

    from sdltag.index import ImageIndex
    from sdltag.runtime import ImageModel
    from sdltag.sidecars import SidecarPolicy

logger = logging.getLogger(__name__)


@dataclass
class SidecarOptions:
    """Keywords written beside the images: XMP sidecars (``xmp``, named per ``xmp_naming``) and caption files
    (``txt``); which tags, per ``threshold`` and ``max_keywords`` over the model's advice (``sdltag.sidecars``)."""

    xmp: bool = False
    xmp_naming: str = "ext"
    txt: bool = False
    threshold: float | None = None
    max_keywords: int | None = None


def load_model(model: str | os.PathLike[str] | ModelFolder | None) -> ModelFolder:
    """A model folder from its path (``None``: the bundled default), or ``model`` itself."""
    if isinstance(model, ModelFolder):
        return model
    from sdltag.modelfolder import default_model_dir, load_model_folder

    return load_model_folder(Path(model) if model is not None else default_model_dir())


class Tagger:
    """Tags images with a model's labels and the user's, and searches the images it indexed.

    ``model``: a model folder (path or ``ModelFolder``; default: the bundled model).
    ``labels``: extra labels as ``--label`` takes them (``"red car"``, ``"beach\\t0.4"``), or a
    ready ``LabelSet``; ``label_files`` as ``--labels``; ``include_seen=False`` scores only those.
    ``index``: the index file (None: no index). ``dry_run``: read the index, write nothing.
    ``options``: top-k, thresholds, batching (``TagOptions``); ``sidecars``: XMP and caption files.
    """

    def __init__(
        self,
        model: str | os.PathLike[str] | ModelFolder | None = None,
        labels: Sequence[str] | LabelSet = (),
        *,
        label_files: Sequence[Path] = (),
        include_seen: bool = True,
        embedder: str | None = None,
        cache_dir: Path | None = None,
        index: str | os.PathLike[str] | None = None,
        dry_run: bool = False,
        options: TagOptions | None = None,
        sidecars: SidecarOptions | None = None,
        device: str = "auto",
        precision: str = "auto",
        threads: int | None = None,
    ) -> None:
        folder = load_model(model)
        if isinstance(labels, str):
            labels = [labels]  # one label, not its characters
        self.embedder, self.cache_dir = embedder, cache_dir
        options = options or TagOptions()
        thresholds: dict[str, float] = {}
        # First the labels, whose embedding (on a thread) is the longest step of a re-tag: finding
        # the files and reading the index overlap it.
        self._labels: LabelSet | Future[LabelSet] = (
            labels
            if isinstance(labels, LabelSet)
            else labels_for(
                folder,
                label_files,
                list(labels),
                include_seen=include_seen,
                embedder=embedder,
                cache_dir=cache_dir,
                background=True,
                thresholds=thresholds,
            )
        )
        self.options = replace(options, label_thresholds={**thresholds, **options.label_thresholds})
        self.sidecars = sidecars or SidecarOptions()
        from sdltag.xmp import NAMINGS

        if self.sidecars.xmp_naming not in NAMINGS:
            raise SdltagError(f"--xmp-naming {self.sidecars.xmp_naming!r} is not one of {', '.join(NAMINGS)}.")
        from sdltag.runtime import resolve_precision

        self.model, self.graph = resolve_precision(folder, precision, device)  # the index keeps graphs apart
        self.precision, self.device, self.threads = precision, device, threads
        self.index_path = Path(index).expanduser() if index is not None else None
        self.dry_run = dry_run
        self.policy = self._sidecar_policy()
        self._index: ImageIndex | None = None
        self._index_opened = False
        self._image_model: ImageModel | None = None
        self._lock = threading.Lock()  # the pipeline warms the session up from a decode thread
        self._runs: list[Iterator[TagResult]] = []

    def _sidecar_policy(self) -> SidecarPolicy:
        from sdltag.sidecars import sidecar_policy

        manifest = self.model.manifest
        return sidecar_policy(
            manifest.sidecar,
            calibrated=manifest.calibration is not None,
            raw_scores=self.options.raw_scores,
            threshold=self.sidecars.threshold,
            max_keywords=self.sidecars.max_keywords,
        )

    # ---- what the run uses, created on first use

    @property
    def labels(self) -> LabelSet:
        """The labels scored (waiting for their embedding, whose error is raised here)."""
        if isinstance(self._labels, Future):
            self._labels = self._labels.result()
        return self._labels

    @property
    def image_model(self) -> ImageModel:
        """The onnxruntime session, created on first use (thread-safe: always the same object)."""
        with self._lock:
            if self._image_model is None:
                from sdltag.runtime import ImageModel

                self._image_model = model = ImageModel(self.model, device=self.device, threads=self.threads)
                threads = self.threads or os.cpu_count() or 1
                logger.info(
                    f"model {self.model.manifest.name or self.model.path.name} on onnxruntime "
                    f"{model.provider} ({threads} thread{'s' if threads != 1 else ''})"
                    + (f", {self.graph}" if self.graph else "")
                )
            return self._image_model

    @property
    def index(self) -> ImageIndex | None:
        """The index, opened on first use (read-only for a dry run; a dry run without one tags without it)."""
        if not self._index_opened:
            self._index = _open_index(self.index_path, self.dry_run)
            self._index_opened = True
        return self._index

    def close(self) -> None:
        """End any run still going (its finished batches stay in the index), then close the index."""
        for run in reversed(self._runs):
            run.close()  # type: ignore[attr-defined]  # generators
        self._runs.clear()
        if self._index is not None:
            self._index.close()
            self._index = None
        self._index_opened = False

    def __enter__(self) -> Tagger:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ---- tagging

    def tag(
        self,
        paths: str | os.PathLike[str] | Iterable[str | os.PathLike[str]],
        *,
        recursive: bool = True,
        include_hidden: bool = False,
        exclude: Sequence[str] = (),
    ) -> TagRun:
        """Find the images under ``paths`` and plan their sidecars; iterate the returned run for the results.

        Inputs that cannot be read are logged as errors and counted in the summary. The index
        is opened here, so an index that cannot be used stops the run before any output.
        """
        from sdltag.images import discover
        from sdltag.runtime import available_providers, choose_providers

        choose_providers(self.device, available_providers())  # refuse an impossible device before any work
        if self.sidecars.xmp or self.sidecars.txt:
            logger.info(self.policy.describe())
        inputs = [Path(paths)] if isinstance(paths, (str, os.PathLike)) else [Path(p) for p in paths]
        found = discover(inputs, recursive=recursive, include_hidden=include_hidden, exclude=exclude)
        for where, reason in found.problems:
            logger.error(f"{where}: {reason}")
        if not found.files and not found.problems and not found.excluded:
            where = ", ".join(str(p) for p in inputs) or "stdin"
            logger.warning(
                f"no images found in {where}; nothing to tag (hidden files are skipped unless --include-hidden)"
            )
        summary = TagSummary(dry_run=self.dry_run)
        summary.xmp_changed = 0 if self.sidecars.xmp else None
        summary.txt_changed = 0 if self.sidecars.txt else None
        if found.skipped_raw:
            summary.skipped["RAW with a same-name JPEG"] += len(found.skipped_raw)
        if found.excluded:
            summary.skipped["excluded by --exclude"] += found.excluded
        if found.problems:
            summary.skipped["missing or unreadable inputs"] += len(found.problems)
        if self.index is not None:  # opened now: an unusable index stops the run before any output
            logger.debug(f"index {self.index_path}")
        return TagRun(self, inputs, found.files, [Problem(str(w), r) for w, r in found.problems], summary)

    # ---- re-tagging from the index

    def retag_from_index(self, folders: Sequence[str | os.PathLike[str]], stream: IO[str]) -> int:
        """Score the photos the index holds in or under ``folders`` against the labels, from the index's matrix
        file (the photos are not opened, the image model never runs), and write their top-k tags to ``stream``
        as CSV ``path,rank,label,score,kind,path_bytes`` (``sdltag tag -f csv``'s columns); returns how many
        photos were written.

        It reports what the index holds: photos never tagged are missing and deleted ones are still there
        (``sdltag tag`` them first; ``sdltag index prune``). Scores are within about 2e-4 of ``tag``'s, with
        the same best labels in the same order. Per-kind or per-label thresholds and blocked labels are refused.
        """
        from sdltag import matrixfile
        from sdltag.index import ImageIndex

        o = self.options
        if o.blocked or o.threshold_seen is not None or o.threshold_unseen is not None:
            raise SdltagError(
                "--from-index supports --threshold but not --threshold-seen, --threshold-unseen or --block."
            )
        path = self.index_path
        if path is None or not path.is_file():
            shown = path if path is not None else "the index"
            raise SdltagError(f"{shown}: no index yet. Run `sdltag tag FOLDER` first (or pass --index FILE).")
        labels = self.labels
        if self.options.label_thresholds:
            raise SdltagError("--from-index does not support per-label thresholds (a labels file's `label<TAB>0.4`).")
        where = [Path(os.path.abspath(f)) for f in folders]
        with ImageIndex.open_readonly(path) as index:
            written = matrixfile.retag(
                index,
                self.model,
                labels,
                stream,
                top_k=o.top_k,
                raw_scores=o.raw_scores,
                threads=self.threads,
                folders=where,
                threshold=o.threshold,
            )
            held = matrixfile.rowids_under(index, where, self.model.model_id) if written is None else None
            if held is not None and not len(held):
                stream.write(matrixfile.RETAG_CSV_HEADER)  # the index holds none of this model there
                written = 0
        if written is None:
            raise SdltagError(
                f"{path}: cannot use the index's matrix file (the index's folder must be writable); "
                "run `sdltag tag` without --from-index instead."
            )
        if written == 0:
            shown = ", ".join(str(f) for f in folders)
            logger.warning(f"the index holds no photos of this model under {shown}; run `sdltag tag` on them first")
        return written

    # ---- search

    def search(
        self,
        query: str | None = None,
        folders: Sequence[str | os.PathLike[str]] = (),
        *,
        top_k: int = 20,
        threshold: float | None = None,
        like: str | os.PathLike[str] | None = None,
    ) -> list[SearchHit]:
        """The indexed images under ``folders`` (all when empty) best for the label ``query``, or most like
        the image ``like``; best first. The image model runs only for a ``like`` image the index lacks."""
        from sdltag.index import ImageIndex
        from sdltag.search import search_label, search_like

        path = self.index_path
        if path is None or not path.is_file():
            shown = path if path is not None else "the index"
            raise SdltagError(f"{shown}: no index yet. Run `sdltag tag FOLDER` first (or pass --index FILE).")
        where = [Path(p) for p in folders]
        if like is not None:
            with ImageIndex.open_readonly(path) as index:
                return search_like(index, self.model, Path(like), where, top_k, threshold)
        if query is None:
            raise SdltagError("give a label to search for (e.g. `sdltag search beach`), or --like IMAGE.")
        labels = query_labels(self.model, query, self.embedder, self.cache_dir)
        with ImageIndex.open_readonly(path) as index:
            return search_label(
                index,
                self.model,
                labels,
                where,
                top_k,
                raw_scores=self.options.raw_scores,
                threshold=threshold,
                other_graph_too=self.precision == "auto",
            )


class TagRun:
    """One ``Tagger.tag`` call: the images found (``files``), the inputs that could not be read
    (``problems``), the ``summary`` (complete once iterated), and, as you iterate, the results."""

    def __init__(
        self, tagger: Tagger, inputs: list[Path], files: list[Path], problems: list[Problem], summary: TagSummary
    ) -> None:
        self.tagger, self.inputs, self.files, self.problems, self.summary = tagger, inputs, files, problems, summary
        self.xmp_files = _sidecar_files(files, tagger.sidecars.xmp_naming) if tagger.sidecars.xmp else {}
        self.caption_files = _caption_files(files) if tagger.sidecars.txt else {}

    def __iter__(self) -> Iterator[TagResult]:
        return self.results()

    def results(
        self,
        on_problem: Callable[[Problem], None] | None = None,
        on_progress: Callable[[int], None] | None = None,
    ) -> Iterator[TagResult]:
        """The results in input order; each failed file is logged and handed to ``on_problem``."""
        results = self._results(on_problem, on_progress)
        self.tagger._runs.append(results)
        return results

    def _results(
        self, on_problem: Callable[[Problem], None] | None, on_progress: Callable[[int], None] | None
    ) -> Iterator[TagResult]:
        tagger = self.tagger

        def problem(found: Problem) -> None:
            logger.error(f"{found.path}: {found.reason}")
            if on_problem is not None:
                on_problem(found)

        pipeline = iter_tags(
            self.files,
            model=tagger.model,
            labels=tagger._labels,
            image_model=lambda: tagger.image_model,
            on_problem=problem,
            options=tagger.options,
            index=tagger.index,
            index_writable=not tagger.dry_run,
            on_progress=on_progress,
            summary=self.summary,
        )
        with closing(pipeline):  # type: ignore[type-var]  # a generator
            for result in pipeline:
                self._write_sidecars(result)
                yield result
        labels = tagger.labels  # a run that scored nothing still reports a label problem
        if tagger.options.blocked:
            warn_unknown_blocked(tagger.options.blocked, labels)
        index = tagger.index
        if index is not None and not tagger.dry_run:
            # rows of files deleted or renamed since: search must not list them
            index.prune_missing([p for p in self.inputs if p.is_dir()])

    def _write_sidecars(self, result: TagResult) -> None:
        """Merge one result's sidecar keywords into its XMP sidecar and caption file (as asked)."""
        sidecar, caption = self.xmp_files.get(result.path), self.caption_files.get(result.path)
        if sidecar is None and caption is None:
            return
        keywords = self.tagger.policy.keywords(result.tags)
        if caption is not None:
            self._write(caption, keywords, "txt")
        if sidecar is not None:
            self._write(sidecar, keywords, "xmp")

    def _write(self, path: Path, keywords: list[str], kind: str) -> None:
        """One sidecar (``xmp``) or caption file (``txt``); a problem is one error line and counted."""
        from sdltag.captions import CaptionError, write_caption
        from sdltag.xmp import XmpError, write_keywords

        write = write_keywords if kind == "xmp" else write_caption
        try:
            if not write(path, keywords, dry_run=self.tagger.dry_run):
                return
        except (XmpError, CaptionError) as exc:
            logger.error(str(exc))
            self.summary.sidecar_failures += 1
            return
        if kind == "xmp":
            self.summary.xmp_changed = (self.summary.xmp_changed or 0) + 1
        else:
            self.summary.txt_changed = (self.summary.txt_changed or 0) + 1
        if self.tagger.dry_run:
            logger.info(f"--dry-run: would update {path}")


def _open_index(path: Path | None, dry_run: bool) -> ImageIndex | None:
    """The index at ``path``: read-write, or for a dry run read-only (none when missing or unusable)."""
    if path is None:
        return None
    from sdltag.index import ImageIndex, NotAnIndexError

    if not dry_run:
        return ImageIndex.open(path)
    if not path.exists():
        return None
    try:
        return ImageIndex.open_readonly(path)
    except NotAnIndexError:
        raise
    except SdltagError as exc:
        logger.warning(f"{exc} (--dry-run: tagging without the index)")
        return None


def _sidecar_files(files: list[Path], naming: str) -> dict[Path, Path]:
    """Each image's XMP sidecar; a sidecar two images would share goes to the first."""
    from sdltag.xmp import sidecar_path

    return _claim(
        files, lambda path: sidecar_path(path, naming), "sidecar", " (use --xmp-naming ext to give each its own)"
    )


def _caption_files(files: list[Path]) -> dict[Path, Path]:
    """Each image's caption file (``sdltag.captions.caption_path``); a file two images would share goes to the first."""
    from sdltag.captions import caption_path

    return _claim(files, caption_path, "caption file", "")


def _claim(files: list[Path], name_of: Callable[[Path], Path], what: str, hint: str) -> dict[Path, Path]:
    """image -> its file ``name_of(image)``; a file two images would share goes to the first, with a warning."""
    owners: dict[Path, Path] = {}
    for path in files:
        target = name_of(path)
        if target in owners:
            logger.warning(
                f"{path} and {owners[target]} would share the {what} {target.name}; writing it for "
                f"{owners[target].name} only{hint}"
            )
            continue
        owners[target] = path
    return {image: target for target, image in owners.items()}
