"""The sentence-transformers side of the text embedder: loading offline, embedding, ONNX export.

Everything here imports torch / sentence-transformers, so it is imported only when a
label is not cached and the ONNX fast path is not there yet (the first use of an
embedder), or when the user asks for the slow path explicitly.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sdltag.errors import SdltagError

# Texts used to check an export against sentence-transformers before it is trusted.
PROBE_TEXTS = (
    "cat",
    "Golden Retriever",
    "a photo of a red double-decker bus in the rain",
    "naïve café crème brûlée",
    "keycap: #",
    "x" * 40,
    "sunset   over the sea",
    "東京",
)
ONNX_FILE = "text_model.onnx"
TOKENIZER_FILE = "tokenizer.json"
META_FILE = "meta.json"
FAST_PATH_FORMAT = 1
MIN_EXPORT_COSINE = 0.99999


def _quiet_hf() -> None:
    """No progress bars or info chatter from transformers on a CLI's stderr; never go online."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - transformers always comes with sentence-transformers
        pass


_LOADED: dict[str, Any] = {}


def load_sentence_transformer(model_dir: Path) -> Any:
    """Load a sentence-transformers model from a local folder on the CPU, offline (once per process)."""
    key = str(Path(model_dir).resolve())
    if key in _LOADED:
        return _LOADED[key]
    _quiet_hf()
    from sentence_transformers import SentenceTransformer

    try:
        model = SentenceTransformer(str(model_dir), device="cpu", local_files_only=True)
        model.eval()
        _LOADED[key] = model
        return model
    except Exception as exc:  # noqa: BLE001 - any load failure becomes one clear message
        raise SdltagError(
            f"{model_dir}: cannot load the sentence-transformers model ({type(exc).__name__}: {exc}). "
            "Pass --embedder with a complete sentence-transformers model folder."
        ) from None


def st_dimension(model: Any) -> int:
    """The sentence embedding's dimension (the method was renamed in sentence-transformers 6)."""
    getter = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
    return int(getter())


def st_embed(model: Any, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
    """(n, d) float32 unit vectors from sentence-transformers itself."""
    if not texts:
        return np.zeros((0, st_dimension(model)), dtype=np.float32)
    vectors = model.encode(
        list(texts), batch_size=batch_size, convert_to_numpy=True, normalize_embeddings=True, show_progress_bar=False
    )
    return np.ascontiguousarray(vectors, dtype=np.float32)


def _input_names(model: Any) -> list[str]:
    features = model.preprocess(["probe"]) if hasattr(model, "preprocess") else model.tokenize(["probe"])
    return [name for name in ("input_ids", "attention_mask", "token_type_ids") if name in features]


def _pad_id(model: Any) -> int | None:
    tokenizer = getattr(model[0], "tokenizer", None)
    value = getattr(tokenizer, "pad_token_id", None)
    return int(value) if value is not None else None


def _save_tokenizer(model: Any, model_dir: Path, dest: Path) -> None:
    """Write the fast tokenizer's tokenizer.json (from the model folder, else from the loaded tokenizer)."""
    source = model_dir / TOKENIZER_FILE
    if source.is_file():
        shutil.copyfile(source, dest)
        return
    tokenizer = model[0].tokenizer
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise SdltagError(f"{model_dir}: the model has no fast tokenizer (tokenizer.json); the ONNX path needs one.")
    backend.save(str(dest))


def export_fast_path(model: Any, model_dir: Path, dest: Path, embedder_id: str) -> Path:
    """Export ``model`` (the whole sentence-transformers pipeline: transformer, pooling, any Dense
    and Normalize modules, as listed in its modules.json) to ONNX in ``dest``, with its tokenizer.

    The export is checked against sentence-transformers on ``PROBE_TEXTS`` (token ids and
    vectors) in a staging folder, then moved into place with one rename, so a reader sees
    either no fast path or a complete, verified one. Returns ``dest``.
    """
    import torch

    from sdltag.embedding.onnx_text import OnnxTextEncoder

    names = _input_names(model)

    class _Pipeline(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.st = model

        def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
            features: dict[str, Any] = dict(zip(names, inputs, strict=True))
            features["modality"] = "text"
            return self.st(features)["sentence_embedding"]  # (B, d)

    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    # ".NAME.PID.XXXXXXXX": the label cache removes it after a kill once PID has ended (see cache.remove_debris)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.{os.getpid()}.", dir=dest.parent))
    try:
        max_len = int(model.max_seq_length or 512)
        do_lower = bool(getattr(model[0], "do_lower_case", False))
        example = model.preprocess(["a photo of a cat"])
        args = tuple(example[name] for name in names)
        pipeline = _Pipeline().eval()
        axes = {name: {0: "batch", 1: "tokens"} for name in names}
        axes["sentence_embedding"] = {0: "batch"}
        with torch.no_grad(), warnings.catch_warnings():
            # The tracer warns about shape checks that are constant for an encoder; the export
            # is verified against sentence-transformers below instead.
            warnings.simplefilter("ignore")
            torch.onnx.export(
                pipeline,
                args,
                str(staging / ONNX_FILE),
                input_names=names,
                output_names=["sentence_embedding"],
                dynamic_axes=axes,
                opset_version=17,
                dynamo=False,
            )
        _save_tokenizer(model, model_dir, staging / TOKENIZER_FILE)
        meta = {
            "format": FAST_PATH_FORMAT,
            "embedder_id": embedder_id,
            "inputs": names,
            "output": "sentence_embedding",
            "max_seq_length": max_len,
            "do_lower_case": do_lower,
            "dim": st_dimension(model),
            "pad_id": _pad_id(model),
            "onnx_bytes": (staging / ONNX_FILE).stat().st_size,
        }
        (staging / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        _verify(model, OnnxTextEncoder(staging), names)
        os.chmod(staging, 0o755)
        try:
            os.replace(staging, dest)
        except OSError:
            # Another process finished the same export first; theirs is equally good.
            if not (dest / META_FILE).is_file():
                raise
            shutil.rmtree(staging, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return dest


def _verify(model: Any, encoder: Any, names: list[str]) -> None:
    """Refuse an export whose token ids or vectors differ from sentence-transformers'."""
    reference = model.preprocess(list(PROBE_TEXTS))
    ours = encoder.tokenize(list(PROBE_TEXTS))
    for name in names:
        theirs = reference[name].numpy()
        if ours[name].shape != theirs.shape or not np.array_equal(ours[name], theirs):
            raise RuntimeError(f"tokenizer.json gives other {name} than sentence-transformers")
    cosine = np.sum(encoder.embed(list(PROBE_TEXTS)) * st_embed(model, PROBE_TEXTS), axis=1)
    if float(cosine.min()) < MIN_EXPORT_COSINE:
        raise RuntimeError(f"ONNX vectors differ from sentence-transformers (min cosine {cosine.min():.6f})")
