"""Recipe of the benchmark model ``models/emoji-zsl`` and of every learned row of RESULTS.md.

The main (in-domain) protocol of benchmarks/README.md: train on ``all-train`` (60,000 scenes) with the
100 labels of ``unseen_labels.txt`` held out (``--unseen``), select the epoch and fit
the calibration on ``val-1k``, then test on ``zsl-test`` with ``sdltag eval``, whose
JSON goes to ``benchmarks/results/`` (or ``--results DIR``). ``--variant`` picks a row of the table, all with
the same backbone (``smallcnn`` width 24, 96 px), data, epochs and optimiser:

- ``sdl``: M=7, sigma weighting, regulariser lambda (``--lam``, default 0.1)
- ``nosigma``: M=7 without the (1 + sigma) weight
- ``m1``: a single principal vector (M=1, the Fast0Tag-style baseline; the
  regulariser is 0 with one row)

::

    python -m benchmarks.recipe_emoji_zsl --data ../shared/datasets/emoji --work /work \\
        --out models/emoji-zsl                                   # the committed model (sdl, seed 0)
    python -m benchmarks.recipe_emoji_zsl ... --variant m1 --seed 1 --out WORK/models/zsl-m1-s1
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from benchmarks._recipes import (
    ATTRIBUTION,
    EMOJI_AUGMENT,
    UNSEEN_FILE,
    Split,
    ensure_split,
    log,
    recipe_parser,
    run_training,
)
from sdltag.paths import atomic_write

TRAIN = Split("all-train", ("twitter", "google"), 60000, 1, "test", unseen=False)
VAL = Split("val-1k", ("twitter", "google"), 1000, 2, "test", unseen=False)
TEST = Split("zsl-test", ("twitter", "google"), 5000, 3, "test", unseen=False)
# The cross-style protocol: train and validate on Twemoji only, test on Noto only.
XS_TRAIN = Split("xs-train", ("twitter",), 60000, 11, "test", unseen=False)
XS_VAL = Split("xs-val", ("twitter",), 1000, 12, "test", unseen=False)
XS_TEST = Split("xs-test", ("google",), 5000, 13, "test", unseen=False)
PROTOCOLS = {"main": (TRAIN, VAL, TEST), "xs": (XS_TRAIN, XS_VAL, XS_TEST)}
WIDTH = 24
EPOCHS = 3
VARIANTS = {"sdl": (7, True), "nosigma": (7, False), "m1": (1, True)}
RESULTS = Path(__file__).with_name("results")


def main(argv: Sequence[str] | None = None) -> int:
    parser = recipe_parser(
        "Train an emoji-scenes ZSL model (seen labels only) and test it.", "models/emoji-zsl", EPOCHS
    )
    parser.add_argument("--variant", choices=sorted(VARIANTS), default="sdl", help="Row of the table (default sdl).")
    parser.add_argument("--lam", type=float, default=0.1, help="Regulariser weight lambda (default 0.1).")
    parser.add_argument(
        "--protocol", choices=sorted(PROTOCOLS), default="main", help="main (in-domain, default) or xs (cross-style)."
    )
    parser.add_argument("--skip-train", action="store_true", help="Only evaluate the model folder --out on the test.")
    parser.add_argument(
        "--results", type=Path, default=RESULTS, help="Folder of the result JSON (default benchmarks/results)."
    )
    args = parser.parse_args(argv)
    train_split, val_split, test_split = PROTOCOLS[args.protocol]
    train_dir = ensure_split(args.data, args.work, train_split, args.workers)
    val_dir = ensure_split(args.data, args.work, val_split, args.workers)
    test_dir = ensure_split(args.data, args.work, test_split, args.workers)
    if args.data_only:
        return 0
    rows, sigma = VARIANTS[args.variant]
    # The name of the run and of its results file: the 3-epoch main protocol keeps its
    # original name; another budget or protocol says so.
    prefix = "zsl" if args.protocol == "main" else "xs"
    budget = "" if args.epochs == EPOCHS else f"-e{args.epochs}"
    tag = f"{prefix}-{args.variant}-lam{args.lam:g}{budget}-s{args.seed}"
    validation = None
    if not args.skip_train:
        from sdltag.nn.train import TrainConfig

        config = TrainConfig(
            data=str(train_dir),
            out=str(args.out),
            val=str(val_dir),
            unseen=str(UNSEEN_FILE),
            backbone="smallcnn",
            width=WIDTH,
            image_size=96,
            rows=rows,
            lam=args.lam,
            sigma=sigma,
            epochs=args.epochs,
            batch_size=64,
            lr=2e-3,
            weight_decay=1e-4,
            optimizer="adam",
            seed=args.seed,
            augment=dict(EMOJI_AUGMENT),
            name="emoji-zsl" if args.out.name == "emoji-zsl" else tag,
            notes=ATTRIBUTION + " The emoji-scenes zero-shot benchmark (benchmarks/README.md): the 100 labels of "
            "benchmarks/unseen_labels.txt were held out of training.",
        )
        log(f"recipe_emoji_zsl ({tag}): {config}")
        trained = run_training(config, args.work / "runs" / tag, args)
        validation = {"best_epoch": trained.best_epoch, "metrics": trained.metrics, "history": trained.history}
    log(f"evaluating {args.out} on {test_dir}")
    script = Path(sys.executable).with_name("sdltag")  # the installed command; else the module
    sdltag = [str(script)] if script.is_file() else [sys.executable, "-m", "sdltag"]
    command = [*sdltag, "eval", str(args.out), str(test_dir), "--format", "json"]
    if args.eval_threads:
        command += ["--threads", str(args.eval_threads)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        log(f"sdltag eval failed ({result.returncode}): {result.stderr.strip()}")
        return result.returncode
    metrics = json.loads(result.stdout)
    args.results.mkdir(parents=True, exist_ok=True)
    record = {
        "row": tag,
        "variant": args.variant,
        "seed": args.seed,
        "lam": args.lam,
        "epochs": args.epochs,
        "protocol": args.protocol,
        "model": str(args.out),
        "test": str(test_dir),
        "command": " ".join(command),
        "metrics": metrics,
        "validation": validation,  # val-1k (or xs-val) figures of the run; None with --skip-train
    }
    out_file = args.results / f"{tag}.json"
    with atomic_write(out_file) as handle:
        handle.write(json.dumps(record, indent=2) + "\n")
    log(f"wrote {out_file}")
    print(result.stdout, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
