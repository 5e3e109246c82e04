"""Thresholds: per kind (`--threshold-seen/--threshold-unseen`), per label (`label<TAB>0.4`), `--block`, `search -t`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import build_tiny_model
from PIL import Image
from typer.testing import CliRunner

from sdltag.cli import app
from sdltag.errors import SdltagError
from sdltag.index import ImageIndex
from sdltag.labels import LabelEntry, build_vocabulary, read_labels_file
from sdltag.tagger import LabelSpace, Scorer, TagOptions

SEEN = ["cat", "dog", "tree", "car"]
UNSEEN = ["beach", "snow", "flag"]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory):
    """A tiny model whose manifest lists zero-shot labels too (no text model needed)."""
    rng = np.random.default_rng(3)
    vectors = rng.normal(size=(len(SEEN) + len(UNSEEN), 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return build_tiny_model(tmp_path_factory.mktemp("m") / "tiny", SEEN, vectors, unseen_labels=UNSEEN)


def _photos(folder: Path, count: int = 6) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(count):
        pixels = np.random.default_rng(i).integers(0, 255, size=(32, 40, 3), dtype=np.uint8)
        out.append(folder / f"p{i}.png")
        Image.fromarray(pixels).save(out[-1])
    return out


def _tag(*args: object):
    result = CliRunner().invoke(app, ["tag", *map(str, args)], catch_exceptions=False)
    assert result.exit_code == 0, result.stderr
    return {
        r["path"]: {t["label"]: (t["score"], t["kind"]) for t in r["tags"]}
        for r in map(json.loads, result.stdout.splitlines())
    }


# -- the labels file's threshold column ---------------------------------------------------------


def test_labels_file_threshold_column(tmp_path: Path) -> None:
    path = tmp_path / "labels.txt"
    path.write_text(
        "beach\t0.4\n"
        "tabby: a striped cat\t.25   # a comment\n"
        "room 101\n"  # a space, not a tab: the number is part of the label
        "sunset \t 1e-1\n"
        "red car\tnot a number\n",
        encoding="utf-8",
    )
    entries = read_labels_file(path)
    assert [(e.label, e.text, e.threshold) for e in entries] == [
        ("beach", "beach", 0.4),
        ("tabby", "a striped cat", 0.25),
        ("room 101", "room 101", None),
        ("sunset", "sunset", 0.1),
        ("red car not a number", "red car not a number", None),
    ]
    assert build_vocabulary(inline=["x\t0.3"]) == [LabelEntry("x 0.3", "x 0.3", "--label")]  # not in --label


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("\t0.4", r":2: the threshold 0.4 has no label before it. Write `label<TAB>0.4`."),
        ("beach\t1e999", r":2: the threshold 1e999 is not a finite number"),
        ("be\x01ach\t0.4", r":2: the label contains a control character"),  # the checks still apply
        ("beach\ufffe\t0.4", r":2: the label contains U\+FFFE, which XML"),
    ],
)
def test_labels_file_threshold_errors_name_the_line(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "labels.txt"
    path.write_text(f"cat\n{line}\n", encoding="utf-8")
    with pytest.raises(SdltagError, match=rf"^{path}{message}"):
        read_labels_file(path)


# -- the scorer ---------------------------------------------------------------------------------


def test_scorer_cutoffs_per_kind_per_label_and_blocked(model) -> None:
    labels = LabelSpace.from_model(model)
    vectors = np.random.default_rng(1).normal(size=(40, model.manifest.rows, model.manifest.dim)).astype(np.float32)
    options = TagOptions(
        top_k=3,
        threshold=-100.0,  # under the per-kind ones
        threshold_seen=0.2,
        threshold_unseen=-0.1,
        label_thresholds={"dog": 0.5, "snow": 10.0},
        blocked=frozenset({"flag"}),
        raw_scores=True,
    )
    scorer = Scorer(labels, None, options)
    scores = scorer.scores(vectors)
    cut = np.array([0.2, 0.5, 0.2, 0.2, -0.1, 10.0, np.inf])
    for row, tags in zip(scores, scorer.tags(vectors), strict=True):
        passing = [i for i in np.argsort(-row, kind="stable") if row[i] >= cut[i]]
        assert [t.label for t in tags] == [labels.names[i] for i in passing[:3]]  # the 3 best that pass
    # without per-label or per-kind cut-offs the plain --threshold path is unchanged
    plain = Scorer(labels, None, TagOptions(top_k=3, threshold=0.1, raw_scores=True))
    assert plain.cutoffs is None
    for row, tags in zip(scores, plain.tags(vectors), strict=True):
        best = [i for i in np.argsort(-row, kind="stable")[:3] if row[i] >= 0.1]
        assert [t.label for t in tags] == [labels.names[i] for i in best]


# -- through `sdltag tag` -----------------------------------------------------------------------


def test_cli_thresholds_and_block(tmp_path: Path, model) -> None:
    _photos(tmp_path / "lib")
    base = [tmp_path / "lib", "--model", model.path, "--index", tmp_path / "i.db", "-f", "jsonl", "-k", "7"]
    everything = _tag(*base, "--raw-scores")
    assert all(len(tags) == 7 for tags in everything.values())
    seen_scores = sorted(s for tags in everything.values() for s, k in tags.values() if k == "seen")
    unseen_scores = sorted(s for tags in everything.values() for s, k in tags.values() if k == "unseen")
    t_seen, t_unseen = seen_scores[len(seen_scores) // 2], unseen_scores[len(unseen_scores) // 3]
    labels = tmp_path / "labels.txt"
    beach = sorted(tags["beach"][0] for tags in everything.values())[3]
    labels.write_text(f"beach\t{beach!r}\n", encoding="utf-8")
    block = tmp_path / "never.txt"
    block.write_text("# never again\nFlag\ndog\n", encoding="utf-8")
    args = ["--raw-scores", "--threshold-seen", repr(t_seen), "--threshold-unseen", repr(t_unseen)]
    cut = _tag(*base, *args, "--labels", labels, "--block", block)
    assert cut.keys() == everything.keys()
    for path, tags in everything.items():
        limits = {
            label: beach if label == "beach" else t_seen if kind == "seen" else t_unseen
            for label, (_, kind) in tags.items()
        }
        near = {label for label, (score, _) in tags.items() if abs(score - limits[label]) < 1e-4}  # printed rounded
        want = {label for label, (score, _) in tags.items() if label not in {"flag", "dog"} and score >= limits[label]}
        assert set(cut[path]) - near == want - near
    assert sum(len(t) for t in cut.values()) < sum(len(t) for t in everything.values())
    # --threshold serves a kind that has none of its own
    only_seen = _tag(*base, "--raw-scores", "--threshold", "1e9", "--threshold-seen", repr(t_seen))
    assert all(k == "seen" and s >= t_seen for tags in only_seen.values() for s, k in tags.values())
    typo = tmp_path / "typo.txt"
    typo.write_text("flagg\n", encoding="utf-8")
    result = CliRunner().invoke(app, ["tag", *map(str, base), "--block", str(typo)])
    assert result.exit_code == 0 and "--block: 'flagg' is not among the labels scored" in result.stderr
    result = CliRunner().invoke(app, ["tag", *map(str, base), "--block", str(tmp_path / "nope.txt")])
    assert result.exit_code == 2 and "nope.txt: labels file does not exist. Check the --block path." in result.stderr


# -- `sdltag search --threshold` ----------------------------------------------------------------


def test_search_threshold(tmp_path: Path, model) -> None:
    rng = np.random.default_rng(5)
    with ImageIndex.open(tmp_path / "i.db") as index:
        for i in range(8):
            path = tmp_path / "lib" / f"{i}.png"
            path.parent.mkdir(exist_ok=True)
            Image.new("RGB", (8, 8)).save(path)
            index.put(path, 1, 1, str(i), model.model_id, rng.normal(size=(model.manifest.rows, 16)).astype(np.float32))
    base = ["search", "tree", "--model", str(model.path), "--index", str(tmp_path / "i.db"), "--raw-scores"]
    every = [json.loads(x)["score"] for x in CliRunner().invoke(app, base).stdout.splitlines()]
    assert len(every) == 8
    limit = sorted(every)[5]
    result = CliRunner().invoke(app, [*base, "--threshold", repr(limit)])
    assert result.exit_code == 0, result.stderr
    assert [json.loads(x)["score"] for x in result.stdout.splitlines()] == sorted(every, reverse=True)[:3]
    capped = CliRunner().invoke(app, [*base, "-t", repr(limit), "--top", "2", "-f", "paths"])
    assert len(capped.stdout.splitlines()) == 2
    none = CliRunner().invoke(app, [*base, "-t", "1e9"])
    assert none.exit_code == 1 and none.stdout == "" and "scores at least 1e+09" in none.stderr
