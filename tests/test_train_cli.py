"""`sdltag train` and `sdltag eval` end to end with the real MiniLM text model, plus Ctrl-C and --resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from typer.testing import CliRunner

from sdltag.cli import app
from sdltag.modelfolder import load_model_folder

sys.path.insert(0, str(Path(__file__).parent))
from test_train import make_scenes  # noqa: E402

TINY = ["--width", "8", "--image-size", "16", "--rows", "3", "--batch-size", "8", "--workers", "0", "--threads", "1"]


def test_train_then_eval_with_minilm(tmp_path: Path) -> None:
    data = make_scenes(tmp_path / "data", 24)
    (tmp_path / "unseen.txt").write_text("yellow\n", encoding="utf-8")
    runner = CliRunner()
    result = runner.invoke(
        app,
        [
            "train",
            str(data),
            "--out",
            str(tmp_path / "model"),
            "--epochs",
            "2",
            "--unseen",
            str(tmp_path / "unseen.txt"),
            "--notes",
            "generated squares",
            "--no-flip",
            *TINY,
        ],
    )
    assert result.exit_code == 0, result.output
    assert "wrote" in result.stderr and "GZSL F1@3" in result.stderr and "epoch 2:" in result.stderr
    folder = load_model_folder(tmp_path / "model")
    manifest = folder.manifest
    assert manifest.embedder.name.lower().endswith("minilm-l6-v2") and manifest.dim == 384
    assert manifest.unseen_labels == ["yellow"]
    assert manifest.model_card["notes"] == "generated squares"
    assert manifest.model_card["settings"]["augment"]["flip"] == 0.0  # --no-flip
    assert (tmp_path / "model.train" / "best.pt").is_file()

    # A further zero-shot label, embedded with the model's own embedder.
    (tmp_path / "extra.txt").write_text("purple\n", encoding="utf-8")
    with open(data / "labels.csv", "a", encoding="utf-8") as handle:
        handle.write("img000.png,purple\n")
    result = runner.invoke(
        app,
        ["eval", str(tmp_path / "model"), str(data), "--unseen", str(tmp_path / "extra.txt"), "--format", "json", "-q"],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["labels"]["seen"] == 3 and report["labels"]["unseen"] == 2
    assert report["zsl"]["labels"] == 2
    assert 0 <= report["gzsl"]["map"] <= 100


def test_train_help_and_refusals(tmp_path: Path) -> None:
    runner = CliRunner()
    help_text = runner.invoke(app, ["train", "--help"]).stdout
    for option in ("--val-split", "--unseen", "--init", "--resume", "--rows", "--lambda", "--no-sigma", "--layout"):
        assert option in help_text
    assert "--format" not in help_text  # the old spelling of --layout still works, unlisted
    assert "--empty-labels" in runner.invoke(app, ["eval", "--help"]).stdout
    data = make_scenes(tmp_path / "data", 8)
    bad = runner.invoke(app, ["train", str(data), "--out", str(tmp_path / "m"), "--epochs", "0", *TINY])
    assert bad.exit_code == 2 and "--epochs 0" in bad.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    refused = runner.invoke(app, ["train", str(empty), "--out", str(tmp_path / "m"), *TINY])
    assert refused.exit_code == 2 and "empty" in refused.stderr
    for spelling in ("--layout", "--format"):  # --format: the old name, merged into --layout
        wrong = runner.invoke(app, ["train", str(data), "--out", str(tmp_path / "m"), spelling, "sidecars", *TINY])
        assert wrong.exit_code == 2 and "--layout sidecars: choose auto, manifest, sidecar" in wrong.stderr
    assert not (tmp_path / "m").exists() and not (tmp_path / "m.train").exists()


def test_ctrl_c_saves_a_resumable_checkpoint(tmp_path: Path) -> None:
    data = make_scenes(tmp_path / "data", 64)
    command = [
        sys.executable,
        "-m",
        "sdltag",
        "train",
        str(data),
        "--out",
        str(tmp_path / "model"),
        *TINY,
        "--epochs",
        "200",
        "--val-split",
        "0.1",
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=env)
    assert process.stderr is not None
    deadline = time.monotonic() + 120
    for line in process.stderr:  # wait until the first epoch is done
        if line.startswith("sdltag: epoch 1:") or time.monotonic() > deadline:
            break
    process.send_signal(signal.SIGINT)
    rest = process.communicate(timeout=120)[1]
    assert process.returncode == 130, rest
    assert "--resume" in rest
    last = tmp_path / "model.train" / "last.pt"
    assert last.is_file()
    assert not (tmp_path / "model").exists()
    from sdltag.nn.checkpoint import load_checkpoint

    state = load_checkpoint(last)
    assert state["step"] >= 7 and "optimizer" in state and "rng" in state


def test_progress_lines_in_a_log_file(monkeypatch, capsys) -> None:
    import sdltag.commands.train as command

    monkeypatch.setattr(command, "LOG_EVERY_S", 0.0)
    reporter = command.TrainDisplay()
    reporter.start(total_steps=10, done_steps=4, steps_per_epoch=5)  # resumed at step 4; stderr is not a terminal
    reporter.step(5, 0, 2.5, 1e-3, 120.0)
    reporter.epoch_end(1, 2.5, {"gzsl": {"f1": {"3": 12.5}, "map": 7.25}}, True)
    reporter.finish()
    err = capsys.readouterr().err
    assert "step 5/10 (epoch 1)  loss 2.5000  lr 1.00e-03  120 img/s  ETA" in err
    assert "epoch 1: train loss 2.5000  GZSL F1@3 12.50 mAP 7.25  (best so far)" in err
