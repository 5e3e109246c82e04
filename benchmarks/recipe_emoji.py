"""Recipe of the bundled default model ``models/emoji``, end to end on a CPU.

Every one of the 1,004 vocabulary labels is a training label (no unseen split), both
art styles, the default ``smallcnn`` backbone at width 24 (the exported folder stays
under 10 MB), M=7, lambda 0.1, 96 px, Adam with a one-cycle schedule. Validation
(model selection and calibration): 1,000 other scenes. Two stages, each a complete
`sdltag train` run with its own one-cycle schedule, because the work had to fit the
time a shared 2-core machine gave it: stage 1 trains from scratch on 16,000 scenes for
5 epochs, stage 2 continues from stage 1's best epoch (``--init``) on 60,000 scenes
(whose first 16,000 are stage 1's) for 4 epochs. Last, the 8-bit graph is attached
(``sdltag quantize --attach``, calibrated on 256 training scenes). RESULTS.md gives the time
and the validation figures of each stage::

    python -m benchmarks.recipe_emoji --data ../shared/datasets/emoji --work /work --out models/emoji

Scenes go to WORK/data/train-16k, WORK/data/all-train and WORK/data/val-1k, stage 1's model to
WORK/models/emoji-stage1, checkpoints to WORK/runs/<stage>; rerunning the command
skips finished stages and resumes an interrupted one.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from benchmarks._recipes import ATTRIBUTION, EMOJI_AUGMENT, Split, ensure_split, log, recipe_parser, run_training

TRAIN_16K = Split("train-16k", ("twitter", "google"), 16000, 1, "test", unseen=False)
TRAIN_60K = Split("all-train", ("twitter", "google"), 60000, 1, "test", unseen=False)  # scenes 0-15999 = train-16k
VAL = Split("val-1k", ("twitter", "google"), 1000, 2, "test", unseen=False)
WIDTH = 24


@dataclass(frozen=True)
class Stage:
    name: str
    data: Split
    epochs: int
    lr: float
    init_from_previous: bool


INT8_CALIBRATION = 256  # training scenes the 8-bit graph's activation ranges come from
STAGES = (Stage("emoji-stage1", TRAIN_16K, 5, 2e-3, False), Stage("emoji-stage2", TRAIN_60K, 4, 2e-3, True))


def main(argv: Sequence[str] | None = None) -> int:
    parser = recipe_parser("Train the default model models/emoji on emoji scenes.", "models/emoji", STAGES[0].epochs)
    parser.add_argument(
        "--final-epochs",
        type=int,
        default=STAGES[-1].epochs,
        help=f"Epochs of the last stage (default {STAGES[-1].epochs}; the GPU run of RESULTS.md used more).",
    )
    args = parser.parse_args(argv)
    train_dirs = {stage.name: ensure_split(args.data, args.work, stage.data, args.workers) for stage in STAGES}
    val_dir = ensure_split(args.data, args.work, VAL, args.workers)
    if args.data_only:
        return 0
    from sdltag.nn.train import TrainConfig

    previous: Path | None = None
    for number, stage in enumerate(STAGES, start=1):
        last = number == len(STAGES)
        out = args.out if last else args.work / "models" / stage.name
        epochs = args.final_epochs if last else stage.epochs
        run_dir = args.work / "runs" / (stage.name + ("" if epochs == stage.epochs else f"-e{epochs}"))
        if not last and (out / "manifest.json").is_file() and (run_dir / "best.pt").is_file():
            log(f"stage {number} ({stage.name}) already done: {out}")
            previous = out
            continue
        config = TrainConfig(
            data=str(train_dirs[stage.name]),
            out=str(out),
            val=str(val_dir),
            backbone="smallcnn",
            width=WIDTH,
            image_size=96,
            rows=7,
            lam=0.1,
            sigma=True,
            epochs=epochs,
            batch_size=64,
            lr=stage.lr,
            weight_decay=1e-4,
            optimizer="adam",
            seed=args.seed + number - 1,
            init=str(previous) if stage.init_from_previous and previous else None,
            augment=dict(EMOJI_AUGMENT),
            name="emoji",
            notes=ATTRIBUTION
            + " All 1,004 vocabulary labels (CLDR tags on >= 3 emoji) are seen labels."
            + (f" Stage {number} of benchmarks/recipe_emoji.py, continued from {previous}." if previous else ""),
        )
        log(f"recipe_emoji stage {number}: {config}")
        run_training(config, run_dir, args)
        previous = out
    # The 8-bit graph `sdltag tag` runs on CPUs with VNNI or Arm dot product (--precision auto),
    # calibrated on training scenes: `sdltag quantize models/emoji WORK/data/all-train --attach`.
    from sdltag.modelfolder import load_model_folder
    from sdltag.quantize import quantize_model_folder

    calibration = train_dirs[STAGES[-1].name]
    log(f"attaching the 8-bit graph, calibrated on {INT8_CALIBRATION} scenes of {calibration}")
    folder, fid = quantize_model_folder(
        load_model_folder(args.out), calibration, None, count=INT8_CALIBRATION, seed=0, warn=log
    )
    log(
        f"wrote {folder.with_precision('int8').onnx_path}: on {fid.images} held-out scenes, score correlation "
        f"{fid.score_correlation:.4f}, top-10 overlap {fid.top10_overlap:.3f} with the float graph"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
