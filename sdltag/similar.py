"""``sdltag search --like IMAGE``: rank indexed images by how alike their principal-vector matrices are.

The similarity of two images with (M, d) matrices A and B is the symmetric mean best-row
cosine (a Chamfer similarity)::

    sim(A, B) = 1/2 * (mean_i max_j cos(a_i, b_j) + mean_j max_i cos(a_i, b_j))

Why this one: SDL scores a label against an image by its best row (``max_m <A_m, w>``),
so each row stands for one thing the image shows and the rows are not aligned between
images (row 3 of one photo need not mean what row 3 of another means). Matching each row
to its best counterpart is therefore order-free, as the scoring is; averaging (rather
than taking one best pair) asks every aspect of the photo to be matched, so two photos
that merely share the sky do not rank first; and taking both directions penalises a
candidate with aspects the query lacks as much as the reverse, making the measure
symmetric. Cosines (not dot products) leave out the rows' lengths, which carry how strongly
the model responds, not what the photo shows. It lies in [-1, 1]; an image compared
with itself scores 1.

Only the query image may need the image model (when the index does not hold it); every
candidate's matrix is read from the index. Library code: numpy only.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

CHUNK = 2048  # index rows compared per batch


def _unit_rows(matrices: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(matrices, axis=-1, keepdims=True)
    return matrices / np.maximum(norms, 1e-12)


def chamfer_similarity(query: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """(M, d) and (N, K, d) -> (N,): the symmetric mean best-row cosine of ``query`` with each candidate."""
    q = _unit_rows(np.asarray(query, dtype=np.float32))  # (M, d)
    c = _unit_rows(np.asarray(candidates, dtype=np.float32))  # (N, K, d)
    cos = np.einsum("md,nkd->nmk", q, c)  # (N, M, K)
    return 0.5 * (cos.max(axis=2).mean(axis=1) + cos.max(axis=1).mean(axis=1))


def rank_like(index, model_id: str, query: np.ndarray, folders: list[Path], top: int, *, threshold=None, skip=None):
    """The ``top`` indexed images of ``model_id`` under ``folders`` (all when empty) most like ``query`` (M, d).

    Returns ``(path, similarity)`` pairs, best first (ties in path order). Rows whose file has
    gone, the path ``skip`` (the query image itself) and, with ``threshold``, images below it
    are left out.
    """
    skip_key = os.path.abspath(skip) if skip is not None else None
    paths: list[Path] = []
    scores: list[np.ndarray] = []
    batch: list[np.ndarray] = []
    shape = None

    def flush() -> None:
        scores.append(chamfer_similarity(query, np.stack(batch)))
        batch.clear()

    for row in index.under(folders, model_id):
        if skip_key is not None and os.path.abspath(row.path) == skip_key:
            continue
        if shape is not None and row.vectors.shape != shape:
            flush()  # rows of one model share a shape; a stray one is compared on its own
        shape = row.vectors.shape
        paths.append(row.path)
        batch.append(row.vectors)
        if len(batch) >= CHUNK:
            flush()
    if batch:
        flush()
    if not paths:
        return []
    similarity = np.concatenate(scores)
    order = np.lexsort((np.arange(similarity.size), -similarity))
    hits: list[tuple[Path, float]] = []
    for i in order:
        if threshold is not None and similarity[i] < threshold:
            break
        if not paths[i].exists():
            continue
        hits.append((paths[i], float(similarity[i])))
        if len(hits) >= top:
            break
    return hits


def query_matrix(index, model, image: Path, max_megapixels: float = 100.0) -> tuple[np.ndarray, str]:
    """The (M, d) matrix of ``image`` for ``model``, and where it came from.

    From the index when it holds the file (same path, size and mtime, or the same content
    hash); otherwise the image model runs on this one image. The index is not written.
    """
    from sdltag.errors import SdltagError
    from sdltag.hashing import file_hash
    from sdltag.images import ImageError, load_image

    try:
        st = os.stat(image)
    except OSError as exc:
        raise SdltagError(f"{image}: cannot read the --like image ({exc.strerror or exc}). Check the path.") from None
    if index is not None:
        stored = index.lookup(image, st.st_size, st.st_mtime_ns, model.model_id)
        if stored is not None:
            return stored, "the index"
        try:
            stored = index.vectors_for_hash(file_hash(image), model.model_id)
        except OSError:
            stored = None
        if stored is not None:
            return stored, "the index (same content)"
    try:
        array = load_image(image, model.manifest.input, max_megapixels)
    except ImageError as exc:
        raise SdltagError(f"{image}: cannot use it as the --like image ({exc.reason}).") from None
    from sdltag.runtime import ImageModel

    return ImageModel(model, device="cpu").run(array[None])[0], "the image model"
