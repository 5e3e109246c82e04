"""The photo model's recipe: vocabulary, teacher labels, closed-form initialisation, head training, scenes."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks.photo_vocabulary import read_vocabulary
from benchmarks.recipe_photo import (
    PhotoConfig,
    class_to_label_matrix,
    hypernym_text,
    name_targets,
    photo_metrics,
    pseudo_features,
    ridge_map,
    teacher_targets,
    train_head,
)
from benchmarks.tuxpaint_scenes import find_stamps, generate, read_scenes


def test_vocabulary_covers_every_class_with_unique_labels_and_broader_words():
    vocabulary = read_vocabulary()
    labels = [label for label, _, _ in vocabulary]
    assert len(labels) == len(set(labels)) > 1000
    assert all(label == label.strip().lower() and label for label in labels)
    covered = set()
    for _, _, classes in vocabulary:
        assert classes and all(0 <= c < 1000 for c in classes)
        covered.update(classes)
    assert covered == set(range(1000))
    by_label = {label: (kind, set(classes)) for label, kind, classes in vocabulary}
    # a beagle (class 162) teaches "dog" and "animal"; "dog" is a broader word over 100+ breeds
    assert 162 in by_label["dog"][1] and 162 in by_label["animal"][1] and len(by_label["dog"][1]) > 100
    assert by_label["fruit"][0] == "broader" and 948 in by_label["fruit"][1]  # Granny Smith
    # the two ImageNet classes named "missile" are one label
    assert len(by_label["missile"][1]) == 2


def test_teacher_targets_add_up_probability_of_classes_under_a_broader_word():
    vocabulary = [("a", "class", [0]), ("b", "class", [1]), ("ab", "broader", [0, 1]), ("c", "class", [2])]
    membership = class_to_label_matrix(vocabulary, classes=3)
    probabilities = np.array([[0.35, 0.35, 0.3]])
    targets = teacher_targets(np.log(probabilities), membership, tau=0.4)
    assert targets.tolist() == [[0.0, 0.0, 1.0, 0.0]]  # no class reaches 0.4, their broader word does


def test_name_targets_find_vocabulary_words_in_cut_out_names():
    labels = ["apple", "granny smith", "tiger", "dog"]
    out = name_targets([["apple granny smith"], ["tiger sumatran", "bulldog"]], labels)
    assert out.tolist() == [[1, 1, 0, 0], [0, 0, 1, 0]]  # "bulldog" is not the word "dog"


def test_ridge_map_reproduces_classifier_scores_and_hypernym_text_stays_unit():
    rng = np.random.default_rng(0)
    text = rng.standard_normal((50, 8)).astype(np.float32)
    true_map = rng.standard_normal((8, 20)).astype(np.float32)
    classifier = text @ true_map
    assert np.allclose(ridge_map(text, classifier, 1e-6), true_map, atol=1e-3)
    membership = class_to_label_matrix([("x", "class", [0]), ("y", "class", [1]), ("xy", "broader", [0, 1])], 2)
    vectors = np.eye(3, 8, dtype=np.float32)
    mixed = hypernym_text(vectors[:2], vectors, membership, pull=0.5)
    assert np.allclose(np.linalg.norm(mixed, axis=1), 1.0)
    assert mixed[0, 2] > 0 and mixed[0, 1] == 0  # moved toward its broader word, not toward the other class


def test_pseudo_features_are_classified_as_their_own_class():
    rng = np.random.default_rng(1)
    classifier = rng.standard_normal((30, 64)).astype(np.float32)
    mean = np.full(64, 0.5, dtype=np.float32)
    features, classes = pseudo_features(classifier, mean, np.full(64, 0.5, np.float32), 2, 2.0, rng)
    assert features.shape == (60, 64) and features.min() >= 0 and features.max() <= 6
    assert ((features @ classifier.T).argmax(axis=1) == classes).mean() > 0.9


def test_train_head_lowers_the_loss_and_the_anchor_holds_it_near_the_initialisation():
    rng = np.random.default_rng(2)
    vectors = rng.standard_normal((6, 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    features = rng.random((64, 12)).astype(np.float32)
    targets = np.zeros((64, 6), np.float32)
    targets[np.arange(64), rng.integers(0, 6, 64)] = 1
    init = rng.standard_normal((16, 12)).astype(np.float32) * 0.1
    free, losses = train_head(features, targets, vectors, init, PhotoConfig(anchor=0.0, epochs=15, lr=1e-2, batch=16))
    assert losses[-1] < losses[0]
    held, _ = train_head(features, targets, vectors, init, PhotoConfig(anchor=100.0, epochs=15, lr=1e-2, batch=16))
    assert np.abs(held - init).sum() < np.abs(free - init).sum() / 3
    rows, _ = train_head(features, targets, vectors, init, PhotoConfig(rows=3, epochs=2, batch=16))
    assert rows.shape == (48, 12)


def test_photo_metrics_follow_the_photo_eval_protocol():
    truth = {"a.jpg": {"cat"}, "b.jpg": {"dog", "pet"}}
    keywords = ["cat", "dog", "pet"]
    perfect = np.array([[3.0, 1.0, 0.0], [0.0, 3.0, 2.0]])
    assert photo_metrics(["a.jpg", "b.jpg"], perfect, keywords, truth) == {"map": 100.0, "hit1": 100, "hit5": 100}
    wrong = np.array([[0.0, 3.0, 2.0], [3.0, 1.0, 0.0]])  # each photo ranks its own keywords last-ish
    result = photo_metrics(["a.jpg", "b.jpg"], wrong, keywords, truth)
    assert result["hit1"] == 0 and result["hit5"] == 100
    # each keyword's one positive photo comes second in that keyword's order of photos: AP 1/2
    assert result["map"] == 50.0


def _stamp(path: Path, colour: tuple[int, int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGBA", (40, 30), (0, 0, 0, 0))
    image.paste(Image.new("RGBA", (20, 20), (*colour, 255)), (10, 5))
    image.save(path)


def test_scenes_skip_symbols_and_cartoons_and_regenerate_identically(tmp_path):
    root = tmp_path / "stamps"
    _stamp(root / "animals" / "mammals" / "tiger_sumatran.png", (200, 120, 0))
    _stamp(root / "food" / "fruit" / "apple-granny-smith.png", (0, 200, 0))
    _stamp(root / "food" / "fruit" / "cartoon" / "pineapple.png", (200, 200, 0))
    _stamp(root / "symbols" / "flags" / "redflag.png", (255, 0, 0))
    stamps = find_stamps(root)
    assert [(s.name, s.category) for s in stamps] == [
        ("tiger sumatran", "animals/mammals"),
        ("apple granny smith", "food/fruit"),
    ]
    first = generate(root, tmp_path / "one", 6, seed=3)
    second = generate(root, tmp_path / "two", 6, seed=3)
    rows = read_scenes(first)
    assert len(rows) == 6 and rows == read_scenes(second)
    assert all(set(names) <= {"tiger sumatran", "apple granny smith"} for _, names, _ in rows)
    for name, _, _ in rows:
        assert (first / name).read_bytes() == (second / name).read_bytes()
    with open(first / "labels.csv", encoding="utf-8") as handle:
        assert next(csv.reader(handle)) == ["file", "names", "categories"]


def test_committed_photo_model_matches_its_vocabulary_and_tags_a_demo_photo():
    import onnxruntime as ort

    from sdltag.images import load_image
    from sdltag.modelfolder import load_model_folder
    from sdltag.nn.backbones import efficientnet_lite as lite
    from sdltag.scoring import sdl_scores

    root = Path(__file__).resolve().parents[1]
    folder = load_model_folder(root / "models" / "photo-lite0")
    manifest = folder.manifest
    assert manifest.backbone == "efficientnet_lite0" and manifest.input == lite.input_spec("efficientnet_lite0")
    assert manifest.seen_labels == [label for label, _, _ in read_vocabulary()]
    assert manifest.calibration and manifest.calibration["method"] == "platt"
    weights = manifest.provenance["backbone_weights"]
    assert weights["sha256"] == lite.VARIANTS["efficientnet_lite0"].sha256
    session = ort.InferenceSession(str(folder.onnx_path), providers=["CPUExecutionProvider"])
    image = load_image(root / "examples" / "photos" / "tuxpaint-european-bear.jpg", manifest.input)
    vectors = session.run(None, {"images": image[None]})[0]
    scores = sdl_scores(vectors, np.load(folder.path / "label_embeddings.npy"))[0]
    top = [manifest.seen_labels[i] for i in np.argsort(-scores)[:3]]
    assert "bear" in top or "brown bear" in top
