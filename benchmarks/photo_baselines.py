"""Training-free keyword scorers on real photos, with the photo model's backbone: the references it must beat.

On a folder of photos with ``labels.csv`` (``photos-dev``), every photo ranked over all the keywords,
label mAP / hit@1 / hit@5 as in ``photo_eval.py`` (``benchmarks.recipe_photo.photo_metrics``):

- ``conse``: the probability-weighted text vectors of the ImageNet classifier's top-10 classes (ConSE);
- ``ridge``: the closed-form ridge map ``(T'T + 10 I)^-1 T'C`` of the classifier weights C into the text
  space (T: class-name vectors), no images;
- ``conse+ridge``: the two unit vectors averaged;
- ``init``: the photo recipe's initialisation (the ridge map with hypernym-aware class vectors, r = 1).

::

    python -m benchmarks.photo_baselines --photos ../shared/datasets/photos-dev --work WORK \
        --out benchmarks/results/photo-baselines.json
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from benchmarks.photo_vocabulary import read_vocabulary
from benchmarks.recipe_photo import (
    BACKBONE,
    _features,
    class_to_label_matrix,
    hypernym_text,
    photo_metrics,
    read_photo_labels,
    ridge_map,
)


def conse_vectors(logits: np.ndarray, class_vectors: np.ndarray, top: int = 10) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=1, keepdims=True)
    out = np.zeros((len(p), class_vectors.shape[1]), dtype=np.float32)
    for i, row in enumerate(p):
        best = np.argsort(-row)[:top]
        out[i] = row[best] @ class_vectors[best]
    return out / np.linalg.norm(out, axis=1, keepdims=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=Path, required=True)
    parser.add_argument("--work", type=Path, default=Path("work-photo"))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    from sdltag.embedding import get_text_embedder
    from sdltag.nn.backbones import efficientnet_lite as lite

    truth = read_photo_labels(args.photos)
    files = sorted(truth)
    keywords = sorted(set().union(*truth.values()))
    embedder = get_text_embedder()
    keyword_vectors = np.asarray(embedder.embed(keywords), dtype=np.float32)
    net = lite.efficientnet_lite(BACKBONE, pretrained=True).eval()
    features = _features([args.photos / f for f in files], args.work, lite.input_spec(BACKBONE), net, "photos")
    classifier = net._fc.weight.detach().numpy()
    logits = features @ classifier.T + net._fc.bias.detach().numpy()
    class_vectors = np.asarray(embedder.embed(lite.imagenet_class_names()), dtype=np.float32)
    vocabulary = read_vocabulary()
    label_vectors = np.asarray(embedder.embed([row[0] for row in vocabulary]), dtype=np.float32)
    hyper = hypernym_text(class_vectors, label_vectors, class_to_label_matrix(vocabulary), 0.5)

    conse = conse_vectors(logits, class_vectors)
    ridge = features @ ridge_map(class_vectors, classifier, 10.0).T
    ridge_unit = ridge / np.linalg.norm(ridge, axis=1, keepdims=True)
    init = features @ ridge_map(hyper, classifier, 1.0).T
    rng = np.random.default_rng(0)
    random_runs = [photo_metrics(files, rng.random((len(files), len(keywords))), keywords, truth) for _ in range(200)]
    results = {
        "photos": len(files),
        "keywords": len(keywords),
        "conse": photo_metrics(files, conse @ keyword_vectors.T, keywords, truth),
        "ridge": photo_metrics(files, ridge @ keyword_vectors.T, keywords, truth),
        "conse+ridge": photo_metrics(files, (conse + ridge_unit) @ keyword_vectors.T, keywords, truth),
        "init": photo_metrics(files, init @ keyword_vectors.T, keywords, truth),
        "random": {k: round(float(np.mean([r[k] for r in random_runs])), 1) for k in ("map", "hit1", "hit5")},
    }
    text = json.dumps(results, indent=1)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n", encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
