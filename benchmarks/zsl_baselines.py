"""Image-blind reference rows for the emoji-scenes table: random scores and a label-frequency prior.

Both rows ignore the pixels, so any learned model must beat them to have learned
anything from the images:

- **random**: every (image, label) score drawn uniformly at random; mean +/- std over
  ``--seeds`` draws.
- **label-frequency prior**: every image gets the same scores, each label's frequency
  among the *test* scenes' labels (an oracle prior: it knows the test distribution,
  which no trained model is told). Its mAP equals the mean label prevalence; its F1@K
  shows what ranking the commonest labels first buys.

Metrics are ``sdltag.metrics.zsl_gzsl_metrics``, the code ``sdltag eval`` uses.

    python -m benchmarks.zsl_baselines --test /work/data/zsl-test \\
        --unseen benchmarks/unseen_labels.txt --out benchmarks/results/baselines-zsl-test.json
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from benchmarks.emoji_scenes import iter_labels_csv, read_label_file
from sdltag.metrics import zsl_gzsl_metrics

METRICS = ("map", "f1@3", "f1@5")


def load_targets(test_dir: Path, vocabulary: Sequence[str]) -> np.ndarray:
    """(N, L) 0/1 targets of a generated scenes folder, columns in ``vocabulary`` order."""
    column = {label: i for i, label in enumerate(vocabulary)}
    rows = list(iter_labels_csv(Path(test_dir) / "labels.csv"))
    targets = np.zeros((len(rows), len(vocabulary)), dtype=np.float32)
    for i, (_, labels) in enumerate(rows):
        for label in labels:
            if label in column:
                targets[i, column[label]] = 1.0
    return targets


def flatten(results: dict) -> dict[str, float]:
    """{"zsl map": ..., "gzsl f1@3": ...} from zsl_gzsl_metrics' output."""
    out = {}
    for protocol, metrics in results.items():
        out[f"{protocol} map"] = metrics.map
        for k in (3, 5):
            out[f"{protocol} f1@{k}"] = metrics.f1[k]
    return out


def baselines(targets: np.ndarray, unseen_mask: np.ndarray, seeds: int) -> dict[str, dict[str, list[float]]]:
    """Per row name, per metric, the list of values over seeds (one value for the prior)."""
    rows: dict[str, dict[str, list[float]]] = {"random": {}, "label-frequency prior (oracle)": {}}
    for seed in range(seeds):
        rng = np.random.default_rng(seed)
        scores = rng.random(targets.shape, dtype=np.float32)
        for key, value in flatten(zsl_gzsl_metrics(scores, targets, unseen_mask)).items():
            rows["random"].setdefault(key, []).append(value)
    prior = np.broadcast_to(targets.mean(axis=0, keepdims=True), targets.shape)
    for key, value in flatten(zsl_gzsl_metrics(prior, targets, unseen_mask)).items():
        rows["label-frequency prior (oracle)"][key] = [value]
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.zsl_baselines", description=__doc__.splitlines()[0])
    parser.add_argument("--test", type=Path, required=True, help="Generated test scenes folder (labels.csv).")
    parser.add_argument("--unseen", type=Path, required=True, help="Unseen labels file (benchmarks/unseen_labels.txt).")
    parser.add_argument("--vocab", type=Path, help="Vocabulary file (default: TEST/vocabulary.txt).")
    parser.add_argument("--seeds", type=int, default=5, help="Random draws for the random row (default 5).")
    parser.add_argument("--out", type=Path, help="JSON file to write the rows to.")
    args = parser.parse_args(argv)
    vocabulary = read_label_file(args.vocab or args.test / "vocabulary.txt")
    unseen = set(read_label_file(args.unseen))
    unseen_mask = np.array([label in unseen for label in vocabulary])
    targets = load_targets(args.test, vocabulary)
    rows = baselines(targets, unseen_mask, args.seeds)
    summary = {
        "test": str(args.test),
        "images": int(targets.shape[0]),
        "labels": len(vocabulary),
        "unseen": int(unseen_mask.sum()),
        "rows": {
            name: {k: {"mean": float(np.mean(v)), "std": float(np.std(v)), "n": len(v)} for k, v in metrics.items()}
            for name, metrics in rows.items()
        },
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(summary, indent=2) + "\n")
    keys = ["zsl map", "zsl f1@3", "zsl f1@5", "gzsl map", "gzsl f1@3", "gzsl f1@5"]
    print("| row | " + " | ".join(keys) + " |")
    print("| --- |" + " --- |" * len(keys))
    for name, metrics in summary["rows"].items():
        cells = [f"{metrics[k]['mean']:.2f} +/- {metrics[k]['std']:.2f}" if metrics[k]["n"] > 1 else
                 f"{metrics[k]['mean']:.2f}" for k in keys]  # fmt: skip
        print(f"| {name} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
