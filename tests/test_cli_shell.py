"""Shell completion, `-h` and usage lines, through the installed `sdltag` command."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

# The console script, so the program name in the scripts is `sdltag` (as a user runs it).
SDLTAG = [str(Path(sys.executable).with_name("sdltag"))]


def run(args: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(SDLTAG + args, capture_output=True, text=True, env={**os.environ, **env}, timeout=60)


@pytest.mark.parametrize(
    ("shell", "marker"),
    [("bash", "complete -o default -F"), ("zsh", "#compdef sdltag"), ("fish", "complete --command sdltag")],
)
def test_completion_script_for_each_shell(shell: str, marker: str) -> None:
    # Typer detects the running shell unless told not to; the variable makes the option take a name.
    result = run(["--show-completion", shell], _TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION="1")
    assert result.returncode == 0, result.stderr
    assert marker in result.stdout
    assert "_SDLTAG_COMPLETE" in result.stdout


def complete(words: str, cword: int, cwd: Path | None = None) -> list[str]:
    env = {**os.environ, "_SDLTAG_COMPLETE": "complete_bash", "COMP_WORDS": words, "COMP_CWORD": str(cword)}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    out = subprocess.run(
        [sys.executable, "-c", "import sys; sys.argv[0] = 'sdltag'; from sdltag.cli import main; main()"],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


def test_completes_command_names() -> None:
    assert complete("sdltag sea", 1) == ["search"]


def test_model_option_completes_model_folders_first(tmp_path: Path) -> None:
    (tmp_path / "mymodel").mkdir()
    (tmp_path / "mymodel" / "manifest.json").write_text("{}")
    (tmp_path / "myphotos").mkdir()
    (tmp_path / "mynotes.txt").write_text("")
    assert complete("sdltag tag --model my", 3, cwd=tmp_path) == ["mymodel", "myphotos/"]


def test_dash_h_is_help_on_every_level() -> None:
    for args in (["-h"], ["tag", "-h"], ["search", "-h"], ["labels", "list", "-h"]):
        result = run(args)
        assert result.returncode == 0, (args, result.stderr)
        assert result.stdout.startswith("Usage: "), args


def test_usage_lines_name_arguments_plainly() -> None:
    usage = run(["tag", "-h"]).stdout.splitlines()[0]
    assert usage.endswith("tag [OPTIONS] PATHS...")
    assert "{" not in run(["search", "-h"]).stdout.splitlines()[0]
    assert run(["search", "-h"]).stdout.splitlines()[0].endswith("[QUERY] [PATHS...]")  # no QUERY with --like
