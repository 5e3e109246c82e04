"""Shared parts of the model recipes (``recipe_emoji.py``, ``recipe_emoji_zsl.py``).

A recipe generates the emoji-scenes splits it needs (skipped when already there),
then trains through ``sdltag.nn.train.train``, the library behind ``sdltag train``,
so the model folder gets the same calibration, model card and checkpoints. The
recipes call the library rather than the command for one reason: emoji scenes need
gentler augmentation than photos (no horizontal flip: ``left``, ``right`` and
``leftwards`` are labels, and digits and letters mirror; crops of at least 70% of the
area, so an emoji at the edge is rarely cut out while its label stays).

Runs write checkpoints to ``WORK/runs/NAME`` every epoch (``last.pt``, ``best.pt``);
rerunning the recipe with ``--resume`` continues an interrupted run exactly, and
``sdltag export WORK/runs/NAME/best.pt --out DIR`` turns the best epoch so far into a
usable (uncalibrated) model folder at any time.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.emoji_scenes import SceneConfig, generate, read_label_file

# Twemoji, Noto and CLDR attribution: required by the artwork licences for anything trained on them.
ATTRIBUTION = (
    "Trained on generated emoji scenes (benchmarks/emoji_scenes.py), not photographs. Artwork: Twemoji "
    "(CC BY 4.0, Twitter, Inc and other contributors) and Noto Emoji (Apache 2.0, Google), via "
    "emoji-datasource 16.0.0 (MIT); labels: Unicode CLDR keyword annotations via emojibase-data 17.0.0 (MIT)."
)

# Gentler than sdltag train's photo defaults; see the module docstring.
EMOJI_AUGMENT: dict[str, Any] = {
    "crop_scale": (0.7, 1.0),
    "crop_ratio": (3 / 4, 4 / 3),
    "flip": 0.0,
    "brightness": 0.3,
    "contrast": 0.3,
    "saturation": 0.3,
    "cutout": 0.25,
    "cutout_size": 0.3,
}


@dataclass(frozen=True)
class Split:
    """One generated scenes folder of the protocol (see benchmarks/README.md)."""

    name: str
    styles: tuple[str, ...]  # sub-folders of the emoji data folder
    count: int
    seed: int
    split: str  # "train" drops the unseen labels, "test" keeps them
    unseen: bool  # whether the benchmark's unseen list applies


UNSEEN_FILE = Path(__file__).with_name("unseen_labels.txt")


def ensure_split(data: Path, work: Path, split: Split, workers: int = 2) -> Path:
    """Generate ``WORK/data/NAME`` unless a complete folder with the same settings is there."""
    out = work / "data" / split.name
    summary_path = out / "generator.json"
    if summary_path.is_file() and (out / "labels.csv").is_file():
        done = json.loads(summary_path.read_text())
        if done.get("count") == split.count and done.get("seed") == split.seed and done.get("split") == split.split:
            log(f"{out}: already generated ({split.count} scenes, seed {split.seed})")
            return out
    unseen = read_label_file(UNSEEN_FILE) if split.unseen else []
    log(f"generating {out}: {split.count} scenes of {'+'.join(split.styles)}, seed {split.seed}, {split.split} split")
    summary = generate(
        [data / style for style in split.styles],
        data / "emoji.json",
        out,
        split.count,
        split.seed,
        SceneConfig(),
        unseen=unseen,
        split=split.split,
        workers=workers,
        force=True,
        options={"recipe_split": split.name},
    )
    log(f"  {summary['count']} scenes in {summary['seconds']} s, {summary['mean_labels_per_scene']} labels/scene")
    return out


def log(text: str) -> None:
    """A timestamped line on stdout, flushed (recipes run under nohup into a log file)."""
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


def make_reporter(every: int = 100):
    """A plain-text ``TrainReporter``: a line every ``every`` steps and one per epoch; sdltag's log lines too."""
    import logging

    from sdltag.nn.train import TrainReporter

    class LogLines(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            log(("warning: " if record.levelno >= logging.WARNING else "") + record.getMessage())

    sdltag_logger = logging.getLogger("sdltag")
    if not any(type(h).__name__ == "LogLines" for h in sdltag_logger.handlers):  # once per process
        sdltag_logger.addHandler(LogLines())
        sdltag_logger.setLevel(logging.INFO)

    class LogReporter(TrainReporter):
        def __init__(self) -> None:
            self.total = 0
            self.started = time.perf_counter()
            self.first_step = 0
            self.rates: list[float] = []

        def start(self, total_steps: int, done_steps: int, steps_per_epoch: int) -> None:
            self.total, self.first_step = total_steps, done_steps
            self.started = time.perf_counter()
            log(f"training: {total_steps} steps ({steps_per_epoch} per epoch), starting at step {done_steps}")

        def step(self, step: int, epoch: int, loss: float, lr: float, images_per_s: float) -> None:
            self.rates.append(images_per_s)
            if step % every == 0:
                elapsed = time.perf_counter() - self.started
                per_step = elapsed / max(step - self.first_step, 1)
                eta = (self.total - step) * per_step / 60
                rate = sorted(self.rates)[len(self.rates) // 2]
                self.rates.clear()
                log(f"step {step}/{self.total} epoch {epoch + 1} loss {loss:.4f} lr {lr:.2e} {rate:.0f} img/s "
                    f"eta {eta:.1f} min")  # fmt: skip

        def epoch_end(self, epoch: int, train_loss: float, metrics: dict[str, Any] | None, best: bool) -> None:
            parts = [f"epoch {epoch} done: train loss {train_loss:.4f}"]
            for protocol, values in (metrics or {}).items():
                parts.append(f"{protocol} mAP {values['map']:.2f} F1@3 {values['f1']['3']:.2f}")
            log(", ".join(parts) + (" (best)" if best else ""))

    return LogReporter()


def recipe_parser(description: str, default_out: str, default_epochs: int) -> argparse.ArgumentParser:
    """Options every recipe shares."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--data", type=Path, required=True, help="The emoji data folder (twitter/, google/, emoji.json)."
    )
    parser.add_argument("--work", type=Path, default=Path("work"), help="Folder for generated scenes and runs.")
    parser.add_argument("--out", type=Path, default=Path(default_out), help=f"Model folder (default {default_out}).")
    parser.add_argument("--epochs", type=int, default=default_epochs, help=f"Epochs (default {default_epochs}).")
    parser.add_argument("--seed", type=int, default=0, help="Training seed (default 0).")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2).")
    parser.add_argument("--workers", type=int, default=2, help="Processes for scene generation and decoding.")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="Continue an interrupted run (automatic when WORK/runs/NAME/last.pt exists).",
    )
    parser.add_argument("--data-only", action="store_true", help="Generate the scenes and stop.")
    parser.add_argument(
        "--device", choices=("auto", "cpu", "cuda"), default="auto", help="Training device (default auto)."
    )
    parser.add_argument(
        "--label-vectors",
        type=Path,
        default=None,
        help="Label vectors from benchmarks.label_vectors instead of the text model (machines without it).",
    )
    parser.add_argument("--eval-threads", type=int, default=None, help="Threads of the final `sdltag eval`.")
    return parser


def run_training(config: Any, run_dir: Path, args: argparse.Namespace) -> Any:
    """Train (or resume) and return the ``TrainResult``; Ctrl-C leaves a resumable checkpoint.

    A run folder holding ``last.pt`` is resumed with its saved settings (a finished run
    only re-exports its best epoch).
    """
    # Import everything the end of the run needs now, so that a long run never fails at
    # its export because the source tree changed underneath it.
    import sdltag.metrics  # noqa: F401
    import sdltag.nn.calibration  # noqa: F401
    import sdltag.nn.export  # noqa: F401
    from sdltag.errors import SdltagError
    from sdltag.nn.train import RuntimeOptions, TrainingInterrupted, train

    resume = args.resume or (run_dir / "last.pt").is_file()
    if resume:
        log(f"resuming the run in {run_dir} with its saved settings")

    embedder = None
    if getattr(args, "label_vectors", None):
        from benchmarks.label_vectors import PrecomputedEmbedder

        embedder = PrecomputedEmbedder(args.label_vectors)
        log(f"label vectors from {args.label_vectors} ({embedder.spec.id})")
    options = RuntimeOptions(
        device=getattr(args, "device", "auto"),
        workers=args.workers,
        threads=args.threads,
        run_dir=run_dir,
        resume=resume,
        channels_last=True,  # ~1.25x faster for smallcnn on this 2-core CPU
    )
    try:
        result = train(config, options, embedder=embedder, reporter=make_reporter())
    except TrainingInterrupted as stop:
        log(f"interrupted; resume with --resume (checkpoint {stop.checkpoint})")
        sys.exit(130)
    except SdltagError as exc:
        log(f"error: {exc}")
        sys.exit(2)
    log(f"wrote {result.model_folder.path} (best epoch {result.best_epoch})")
    return result
