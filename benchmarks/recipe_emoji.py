"""Recipe of the bundled default model ``models/emoji``, end to end on a CPU.

Every one of the 1,004 vocabulary labels is a training label (no unseen split), both
art styles, the default ``smallcnn`` backbone at width 24 (the exported folder stays
under 10 MB), M=7, 96 px. Validation (model selection and calibration): 1,000 other
scenes. The committed model was trained with the command below; see RESULTS.md for
its epochs, time and validation figures::

    python -m benchmarks.recipe_emoji --data ../shared/datasets/emoji --work /work --out models/emoji
    python -m benchmarks.recipe_emoji ... --resume      # after an interruption

Scenes go to WORK/data/train-16k and WORK/data/val-1k, checkpoints to WORK/runs/emoji.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from benchmarks._recipes import ATTRIBUTION, EMOJI_AUGMENT, Split, ensure_split, log, recipe_parser, run_training

TRAIN = Split("train-16k", ("twitter", "google"), 16000, 1, "test", unseen=False)
VAL = Split("val-1k", ("twitter", "google"), 1000, 2, "test", unseen=False)
WIDTH = 24
EPOCHS = 5


def main(argv: Sequence[str] | None = None) -> int:
    parser = recipe_parser("Train the default model models/emoji on emoji scenes.", "models/emoji", EPOCHS)
    args = parser.parse_args(argv)
    train_dir = ensure_split(args.data, args.work, TRAIN, args.workers)
    val_dir = ensure_split(args.data, args.work, VAL, args.workers)
    if args.data_only:
        return 0
    from sdltag.nn.train import TrainConfig

    config = TrainConfig(
        data=str(train_dir),
        out=str(args.out),
        val=str(val_dir),
        backbone="smallcnn",
        width=WIDTH,
        image_size=96,
        rows=7,
        lam=0.1,
        sigma=True,
        epochs=args.epochs,
        batch_size=64,
        lr=2e-3,
        weight_decay=1e-4,
        optimizer="adam",
        seed=args.seed,
        augment=dict(EMOJI_AUGMENT),
        name="emoji",
        notes=ATTRIBUTION + " All 1,004 vocabulary labels (CLDR tags on >= 3 emoji) are seen labels.",
    )
    log(f"recipe_emoji: {config}")
    run_training(config, args.work / "runs" / "emoji", args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
