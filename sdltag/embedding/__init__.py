"""Text embedders for labels, behind an on-disk cache.

``get_text_embedder(name_or_path, cache_dir)`` returns a ``TextEmbedder``: its
``spec`` (kind, name, id = name + weights hash, dim) is what a model manifest records,
and ``embed(texts)`` returns (n, d) float32 unit vectors, from the cache when it can,
else from the embedder's exported ONNX encoder (onnxruntime + tokenizers; written once by
``sdltag labels export-embedder``), else from sentence-transformers (torch).
Importing this package imports numpy only.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

from sdltag.embedding.locate import DEFAULT_NAME
from sdltag.modelfolder import EmbedderSpec

if TYPE_CHECKING:
    from sdltag.embedding.embedder import CachedTextEmbedder

__all__ = ["DEFAULT_NAME", "TextEmbedder", "get_text_embedder", "clear_embedder_memo"]


class TextEmbedder(Protocol):
    """Anything that turns label texts into unit vectors in a named embedding space."""

    @property
    def spec(self) -> EmbedderSpec:
        """The embedding space the vectors are in."""
        ...

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """(n, d) float32, L2-normalised rows, in the order of ``texts``; uses the cache."""
        ...


_MEMO: dict[tuple[str, str, str], CachedTextEmbedder] = {}


def get_text_embedder(
    name_or_path: str | None = None,
    cache_dir: Path | None = None,
    *,
    backend: str = "auto",
) -> TextEmbedder:
    """The embedder for ``--embedder`` (None: the bundled all-MiniLM-L6-v2, loaded offline).

    ``cache_dir`` overrides the cache folder (``sdltag.paths.cache_dir``). ``backend``
    "auto" uses the exported encoder when there is one, else sentence-transformers (with a
    warning naming the export command); "onnx" requires the exported encoder;
    "sentence-transformers" never uses it (the reference in benchmarks and tests).
    Instances are shared within a process, so the ONNX session and text model load once.
    """
    from sdltag.embedding.cache import LabelVectorCache
    from sdltag.embedding.embedder import CachedTextEmbedder
    from sdltag.embedding.locate import locate_text_model

    files = locate_text_model(name_or_path)
    cache = LabelVectorCache(cache_dir)
    key = (str(files.folder), str(cache.directory.absolute()), backend)
    embedder = _MEMO.get(key)
    if embedder is None:
        embedder = CachedTextEmbedder(files, cache, backend=backend)
        _MEMO[key] = embedder
    return embedder


def clear_embedder_memo() -> None:
    """Forget shared embedders (after clearing a cache, or between tests)."""
    for embedder in _MEMO.values():
        embedder.cache.close()
    _MEMO.clear()
