"""The emoji-scenes generator (benchmarks/emoji_scenes.py) on a tiny synthetic emoji set made here."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from benchmarks import emoji_scenes as es

# name -> (colour, tags, subcategory). Tag counts: animal 3, food 2, red 2, round 2, the rest 1.
EMOJI = {
    "a.png": ((255, 0, 0), ["animal", "red", "cat"], "mammal"),
    "b.png": ((0, 255, 0), ["animal", "green", "frog"], "amphibian"),
    "c.png": ((0, 0, 255), ["animal", "blue", "whale"], "marine"),
    "d.png": ((255, 255, 0), ["food", "round", "lemon"], "fruit"),
    "e.png": ((255, 0, 255), ["food", "red", "round"], "sweet"),
    "f.png": ((0, 255, 255), ["ice"], "weather"),
}


def _write_emoji_set(root: Path, styles: tuple[str, ...] = ("styleA", "styleB")) -> tuple[list[Path], Path]:
    """Two 'art styles' of six coloured discs (RGBA, transparent corners) and their emoji.json."""
    folders = []
    for k, style in enumerate(styles):
        folder = root / style
        folder.mkdir(parents=True)
        for name, (colour, _, _) in EMOJI.items():
            image = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
            draw = ImageDraw.Draw(image)
            draw.ellipse((2 + k, 2 + k, 29 - k, 29 - k), fill=(*colour, 255))
            image.save(folder / name)
        folders.append(folder)
    records = [
        {"image": name, "emoji": "?", "name": name, "category": "c", "subcategory": sub, "tags": tags}
        for name, (_, tags, sub) in EMOJI.items()
    ]
    tags_json = root / "emoji.json"
    tags_json.write_text(json.dumps(records))
    return folders, tags_json


@pytest.fixture()
def emoji_set(tmp_path: Path) -> tuple[list[Path], Path]:
    return _write_emoji_set(tmp_path / "emoji")


def _rows(out: Path) -> list[tuple[str, list[str]]]:
    return list(es.iter_labels_csv(out / "labels.csv"))


def _scenes(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "scenes.jsonl").read_text().splitlines()]


def test_vocabulary_threshold_and_unseen_pick(emoji_set):
    _, tags_json = emoji_set
    records = es.load_records(tags_json)
    assert es.build_vocabulary(records, 2) == ["animal", "food", "red", "round"]
    assert es.build_vocabulary(records, 3) == ["animal"]
    assert len(es.build_vocabulary(records, 1)) == 11
    vocab = [f"label{i:02d}" for i in range(50)]
    unseen = es.pick_unseen(vocab, 0.1, seed=3)
    assert len(unseen) == 5 and set(unseen) <= set(vocab) and unseen == sorted(unseen)
    assert es.pick_unseen(vocab, 0.1, seed=3) == unseen
    assert es.pick_unseen(vocab, 0.1, seed=4) != unseen
    with pytest.raises(es.GeneratorError, match="--unseen-share"):
        es.pick_unseen(vocab, 1.5, seed=0)


def test_scene_labels_are_union_of_placed_tags_in_vocabulary(emoji_set, tmp_path):
    folders, tags_json = emoji_set
    out = tmp_path / "scenes"
    config = es.SceneConfig(size=48, min_emoji=2, max_emoji=3, scale_min=0.3, scale_max=0.5)
    summary = es.generate(folders, tags_json, out, 40, seed=7, config=config, vocab_min_count=2)
    vocab = {"animal", "food", "red", "round"}
    assert (out / "vocabulary.txt").read_text().split() == sorted(vocab)
    rows, scenes = _rows(out), _scenes(out)
    assert len(rows) == len(scenes) == 40 == summary["count"]
    tags_of = {name: set(tags) for name, (_, tags, _) in EMOJI.items()}
    for (path, labels), scene in zip(rows, scenes, strict=True):
        assert (out / path).is_file() and path == scene["path"]
        with Image.open(out / path) as image:
            assert image.size == (48, 48) and image.mode == "RGB"
        expected = set().union(*(tags_of[e["image"]] for e in scene["emoji"])) & vocab
        assert labels and set(labels) == expected
        # Only emoji carrying a vocabulary tag are placed ("f.png" has none).
        assert all(e["image"] != "f.png" for e in scene["emoji"])
        # Distinct sub-categories: never the same emoji twice in one scene.
        names = [e["image"] for e in scene["emoji"]]
        assert len(names) == len(set(names))
    # Most scenes show several things.
    assert sum(len(s["emoji"]) >= 2 for s in scenes) >= 30


def test_emoji_are_drawn_where_recorded(emoji_set, tmp_path):
    folders, tags_json = emoji_set
    out = tmp_path / "scenes"
    config = es.SceneConfig(size=64, min_emoji=1, max_emoji=1, scale_min=0.5, scale_max=0.5, max_rotation=0)
    es.generate(folders, tags_json, out, 6, seed=1, config=config, vocab_min_count=2)
    for scene in _scenes(out):
        (emoji,) = scene["emoji"]
        colour = np.array(EMOJI[emoji["image"]][0], dtype=np.float32)
        left, top, right, bottom = emoji["box"]
        cx, cy = (left + right) // 2, (top + bottom) // 2
        with Image.open(out / scene["path"]) as image:
            pixel = np.asarray(image, dtype=np.float32)[cy, cx]
        assert np.abs(pixel - colour).max() < 40, (scene, pixel)


def test_deterministic_per_seed_and_independent_of_workers(emoji_set, tmp_path):
    folders, tags_json = emoji_set
    config = es.SceneConfig(size=32)
    outs = []
    for name, seed, workers in (("one", 5, 1), ("two", 5, 2), ("other", 6, 1)):
        out = tmp_path / name
        es.generate(folders, tags_json, out, 12, seed=seed, config=config, vocab_min_count=2, workers=workers)
        outs.append(out)
    one, two, other = outs
    assert (one / "labels.csv").read_text() == (two / "labels.csv").read_text()
    for path, _ in _rows(one):
        assert (one / path).read_bytes() == (two / path).read_bytes()
    assert [np.asarray(Image.open(one / p)).tobytes() for p, _ in _rows(one)] != [
        np.asarray(Image.open(other / p)).tobytes() for p, _ in _rows(other)
    ]


def test_unseen_dropped_from_train_split_kept_in_test_split(emoji_set, tmp_path):
    folders, tags_json = emoji_set
    config = es.SceneConfig(size=32, min_emoji=1, max_emoji=2)
    train, test = tmp_path / "train", tmp_path / "test"
    es.generate(folders, tags_json, train, 30, seed=2, config=config, vocab_min_count=2, unseen=["red"], split="train")
    es.generate(folders, tags_json, test, 30, seed=2, config=config, vocab_min_count=2, unseen=["red"], split="test")
    train_rows, test_rows = _rows(train), _rows(test)
    assert all("red" not in labels and labels for _, labels in train_rows)
    assert any("red" in labels for _, labels in test_rows)
    # The pixels are the same scenes; only the annotations differ.
    for (path, train_labels), (_, test_labels) in zip(train_rows, test_rows, strict=True):
        assert (train / path).read_bytes() == (test / path).read_bytes()
        assert set(train_labels) == set(test_labels) - {"red"}
    summary = json.loads((train / "generator.json").read_text())
    assert summary["unseen_dropped"] == 1 and summary["split"] == "train"


def test_backgrounds_each_kind(tmp_path):
    rng = np.random.default_rng(0)
    for kind in es.BACKGROUNDS:
        image = es.make_background(rng, 40, kind)
        assert image.shape == (40, 40, 3) and image.min() >= 0 and image.max() <= 255
        spread = image.reshape(-1, 3).std(axis=0).max()
        assert (spread == 0) if kind == "plain" else (spread > 0), kind


def test_style_mix_per_emoji_uses_both_styles(emoji_set, tmp_path):
    folders, tags_json = emoji_set
    out = tmp_path / "mix"
    config = es.SceneConfig(size=32, min_emoji=3, max_emoji=3, style_mix="emoji")
    es.generate(folders, tags_json, out, 20, seed=0, config=config, vocab_min_count=2)
    mixed = [len({e["style"] for e in s["emoji"]}) > 1 for s in _scenes(out)]
    assert any(mixed)
    out2 = tmp_path / "scene"
    es.generate(folders, tags_json, out2, 20, seed=0, config=es.SceneConfig(size=32, min_emoji=3), vocab_min_count=2)
    assert all(len({e["style"] for e in s["emoji"]}) == 1 for s in _scenes(out2))


def test_bad_images_are_reported_and_skipped(tmp_path, capsys):
    folders, tags_json = _write_emoji_set(tmp_path / "emoji", styles=("only",))
    (folders[0] / "a.png").write_bytes(b"not a png")
    (folders[0] / "b.png").unlink()
    out = tmp_path / "out"
    es.generate(folders, tags_json, out, 20, seed=0, config=es.SceneConfig(size=32), vocab_min_count=2)
    err = capsys.readouterr().err
    assert "a.png" in err and "cannot decode" in err
    assert "1 emoji of emoji.json have no image" in err
    used = {e["image"] for s in _scenes(out) for e in s["emoji"]}
    assert used and not used & {"a.png", "b.png"}


def test_cli_writes_scenes_and_unseen_list(emoji_set, tmp_path, capsys):
    folders, tags_json = emoji_set
    unseen_file = tmp_path / "unseen.txt"
    assert es.main(["--tags", str(tags_json), "--vocab-min-count", "2", "--write-unseen", str(unseen_file),
                    "--unseen-share", "0.25", "--unseen-seed", "1"]) == 0  # fmt: skip
    unseen = es.read_label_file(unseen_file)
    assert len(unseen) == 1 and unseen[0] in {"animal", "food", "red", "round"}
    out = tmp_path / "cli"
    argv = ["--tags", str(tags_json), "--out", str(out), "--count", "8", "--seed", "3", "--size", "32",
            "--vocab-min-count", "2", "--unseen", str(unseen_file), "--split", "train", "--format", "jpg"]  # fmt: skip
    for folder in folders:
        argv += ["--images", str(folder)]
    assert es.main(argv) == 0
    rows = _rows(out)
    assert len(rows) == 8 and all(path.endswith(".jpg") for path, _ in rows)
    assert all(unseen[0] not in labels for _, labels in rows)
    # A non-empty output folder is refused without --force, naming the option.
    assert es.main(argv) == 2
    assert "--force" in capsys.readouterr().err
    assert es.main(argv + ["--force"]) == 0


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--scale-min", "0.9", "--scale-max", "0.2"], "--scale-min"),
        (["--min-emoji", "0"], "--min-emoji"),
        (["--backgrounds", "plain,stars"], "--backgrounds"),
        (["--vocab-min-count", "99"], "--vocab-min-count"),
    ],
)
def test_cli_bad_options_name_the_option(emoji_set, tmp_path, capsys, extra, needle):
    folders, tags_json = emoji_set
    argv = ["--tags", str(tags_json), "--out", str(tmp_path / "o"), "--count", "2", "--images", str(folders[0])]
    assert es.main(argv + extra) == 2
    assert needle in capsys.readouterr().err


def test_cli_missing_tags_file(tmp_path, capsys):
    code = es.main(["--tags", str(tmp_path / "nope.json"), "--out", str(tmp_path / "o"), "--count", "2",
                    "--images", str(tmp_path)])  # fmt: skip
    assert code == 2
    assert "nope.json" in capsys.readouterr().err


def test_output_is_read_by_sdltag_labeled_dir_reader(emoji_set, tmp_path):
    """The generated folder is a manifest-format labeled directory for `sdltag train` / `sdltag eval`."""
    from sdltag import log
    from sdltag.datasets import read_labeled_dir

    folders, tags_json = emoji_set
    out = tmp_path / "scenes"
    es.generate(folders, tags_json, out, 10, seed=4, config=es.SceneConfig(size=32), vocab_min_count=2)
    with log.collect() as warnings:
        dataset = read_labeled_dir(out)
    assert dataset.format == "manifest" and not warnings and not dataset.skipped
    expected = {(out / path).resolve(): set(labels) for path, labels in _rows(out)}
    assert {item.path.resolve(): set(item.labels) for item in dataset.items} == expected


def test_zsl_baselines_rows(emoji_set, tmp_path):
    """The image-blind rows: the prior's mAP is the mean label prevalence, random is seeded."""
    from benchmarks import zsl_baselines as zb

    folders, tags_json = emoji_set
    out = tmp_path / "test"
    es.generate(folders, tags_json, out, 30, seed=9, config=es.SceneConfig(size=32), vocab_min_count=2)
    vocab = es.read_label_file(out / "vocabulary.txt")
    targets = zb.load_targets(out, vocab)
    assert targets.shape == (30, 4)
    assert [set(np.array(vocab)[row > 0]) for row in targets] == [set(labels) for _, labels in _rows(out)]
    unseen_mask = np.array([label == "red" for label in vocab])
    rows = zb.baselines(targets, unseen_mask, seeds=3)
    prior = rows["label-frequency prior (oracle)"]
    kept = targets[targets.sum(axis=1) > 0]
    assert prior["gzsl map"][0] == pytest.approx(100 * kept.mean(axis=0)[kept.any(axis=0)].mean(), abs=1e-6)
    assert len(rows["random"]["zsl map"]) == 3
    assert rows["random"] == zb.baselines(targets, unseen_mask, seeds=3)["random"]


def test_examples_are_outside_the_default_vocabulary():
    """examples/extra.txt holds labels the default model was not trained on; examples/images decode."""
    from PIL import Image

    root = Path(__file__).resolve().parents[1]
    extra = es.read_label_file(root / "examples" / "extra.txt")
    assert len(extra) >= 8
    images = sorted((root / "examples" / "images").glob("*.jpg"))
    assert len(images) >= 10
    for path in images:
        with Image.open(path) as image:
            image.load()
    manifest = root / "models" / "emoji" / "manifest.json"
    if manifest.is_file():
        labels = json.loads(manifest.read_text())["labels"]
        known = {label.casefold() for label in labels["seen"] + labels["unseen"]}
        assert not known & {label.casefold() for label in extra}
