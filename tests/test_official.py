"""`sdltag import-official`: the official checkpoint format end to end, the label table, and the refusals."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import zs_sdl_layout as zs
from PIL import Image, ImageDraw
from typer.testing import CliRunner

from sdltag import scoring
from sdltag.cli import app
from sdltag.errors import SdltagError
from sdltag.images import load_image
from sdltag.modelfolder import ModelFolder, load_model_folder
from sdltag.nn.official import (
    build_official_model,
    expected_layout,
    extract_state_dict,
    label_table,
    official_config,
    to_official_key,
    to_sdltag_key,
    verify_state_dict,
)
from sdltag.runtime import ImageModel
from sdltag.safepickle import safe_load


class _Reduce:
    def __init__(self, func, *args) -> None:
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _pickle_args(checkpoint: Path, out: Path, *, unseen: bool = True, wordvecs: Path | None = None) -> list[str]:
    args = ["import-official", str(checkpoint), "--wordvecs", str(wordvecs or zs.WORDVECS)]
    args += ["--classes", str(zs.CLASSES), "--out", str(out)]
    return args + (["--unseen", str(zs.UNSEEN)] if unseen else [])


@pytest.fixture(scope="session")
def official_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The layout rule's weights saved as the official release saves them."""
    zs.require_fixtures()
    return zs.save_official_checkpoint(tmp_path_factory.mktemp("official") / "NUS_mtresnet_224.pth")


@pytest.fixture(scope="session")
def imported(official_checkpoint: Path) -> ModelFolder:
    """`sdltag import-official` run once for the whole session (the export takes a while)."""
    out = official_checkpoint.parent / "nus-model"
    result = CliRunner().invoke(app, _pickle_args(official_checkpoint, out))
    assert result.exit_code == 0, result.output
    assert "925 seen + 81 unseen labels" in result.stderr
    return load_model_folder(out)


def test_manifest_records_the_official_model(imported: ModelFolder, official_checkpoint: Path) -> None:
    manifest = imported.manifest
    imported.verify_onnx()
    assert (manifest.backbone, manifest.rows, manifest.dim, manifest.head_layout) == (
        "tresnet_m",
        7,
        300,
        "interleaved",
    )
    spec = manifest.input
    assert (spec.height, spec.width, spec.resize) == (224, 224, "squash")
    assert spec.mean == (0.0, 0.0, 0.0) and spec.std == (1.0, 1.0, 1.0)  # [0, 1] input, no normalisation
    # Labels: the 925 seen and 81 unseen NUS-WIDE classes, each row its official word vector.
    classes = safe_load(zs.CLASSES)
    unseen = safe_load(zs.UNSEEN)
    wordvecs = safe_load(zs.WORDVECS)  # (300, 1006)
    assert len(manifest.seen_labels) == 925 and set(manifest.unseen_labels) == set(unseen)
    assert sorted(imported.all_labels) == sorted(classes.values())
    column = {name: i for i, name in classes.items()}
    expected = np.stack([wordvecs[:, column[name]] for name in imported.all_labels])
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    np.testing.assert_allclose(imported.label_vectors, expected, atol=1e-6)
    # Embedder: the word-vector table, identified by a hash of the array's bytes.
    digest = hashlib.sha256(np.ascontiguousarray(wordvecs, dtype=np.float32).tobytes()).hexdigest()[:16]
    embedder = manifest.embedder
    assert (embedder.kind, embedder.name, embedder.dim) == ("word-vectors", "nus-wide-wordvec-300", 300)
    assert embedder.id == f"nus-wide-wordvec-300@sha256:{digest}"
    # Provenance: the source files by name and hash, the paper, the licence.
    prov = manifest.provenance
    assert prov["checkpoint"] == {
        "file": "NUS_mtresnet_224.pth",
        "sha256": hashlib.sha256(official_checkpoint.read_bytes()).hexdigest(),
    }
    assert prov["wordvecs"]["sha256"] == hashlib.sha256(zs.WORDVECS.read_bytes()).hexdigest()
    assert prov["unseen"]["file"] == "nus_wide_unseen_classes.pickle"
    assert "ICCV 2021" in prov["paper"] and prov["license"].startswith("MIT")
    assert prov["checkpoint_num_classes"] == 1006
    assert prov["repository"] == "https://github.com/Alibaba-MIIL/ZS_SDL"
    assert (imported.path / "MODEL_CARD.md").read_text(encoding="utf-8").startswith("# Official SDL model")


def test_imported_onnx_reproduces_the_official_output(imported: ModelFolder) -> None:
    vectors = ImageModel(imported, device="cpu").run(zs.golden_input())  # (1, 7, 300)
    diff = np.abs(vectors[0] - zs.golden_principal_vectors()).max()
    assert diff < 1e-4, f"max abs difference to the official output: {diff}"


def _photos(folder: Path) -> list[Path]:
    """A few real image files of different sizes, modes and formats."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    rng = np.random.default_rng(1)
    sky = np.zeros((200, 320, 3), dtype=np.uint8)
    sky[..., 2] = np.linspace(255, 120, 200, dtype=np.uint8)[:, None]
    sky[120:, :, 1] = 140  # a green field under a blue sky
    image = Image.fromarray(sky)
    ImageDraw.Draw(image).ellipse((230, 20, 290, 80), fill=(255, 230, 90))
    image.save(folder / "field.jpg", quality=90)
    paths.append(folder / "field.jpg")
    noise = Image.fromarray(rng.integers(0, 255, (150, 100, 4), dtype=np.uint8), "RGBA")
    noise.save(folder / "noise.png")
    paths.append(folder / "noise.png")
    gray = Image.fromarray(np.tile(np.linspace(0, 255, 64, dtype=np.uint8), (48, 1)), "L")
    gray.save(folder / "ramp.png")
    paths.append(folder / "ramp.png")
    return paths


def test_imported_model_ranks_nus_wide_labels_on_images(
    imported: ModelFolder, official_checkpoint: Path, tmp_path: Path
) -> None:
    spec = imported.manifest.input
    batch = np.stack([load_image(p, spec) for p in _photos(tmp_path / "photos")])  # (3, 3, 224, 224)
    assert batch.min() >= 0.0 and batch.max() <= 1.0
    vectors = ImageModel(imported, device="cpu").run(batch)  # (3, 7, 300)
    # The ONNX graph agrees with the torch model on real decoded images.
    state = extract_state_dict(torch.load(official_checkpoint, weights_only=True))
    with torch.no_grad():
        expected = build_official_model(state)(torch.from_numpy(batch)).numpy()
    np.testing.assert_allclose(vectors, expected, atol=1e-4, rtol=0)
    scores = scoring.sdl_scores(vectors, imported.label_vectors)  # (3, 1006)
    assert scores.shape == (3, 1006)
    brute = np.einsum("bmd,ld->bml", vectors, imported.label_vectors).max(axis=1)
    np.testing.assert_allclose(scores, brute, atol=1e-4)
    labels = imported.all_labels
    classes = set(safe_load(zs.CLASSES).values())
    tops = []
    for row in scoring.top_k(scores, 10):
        names = [labels[i] for i, _ in row]
        assert len(names) == 10 and set(names) <= classes
        assert [s for _, s in row] == sorted((s for _, s in row), reverse=True)
        tops.append(names)
    unseen_mask = np.arange(len(labels)) >= len(imported.manifest.seen_labels)
    assert unseen_mask.sum() == 81  # unseen labels are scored alongside the seen ones
    assert np.isfinite(scores[:, unseen_mask]).all()


# --- refusals --------------------------------------------------------------------------------


def test_checkpoint_with_missing_keys_is_refused_naming_the_key(tmp_path: Path) -> None:
    zs.require_fixtures()
    layout = zs.layout_shapes()
    keys = list(layout)
    partial = {k: torch.zeros(layout[k]) for k in keys[:5]}  # stem only
    path = tmp_path / "partial.pth"
    torch.save({"model": partial, "num_classes": 1006}, path)
    out = tmp_path / "out"
    result = CliRunner().invoke(app, _pickle_args(path, out))
    assert result.exit_code == 2
    assert f"missing key {keys[5]!r} and {len(keys) - 6} more" in result.stderr
    assert "partial.pth" in result.stderr and "NUS_mtresnet_224.pth" in result.stderr  # the file and the fix
    assert not out.exists()


def test_misshaped_and_unexpected_keys_are_named() -> None:
    expected = expected_layout()
    assert len(expected) == 373
    state = {k: torch.empty(shape) for k, shape in expected.items()}
    state["layer3.4.conv2.0.weight"] = torch.empty(256, 256, 1, 1)
    with pytest.raises(
        SdltagError,
        match=r"'layer3\.4\.conv2\.0\.weight' has shape \(256, 256, 1, 1\), "
        r"expected \(256, 256, 3, 3\)",
    ):
        verify_state_dict(state, expected, "ckpt.pth")
    state = {k: torch.empty(shape) for k, shape in expected.items()}
    state["head.fc.weight"] = torch.empty(3)
    state["layer1.0.conv1.1.num_batches_tracked"] = torch.tensor(0)
    with pytest.raises(SdltagError, match=r"unexpected key 'head\.fc\.weight' and 1 more"):
        verify_state_dict(state, expected, "ckpt.pth")
    del state["head.fc.weight"], state["layer1.0.conv1.1.num_batches_tracked"]
    state["embedding.weight"] = torch.zeros(2100, 2048, dtype=torch.int64)
    with pytest.raises(SdltagError, match=r"'embedding\.weight' has dtype torch\.int64"):
        verify_state_dict(state, expected, "ckpt.pth")


def test_malicious_checkpoint_is_refused_unexecuted(tmp_path: Path) -> None:
    zs.require_fixtures()
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"model": _Reduce(os.system, f"touch {marker}")}, path)
    result = CliRunner().invoke(app, _pickle_args(path, tmp_path / "out"))
    assert result.exit_code == 2 and "evil.pth: cannot read the checkpoint safely" in result.stderr
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_malicious_wordvecs_pickle_is_refused_unexecuted(tmp_path: Path) -> None:
    zs.require_fixtures()
    import pickle

    marker = tmp_path / "pwned"
    evil = tmp_path / "wordvecs.pickle"
    evil.write_bytes(pickle.dumps(_Reduce(os.system, f"touch {marker}")))
    result = CliRunner().invoke(app, _pickle_args(tmp_path / "never-read.pth", tmp_path / "out", wordvecs=evil))
    assert result.exit_code == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("sdltag: error:")]
    assert len(errors) == 1
    assert re.search(r"wordvecs\.pickle: refused global \w+\.system", errors[0])  # posix.system on Linux
    assert "never-read.pth" not in errors[0]  # refused before the checkpoint is even opened
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_label_table_split_and_refusals() -> None:
    classes = {0: "cat", 1: "dog", 2: "sky"}
    vectors = np.zeros((300, 3), dtype=np.float32)
    vectors[0, 0], vectors[1, 1], vectors[2, 2] = 2.0, 3.0, 4.0
    table = label_table(classes, vectors, ["dog"])
    assert table.seen == ["cat", "sky"] and table.unseen == ["dog"]
    np.testing.assert_allclose(table.vectors[:, :3], [[1, 0, 0], [0, 0, 1], [0, 1, 0]])  # normalised, seen first
    assert label_table(classes, vectors).unseen == []
    with pytest.raises(SdltagError, match="unseen label 'bird' is not in"):
        label_table(classes, vectors, ["bird"])
    with pytest.raises(SdltagError, match=r"shape \(300, 2\) but classes lists 3 classes"):
        label_table(classes, vectors[:, :2])
    with pytest.raises(SdltagError, match="keys must be 0..N-1"):
        label_table({1: "cat", 2: "dog", 3: "sky"}, vectors)
    with pytest.raises(SdltagError, match="all zeros"):
        label_table({0: "cat", 1: "dog", 2: "sky", 3: "sea"}, np.zeros((300, 4), dtype=np.float32))
    with pytest.raises(SdltagError, match="2-D float array"):
        label_table(classes, [[1.0]])


def test_state_dict_wrappers_and_key_mapping() -> None:
    sd = {"conv1.0.weight": torch.zeros(1)}
    assert extract_state_dict(sd) == sd  # bare state dict
    assert extract_state_dict({"model": sd, "num_classes": 1006}) == sd  # official format
    assert extract_state_dict({"module.conv1.0.weight": torch.zeros(1)}).keys() == sd.keys()  # DataParallel
    with pytest.raises(SdltagError, match="not a tensor"):
        extract_state_dict({"model": {"conv1.0.weight": [1.0]}})
    with pytest.raises(SdltagError, match="no state dict"):
        extract_state_dict([1, 2])
    assert to_sdltag_key("embedding.weight") == "head.embedding.weight"
    assert to_sdltag_key("layer1.0.se.fc1.bias") == "backbone.layer1.0.se.fc1.bias"
    assert official_config().head_layout == "interleaved"
    for key in ("head.embedding.weight", "backbone.conv1.1.running_var"):
        assert to_sdltag_key(to_official_key(key)) == key


def test_tagging_labels_come_from_the_word_vector_table(imported: ModelFolder) -> None:
    from sdltag.label_space import resolve_labels
    from sdltag.labels import parse_inline_label

    # A label in the table is scored with its official vector (and keeps its unseen mark) ...
    labels = resolve_labels(imported, [parse_inline_label("Dog")], include_seen=False)
    row = imported.all_labels.index("dog")
    assert labels.names == ["dog"] and labels.unseen_mask.tolist() == [True]
    np.testing.assert_array_equal(labels.vectors[0], imported.label_vectors[row])
    everything = resolve_labels(imported, [])
    assert len(everything) == 1006 and int(everything.unseen_mask.sum()) == 81
    # ... one outside it is refused with what this model can score.
    with pytest.raises(SdltagError, match="fixed word-vector table.*'spaceship'.*text encoder"):
        resolve_labels(imported, [parse_inline_label("spaceship")])


def test_sdltag_tag_ranks_the_nus_wide_labels(imported: ModelFolder, tmp_path: Path) -> None:
    photos = _photos(tmp_path / "photos")
    args = ["tag", str(tmp_path / "photos"), "--model", str(imported.path), "--no-index", "--format", "json"]
    result = CliRunner().invoke(app, [*args, "--top-k", "10"])
    assert result.exit_code == 0, result.output
    rows = {Path(row["path"]).name: row["tags"] for row in json.loads(result.stdout)}
    assert sorted(rows) == sorted(p.name for p in photos)
    # The same ranking as the model folder's ONNX graph and the word-vector table give directly.
    batch = np.stack([load_image(p, imported.manifest.input) for p in photos])
    scores = scoring.sdl_scores(ImageModel(imported, device="cpu").run(batch), imported.label_vectors)  # (3, 1006)
    unseen = set(imported.manifest.unseen_labels)
    for path, ranked in zip(photos, scoring.top_k(scores, 10), strict=True):
        tags = rows[path.name]
        assert [t["label"] for t in tags] == [imported.all_labels[i] for i, _ in ranked]
        np.testing.assert_allclose([t["score"] for t in tags], [s for _, s in ranked], atol=1e-3)
        assert all(t["kind"] == ("unseen" if t["label"] in unseen else "seen") for t in tags)
    # An unseen NUS-WIDE label can be asked for by name; a word outside the table is refused.
    result = CliRunner().invoke(app, [*args, "--no-seen", "--label", "Dog"])
    assert result.exit_code == 0, result.output
    assert all(
        tags == [{"label": "dog", "score": tags[0]["score"], "kind": "unseen"}]
        for tags in (row["tags"] for row in json.loads(result.stdout))
    )
    result = CliRunner().invoke(app, [*args, "--label", "spaceship"])
    assert result.exit_code == 2 and "cannot score 'spaceship'" in result.stderr
