"""The text embedder with the real all-MiniLM-L6-v2: identity, the ONNX fast path against
sentence-transformers, the cache, no torch on cached runs, and the embedder refusals.

The export and sentence-transformers load once per session (``warm_cache``); each test
gets its own cache folder sharing that export through a symlink.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from sdltag.embedding import DEFAULT_NAME, get_text_embedder
from sdltag.embedding.cache import FAST_PATH_DIR, LabelVectorCache
from sdltag.embedding.locate import default_model_folder
from sdltag.embedding.onnx_text import FastPathError, OnnxTextEncoder, read_meta
from sdltag.errors import SdltagError
from sdltag.label_space import resolve_labels
from sdltag.labels import LabelEntry, build_vocabulary
from tests.conftest import build_tiny_model

DATA = Path(__file__).parent / "data"
HEAVY = ("torch", "sentence_transformers", "transformers")


def _real_labels() -> list[str]:
    lines = (DATA / "cldr_labels.txt").read_text(encoding="utf-8").splitlines()
    return [line for line in lines if line and not line.startswith("#")]


@pytest.fixture(scope="session")
def warm_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache folder holding the default embedder's verified ONNX export."""
    folder = tmp_path_factory.mktemp("warm-cache")
    embedder = get_text_embedder(None, folder)
    embedder.embed(["warm up"])
    read_meta(LabelVectorCache(folder).fast_path_dir(embedder.spec.id))  # the export is complete
    return folder


@pytest.fixture()
def cache_dir(tmp_path: Path, warm_cache: Path) -> Path:
    """An empty label cache that shares the session's ONNX export."""
    folder = tmp_path / "cache"
    (folder / FAST_PATH_DIR).mkdir(parents=True)
    for export in (warm_cache / FAST_PATH_DIR).iterdir():
        (folder / FAST_PATH_DIR / export.name).symlink_to(export, target_is_directory=True)
    return folder


@pytest.fixture(scope="session")
def st_model(warm_cache: Path):
    from sdltag.embedding.st import load_sentence_transformer

    return load_sentence_transformer(default_model_folder())


@pytest.fixture(scope="session")
def minilm_model(tmp_path_factory: pytest.TempPathFactory, warm_cache: Path):
    """A tiny model folder whose manifest names the real default embedder; labels cat/dog/tree + unseen zebra."""
    embedder = get_text_embedder(None, warm_cache)
    labels = ["cat", "dog", "tree", "zebra"]
    return build_tiny_model(
        tmp_path_factory.mktemp("minilm") / "m",
        labels[:3],
        embedder.embed(labels),
        embedder=embedder.spec.to_json(),
        unseen_labels=labels[3:],
        rows=2,
        size=16,
        width=4,
    )


def _run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", **env}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=environment,
        timeout=120,
        cwd=Path(__file__).parents[1],
    )


def test_spec_is_name_plus_weights_hash_and_needs_no_torch(tmp_path: Path) -> None:
    weights = default_model_folder() / "model.safetensors"
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    code = """
        import json, sys
        from sdltag.embedding import get_text_embedder
        spec = get_text_embedder(None, sys.argv[1] if len(sys.argv) > 1 else None).spec
        print(json.dumps({"spec": spec.to_json(), "heavy": [m for m in HEAVY if m in sys.modules]}))
    """.replace("HEAVY", repr(HEAVY))
    result = _run_python(code, SDLTAG_HOME=str(tmp_path))
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["spec"] == {
        "kind": "sentence-transformers",
        "name": DEFAULT_NAME,
        "id": f"{DEFAULT_NAME}@sha256:{digest[:16]}",
        "dim": 384,
    }
    assert out["heavy"] == []
    # The hash is memoised in the cache, keyed by path, size and mtime.
    stat = weights.stat()
    assert (
        LabelVectorCache(tmp_path / "cache").get_file_hash(weights.resolve(), stat.st_size, stat.st_mtime_ns) == digest
    )


def test_onnx_path_matches_sentence_transformers_on_real_labels(warm_cache: Path, st_model) -> None:
    from sdltag.embedding.st import st_embed

    # Real labels, a description, and a text longer than the 256 tokens both truncate to.
    texts = _real_labels() + [
        "a striped domestic cat sleeping on a sunny windowsill",
        " ".join(["a very long description of a photograph"] * 60),
    ]
    assert len(texts) >= 290
    spec = get_text_embedder(None, warm_cache).spec
    onnx = OnnxTextEncoder(LabelVectorCache(warm_cache).fast_path_dir(spec.id)).embed(texts)
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on a loaded 2-core machine one thread is 3x faster than two fighting
    try:
        # The long text alone: sentence-transformers would pad a whole batch of labels to 256 tokens.
        reference = np.concatenate([st_embed(st_model, texts[:-1]), st_embed(st_model, texts[-1:])])
    finally:
        torch.set_num_threads(threads)
    assert onnx.shape == reference.shape == (len(texts), 384)
    np.testing.assert_allclose(np.linalg.norm(onnx, axis=1), 1.0, atol=1e-5)
    cosine = np.sum(onnx * reference, axis=1)
    assert float(cosine.min()) >= 0.9999, texts[int(cosine.argmin())]


def test_cache_hit_and_miss(cache_dir: Path) -> None:
    embedder = get_text_embedder(None, cache_dir)
    first = embedder.embed(["red car", "blue sky", "red car"])
    assert embedder.last_new == 2 and first.shape == (3, 384) and first.dtype == np.float32
    np.testing.assert_array_equal(first[0], first[2])
    second = embedder.embed(["blue sky", "green field"])
    assert embedder.last_new == 1
    np.testing.assert_array_equal(second[0], first[1])
    stored = LabelVectorCache(cache_dir).get_many(embedder.spec.id, ["red car", "blue sky", "green field"])
    assert len(stored) == 3
    np.testing.assert_array_equal(stored["green field"], second[1])


def test_sentence_transformers_backend_agrees_with_the_fast_path(cache_dir: Path, tmp_path: Path) -> None:
    texts = ["red car", "woman astronaut", "waning gibbous moon"]
    fast = get_text_embedder(None, cache_dir).embed(texts)
    slow = get_text_embedder(None, tmp_path / "slow", backend="sentence-transformers").embed(texts)
    assert float(np.sum(fast * slow, axis=1).min()) >= 0.9999
    assert not (tmp_path / "slow" / FAST_PATH_DIR).exists()  # the reference path never exports


def test_new_labels_use_the_fast_path_without_torch(cache_dir: Path, tmp_path: Path, st_model) -> None:
    from sdltag.embedding.st import st_embed

    out = tmp_path / "vectors.npy"
    code = """
        import sys
        import numpy as np
        from sdltag.embedding import get_text_embedder
        embedder = get_text_embedder(None, sys.argv[1])
        np.save(sys.argv[2], embedder.embed(["lighthouse at dusk", "birthday cake"]))
        heavy = [m for m in HEAVY if m in sys.modules]
        assert not heavy, heavy
        print(embedder.last_new)
    """.replace("HEAVY", repr(HEAVY))
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), str(cache_dir), str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "2"
    reference = st_embed(st_model, ["lighthouse at dusk", "birthday cake"])
    assert float(np.sum(np.load(out) * reference, axis=1).min()) >= 0.9999


def test_fully_cached_resolve_imports_nothing_heavy(cache_dir: Path, tmp_path: Path, minilm_model) -> None:
    labels = tmp_path / "labels.txt"
    labels.write_text("Cat\nred bus\ntabby: a striped cat\n", encoding="utf-8")
    resolve_labels(minilm_model, build_vocabulary([labels]), cache_dir=cache_dir)  # warm the cache
    code = """
        import json, sys
        from pathlib import Path
        from sdltag.labels import build_vocabulary
        from sdltag.label_space import resolve_labels
        from sdltag.modelfolder import load_model_folder
        model = load_model_folder(sys.argv[1])
        label_set = resolve_labels(model, build_vocabulary([Path(sys.argv[2])]), cache_dir=Path(sys.argv[3]))
        print(json.dumps({"names": label_set.names, "kinds": label_set.kinds(),
                          "heavy": [m for m in HEAVY if m in sys.modules]}))
    """.replace("HEAVY", repr(HEAVY))
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), str(minilm_model.path), str(labels), str(cache_dir)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["heavy"] == []
    assert out["names"] == ["cat", "dog", "tree", "zebra", "red bus", "tabby"]
    assert out["kinds"] == ["seen", "seen", "seen", "unseen", "unseen", "unseen"]


def test_resolve_embeds_new_labels_and_descriptions_with_the_models_embedder(cache_dir: Path, minilm_model) -> None:
    entries = [
        LabelEntry("Dog", "Dog", "--label"),
        LabelEntry("tabby", "a striped cat", "--label"),
        LabelEntry("Zebra", "Zebra", "--label"),
    ]
    label_set = resolve_labels(minilm_model, entries, include_seen=False, cache_dir=cache_dir)
    assert label_set.names == ["dog", "tabby", "zebra"]
    assert label_set.kinds() == ["seen", "unseen", "unseen"]
    np.testing.assert_array_equal(label_set.vectors[0], minilm_model.label_vectors[1])  # the trained vector
    expected = get_text_embedder(None, cache_dir).embed(["a striped cat"])[0]
    np.testing.assert_allclose(label_set.vectors[1], expected, atol=1e-6)


def test_another_embedder_is_refused(tmp_path: Path, cache_dir: Path, minilm_model) -> None:
    other = tmp_path / "other-embedder"
    other.mkdir()
    for item in default_model_folder().iterdir():
        (other / item.name).symlink_to(item, target_is_directory=item.is_dir())
    entries = [LabelEntry("red bus", "red bus", "--label")]
    with pytest.raises(SdltagError) as info:
        resolve_labels(minilm_model, entries, embedder=str(other), cache_dir=cache_dir)
    message = str(info.value)
    assert "other-embedder@sha256:" in message and minilm_model.manifest.embedder.id in message
    assert f"--embedder {DEFAULT_NAME}" in message and "retrain" in message
    # Naming the model's own embedder is fine.
    label_set = resolve_labels(minilm_model, entries, embedder=DEFAULT_NAME, cache_dir=cache_dir)
    assert label_set.names[-1] == "red bus"


def test_same_name_other_weights_is_refused(tmp_path: Path, cache_dir: Path) -> None:
    spec = get_text_embedder(None, cache_dir).spec
    vectors = np.eye(2, 384, dtype=np.float32)
    model = build_tiny_model(
        tmp_path / "m",
        ["a", "b"],
        vectors,
        rows=2,
        size=16,
        width=4,
        embedder={**spec.to_json(), "id": f"{DEFAULT_NAME}@sha256:ffffffffffffffff"},
    )
    with pytest.raises(SdltagError, match="different weights"):
        resolve_labels(model, [LabelEntry("c", "c", "--label")], cache_dir=cache_dir)


def test_model_embedder_not_available_offline_is_refused(tiny_model, cache_dir: Path) -> None:
    with pytest.raises(SdltagError, match=r"'test-embedder' .* cannot be loaded offline"):
        resolve_labels(tiny_model, [LabelEntry("zebra", "zebra", "--label")], cache_dir=cache_dir)
    # Labels the model knows need no embedder at all.
    assert resolve_labels(tiny_model, [LabelEntry("CAT", "CAT", "--label")], include_seen=False).names == ["cat"]


@pytest.mark.slow  # exports the text model again (~5-10 s)
def test_broken_export_is_replaced(tmp_path: Path, warm_cache: Path) -> None:
    spec = get_text_embedder(None, warm_cache).spec
    source = LabelVectorCache(warm_cache).fast_path_dir(spec.id)
    folder = tmp_path / "cache"
    broken = LabelVectorCache(folder).fast_path_dir(spec.id)
    broken.mkdir(parents=True)
    for name in ("meta.json", "tokenizer.json"):
        (broken / name).write_bytes((source / name).read_bytes())
    (broken / "text_model.onnx").write_bytes((source / "text_model.onnx").read_bytes()[:1000])  # truncated
    with pytest.raises(FastPathError, match="truncated"):
        read_meta(broken)
    warnings: list[str] = []
    embedder = get_text_embedder(None, folder, warn=warnings.append)
    vector = embedder.embed(["harbour"])
    assert len(warnings) == 1 and "broken" in warnings[0]
    read_meta(broken)  # exported again, complete
    expected = OnnxTextEncoder(source).embed(["harbour"])
    assert float(vector[0] @ expected[0]) >= 0.9999


def test_optimised_text_graph_is_saved_reused_and_replaced_when_damaged(tmp_path: Path, warm_cache: Path) -> None:
    """The first session saves onnxruntime's optimised graph; later ones start from it with the same vectors."""
    spec = get_text_embedder(None, warm_cache).spec
    source = LabelVectorCache(warm_cache).fast_path_dir(spec.id)
    folder = tmp_path / "fast"
    folder.mkdir()
    for name in ("meta.json", "tokenizer.json", "text_model.onnx"):
        (folder / name).symlink_to(source / name)
    texts = _real_labels()[:40] + ["a striped domestic cat sleeping on a sunny windowsill"]
    first = OnnxTextEncoder(folder)
    optimised = first._optimized_path()
    assert not optimised.exists()
    stale = folder / "text_model.optimized-ort0.1.onnx"  # another onnxruntime version's copy
    stale.write_bytes(b"old")
    reference = first.embed(texts)
    assert not stale.exists()
    assert optimised.is_file() and not list(folder.glob(".optimise.*"))
    data = optimised.with_name(optimised.name + ".data")  # the weights, mapped into memory on load
    assert data.stat().st_size > 50_000_000 and optimised.stat().st_size < 5_000_000
    second = OnnxTextEncoder(folder)
    np.testing.assert_allclose(second.embed(texts), reference, atol=2e-6)
    assert second._session._model_path == str(optimised)  # started from the saved graph
    optimised.write_bytes(b"not an onnx graph")  # damaged: dropped, the original used and saved again
    third = OnnxTextEncoder(folder)
    np.testing.assert_allclose(third.embed(texts), reference, atol=2e-6)
    assert third._session._model_path == str(folder / "text_model.onnx")
    assert optimised.stat().st_size > 10_000 and data.stat().st_size > 50_000_000  # saved again
    data.unlink()  # the graph without its weights: dropped too, and rebuilt
    fourth = OnnxTextEncoder(folder)
    np.testing.assert_allclose(fourth.embed(texts), reference, atol=2e-6)
    assert fourth._session._model_path == str(folder / "text_model.onnx") and data.is_file()


def test_labels_embed_command_reports_new_and_cached(tmp_path: Path, cache_dir: Path) -> None:
    from sdltag.cli import app

    labels = tmp_path / "labels.txt"
    labels.write_text("# pets\ncat\nDog\ntabby: a striped cat\n", encoding="utf-8")
    args = ["labels", "embed", str(labels), "--label", "red bus", "--label", "CAT", "--cache-dir", str(cache_dir)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "4 labels: 4 new, 0 already cached" in result.output
    assert "duplicate" in result.output  # CAT vs cat
    result = CliRunner().invoke(app, args)
    assert "4 labels: 0 new, 4 already cached" in result.output
    result = CliRunner().invoke(app, ["labels", "cache", "--cache-dir", str(cache_dir)])
    assert "entries: 4" in result.stdout


def test_a_failed_export_is_not_retried_until_a_version_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A text model that cannot be exported to ONNX costs that attempt once, not in every process."""
    import sdltag.embedding.st as st
    from sdltag.embedding import clear_embedder_memo
    from sdltag.embedding.embedder import EXPORT_FAILED, CachedTextEmbedder

    attempts: list[str] = []

    def failing_export(*args, **kwargs) -> None:
        attempts.append("export")
        raise RuntimeError("no exporter for this model")

    monkeypatch.setattr(st, "export_fast_path", failing_export)
    monkeypatch.setattr(st, "st_embed", lambda model, texts: np.full((len(texts), 384), 384**-0.5, np.float32))
    monkeypatch.setattr(CachedTextEmbedder, "_sentence_transformer", lambda self: object())
    warnings: list[str] = []
    folder = tmp_path / "cache"
    try:
        first = get_text_embedder(None, folder, warn=warnings.append)
        assert first.embed(["alpha"]).shape == (1, 384)
        assert attempts == ["export"] and "cannot export" in warnings[0]
        marker = next((folder / FAST_PATH_DIR).glob(f"*{EXPORT_FAILED}"))
        assert "no exporter" in json.loads(marker.read_text())["reason"]
        clear_embedder_memo()  # as a new process would
        get_text_embedder(None, folder, warn=warnings.append).embed(["beta"])
        assert attempts == ["export"] and len(warnings) == 1  # not tried again, no second warning
        monkeypatch.setattr(CachedTextEmbedder, "_export_versions", staticmethod(lambda: {"sdltag": "newer"}))
        clear_embedder_memo()  # an upgrade may fix the export: tried again
        get_text_embedder(None, folder, warn=warnings.append).embed(["gamma"])
        assert attempts == ["export", "export"]
    finally:
        clear_embedder_memo()
