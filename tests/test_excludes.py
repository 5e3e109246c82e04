"""`--exclude GLOB` for `tag`, `train` and `eval`: what a pattern matches, through the real commands."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from sdltag.cli import app
from sdltag.errors import SdltagError
from sdltag.excludes import Excluder
from sdltag.images import discover

sys.path.insert(0, str(Path(__file__).parent))
from test_eval import colour_data, colour_model  # noqa: E402
from test_train import make_scenes, tiny_config  # noqa: E402


def _image(path: Path, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (24, 32, 3), dtype=np.uint8)).save(path)
    return path


@pytest.mark.parametrize(
    ("patterns", "path", "root", "excluded"),
    [
        (["*/exports/*"], "/lib/2024/exports/a.jpg", "/lib", True),
        (["*/exports/*"], "/lib/exports/a.jpg", "/lib", True),  # at the top too
        (["*/exports/*"], "/lib/exportsx/a.jpg", "/lib", False),
        (["*/exports/*"], "/exports/lib/a.jpg", "/exports/lib", False),  # the input folder's own path is not matched
        (["/exports/*"], "/lib/exports/a.jpg", "/lib", True),  # a leading / anchors at the input folder
        (["/exports/*"], "/lib/2024/exports/a.jpg", "/lib", False),
        (["*.thumb.jpg"], "/lib/2024/IMG_1.thumb.JPG", "/lib", True),  # the name, case-insensitively
        (["*.thumb.jpg"], "/lib/2024/IMG_1.jpg", "/lib", False),
        (["IMG_1.jpg"], "/lib/2024/IMG_1.jpg", "/lib", True),
        (["2024/*"], "/lib/2024/x/IMG_1.jpg", "/lib", True),  # * also matches /
        (["*.png", "*/raw/*"], "/lib/raw/a.jpg", "/lib", True),
        (["*.thumb.jpg"], "shots/a.thumb.jpg", None, True),  # named on the command line: its name
        (["shots/*"], "shots/a.jpg", None, True),  # ... and the path as given
    ],
)
def test_what_a_pattern_matches(patterns: list[str], path: str, root: str | None, excluded: bool) -> None:
    assert Excluder(patterns).excluded(path, root) is excluded


def test_an_empty_pattern_is_refused() -> None:
    with pytest.raises(SdltagError, match=r"--exclude '': the pattern is empty"):
        Excluder(["*.jpg", " "])


def test_excluded_jpeg_lets_its_raw_twin_through(tmp_path: Path) -> None:
    """Exclusion comes before the RAW/JPEG pairing: excluding the JPEGs leaves the RAW files to tag."""
    _image(tmp_path / "a.jpg")
    (tmp_path / "a.dng").write_bytes(b"raw")
    plain = discover([tmp_path])
    assert plain.files == [tmp_path / "a.jpg"] and plain.skipped_raw == [tmp_path / "a.dng"]
    found = discover([tmp_path], exclude=["*.jpg"])
    assert found.files == [tmp_path / "a.dng"] and found.skipped_raw == [] and found.excluded == 1


def test_tag_exclude(tmp_path: Path, tiny_model) -> None:
    lib = tmp_path / "lib"
    keep = [_image(lib / "a.jpg", 1), _image(lib / "2024" / "e.jpg", 2)]
    _image(lib / "exports" / "b.jpg", 3)
    _image(lib / "2024" / "exports" / "c.jpg", 4)
    _image(lib / "2024" / "d.thumb.JPG", 5)
    single = _image(tmp_path / "single.thumb.jpg", 6)
    args = ["tag", str(lib), str(single), "--model", str(tiny_model.path), "--index", str(tmp_path / "i.db")]
    args += ["--exclude", "*/exports/*", "--exclude", "*.thumb.jpg", "-f", "paths"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.stderr
    assert result.stdout.splitlines() == [str(keep[0]), str(keep[1])]  # a folder's files, then its sub-folders
    assert "2 tagged" in result.stderr and "4 skipped (4 excluded by --exclude)" in result.stderr
    nothing = CliRunner().invoke(
        app, ["tag", str(lib / "exports"), "--no-index", "--exclude", "*", "--model", str(tiny_model.path)]
    )
    assert nothing.exit_code == 0 and "no images found" not in nothing.stderr and "1 excluded" in nothing.stderr
    bad = CliRunner().invoke(app, ["tag", str(lib), "--no-index", "--exclude", "", "--model", str(tiny_model.path)])
    assert bad.exit_code == 2 and "--exclude '': the pattern is empty" in bad.stderr


def test_eval_exclude(tmp_path: Path) -> None:
    colour_model(tmp_path / "model")
    colour_data(tmp_path / "data")
    base = ["eval", str(tmp_path / "model"), str(tmp_path / "data"), "--format", "json", "-q"]
    result = CliRunner().invoke(app, [*base, "--exclude", "broken.png", "--exclude", "GREY.*"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["images"] == {"listed": 5, "failed": 0, "evaluated": 5}
    assert "broken.png" not in result.stderr


def test_train_exclude(tmp_path: Path) -> None:
    from sdltag.nn.train import prepare_data

    data = make_scenes(tmp_path / "data", 12)
    config = tiny_config(data, tmp_path / "m", exclude=["img00[0-3].png"], val_split=0.0)
    prepared = prepare_data(config)
    names = sorted(item.path.name for item in prepared.train_items)
    assert names == [f"img{i:03d}.png" for i in range(4, 12)]
    assert config.to_dict()["exclude"] == ["img00[0-3].png"]  # recorded in the checkpoint's settings
    refused = CliRunner().invoke(
        app, ["train", str(data), "--out", str(tmp_path / "m"), "--exclude", "*.png", "--workers", "0"]
    )
    assert refused.exit_code == 2 and "no labelled image found" in refused.stderr
