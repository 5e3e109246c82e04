"""The command line: every command and option is documented; the bundled model is found."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from sdltag import __version__
from sdltag.cli import app

ROOT = Path(__file__).resolve().parents[1]


def _commands(group, prefix: str = ""):
    # typer vendors its own click: match groups and options by what they have, not by class
    for name, command in group.commands.items():
        yield f"{prefix}{name}", command
        if hasattr(command, "commands"):
            yield from _commands(command, f"{prefix}{name} ")


def test_every_command_and_option_has_help() -> None:
    root = typer.main.get_command(app)
    commands = list(_commands(root))
    assert "export" in dict(commands)
    for name, command in commands:
        assert (command.help or "").strip(), f"`sdltag {name}` has no help text"
        for param in command.params:
            if getattr(param, "param_type_name", "") == "option" and param.name != "help":
                assert (param.help or "").strip(), f"`sdltag {name}` option {param.opts} has no help text"


def test_help_and_version() -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0 and "export" in result.output
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and __version__ in result.output
    result = runner.invoke(app, ["export", "--help"])
    assert result.exit_code == 0 and "--out" in result.output


def test_bad_option_is_a_usage_error() -> None:
    result = CliRunner().invoke(app, ["export", "--no-such-option"])
    assert result.exit_code == 2


def _bundled_model_or_fail() -> Path:
    model = ROOT / "models" / "photo-lite0" / "manifest.json"
    assert model.is_file(), "the bundled default model models/photo-lite0 is missing"
    return model.parent


def test_default_model_is_found_from_the_source_tree(monkeypatch: pytest.MonkeyPatch) -> None:
    from sdltag.modelfolder import default_model_dir, load_model_folder

    monkeypatch.delenv("SDLTAG_MODEL", raising=False)
    expected = _bundled_model_or_fail()
    assert default_model_dir().resolve() == expected.resolve()
    load_model_folder(default_model_dir())


def test_default_model_is_found_from_a_built_wheel(tmp_path: Path) -> None:
    _bundled_model_or_fail()
    # Build from a copy so setuptools' build/ and egg-info never land in the working tree.
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    for name in ("sdltag", "models"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path),
            str(source),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("sdltag-*.whl")
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        for model in ("photo-lite0", "emoji"):  # the default and the emoji benchmark's model
            assert f"sdltag_models/{model}/model.onnx" in names and f"sdltag_models/{model}/manifest.json" in names
        assert "sdltag_models/emoji/model.int8.onnx" in names  # its 8-bit graph ships too
        archive.extractall(site)
    code = (
        "from sdltag.modelfolder import default_model_dir, load_model_folder; "
        "model = load_model_folder(default_model_dir()); model.verify_onnx(); "
        "print(model.path)"
    )
    env = {k: v for k, v in os.environ.items() if k != "SDLTAG_MODEL"}
    env["PYTHONPATH"] = str(site)
    # -I would drop PYTHONPATH; run from the wheel's folder so the source tree is not importable
    out = subprocess.run([sys.executable, "-c", code], cwd=site, env=env, capture_output=True, text=True, check=True)
    assert Path(out.stdout.strip()).resolve().is_relative_to(site.resolve()), out.stdout
    assert Path(out.stdout.strip()).name == "photo-lite0"
