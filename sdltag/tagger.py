"""The tag pipeline: index look-up, decoding in threads, batched inference, scoring, results in input order.

The image model runs only on images the index does not already hold for this model:
an unchanged file (same size and mtime) or a renamed/copied one (same content hash)
reuses its stored (M, d) matrix, so re-tagging with new labels costs one matrix
product per image. Decoding (Pillow releases the GIL) runs in a thread pool while
the main thread runs onnxruntime (which also releases it), so both cores stay busy.
The label set is an input (names, vectors, unseen mask): the pipeline never embeds
text. Library code: no printing; results are yielded in input order (``iter_tags``) or
handed to a callback (``tag_files``), problems go to a callback.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from sdltag.hashing import bytes_hash, file_hash
from sdltag.images import RAW_EXTENSIONS, ImageError, load_image, open_image, preprocess
from sdltag.index import ImageIndex
from sdltag.label_space import LabelSet
from sdltag.modelfolder import InputSpec, ModelFolder
from sdltag.results import Problem, Tag, TagResult, TagSummary
from sdltag.scoring import calibrate, sdl_scores, top_k

SCORE_CHUNK = 256  # images scored per matrix product when their vectors come from the index
LOOKUP_CHUNK = 256  # files looked up in the index per query
# While the label vectors are still being computed (a Future), matrices wait unscored up to this
# many images (7 x 384 float32 = 10.5 KB each, so ~43 MB); then the run waits for the labels.
MAX_UNSCORED = 4096
# numpy's BLAS runs on one thread in sdltag (sdltag._platform.single_thread_blas); batches of at
# least this many images (re-tagging from the index) are scored in parts on several threads.
PARALLEL_SCORE_MIN = 128
# Files up to this size are read once: hashed, then decoded from the same bytes (larger ones are
# hashed in chunks and decoded from disk, so a huge TIFF is never held twice in memory).
READ_ONCE_MAX = 64 << 20


LabelSpace = LabelSet  # the name this module used for the label set; one type, ``sdltag.label_space.LabelSet``
__all__ = ["LabelSpace", "Problem", "Scorer", "TagOptions", "TagSummary", "iter_tags", "tag_files"]


@dataclass
class TagOptions:
    """How to tag: ``top_k`` labels per image, optional ``threshold``, raw or calibrated scores, batching."""

    top_k: int = 10
    threshold: float | None = None
    raw_scores: bool = False
    batch_size: int = 32
    decode_threads: int | None = None
    max_megapixels: float = 100.0
    # > 0: each decoded image also gives a JPEG thumbnail this many px on its long side (the HTML contact sheet)
    thumbnail_size: int = 0
    # Cut-offs by kind (over ``threshold``), and per label (``label_key`` -> value, over both: a labels
    # file's ``label<TAB>0.4``); ``blocked`` labels (``label_key``) are never emitted (``--block FILE``).
    threshold_seen: float | None = None
    threshold_unseen: float | None = None
    label_thresholds: dict[str, float] = field(default_factory=dict)
    blocked: frozenset[str] = frozenset()


class Scorer:
    """(B, M, d) principal vectors -> the top-k ``Tag`` lists, calibrated unless ``raw_scores``."""

    def __init__(self, labels: LabelSet, calibration: dict | None, options: TagOptions) -> None:
        self.labels = labels
        self.calibration = None if options.raw_scores else calibration
        self.options = options
        self.kinds = ["unseen" if u else "seen" for u in labels.unseen_mask]
        self.cutoffs = self._cutoffs()

    def _cutoffs(self) -> np.ndarray | None:
        """(L,) the least score each label is emitted at (inf: blocked); None when one ``threshold`` serves all."""
        o = self.options
        if not (o.label_thresholds or o.blocked or o.threshold_seen is not None or o.threshold_unseen is not None):
            return None
        from sdltag.labels import label_key

        base = -np.inf if o.threshold is None else o.threshold
        seen = base if o.threshold_seen is None else o.threshold_seen
        unseen = base if o.threshold_unseen is None else o.threshold_unseen
        cutoffs = np.where(self.labels.unseen_mask, unseen, seen).astype(np.float64)
        for i, name in enumerate(self.labels.names):
            key = label_key(name)
            if key in o.blocked:
                cutoffs[i] = np.inf
            elif key in o.label_thresholds:
                cutoffs[i] = o.label_thresholds[key]
        return cutoffs

    def _scores(self, principal_vectors: np.ndarray) -> np.ndarray:
        raw = sdl_scores(principal_vectors, self.labels.vectors)  # (B, L)
        return calibrate(raw, self.labels.unseen_mask, self.calibration)

    def scores(self, principal_vectors: np.ndarray) -> np.ndarray:
        """(B, M, d) -> (B, L) scores; big batches in parts on threads (numpy releases the GIL)."""
        parts = min(os.cpu_count() or 1, 4, len(principal_vectors) // (PARALLEL_SCORE_MIN // 2))
        if parts < 2:
            return self._scores(principal_vectors)
        with ThreadPoolExecutor(max_workers=parts, thread_name_prefix="sdltag-score") as pool:
            return np.concatenate(list(pool.map(self._scores, np.array_split(principal_vectors, parts))))

    def tags(self, principal_vectors: np.ndarray) -> list[list[Tag]]:
        scores = self.scores(principal_vectors)
        if self.cutoffs is None:
            picked = top_k(scores, self.options.top_k, self.options.threshold)
        else:  # the k best of the labels at or above their own cut-off
            masked = np.where(scores >= self.cutoffs, scores, -np.inf)
            picked = [[(i, s) for i, s in row if s != -np.inf] for row in top_k(masked, self.options.top_k)]
        return [[Tag(self.labels.names[i], s, self.kinds[i]) for i, s in row] for row in picked]


@dataclass
class _Prepared:
    """What a decode thread hands back: the content hash and, unless the index knows it, the input array."""

    content_hash: str | None
    array: np.ndarray | None  # (3, H, W)
    thumbnail: bytes | None = None  # JPEG, when asked for


def _prepare(
    path: Path,
    size: int,
    spec: InputSpec,
    max_megapixels: float,
    want_hash: bool,
    known: frozenset[str],
    thumbnail_size: int = 0,
) -> _Prepared:
    content_hash = None
    data = None
    if want_hash:
        try:
            if size <= READ_ONCE_MAX and path.suffix.lower() not in RAW_EXTENSIONS:
                with open(path, "rb") as handle:
                    data = handle.read()
                content_hash = bytes_hash(data)
            else:
                content_hash = file_hash(path)
        except PermissionError:
            raise ImageError(path, "permission denied (cannot read the file)") from None
        except OSError as exc:
            raise ImageError(path, f"cannot read ({exc.strerror or exc})") from None
        if content_hash in known:
            return _Prepared(content_hash, None)
    if not thumbnail_size:
        return _Prepared(content_hash, load_image(path, spec, max_megapixels, data=data))
    from sdltag.contact_sheet import thumbnail_jpeg

    # The thumbnail is made from this decode (the one the model input comes from, unchanged by it).
    image = open_image(path, max_megapixels=max_megapixels, target=(spec.height, spec.width), data=data)
    return _Prepared(content_hash, preprocess(image, spec), thumbnail_jpeg(image, thumbnail_size))


class ImageModelLike(Protocol):
    """What ``tag_files``'s ``image_model`` factory returns (``sdltag.runtime.ImageModel``)."""

    def run(self, images: np.ndarray) -> np.ndarray:
        """(B, 3, H, W) model inputs -> (B, M, d) principal vectors."""
        ...


@dataclass
class _Slot:
    """One input's place in the output order."""

    path: Path
    result: TagResult | None = None
    done: bool = False
    thumbnail: bytes | None = None


class _Run:
    """State of one tagging run (``iter_tags``)."""

    def __init__(
        self,
        files: list[Path],
        model: ModelFolder,
        labels: LabelSet | Future,
        options: TagOptions,
        index: ImageIndex | None,
        index_writable: bool,
        image_model: Callable[[], ImageModelLike],
        on_problem: Callable[[Problem], None],
    ) -> None:
        self.files = files
        self.model_id = model.model_id
        self.spec = model.manifest.input
        self.options = options
        self.index = index
        self.index_writable = index_writable and index is not None
        self.image_model = image_model
        self.on_problem = on_problem
        self.on_progress: Callable[[int], None] | None = None
        self.finished: deque[TagResult] = deque()  # results in input order, not yet handed out
        self.labels = labels
        self.calibration = model.manifest.calibration
        self._scorer: Scorer | None = None
        self.summary = TagSummary()
        self.slots: deque[_Slot] = deque()
        self.ready: list[tuple[_Slot, np.ndarray]] = []  # (slot, (M, d)) waiting to be scored
        self.batch: list[tuple[_Slot, np.ndarray, os.stat_result, str | None]] = []  # waiting for the model
        self.inflight: deque[tuple[_Slot, Future, os.stat_result]] = deque()
        self.pool: ThreadPoolExecutor | None = None
        self.warmed = False

    @property
    def labels_ready(self) -> bool:
        return not isinstance(self.labels, Future) or self.labels.done()

    @property
    def scorer(self) -> Scorer:
        """The scorer, waiting for the label vectors if they are still being computed (their error is raised)."""
        if self._scorer is None:
            labels = self.labels.result() if isinstance(self.labels, Future) else self.labels
            self._scorer = Scorer(labels, self.calibration, self.options)
        return self._scorer

    def fail(self, slot: _Slot, reason: str) -> None:
        problem = Problem(os.fsdecode(os.fspath(slot.path)), reason)
        self.summary.failed.append(problem)
        self.on_problem(problem)
        slot.done = True

    def record(self, path: Path, st: os.stat_result, content_hash: str | None, vectors: np.ndarray) -> None:
        if self.index is not None and self.index_writable and content_hash is not None:
            self.index.put(path, st.st_size, st.st_mtime_ns, content_hash, self.model_id, vectors)

    def _warm_up(self) -> None:
        try:
            self.image_model()
        except Exception:  # noqa: BLE001 - the same error is raised again, on the main thread, by run_batch
            pass

    def run_batch(self) -> None:
        if not self.batch:
            return
        images = np.stack([array for _, array, _, _ in self.batch])  # (B, 3, H, W)
        vectors = self.image_model().run(images)  # (B, M, d)
        for (slot, _, st, content_hash), matrix in zip(self.batch, vectors, strict=True):
            self.record(slot.path, st, content_hash, matrix)
            self.ready.append((slot, matrix))
        self.summary.tagged += len(self.batch)
        self.batch = []
        self.score_ready(force=False)

    def score_ready(self, force: bool = True) -> None:
        """Score the waiting matrices; unless ``force``, only once the labels are there or too many wait."""
        if not self.ready or not (force or self.labels_ready or len(self.ready) >= MAX_UNSCORED):
            return
        stacked = np.stack([matrix for _, matrix in self.ready])  # (B, M, d)
        for (slot, _), tags in zip(self.ready, self.scorer.tags(stacked), strict=True):
            slot.result = TagResult(slot.path, tags, thumbnail=slot.thumbnail)
            slot.done = True
        self.ready = []
        self.flush()

    def flush(self) -> None:
        """Move finished results from the front to ``finished``, keeping input order."""
        while self.slots and self.slots[0].done:
            slot = self.slots.popleft()
            if slot.result is not None:
                self.finished.append(slot.result)
            if self.on_progress is not None:
                self.on_progress(1)

    def take(self) -> Iterator[TagResult]:
        """The results finished so far, in input order."""
        while self.finished:
            yield self.finished.popleft()

    def drain_one(self) -> None:
        slot, future, st = self.inflight.popleft()
        try:
            prepared: _Prepared = future.result()
        except ImageError as exc:
            self.fail(slot, exc.reason)
            return
        array = prepared.array
        if array is None:
            # the index had this content (so the hash is known): its stored vectors, unless gone meanwhile
            vectors = (
                self.index.vectors_for_hash(prepared.content_hash, self.model_id)
                if self.index and prepared.content_hash is not None
                else None
            )
            if vectors is not None:
                self.record(slot.path, st, prepared.content_hash, vectors)
                self.summary.by_hash += 1
                self.ready.append((slot, vectors))
                return
            try:  # the hash vanished from the index meanwhile: decode here
                array = load_image(slot.path, self.spec, self.options.max_megapixels)
            except ImageError as exc:
                self.fail(slot, exc.reason)
                return
        slot.thumbnail = prepared.thumbnail
        self.batch.append((slot, array, st, prepared.content_hash))
        if not self.warmed:
            # The first decoded image: load the image model on the pool while the batch fills, so its
            # start-up overlaps decoding (a run with nothing to decode never loads it).
            assert self.pool is not None  # made by execute, which alone drains
            self.pool.submit(self._warm_up)
            self.warmed = True
        if len(self.batch) >= self.options.batch_size:
            self.run_batch()

    def look_up(self, paths: list[Path]) -> list[tuple[_Slot, os.stat_result]]:
        """Queue ``paths``; those the index holds unchanged wait for scoring, the others are returned to decode."""
        stated: list[tuple[_Slot, os.stat_result]] = []
        for path in paths:
            slot = _Slot(path)
            self.slots.append(slot)
            try:
                stated.append((slot, os.stat(path)))
            except FileNotFoundError:
                self.fail(slot, "no such file")
            except OSError as exc:
                self.fail(slot, f"cannot access ({exc.strerror or exc})")
        stored: list[np.ndarray | None] = [None] * len(stated)
        if self.index is not None and stated:
            stored = self.index.lookup_many(
                [(slot.path, st.st_size, st.st_mtime_ns) for slot, st in stated], self.model_id
            )
        to_decode = []
        for (slot, st), vectors in zip(stated, stored, strict=True):
            if vectors is None:
                to_decode.append((slot, st))
                continue
            self.summary.unchanged += 1
            self.ready.append((slot, vectors))
            if len(self.ready) >= SCORE_CHUNK:
                self.score_ready(force=False)
        return to_decode

    def results(self) -> Iterator[TagResult]:
        """Run the pipeline, yielding each result in input order; ``summary`` is complete at the end.

        Closing the iterator early (or an exception, Ctrl-C included) still commits the finished batches.
        """
        start = time.perf_counter()
        workers = self.options.decode_threads or os.cpu_count() or 2
        window = max(2 * self.options.batch_size, 4 * workers)
        known = frozenset(self.index.known_hashes(self.model_id)) if self.index is not None else frozenset()
        self.pool = pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sdltag-decode")
        decode = (self.spec, self.options.max_megapixels, self.index is not None, known, self.options.thumbnail_size)
        try:
            for first in range(0, len(self.files), LOOKUP_CHUNK):
                for slot, st in self.look_up(self.files[first : first + LOOKUP_CHUNK]):
                    self.inflight.append((slot, pool.submit(_prepare, slot.path, st.st_size, *decode), st))
                    while len(self.inflight) >= window:
                        self.drain_one()
                        self.flush()
                        yield from self.take()
                self.flush()
                yield from self.take()
            while self.inflight:
                self.drain_one()
                self.flush()
                yield from self.take()
            self.run_batch()
            self.score_ready()
            self.flush()
            yield from self.take()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            if self.index is not None and self.index_writable:
                self.index.commit()
            self.summary.seconds = time.perf_counter() - start


def iter_tags(
    files: list[Path],
    *,
    model: ModelFolder,
    labels: LabelSet | Future,
    image_model: Callable[[], ImageModelLike],
    on_problem: Callable[[Problem], None],
    options: TagOptions | None = None,
    index: ImageIndex | None = None,
    index_writable: bool = True,
    on_progress: Callable[[int], None] | None = None,
    summary: TagSummary | None = None,
) -> Iterator[TagResult]:
    """Tag ``files``, yielding their results in input order; failures go to ``on_problem``.

    ``image_model`` is a zero-argument factory returning an object with
    ``run((B, 3, H, W)) -> (B, M, d)`` (``sdltag.runtime.ImageModel``); it is called
    only once an image has been decoded, so a pure re-tag never loads onnxruntime. It is
    first called from a decode thread (to overlap the session's start-up), so it must
    be thread-safe and return the same object every time.
    ``labels`` may be a ``Future`` of the ``LabelSet`` (the label vectors being computed on
    another thread): looking files up, decoding and running the model go on meanwhile,
    and the first scoring waits for it (its exception, if any, is raised from here).
    ``index`` (optional) supplies stored matrices and receives new ones unless
    ``index_writable`` is False (a dry run). Work is committed in batches, so an
    interrupted run keeps what it finished. ``summary`` (optional) receives the counts.
    """
    run = _Run(files, model, labels, options or TagOptions(), index, index_writable, image_model, on_problem)
    run.on_progress = on_progress
    if summary is not None:
        run.summary = summary
    return run.results()


def tag_files(
    files: list[Path],
    *,
    on_result: Callable[[TagResult], None],
    **kwargs,
) -> TagSummary:
    """``iter_tags`` with each result handed to ``on_result``; returns the run's summary."""
    summary = TagSummary()
    for result in iter_tags(files, summary=summary, **kwargs):
        on_result(result)
    return summary
