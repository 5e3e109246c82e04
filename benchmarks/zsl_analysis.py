"""Why SDL's zero-shot gain is small here: the evidence behind RESULTS.md.

For each model folder (same test scenes, decoded once, as ``sdltag eval`` decodes them):

- **row diversity** of the principal-vector matrix: the mean cosine between two different
  rows of one image's matrix (1 = the M rows collapsed into one direction, i.e. M=1 in
  disguise), and how the rows share the work: for every (image, positive label) pair, the
  row that gives the label its score, as a histogram and its normalised entropy (0 = one
  row scores everything, 1 = all rows equally);
- **per-label zero-shot AP** on the unseen labels (on the scenes with an unseen label, as
  ZSL does), against each label's prevalence (the AP of a random ranking): how many
  unseen labels get any signal at all (AP >= 2x prevalence), and the best and worst.

    python -m benchmarks.zsl_analysis --test WORK/data/zsl-test \\
        --model sdl=models/emoji-zsl --model m1=WORK/models/zsl-m1-s0 --out benchmarks/results/zsl-analysis.json
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np


def _row_diversity(vectors: np.ndarray, targets: np.ndarray, label_vectors: np.ndarray) -> dict:
    """(N, M, d) principal vectors, (N, L) 0/1 targets over the model's labels, (L, d) label vectors."""
    n, rows, _ = vectors.shape
    if rows == 1:
        return {"rows": 1, "mean_row_cosine": None, "row_usage": [1.0], "row_usage_entropy": None}
    unit = vectors / np.maximum(np.linalg.norm(vectors, axis=2, keepdims=True), 1e-12)
    gram = np.einsum("nmd,nkd->nmk", unit, unit)  # (N, M, M)
    off = ~np.eye(rows, dtype=bool)
    mean_cos = float(gram[:, off].mean())
    usage = np.zeros(rows)
    for i in range(n):
        positives = np.flatnonzero(targets[i])
        if positives.size:
            best_row = (vectors[i] @ label_vectors[positives].T).argmax(axis=0)  # (P,)
            usage += np.bincount(best_row, minlength=rows)
    share = usage / max(usage.sum(), 1)
    nonzero = share[share > 0]
    entropy = float(-(nonzero * np.log(nonzero)).sum() / np.log(rows))
    return {
        "rows": rows,
        "mean_row_cosine": round(mean_cos, 4),
        "row_usage": [round(float(s), 4) for s in share],
        "row_usage_entropy": round(entropy, 4),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Row diversity and per-label zero-shot AP of SDL model folders.")
    parser.add_argument("--test", type=Path, required=True, help="Test scenes folder (labels.csv).")
    parser.add_argument("--model", action="append", required=True, help="NAME=MODEL_DIR (repeatable).")
    parser.add_argument("--images", type=int, default=0, help="Use only the first N scenes (default: all).")
    parser.add_argument("--threads", type=int, default=2, help="Decode threads.")
    parser.add_argument("--out", type=Path, help="JSON file to write.")
    args = parser.parse_args(argv)

    from sdltag.datasets import read_labeled_dir
    from sdltag.evaluation import _decode_all
    from sdltag.metrics import average_precision
    from sdltag.modelfolder import load_model_folder
    from sdltag.runtime import ImageModel
    from sdltag.scoring import sdl_scores

    models = {}
    for spec in args.model:
        name, _, folder = spec.partition("=")
        models[name] = load_model_folder(Path(folder))
    dataset = read_labeled_dir(args.test)
    items = dataset.items[: args.images] if args.images else dataset.items
    first = next(iter(models.values()))
    if any(m.manifest.input != first.manifest.input for m in models.values()):
        raise SystemExit("the models decode images differently; analyse them separately")
    ok, images = _decode_all([item.path for item in items], first, args.threads)
    items = [item for item, good in zip(items, ok, strict=True) if good]
    report: dict = {"test": str(args.test), "images": len(items), "models": {}}
    for name, model in models.items():
        runner = ImageModel(model, device="cpu")
        vectors = np.concatenate([runner.run(images[i : i + 64]) for i in range(0, len(images), 64)])
        labels = model.all_labels
        index = {label: j for j, label in enumerate(labels)}
        targets = np.zeros((len(items), len(labels)), dtype=np.int8)
        for i, item in enumerate(items):
            for label in item.labels:
                if label in index:
                    targets[i, index[label]] = 1
        unseen = np.array([False] * len(model.manifest.seen_labels) + [True] * len(model.manifest.unseen_labels))
        scores = sdl_scores(vectors, model.label_vectors)[:, unseen]
        zsl_targets = targets[:, unseen]
        keep = zsl_targets.any(axis=1)
        scores, zsl_targets = scores[keep], zsl_targets[keep]
        per_label = []
        for j, label in enumerate(np.array(labels)[unseen]):
            positives = zsl_targets[:, j].astype(bool)
            if positives.any():
                ap = 100 * average_precision(scores[:, j], positives)
                prevalence = 100 * positives.mean()
                per_label.append({"label": str(label), "ap": round(ap, 2), "prevalence": round(prevalence, 2)})
        aps = np.array([p["ap"] for p in per_label])
        lifts = np.array([p["ap"] / p["prevalence"] for p in per_label])
        ranked = sorted(per_label, key=lambda p: -p["ap"] / p["prevalence"])
        report["models"][name] = {
            "model": str(model.path),
            "row_diversity": _row_diversity(vectors, targets, model.label_vectors),
            "zsl": {
                "labels": len(per_label),
                "map": round(float(aps.mean()), 2),
                "mean_prevalence": round(float(np.mean([p["prevalence"] for p in per_label])), 2),
                "labels_with_signal": int((lifts >= 2).sum()),
                "map_of_labels_with_signal": round(float(aps[lifts >= 2].mean()), 2) if (lifts >= 2).any() else None,
                "best": ranked[:8],
                "worst": ranked[-8:],
            },
            "per_label": per_label,
        }
    text = json.dumps(report, indent=2)
    if args.out:
        args.out.write_text(text + "\n", encoding="utf-8")
    summary = {
        name: {
            "row_diversity": m["row_diversity"],
            **{
                k: v
                for k, v in m["zsl"].items()
                if k in ("map", "labels_with_signal", "map_of_labels_with_signal", "mean_prevalence")
            },
        }
        for name, m in report["models"].items()
    }
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
