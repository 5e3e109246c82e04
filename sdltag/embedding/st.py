"""The sentence-transformers side of the text embedder: loading offline, embedding, and the
explicit ONNX export (``sdltag labels export-embedder``).

Everything here imports torch / sentence-transformers, so it is imported only by the export,
when a new label must be embedded and no exported encoder is there, or when the user asks
for sentence-transformers explicitly.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sdltag.embedding.onnx_text import (
    ENCODER_FORMAT,
    META_FILE,
    ONNX_FILE,
    TOKENIZER_FILE,
    EncoderError,
    OnnxTextEncoder,
    encoder_folder_name,
    read_meta,
    remove_dead_staging,
)
from sdltag.errors import SdltagError

# Texts used to check an export against sentence-transformers before it is trusted: short and long,
# accents, symbols, extra spaces, a script the vocabulary barely covers, and one past max_seq_length.
PROBE_TEXTS = (
    "cat",
    "Golden Retriever",
    "a photo of a red double-decker bus in the rain",
    "naïve café crème brûlée",
    "keycap: #",
    "x" * 40,
    "sunset   over the sea",
    "東京",
    " ".join(["a very long description of a photograph"] * 60),
)
# An export is refused when any probe vector differs from sentence-transformers' by more than this
# (in any coordinate of the unit vector); exports of all-MiniLM-L6-v2 differ by about 1e-7.
MAX_ABS_DIFF = 1e-5


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
        raise RuntimeError(f"{model_dir}: the model has no fast tokenizer (tokenizer.json); the ONNX export needs one")
    backend.save(str(dest))


@dataclass(frozen=True)
class ExportResult:
    """What ``export_encoder`` did: the folder, its size, and how close it came to sentence-transformers."""

    folder: Path
    bytes: int
    max_abs_diff: float | None  # None: an earlier, complete export was kept
    min_cosine: float | None
    probes: int


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


def _existing_export(dest: Path, embedder_id: str) -> bool:
    """True when ``dest`` holds a complete export of ``embedder_id``; False when it is absent or an
    incomplete export sdltag wrote (replaced); refuses anything else (nothing of the user's is replaced)."""
    if not dest.exists() and not dest.is_symlink():
        return False
    try:
        read_meta(dest, embedder_id)
        return True
    except EncoderError:
        pass
    try:
        meta = json.loads((dest / META_FILE).read_text(encoding="utf-8"))
        ours = dest.is_dir() and not dest.is_symlink() and meta.get("embedder_id") == embedder_id
    except (OSError, ValueError, AttributeError):
        ours = False
    if not ours:
        raise SdltagError(
            f"{dest} exists and is not an export of {embedder_id} by sdltag. Move it away or choose another --out."
        )
    return False


def export_encoder(model_dir: Path, embedder_id: str, out: Path, *, force: bool = False) -> ExportResult:
    """Export the sentence-transformers model in ``model_dir`` to ``out/<embedder id>`` (graph + tokenizer),
    verified against sentence-transformers on ``PROBE_TEXTS``; a complete earlier export is kept unless
    ``force``. Any failure raises ``SdltagError`` (exit code 1) and leaves nothing behind.
    """
    dest = Path(out) / encoder_folder_name(embedder_id)
    if force and dest.is_symlink():
        raise SdltagError(f"{dest} is a link, which --force does not replace. Remove it or choose another --out.")
    if _existing_export(dest, embedder_id) and not force:
        return ExportResult(dest, _folder_bytes(dest), None, None, 0)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SdltagError(f"{dest.parent}: cannot create the folder ({exc.strerror}). Choose another --out.") from None
    remove_dead_staging(dest.parent, f".{dest.name}")  # what a killed export left
    model = load_sentence_transformer(model_dir)
    # ".NAME.PID.XXXXXXXX": removed by a later export once PID has ended (``remove_dead_staging``)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.{os.getpid()}.", dir=dest.parent))
    try:
        max_abs, min_cosine = _export_and_verify(model, model_dir, staging, embedder_id)
        _install(staging, dest)
    except SdltagError:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    except Exception as exc:  # noqa: BLE001 - any failure of the export becomes one clear line
        shutil.rmtree(staging, ignore_errors=True)
        reason = " ".join(f"{type(exc).__name__}: {exc}".split())[:400]
        raise SdltagError(f"cannot export the embedder {embedder_id} to ONNX ({reason})", exit_code=1) from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return ExportResult(dest, _folder_bytes(dest), max_abs, min_cosine, len(PROBE_TEXTS))


def _install(staging: Path, dest: Path) -> None:
    """Move the verified export into place with renames; an earlier export of sdltag's is replaced."""
    os.chmod(staging, 0o755)
    old = dest.with_name(f".{dest.name}.{os.getpid()}.replaced")
    if dest.exists():
        os.replace(dest, old)
    os.replace(staging, dest)
    shutil.rmtree(old, ignore_errors=True)


def _export_and_verify(model: Any, model_dir: Path, folder: Path, embedder_id: str) -> tuple[float, float]:
    """Write the graph, tokenizer and meta.json into ``folder`` and check them; (max abs diff, min cosine)."""
    names = _input_names(model)
    _trace_to_onnx(model, names, folder / ONNX_FILE)
    _save_tokenizer(model, model_dir, folder / TOKENIZER_FILE)
    meta: dict[str, Any] = {
        "format": ENCODER_FORMAT,
        "embedder_id": embedder_id,
        "inputs": names,
        "output": "sentence_embedding",
        "max_seq_length": int(model.max_seq_length or 512),
        "do_lower_case": bool(getattr(model[0], "do_lower_case", False)),
        "dim": st_dimension(model),
        "pad_id": _pad_id(model),
        "onnx_bytes": (folder / ONNX_FILE).stat().st_size,
    }
    (folder / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    max_abs, min_cosine = _verify(model, OnnxTextEncoder(folder), names)
    meta["verified"] = {"probes": len(PROBE_TEXTS), "max_abs_diff": max_abs, "min_cosine": min_cosine}
    (folder / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return max_abs, min_cosine


def _trace_to_onnx(model: Any, names: list[str], path: Path) -> None:
    """The whole sentence-transformers pipeline (transformer, pooling, any Dense and Normalize modules,
    as its modules.json lists them) as one ONNX graph with dynamic batch and token axes."""
    import torch

    class _Pipeline(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.st = model

        def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
            features: dict[str, Any] = dict(zip(names, inputs, strict=True))
            features["modality"] = "text"
            return self.st(features)["sentence_embedding"]  # (B, d)

    example = model.preprocess(["a photo of a cat"])
    axes = {name: {0: "batch", 1: "tokens"} for name in names}
    axes["sentence_embedding"] = {0: "batch"}
    with torch.no_grad(), warnings.catch_warnings():
        # The tracer warns about shape checks that are constant for an encoder; the export is
        # verified against sentence-transformers instead.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            _Pipeline().eval(),
            tuple(example[name] for name in names),
            str(path),
            input_names=names,
            output_names=["sentence_embedding"],
            dynamic_axes=axes,
            opset_version=17,
            dynamo=False,
        )


def _verify(model: Any, encoder: OnnxTextEncoder, names: list[str]) -> tuple[float, float]:
    """Refuse an export whose token ids or vectors differ from sentence-transformers'; returns
    (max abs diff, min cosine) over ``PROBE_TEXTS``."""
    reference = model.preprocess(list(PROBE_TEXTS))
    ours = encoder.tokenize(list(PROBE_TEXTS))
    for name in names:
        theirs = reference[name].numpy()
        if ours[name].shape != theirs.shape or not np.array_equal(ours[name], theirs):
            raise RuntimeError(f"tokenizer.json gives other {name} than sentence-transformers")
    onnx = encoder.embed(list(PROBE_TEXTS))
    torch_vectors = st_embed(model, PROBE_TEXTS)
    max_abs = float(np.abs(onnx - torch_vectors).max())
    min_cosine = float(np.sum(onnx * torch_vectors, axis=1).min())
    if not max_abs <= MAX_ABS_DIFF:  # also refuses NaN
        raise RuntimeError(
            f"the ONNX vectors differ from sentence-transformers by up to {max_abs:.2e} "
            f"(allowed {MAX_ABS_DIFF:.0e}; min cosine {min_cosine:.6f})"
        )
    return max_abs, min_cosine
