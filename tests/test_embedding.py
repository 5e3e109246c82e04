"""The text embedder with the real all-MiniLM-L6-v2: identity, the explicit ONNX export
(`sdltag labels export-embedder`) against sentence-transformers, the cache, no torch when the
exported encoder is there, the torch fallback when it is not, and the embedder refusals.

The default embedder is exported once per session by the command itself (``exported``); each
test sees it through its own ``$SDLTAG_HOME/data/text-models`` (``encoders``); this environment's
``share/sdltag`` (``make venv``'s) is hidden in this process, so a test decides whether one exists.
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

from sdltag import log
from sdltag.embedding import DEFAULT_NAME, clear_embedder_memo, get_text_embedder, onnx_text
from sdltag.embedding.cache import LabelVectorCache
from sdltag.embedding.locate import default_model_folder
from sdltag.embedding.onnx_text import EncoderError, OnnxTextEncoder, encoder_folder_name, read_meta
from sdltag.errors import SdltagError
from sdltag.label_space import resolve_labels
from sdltag.labels import LabelEntry, build_vocabulary
from sdltag.modelfolder import load_model_folder
from tests.conftest import build_tiny_model

DATA = Path(__file__).parent / "data"
HEAVY = ("torch", "sentence_transformers", "transformers")
EXPORT_HINT = f"sdltag labels export-embedder {DEFAULT_NAME}"


def _real_labels() -> list[str]:
    lines = (DATA / "cldr_labels.txt").read_text(encoding="utf-8").splitlines()
    return [line for line in lines if line and not line.startswith("#")]


def _cli(*args: str):
    from sdltag.cli import app

    return CliRunner().invoke(app, list(args))


@pytest.fixture(autouse=True)
def _no_environment_encoders(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Hide this environment's exported encoders (make venv's) from the process and its children."""
    monkeypatch.setattr(onnx_text, "environment_encoders_dir", lambda: tmp_path / "no-environment-encoders")
    clear_embedder_memo()
    yield
    clear_embedder_memo()


@pytest.fixture(scope="session")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default embedder's encoder, exported by `sdltag labels export-embedder` once per session."""
    out = tmp_path_factory.mktemp("encoders")
    cache = tmp_path_factory.mktemp("export-cache")  # session fixtures start before the per-test SDLTAG_HOME
    result = _cli("labels", "export-embedder", DEFAULT_NAME, "--out", str(out), "--cache-dir", str(cache))
    assert result.exit_code == 0, result.output
    assert "max abs diff to sentence-transformers" in result.stderr
    (folder,) = out.iterdir()
    return folder


@pytest.fixture()
def encoders(exported: Path, sdltag_home: Path) -> Path:
    """``$SDLTAG_HOME/data/text-models`` holding the session's export (where tagging finds it)."""
    root = sdltag_home / "data" / "text-models"
    root.mkdir(parents=True, exist_ok=True)
    if not (root / exported.name).exists():
        (root / exported.name).symlink_to(exported, target_is_directory=True)
    return root


@pytest.fixture()
def cache_dir(tmp_path: Path, encoders: Path) -> Path:
    """An empty label cache, with the default embedder's encoder exported."""
    return tmp_path / "cache"


@pytest.fixture(scope="session")
def st_model():
    from sdltag.embedding.st import load_sentence_transformer

    return load_sentence_transformer(default_model_folder())


@pytest.fixture(scope="session")
def minilm_model(tmp_path_factory: pytest.TempPathFactory, exported: Path):
    """A tiny model folder whose manifest names the real default embedder; labels cat/dog/tree + unseen zebra."""
    labels = ["cat", "dog", "tree", "zebra"]
    encoder = OnnxTextEncoder(exported)
    spec = {"kind": "sentence-transformers", "name": DEFAULT_NAME, "id": read_meta(exported)["embedder_id"]}
    return build_tiny_model(
        tmp_path_factory.mktemp("minilm") / "m",
        labels[:3],
        encoder.embed(labels),
        embedder={**spec, "dim": 384},
        unseen_labels=labels[3:],
        rows=2,
        size=16,
        width=4,
    )


@pytest.fixture(scope="session")
def tiny_st_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another sentence-transformers model, offline and small: a 1-layer BERT with random weights,
    MiniLM's tokenizer, mean pooling, a Dense layer to 16 dimensions and Normalize."""
    import torch
    from sentence_transformers import SentenceTransformer, models
    from transformers import BertConfig, BertModel

    root = tmp_path_factory.mktemp("tiny-st")
    bert = root / "bert"
    torch.manual_seed(0)
    config = BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    BertModel(config).save_pretrained(bert)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        (bert / name).write_bytes((default_model_folder() / name).read_bytes())
    modules = [
        models.Transformer(str(bert), max_seq_length=64),
        models.Pooling(32, pooling_mode="mean"),
        models.Dense(32, 16),
        models.Normalize(),
    ]
    folder = root / "tiny-st"
    SentenceTransformer(modules=modules, device="cpu").save(str(folder))
    return folder


def _run_python(code: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", **env}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        capture_output=True,
        text=True,
        env=environment,
        timeout=180,
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


def test_export_embedder_writes_a_verified_encoder_named_by_the_embedder_id(exported: Path, tmp_path: Path) -> None:
    spec = get_text_embedder(None, tmp_path / "cache").spec
    assert exported.name == encoder_folder_name(spec.id) == "all-MiniLM-L6-v2_sha256_53aa51172d142c89"
    meta = read_meta(exported, spec.id)
    assert meta["dim"] == 384 and meta["max_seq_length"] == 256 and meta["inputs"][0] == "input_ids"
    assert meta["verified"]["max_abs_diff"] <= 1e-5 and meta["verified"]["min_cosine"] >= 0.99999
    assert 80_000_000 < (exported / "text_model.onnx").stat().st_size < 100_000_000
    assert not [p for p in exported.parent.iterdir() if p.name.startswith(".")]  # no staging left
    # Exporting again keeps the complete export and says so, without touching it.
    before = (exported / "text_model.onnx").stat().st_mtime_ns
    result = _cli("labels", "export-embedder", DEFAULT_NAME, "--out", str(exported.parent))
    assert result.exit_code == 0, result.output
    assert "already exported" in result.stderr and "--force" in result.stderr
    assert (exported / "text_model.onnx").stat().st_mtime_ns == before


def test_exported_encoder_matches_sentence_transformers_on_real_labels(exported: Path, st_model) -> None:
    from sdltag.embedding.st import st_embed

    # Real labels, a description, and a text longer than the 256 tokens both truncate to.
    texts = _real_labels() + [
        "a striped domestic cat sleeping on a sunny windowsill",
        " ".join(["a very long description of a photograph"] * 60),
    ]
    assert len(texts) >= 290
    onnx = OnnxTextEncoder(exported).embed(texts)
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
    assert float(np.abs(onnx - reference).max()) <= 1e-5
    cosine = np.sum(onnx * reference, axis=1)
    assert float(cosine.min()) >= 0.99999, texts[int(cosine.argmin())]


@pytest.mark.parametrize("name", ["photo-lite0", "emoji"])
def test_shipped_models_label_vectors_are_what_the_encoder_computes(exported: Path, name: str) -> None:
    """The bundled models' label vectors (and so every cached vector) stay valid with the exported encoder."""
    model = load_model_folder(Path(__file__).parents[1] / "models" / name)
    labels = model.manifest.seen_labels + model.manifest.unseen_labels
    rows = list(range(0, len(labels), 25))
    vectors = OnnxTextEncoder(exported).embed([labels[i] for i in rows])
    assert float(np.abs(vectors - model.label_vectors[rows]).max()) <= 1e-5


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


def test_sentence_transformers_backend_agrees_with_the_exported_encoder(cache_dir: Path, tmp_path: Path) -> None:
    texts = ["red car", "woman astronaut", "waning gibbous moon"]
    fast = get_text_embedder(None, cache_dir).embed(texts)
    slow = get_text_embedder(None, tmp_path / "slow", backend="sentence-transformers").embed(texts)
    assert float(np.abs(fast - slow).max()) <= 1e-5


def test_new_labels_use_the_exported_encoder_without_torch(cache_dir: Path, tmp_path: Path, st_model) -> None:
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
    result = _run_python(code, str(cache_dir), str(out))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "2" and "warning" not in result.stderr
    reference = st_embed(st_model, ["lighthouse at dusk", "birthday cake"])
    assert float(np.abs(np.load(out) - reference).max()) <= 1e-5


def test_tag_run_with_new_labels_imports_no_torch(cache_dir: Path, tmp_path: Path, minilm_model) -> None:
    """`sdltag tag` embedding labels no cache holds, through the exported encoder: torch never loads."""
    from PIL import Image

    image = tmp_path / "photo.png"
    Image.new("RGB", (24, 24), (200, 40, 40)).save(image)
    code = """
        import json, sys
        from sdltag.cli import main
        sys.argv = ["sdltag", "tag", sys.argv[1], "--model", sys.argv[2], "--cache-dir", sys.argv[3], "--no-index",
                    "--label", "lighthouse at dusk", "--label", "red kite", "-f", "json"]
        try:
            main()
            code = 0
        except SystemExit as exc:
            code = exc.code
        print(json.dumps({"code": code, "heavy": [m for m in HEAVY if m in sys.modules]}), file=sys.stderr)
    """.replace("HEAVY", repr(HEAVY))
    result = _run_python(code, str(image), str(minilm_model.path), str(cache_dir))
    status = json.loads(result.stderr.strip().splitlines()[-1])
    assert status == {"code": 0, "heavy": []}, result.stderr
    assert "red kite" in result.stdout
    spec_id = minilm_model.manifest.embedder.id
    assert len(LabelVectorCache(cache_dir).get_many(spec_id, ["lighthouse at dusk", "red kite"])) == 2


def test_without_an_export_new_labels_fall_back_to_torch_with_one_hint(
    tmp_path: Path, exported: Path, sdltag_home: Path
) -> None:
    """No exported encoder: the same vectors from sentence-transformers, and one warning naming the command."""
    texts = ["lighthouse at dusk", "birthday cake"]
    with log.collect() as warnings:
        embedder = get_text_embedder(None, tmp_path / "cache")
        vectors = embedder.embed(texts)
        embedder.embed(["a third label"])
    assert len(warnings) == 1 and EXPORT_HINT in warnings[0] and "sentence-transformers" in warnings[0]
    assert float(np.abs(vectors - OnnxTextEncoder(exported).embed(texts)).max()) <= 1e-5
    assert not (sdltag_home / "data" / "text-models").exists()  # nothing exported implicitly
    # The "onnx" backend (benchmarks) refuses instead, naming the command.
    with pytest.raises(SdltagError, match=EXPORT_HINT):
        get_text_embedder(None, tmp_path / "cache2", backend="onnx").embed(["x"])


def test_an_unusable_export_is_left_alone_and_torch_embeds(tmp_path: Path, exported: Path, sdltag_home: Path) -> None:
    root = sdltag_home / "data" / "text-models"
    broken = root / exported.name
    broken.mkdir(parents=True)
    for name in ("meta.json", "tokenizer.json"):
        (broken / name).write_bytes((exported / name).read_bytes())
    (broken / "text_model.onnx").write_bytes((exported / "text_model.onnx").read_bytes()[:1000])  # truncated
    with pytest.raises(EncoderError, match="truncated"):
        read_meta(broken)
    with log.collect() as warnings:
        vector = get_text_embedder(None, tmp_path / "cache").embed(["harbour"])
    assert len(warnings) == 1 and "truncated" in warnings[0] and f"{EXPORT_HINT} --force" in warnings[0]
    assert float(np.abs(vector - OnnxTextEncoder(exported).embed(["harbour"])).max()) <= 1e-5
    assert (broken / "text_model.onnx").stat().st_size == 1000  # not removed: only the command replaces it
    # The command the warning names replaces it (an incomplete export of sdltag's own).
    result = _cli("labels", "export-embedder", DEFAULT_NAME, "--force")
    assert result.exit_code == 0, result.output
    read_meta(broken)


def test_export_embedder_exports_another_model_with_its_own_dimension(tiny_st_folder: Path, tmp_path: Path) -> None:
    from sdltag.embedding.st import load_sentence_transformer, st_embed

    result = _cli("labels", "export-embedder", str(tiny_st_folder), "--out", str(tmp_path / "out"))
    assert result.exit_code == 0, result.output
    (folder,) = (tmp_path / "out").iterdir()
    assert folder.name.startswith("tiny-st_sha256_")
    meta = read_meta(folder)
    assert meta["dim"] == 16 and meta["max_seq_length"] == 64
    texts = _real_labels()[:30]
    reference = st_embed(load_sentence_transformer(tiny_st_folder), texts)
    assert float(np.abs(OnnxTextEncoder(folder).embed(texts) - reference).max()) <= 1e-5
    assert f"max abs diff to sentence-transformers {meta['verified']['max_abs_diff']:.1e}" in result.stderr


def test_a_failed_export_is_one_error_line_and_leaves_nothing(
    tiny_st_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    def failing_export(*args, **kwargs) -> None:
        raise RuntimeError("no exporter for this model\n(a second line of detail)")

    monkeypatch.setattr(torch.onnx, "export", failing_export)
    out = tmp_path / "out"
    result = _cli("labels", "export-embedder", str(tiny_st_folder), "--out", str(out))
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sdltag: error: cannot export the embedder tiny-st@sha256:")
    assert "no exporter for this model (a second line of detail)" in lines[0]
    assert list(out.iterdir()) == []


def test_an_export_that_differs_from_torch_is_refused(
    tiny_st_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sdltag.embedding.st as st

    exact = st.st_embed
    monkeypatch.setattr(st, "st_embed", lambda model, texts: exact(model, texts) + np.float32(1e-3))
    out = tmp_path / "out"
    result = _cli("labels", "export-embedder", str(tiny_st_folder), "--out", str(out))
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "differ from sentence-transformers by up to 1.00e-03" in lines[0], lines
    assert list(out.iterdir()) == []


def test_export_refuses_a_folder_it_did_not_write_and_cleans_its_own_debris(
    tiny_st_folder: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    result = _cli("labels", "export-embedder", str(tiny_st_folder), "--out", str(out))
    assert result.exit_code == 0, result.output
    (folder,) = out.iterdir()
    dead = 2**22 + 12345  # above any pid_max default: no such process
    debris = out / f".{folder.name}.{dead}.abcd1234"  # a killed export's staging
    debris.mkdir()
    (debris / "text_model.onnx").write_bytes(b"partial")
    stranger = out / f".{folder.name}.{dead}.efgh5678"
    stranger.mkdir()
    (stranger / "thesis.tex").write_bytes(b"mine")
    result = _cli("labels", "export-embedder", str(tiny_st_folder), "--out", str(out), "--force")
    assert result.exit_code == 0, result.output
    assert not debris.exists() and (stranger / "thesis.tex").read_bytes() == b"mine"
    read_meta(folder)
    # A folder of the user's under the export's name is never replaced.
    (folder / "meta.json").write_text('{"notes": "mine"}', encoding="utf-8")
    result = _cli("labels", "export-embedder", str(tiny_st_folder), "--out", str(out), "--force")
    assert result.exit_code == 2
    assert "is not an export of tiny-st@sha256:" in result.stderr
    assert (folder / "meta.json").read_text(encoding="utf-8") == '{"notes": "mine"}'


@pytest.mark.slow  # starts a real export of all-MiniLM-L6-v2 (torch), ~20-60 s
def test_a_real_export_killed_part_way_leaves_only_removable_staging(tmp_path: Path) -> None:
    """kill -9 during `labels export-embedder`: the destination is never half-written, and the
    staging folder left behind is recognised as debris (the next export removes it)."""
    import signal
    import time

    from sdltag.embedding.onnx_text import remove_dead_staging

    out = tmp_path / "out"
    command = [sys.executable, "-m", "sdltag", "labels", "export-embedder", DEFAULT_NAME, "--out", str(out)]
    export = subprocess.Popen(command, env={**os.environ, "HF_HUB_OFFLINE": "1"}, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    staging: list[Path] = []
    while not staging:
        assert export.poll() is None and time.monotonic() < deadline, "the export ended before it was killed"
        staging = [p for p in out.glob(".*") if (p / "text_model.onnx").is_file()] if out.is_dir() else []
        time.sleep(0.05)
    export.send_signal(signal.SIGKILL)
    assert export.wait() == -9
    name = encoder_folder_name(get_text_embedder(None, tmp_path / "cache").spec.id)
    assert not (out / name).exists()
    assert remove_dead_staging(out, f".{name}") == staging
    assert list(out.iterdir()) == []


def test_export_of_an_unknown_embedder_is_refused_without_downloading(tmp_path: Path) -> None:
    result = _cli("labels", "export-embedder", "no-such-org/no-such-model-for-sdltag", "--out", str(tmp_path))
    assert result.exit_code == 2 and "never downloads" in result.stderr
    assert list(tmp_path.iterdir()) == []


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
    result = _run_python(code, str(minilm_model.path), str(labels), str(cache_dir))
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


def test_optimised_text_graph_is_saved_reused_and_replaced_when_damaged(tmp_path: Path, exported: Path) -> None:
    """The first session saves onnxruntime's optimised graph; later ones start from it with the same vectors."""
    folder = tmp_path / "fast"
    folder.mkdir()
    for name in ("meta.json", "tokenizer.json", "text_model.onnx"):
        (folder / name).symlink_to(exported / name)
    dead = folder / f".optimise.{2**22 + 12345}.7"  # what an optimisation killed part-way left
    dead.mkdir()
    (dead / "text_model.optimized-ort1.0.onnx.data").write_bytes(b"partial")
    texts = _real_labels()[:40] + ["a striped domestic cat sleeping on a sunny windowsill"]
    first = OnnxTextEncoder(folder)
    optimised = first._optimized_path()
    assert not optimised.exists()
    stale = folder / "text_model.optimized-ort0.1.onnx"  # another onnxruntime version's copy
    stale.write_bytes(b"old")
    reference = first.embed(texts)
    assert not stale.exists() and not dead.exists()
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


def test_labels_embed_command_reports_new_and_cached(tmp_path: Path, cache_dir: Path, encoders: Path) -> None:
    labels = tmp_path / "labels.txt"
    labels.write_text("# pets\ncat\nDog\ntabby: a striped cat\n", encoding="utf-8")
    args = ["labels", "embed", str(labels), "--label", "red bus", "--label", "CAT", "--cache-dir", str(cache_dir)]
    result = _cli(*args)
    assert result.exit_code == 0, result.output
    assert "4 labels: 4 new, 0 already cached" in result.output
    assert "duplicate" in result.output  # CAT vs cat
    result = _cli(*args)
    assert "4 labels: 0 new, 4 already cached" in result.output
    result = _cli("labels", "cache", "--cache-dir", str(cache_dir))
    assert "entries: 4" in result.stdout
    assert f"exported text encoder: {encoders / 'all-MiniLM-L6-v2_sha256_53aa51172d142c89'}" in result.stdout
