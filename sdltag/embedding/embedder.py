"""The cached text embedder: the label cache first, then the exported ONNX encoder, torch last.

Order of work for ``embed(texts)``:

1. look every text up in the label cache (SQLite; imports nothing heavy);
2. embed the misses with the embedder's exported encoder (onnxruntime + tokenizers), found
   by its id under ``onnx_text.encoder_roots()`` (``sdltag labels export-embedder`` writes it;
   ``make venv`` exports the default embedder);
3. without a usable export, embed them with sentence-transformers (torch): the same vectors,
   a slower start, and one warning naming the command that exports the encoder. Nothing is
   exported implicitly.
"""

from __future__ import annotations

import logging
import shlex
from collections.abc import Sequence
from typing import Any

import numpy as np

from sdltag.embedding.cache import LabelVectorCache
from sdltag.embedding.locate import DEFAULT_NAME, TextModelFiles, embedding_dim, make_spec
from sdltag.embedding.onnx_text import EncoderError, OnnxTextEncoder, find_encoder, read_meta
from sdltag.errors import SdltagError
from sdltag.modelfolder import EmbedderSpec

# "auto": the exported encoder, else sentence-transformers; "onnx": the exported encoder or an
# error; "sentence-transformers": always torch (the reference in tests and benchmarks).
BACKENDS = ("auto", "onnx", "sentence-transformers")
STORE_EVERY = 64  # new label vectors are committed to the cache this many at a time

logger = logging.getLogger(__name__)


def export_command(files: TextModelFiles) -> str:
    """The command that exports ``files``' encoder, as a user would type it."""
    if files.name == DEFAULT_NAME or files.folder.name != files.name:
        return f"sdltag labels export-embedder {shlex.quote(files.name)}"  # the default, or a cached model's name
    return f"sdltag labels export-embedder {shlex.quote(str(files.folder))}"


class CachedTextEmbedder:
    """A sentence-transformers embedder behind the label cache (see the module docstring)."""

    def __init__(self, files: TextModelFiles, cache: LabelVectorCache, backend: str = "auto") -> None:
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, not {backend!r}")
        self.files = files
        self.cache = cache
        self.backend = backend
        self.last_new = 0  # how many texts the last embed() call had to compute
        self._spec: EmbedderSpec | None = None
        self._encoder: OnnxTextEncoder | None = None
        self._encoder_looked_up = False
        self._st_model: Any = None

    @property
    def spec(self) -> EmbedderSpec:
        """Kind, name, id (name + weights hash) and dimension; computed without torch."""
        if self._spec is None:
            dim = embedding_dim(self.files.folder)
            spec = make_spec(self.files, self.cache, dim or 0)
            if not dim:
                dim = self._dim_from_encoder(spec.id) or self._load_st_dim()
                spec = EmbedderSpec(spec.kind, spec.name, spec.id, dim)
            self._spec = spec
        return self._spec

    @staticmethod
    def _dim_from_encoder(embedder_id: str) -> int | None:
        folder = find_encoder(embedder_id)
        try:
            return int(read_meta(folder, embedder_id)["dim"]) if folder is not None else None
        except (EncoderError, KeyError, TypeError, ValueError):
            return None

    def _load_st_dim(self) -> int:
        from sdltag.embedding.st import st_dimension

        return st_dimension(self._sentence_transformer())

    def _sentence_transformer(self) -> Any:
        if self._st_model is None:
            from sdltag.embedding.st import load_sentence_transformer

            self._st_model = load_sentence_transformer(self.files.folder)
        return self._st_model

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """(n, d) float32 unit vectors of ``texts``, in order; new texts are computed and cached."""
        spec = self.spec
        texts = [str(t) for t in texts]
        found = self.cache.get_many(spec.id, texts, dim=spec.dim)
        missing = [t for t in dict.fromkeys(texts) if t not in found]
        self.last_new = len(missing)
        for start in range(0, len(missing), STORE_EVERY):  # stored as they come: a kill keeps what was done
            part = missing[start : start + STORE_EVERY]
            vectors = self._compute(part)
            if vectors.shape != (len(part), spec.dim) or not np.all(np.isfinite(vectors)):
                raise SdltagError(
                    f"the embedder {spec.id} produced unusable vectors (shape {vectors.shape}, expected "
                    f"({len(part)}, {spec.dim}), or NaN). Export it again with `{export_command(self.files)} "
                    "--force`.",
                    exit_code=1,
                )
            self.cache.put_many(spec.id, zip(part, vectors, strict=True))
            found.update(zip(part, vectors, strict=True))
        out = np.zeros((len(texts), spec.dim), dtype=np.float32)
        for row, text in enumerate(texts):
            out[row] = found[text]
        return out

    def _compute(self, texts: list[str]) -> np.ndarray:
        encoder = self._onnx_encoder() if self.backend != "sentence-transformers" else None
        if encoder is not None:
            try:
                return encoder.embed(texts)
            except EncoderError as exc:
                self._encoder = None
                self._unusable(str(exc))
        from sdltag.embedding.st import st_embed

        return st_embed(self._sentence_transformer(), texts)

    def _onnx_encoder(self) -> OnnxTextEncoder | None:
        """The exported encoder, looked up once; None (after one warning) when there is no usable one."""
        if self._encoder is None and not self._encoder_looked_up:
            self._encoder_looked_up = True
            folder = find_encoder(self.spec.id)
            if folder is None:
                self._missing()
                return None
            try:
                self._encoder = OnnxTextEncoder(folder, embedder_id=self.spec.id)
            except EncoderError as exc:
                self._unusable(str(exc))
        return self._encoder

    def _missing(self) -> None:
        command = export_command(self.files)
        if self.backend == "onnx":
            raise SdltagError(f"no exported text encoder for {self.spec.id}. Export it once with `{command}`.")
        logger.warning(
            f"no exported text encoder for {self.spec.id}: embedding new labels with sentence-transformers "
            f"(torch; a slower start). Export it once with `{command}` to embed them without torch."
        )

    def _unusable(self, reason: str) -> None:
        command = f"{export_command(self.files)} --force"
        if self.backend == "onnx":
            raise SdltagError(f"the exported text encoder is unusable ({reason}). Export it again with `{command}`.")
        logger.warning(
            f"the exported text encoder is unusable ({reason}): embedding new labels with sentence-transformers. "
            f"Export it again with `{command}`."
        )
