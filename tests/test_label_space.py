"""resolve_labels: merging a model's labels with the user's, seen/unseen, and the refusals.

A small recording embedder stands in for the text model here (speed); tests/test_embedding.py
runs the same paths with the real all-MiniLM-L6-v2.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from sdltag import log
from sdltag.errors import SdltagError
from sdltag.label_space import LabelSet, resolve_labels
from sdltag.labels import LabelEntry
from sdltag.modelfolder import EmbedderSpec
from tests.conftest import build_tiny_model

DIM = 8
SEEN = ["cat", "dog", "tree"]
UNSEEN = ["Zebra"]
SPEC = {"kind": "sentence-transformers", "name": "rec", "id": "rec@sha256:1111222233334444", "dim": DIM}


class RecordingEmbedder:
    """Deterministic unit vectors from a hash of the text; remembers what it was asked to embed."""

    def __init__(self, spec: dict) -> None:
        self.spec = EmbedderSpec.from_json(spec)
        self.calls: list[list[str]] = []

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        self.calls.append(list(texts))
        return np.stack([_vector(t) for t in texts]) if texts else np.zeros((0, DIM), np.float32)


def _vector(text: str) -> np.ndarray:
    seed = int(hashlib.sha256(text.encode()).hexdigest()[:8], 16)
    v = np.random.default_rng(seed).normal(size=DIM).astype(np.float32)
    return v / np.linalg.norm(v)


def _entry(label: str, text: str | None = None) -> LabelEntry:
    return LabelEntry(label, text or label, "--label")


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory):
    vectors = np.stack([_vector(f"trained {n}") for n in SEEN + UNSEEN])
    return build_tiny_model(
        tmp_path_factory.mktemp("ls") / "m",
        SEEN,
        vectors,
        embedder=SPEC,
        unseen_labels=UNSEEN,
        rows=2,
        size=16,
        width=4,
    )


@pytest.fixture(scope="module")
def word_vector_model(tmp_path_factory: pytest.TempPathFactory):
    vectors = np.stack([_vector(n) for n in SEEN + UNSEEN])
    spec = {
        "kind": "word-vectors",
        "name": "nus-wide-glove",
        "id": "nus-wide-glove@sha256:abcdabcdabcdabcd",
        "dim": DIM,
    }
    return build_tiny_model(
        tmp_path_factory.mktemp("wv") / "m",
        SEEN,
        vectors,
        embedder=spec,
        unseen_labels=UNSEEN,
        rows=2,
        size=16,
        width=4,
    )


def test_model_labels_only(model) -> None:
    label_set = resolve_labels(model, [])
    assert isinstance(label_set, LabelSet)
    assert label_set.names == ["cat", "dog", "tree", "Zebra"]
    assert label_set.kinds() == ["seen", "seen", "seen", "unseen"]
    np.testing.assert_array_equal(label_set.vectors, model.label_vectors)
    assert label_set.vectors.dtype == np.float32 and len(label_set) == 4


def test_user_labels_follow_and_known_ones_are_reused(model) -> None:
    embedder = RecordingEmbedder(SPEC)
    entries = [_entry("DOG"), _entry("red bus"), _entry("zebra"), _entry("tabby", "a striped cat"), _entry("Red Bus")]
    label_set = resolve_labels(model, entries, embedder=embedder)
    assert label_set.names == ["cat", "dog", "tree", "Zebra", "red bus", "tabby"]
    assert label_set.kinds() == ["seen", "seen", "seen", "unseen", "unseen", "unseen"]
    assert embedder.calls == [["red bus", "a striped cat"]]  # only new labels, descriptions as text
    np.testing.assert_array_equal(label_set.vectors[5], _vector("a striped cat"))
    np.testing.assert_array_equal(label_set.vectors[:4], model.label_vectors)


def test_without_seen_only_the_users_labels_remain(model) -> None:
    embedder = RecordingEmbedder(SPEC)
    label_set = resolve_labels(
        model, [_entry("Tree"), _entry("kite"), _entry("zebra")], include_seen=False, embedder=embedder
    )
    assert label_set.names == ["tree", "kite", "Zebra"]
    assert label_set.kinds() == ["seen", "unseen", "unseen"]
    np.testing.assert_array_equal(label_set.vectors[0], model.label_vectors[2])
    np.testing.assert_array_equal(label_set.vectors[1], _vector("kite"))


def test_a_description_on_a_known_label_is_ignored_with_a_warning(model) -> None:
    embedder = RecordingEmbedder(SPEC)
    with log.collect() as warnings:
        label_set = resolve_labels(model, [_entry("cat", "a feline")], include_seen=False, embedder=embedder)
    np.testing.assert_array_equal(label_set.vectors[0], model.label_vectors[0])
    assert embedder.calls == [] and len(warnings) == 1 and "'cat'" in warnings[0]


def test_an_embedder_with_another_id_is_refused(model) -> None:
    other = RecordingEmbedder({**SPEC, "id": "rec@sha256:9999999999999999"})
    with pytest.raises(SdltagError) as info:
        resolve_labels(model, [_entry("kite")], embedder=other)
    message = str(info.value)
    assert "rec@sha256:9999999999999999" in message and SPEC["id"] in message
    assert "--embedder rec" in message and "retrain" in message
    assert other.calls == []
    with pytest.raises(SdltagError, match="rec@sha256:9999"):  # also when every label is known
        resolve_labels(model, [_entry("cat")], embedder=other)


def test_word_vector_model_scores_its_own_labels(word_vector_model) -> None:
    label_set = resolve_labels(word_vector_model, [_entry("CAT"), _entry("zebra")], include_seen=False)
    assert label_set.names == ["cat", "Zebra"] and label_set.kinds() == ["seen", "unseen"]
    np.testing.assert_array_equal(label_set.vectors, word_vector_model.label_vectors[[0, 3]])


def test_word_vector_model_refuses_other_labels(word_vector_model) -> None:
    with pytest.raises(SdltagError) as info:
        resolve_labels(word_vector_model, [_entry("cat"), _entry("kite"), _entry("red bus")])
    message = str(info.value)
    assert "'kite'" in message and "'red bus'" in message and "'cat'" in message
    assert f"sdltag labels list --model {word_vector_model.path}" in message
    assert "text encoder" in message
    with pytest.raises(SdltagError, match="leave out --embedder"):
        resolve_labels(word_vector_model, [_entry("cat")], embedder="all-MiniLM-L6-v2")


def test_wrong_dimension_from_the_embedder_is_refused(model) -> None:
    wrong = RecordingEmbedder({**SPEC, "dim": 4})
    with pytest.raises(SdltagError, match="4-d vectors but the model expects 8-d"):
        resolve_labels(model, [_entry("kite")], embedder=wrong)


def test_unknown_embedder_name_is_refused_offline(model, tmp_path: Path) -> None:
    with pytest.raises(SdltagError, match=r"'rec' .*cannot be loaded offline.*--embedder PATH"):
        resolve_labels(model, [_entry("kite")], cache_dir=tmp_path)
