"""`sdltag search`: rank indexed images by a label's score without running the image model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image
from typer.testing import CliRunner

from sdltag.cli import app
from sdltag.index import ImageIndex
from sdltag.label_space import LabelSet
from sdltag.scoring import sdl_scores
from sdltag.search import rank_indexed


def _index_with(tmp_path: Path, tiny_model, names: list[str]) -> tuple[Path, dict[str, np.ndarray]]:
    """An index holding made-up matrices for real files (search never needs the image model)."""
    rng = np.random.default_rng(5)
    matrices = {}
    with ImageIndex.open(tmp_path / "i.db") as index:
        for name in names:
            path = tmp_path / name
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (8, 8)).save(path)
            matrix = rng.normal(size=(tiny_model.manifest.rows, tiny_model.manifest.dim)).astype(np.float32)
            matrices[name] = matrix
            index.put(path, 1, 1, name, tiny_model.model_id, matrix)
    return tmp_path / "i.db", matrices


def test_rank_indexed_orders_by_the_label_score(tmp_path: Path, tiny_model) -> None:
    names = [f"lib/{i}.jpg" for i in range(6)] + ["other/x.jpg"]
    index_path, matrices = _index_with(tmp_path, tiny_model, names)
    own = LabelSet.from_model(tiny_model)
    dog = LabelSet(own.names[1:2], own.vectors[1:2], own.unseen_mask[1:2])
    with ImageIndex.open_readonly(index_path) as index:
        hits = rank_indexed(index, tiny_model, dog, [tmp_path / "lib"], top=4, raw_scores=True)
    expected = sorted(names[:6], key=lambda n: -float(sdl_scores(matrices[n][None], dog.vectors)[0, 0]))[:4]
    assert [h.path for h in hits] == [tmp_path / n for n in expected]
    assert [h.rank for h in hits] == [1, 2, 3, 4] and all(h.label == "dog" for h in hits)
    scores = [h.score for h in hits]
    assert scores == sorted(scores, reverse=True)


def test_search_cli(tmp_path: Path, tiny_model) -> None:
    names = [f"lib/{i}.jpg" for i in range(5)]
    index_path, _ = _index_with(tmp_path, tiny_model, names)
    (tmp_path / "lib" / "4.jpg").unlink()  # gone files are left out
    base = ["--model", str(tiny_model.path), "--index", str(index_path)]
    result = CliRunner().invoke(app, ["search", "Tree", str(tmp_path / "lib"), *base, "--top", "10"])
    assert result.exit_code == 0, result.stderr
    hits = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(hits) == 4 and {h["label"] for h in hits} == {"tree"} and hits[0]["rank"] == 1
    assert "4.jpg" not in result.stdout
    result = CliRunner().invoke(app, ["search", "tree", str(tmp_path / "elsewhere"), *base])
    assert result.exit_code == 1 and "no images indexed" in result.stderr
    result = CliRunner().invoke(
        app, ["search", "tree", "--model", str(tiny_model.path), "--index", str(tmp_path / "none.db")]
    )
    assert result.exit_code == 2 and "Run `sdltag tag" in result.stderr


def test_top_k_and_its_hidden_old_spellings(tmp_path: Path, tiny_model) -> None:
    """-k/--top-k as in `sdltag tag`; --top and -n (the old spellings) still work and are hidden from --help."""
    index_path, _ = _index_with(tmp_path, tiny_model, [f"lib/{i}.jpg" for i in range(5)])
    base = ["search", "tree", "--model", str(tiny_model.path), "--index", str(index_path), "-f", "jsonl"]
    for option in (["--top-k", "2"], ["-k", "3"], ["--top", "2"], ["-n", "3"]):
        result = CliRunner().invoke(app, [*base, *option])
        assert result.exit_code == 0, result.stderr
        assert len(result.stdout.splitlines()) == int(option[1]), option
    assert len(CliRunner().invoke(app, base).stdout.splitlines()) == 5  # default 20: all of them
    help_text = CliRunner().invoke(app, ["search", "--help"]).stdout
    assert "--top-k" in help_text and "--top " not in help_text and "-n" not in help_text.split()


def test_format_is_a_choice_listed_in_help_and_checked_first(tmp_path: Path) -> None:
    """A bad --format is a usage error before anything is opened (here: a model folder that does not exist)."""
    for command in ("tag", "search"):
        help_text = CliRunner().invoke(app, [command, "--help"], terminal_width=200).stdout
        assert "table|csv|json|jsonl|paths|paths0|html" in help_text, command
    missing = str(tmp_path / "no-model")
    for args in (["tag", str(tmp_path), "-m", missing], ["search", "cat", "-m", missing]):
        result = CliRunner().invoke(app, [*args, "-f", "xml"])
        assert result.exit_code == 2 and "'xml' is not one of" in result.stderr, result.stderr
        assert "no-model" not in result.stderr
