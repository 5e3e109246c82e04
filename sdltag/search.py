"""Search the index without running the image model: by a label's score, or by likeness to one image.

``rank_indexed`` scores every indexed image under some folders against a one-label set
(the model's matrix file when it is usable, else the index rows in chunks); ``search_label``
and ``search_like`` add the fallback to the model's other graph (float <-> 8-bit) for a
library tagged with it. Library code: results are ``SearchHit`` records, best first.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from sdltag.errors import SdltagError
from sdltag.index import ImageIndex
from sdltag.label_space import LabelSet
from sdltag.modelfolder import ModelFolder
from sdltag.results import SearchHit

CHUNK = 4096  # index rows scored per matrix product
logger = logging.getLogger(__name__)


def rank_indexed(
    index: ImageIndex,
    model: ModelFolder,
    labels: LabelSet,
    folders: list[Path],
    top: int,
    raw_scores: bool = False,
    threshold: float | None = None,
) -> list[SearchHit]:
    """The ``top`` indexed images under ``folders`` (all when empty) by the score of ``labels``'s one label.

    Rows whose file has gone, and with ``threshold`` those scoring below it, are left out.
    Returns ``SearchHit`` records, best first.
    """
    from sdltag import matrixfile

    # The model's matrix file (memory-mapped, checked against the index): a large index in a few products
    hits = matrixfile.rank(index, model, labels, folders, top, raw_scores=raw_scores, threshold=threshold)
    if hits is not None:
        return hits
    paths, scores = _score_rows(index, model, labels, folders, raw_scores)
    if not paths:
        return []
    order = np.lexsort((np.arange(scores.size), -scores))
    kind = "unseen" if bool(labels.unseen_mask[0]) else "seen"
    found: list[SearchHit] = []
    for i in order:
        if threshold is not None and scores[i] < threshold:
            break  # best first: the rest score lower still
        if not paths[i].exists():
            continue
        found.append(SearchHit(len(found) + 1, paths[i], float(scores[i]), labels.names[0], kind))
        if len(found) >= top:
            break
    return found


def _score_rows(
    index: ImageIndex, model: ModelFolder, labels: LabelSet, folders: list[Path], raw_scores: bool
) -> tuple[list[Path], np.ndarray]:
    """Every indexed image of ``model`` and its score for the one label, read from the index in chunks."""
    from sdltag.scoring import calibrate, sdl_scores

    calibration = None if raw_scores else model.manifest.calibration
    paths: list[Path] = []
    scores: list[np.ndarray] = []
    matrices: list[np.ndarray] = []

    def score_chunk() -> None:
        stacked = np.stack(matrices)  # (N, M, d)
        raw = sdl_scores(stacked, labels.vectors)  # (N, 1)
        scores.append(calibrate(raw, labels.unseen_mask, calibration)[:, 0])
        matrices.clear()

    for row in index.under(folders, model.model_id):
        paths.append(row.path)
        matrices.append(row.vectors)
        if len(matrices) >= CHUNK:
            score_chunk()
    if matrices:
        score_chunk()
    return paths, (np.concatenate(scores) if scores else np.zeros(0, dtype=np.float32))


def other_graph(model: ModelFolder) -> ModelFolder | None:
    """The model's other graph (float <-> 8-bit), or None when it has none to offer."""
    try:
        return model.with_precision("float" if model.precision == "int8" else "int8")
    except SdltagError:
        return None


def search_label(
    index: ImageIndex,
    model: ModelFolder,
    labels: LabelSet,
    folders: list[Path],
    top: int,
    *,
    raw_scores: bool = False,
    threshold: float | None = None,
    other_graph_too: bool = True,
) -> list[SearchHit]:
    """``rank_indexed``; with no hits and ``other_graph_too`` (``--precision auto``), the other graph's rows."""
    hits = rank_indexed(index, model, labels, folders, top, raw_scores=raw_scores, threshold=threshold)
    if not hits and other_graph_too and model.has_int8:
        # tagged with the other graph of the same model (e.g. --precision float, or on another CPU)
        other = other_graph(model)
        if other is not None:
            hits = rank_indexed(index, other, labels, folders, top, raw_scores=raw_scores, threshold=threshold)
    return hits


def search_like(
    index: ImageIndex, model: ModelFolder, image: Path, folders: list[Path], top: int, threshold: float | None = None
) -> list[SearchHit]:
    """The indexed images most like ``image`` (``sdltag.similar``), best first; ``image`` itself left out."""
    from sdltag.similar import query_matrix, rank_like

    if not index.count(model.model_id) and model.has_int8:
        # the library was tagged with this model's other graph: compare like with like
        other = other_graph(model)
        if other is not None and index.count(other.model_id):
            model = other
    query, source = query_matrix(index, model, image)
    pairs = rank_like(index, model.model_id, query, folders, top, threshold=threshold, skip=image)
    logger.info(f"--like {image}: its principal vectors from {source}")
    return [SearchHit(rank, hit, score, image.name, "like") for rank, (hit, score) in enumerate(pairs, start=1)]


def no_hits_message(folders: list[Path], threshold: float | None, like: bool = False) -> str:
    """What to tell the user when a search found nothing (the command then exits 1)."""
    where = ", ".join(str(p) for p in folders) or "the index"
    if like:
        if threshold is not None:
            return f"no other image indexed with this model under {where} is at least {threshold:g} alike"
        return f"no other images indexed with this model under {where}; run `sdltag tag` on them first"
    if threshold is not None:
        return f"no image indexed with this model under {where} scores at least {threshold:g}"
    return f"no images indexed with this model under {where}; run `sdltag tag` on them first"
