"""The cached text embedder: cache first, then the ONNX fast path, sentence-transformers last.

Order of work for ``embed(texts)``:

1. look every text up in the label cache (SQLite; imports nothing heavy);
2. embed the misses with the exported ONNX pipeline (onnxruntime + tokenizers);
3. only if that export does not exist yet, load sentence-transformers (torch) once,
   export it to the cache (verified against sentence-transformers), then go on as in 2.
   An export that fails or does not verify leaves sentence-transformers doing the work.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sdltag.embedding.cache import LabelVectorCache, stderr_info
from sdltag.embedding.locate import TextModelFiles, embedding_dim, make_spec
from sdltag.embedding.onnx_text import FastPathError, OnnxTextEncoder, read_meta
from sdltag.errors import SdltagError
from sdltag.modelfolder import EmbedderSpec

EXPORT_FAILED = ".export-failed"  # marker beside a fast-path folder whose export failed

BACKENDS = ("auto", "onnx", "sentence-transformers")
STORE_EVERY = 64  # new label vectors are committed to the cache this many at a time


class CachedTextEmbedder:
    """A sentence-transformers embedder behind the label cache (see the module docstring)."""

    def __init__(self, files: TextModelFiles, cache: LabelVectorCache, backend: str = "auto") -> None:
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, not {backend!r}")
        self.files = files
        self.cache = cache
        self.backend = backend
        self.last_new = 0  # how many texts the last embed() call had to compute
        self.info: Callable[[str], None] = stderr_info  # progress lines (stderr), e.g. the one-time export
        self._spec: EmbedderSpec | None = None
        self._encoder: Any = None
        self._st_model: Any = None
        self._export_failure_noted = False

    warn: Callable[[str], None] = logging.getLogger(__name__).warning  # get_text_embedder(warn=...) may replace it

    @property
    def spec(self) -> EmbedderSpec:
        """Kind, name, id (name + weights hash) and dimension; computed without torch."""
        if self._spec is None:
            dim = embedding_dim(self.files.folder)
            spec = make_spec(self.files, self.cache, dim or 0)
            if not dim:
                dim = self._dim_from_fast_path(spec.id) or self._load_st_dim()
                spec = EmbedderSpec(spec.kind, spec.name, spec.id, dim)
            self._spec = spec
        return self._spec

    def _dim_from_fast_path(self, embedder_id: str) -> int | None:
        try:
            return int(read_meta(self.cache.fast_path_dir(embedder_id))["dim"])
        except FastPathError:
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
                    f"({len(part)}, {spec.dim}), or NaN). Clear its export with `sdltag labels cache --clear`.",
                    exit_code=1,
                )
            self.cache.put_many(spec.id, zip(part, vectors, strict=True))
            found.update(zip(part, vectors, strict=True))
        out = np.zeros((len(texts), spec.dim), dtype=np.float32)
        for row, text in enumerate(texts):
            out[row] = found[text]
        return out

    def _compute(self, texts: list[str]) -> np.ndarray:
        if self.backend == "sentence-transformers":
            from sdltag.embedding.st import st_embed

            return st_embed(self._sentence_transformer(), texts)
        for attempt in range(2):
            encoder = self._fast_encoder()
            if encoder is None:
                from sdltag.embedding.st import st_embed

                return st_embed(self._sentence_transformer(), texts)
            try:
                return encoder.embed(texts)
            except FastPathError as exc:
                self._discard_fast_path(str(exc))
                if attempt:
                    raise SdltagError(f"the ONNX text model keeps failing ({exc})", exit_code=1) from None
        raise AssertionError("unreachable")

    def _note_failed_export(self, folder: Path, reason: str) -> None:
        from sdltag.paths import atomic_write

        record = {"reason": " ".join(reason.split())[:300], "versions": self._export_versions()}
        try:
            with atomic_write(folder.with_name(folder.name + EXPORT_FAILED)) as handle:
                handle.write(json.dumps(record, indent=1) + "\n")
        except OSError:
            pass  # an unwritable cache only costs the next process the same attempt

    def _discard_fast_path(self, reason: str) -> None:
        folder = self.cache.fast_path_dir(self.spec.id)
        self.warn(f"the exported text model in {folder} is broken ({reason}); exporting it again")
        shutil.rmtree(folder, ignore_errors=True)
        self._encoder = None

    @staticmethod
    def _export_versions() -> dict[str, str]:
        """What an export attempt depends on; a failure is retried once any of these changes."""
        from importlib.metadata import PackageNotFoundError, version

        from sdltag import __version__

        versions = {"sdltag": __version__}
        for package in ("torch", "onnx", "sentence-transformers", "transformers"):
            try:
                versions[package] = version(package)
            except PackageNotFoundError:
                versions[package] = "-"
        return versions

    def _failed_export(self, folder: Path) -> str | None:
        """The reason of an earlier failed export with the same package versions, else None."""
        marker = folder.with_name(folder.name + EXPORT_FAILED)
        try:
            record = json.loads(marker.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if not isinstance(record, dict) or record.get("versions") != self._export_versions():
            return None
        return str(record.get("reason", "unknown"))

    def _fast_encoder(self) -> OnnxTextEncoder | None:
        """The ONNX encoder, exporting it on first use; None when only sentence-transformers can embed.

        A failed export leaves a marker beside the folder (``<folder>.export-failed``), so later
        processes go straight to sentence-transformers instead of failing the same export
        again; it is retried when sdltag, torch, onnx or (sentence-)transformers change
        version, or after ``sdltag labels cache --clear``.
        """
        if self._encoder is not None:
            return self._encoder
        folder = self.cache.fast_path_dir(self.spec.id)
        if self.backend != "onnx" and not folder.exists():
            reason = self._failed_export(folder)
            if reason is not None:
                if not self._export_failure_noted:
                    self.info(f"the text embedder {self.spec.id} could not be exported to ONNX earlier ({reason}); "
                              "embedding new labels with sentence-transformers")  # fmt: skip
                    self._export_failure_noted = True
                return None
        try:
            self._encoder = OnnxTextEncoder(folder)
            return self._encoder
        except FastPathError as exc:
            if folder.exists():
                self._discard_fast_path(str(exc))
        from sdltag.embedding.st import export_fast_path

        self.info(
            f"first use of the text embedder {self.spec.id}: exporting it to ONNX in {folder.parent} "
            "(once, about 20 s); later labels are embedded without torch"
        )
        try:
            export_fast_path(self._sentence_transformer(), self.files.folder, folder, self.spec.id)
            self._encoder = OnnxTextEncoder(folder)
        except SdltagError:
            raise
        except Exception as exc:  # noqa: BLE001 - any export failure falls back to the slow, exact path
            if self.backend == "onnx":
                raise SdltagError(
                    f"cannot export the embedder {self.spec.id} to ONNX ({type(exc).__name__}: {exc}).", exit_code=1
                ) from None
            reason = f"{type(exc).__name__}: {exc}"
            self.warn(
                f"cannot export the embedder {self.spec.id} to ONNX ({reason}); "
                "embedding new labels with sentence-transformers (slower)"
            )
            self._note_failed_export(folder, reason)
            return None
        return self._encoder
