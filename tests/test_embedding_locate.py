"""Finding a text model and naming it, without torch: aliases, folders, offline refusals, dimensions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sdltag.embedding.cache import LabelVectorCache
from sdltag.embedding.locate import (
    DEFAULT_NAME,
    default_model_folder,
    embedding_dim,
    locate_text_model,
    weight_files,
    weights_sha256,
)
from sdltag.errors import SdltagError


@pytest.mark.parametrize("name", [None, "all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"])
def test_default_names_resolve_to_the_bundled_model(name: str | None) -> None:
    files = locate_text_model(name)
    assert files.name == DEFAULT_NAME and files.folder == default_model_folder()
    assert embedding_dim(files.folder) == 384


def test_unknown_name_is_refused_without_downloading() -> None:
    with pytest.raises(SdltagError, match="never downloads"):
        locate_text_model("no-such-org/no-such-model-for-sdltag")


def test_a_folder_that_is_not_a_model_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SdltagError, match="not a sentence-transformers model folder"):
        locate_text_model(str(tmp_path))


def _module_folder(root: Path, modules: list[dict], configs: dict[str, dict]) -> Path:
    root.mkdir()
    (root / "modules.json").write_text(json.dumps(modules))
    for rel, config in configs.items():
        (root / rel).mkdir(parents=True, exist_ok=True)
        (root / rel / "config.json").write_text(json.dumps(config))
    return root


def test_dimension_follows_pooling_modes_and_dense_layers(tmp_path: Path) -> None:
    modules = [
        {"idx": 0, "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    two_modes = {"word_embedding_dimension": 768, "pooling_mode_cls_token": True, "pooling_mode_mean_tokens": True}
    folder = _module_folder(tmp_path / "a", modules, {".": {"hidden_size": 768}, "1_Pooling": two_modes})
    assert embedding_dim(folder) == 1536
    dense = modules + [{"idx": 2, "path": "2_Dense", "type": "sentence_transformers.models.Dense"}]
    folder = _module_folder(
        tmp_path / "b",
        dense,
        {
            ".": {"hidden_size": 768},
            "1_Pooling": {"word_embedding_dimension": 768, "pooling_mode_mean_tokens": True},
            "2_Dense": {"in_features": 768, "out_features": 256},
        },
    )
    assert embedding_dim(folder) == 256
    odd = modules + [{"idx": 2, "path": "x", "type": "somebody.CustomModule"}]
    assert embedding_dim(_module_folder(tmp_path / "c", odd, {".": {"hidden_size": 8}})) is None


def test_weights_hash_prefers_safetensors_and_combines_several_files(tmp_path: Path) -> None:
    import hashlib

    (tmp_path / "model.safetensors").write_bytes(b"weights")
    (tmp_path / "pytorch_model.bin").write_bytes(b"same weights, other format")
    (tmp_path / "onnx").mkdir()
    (tmp_path / "onnx" / "model.bin").write_bytes(b"ignored")
    cache = LabelVectorCache(tmp_path / "cache")
    assert [p.name for p in weight_files(tmp_path)] == ["model.safetensors"]
    assert weights_sha256(tmp_path, cache) == hashlib.sha256(b"weights").hexdigest()
    (tmp_path / "2_Dense").mkdir()
    (tmp_path / "2_Dense" / "model.safetensors").write_bytes(b"dense")
    combined = weights_sha256(tmp_path, cache)
    expected = hashlib.sha256()
    for rel, data in (("2_Dense/model.safetensors", b"dense"), ("model.safetensors", b"weights")):
        expected.update(f"{rel}\0{hashlib.sha256(data).hexdigest()}\n".encode())
    assert combined == expected.hexdigest()


def test_a_folder_without_weights_is_refused(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(SdltagError, match="no weight files"):
        weights_sha256(tmp_path, LabelVectorCache(tmp_path / "cache"))
