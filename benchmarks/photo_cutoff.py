"""Precision of the keywords a sidecar would get, by confidence cut-off, on photos-dev (hand-judged).

``RIGHT`` lists, for each photos-dev photo, the words a photographer would keep for it: its own keywords plus
obvious synonyms and broader words (``mammal`` for the baboon, ``electronic equipment`` for the circuit board).
Fine-grained names that could not be checked (``granny smith apple``, ``monarch butterfly``) count as wrong.
Input: ``sdltag tag PHOTOS --model M -k 8 --format jsonl --no-index`` output (the model's own labels,
calibrated confidences)::

    sdltag tag ../shared/datasets/photos-dev --model models/photo-lite0 -k 8 --format jsonl --no-index > tags.jsonl
    python -m benchmarks.photo_cutoff tags.jsonl --max-per-photo 3
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

CUTOFFS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5)
RIGHT = {
    "aero1.jpg": "landscape;aerial view;city;river;buildings;building;roof",
    "aero3.jpg": "landscape;aerial view;city;road;forest",
    "aloeL.jpg": "plant;aloe;plant pot;flowerpot;pot",
    "apple.jpg": "apple;fruit;food",
    "baboon.jpg": "monkey;primate;baboon;mandrill;animal;mammal",
    "basketball1.jpg": "ball;basketball;person;man;sports equipment",
    "board.jpg": "circuit board;electronics;electronic equipment",
    "box_in_scene.jpg": "box;books;book;cardboard box;packaging",
    "building.jpg": "building;architecture;hotel",
    "butterfly.jpg": "butterfly;insect;animal;leaf",
    "chicky_512.jpg": "dog;pet;animal;mammal",
    "ela_original.jpg": "notebook;book",
    "fruits.jpg": "fruit;orange;lime;lemon;kiwi;food",
    "graf1.jpg": "graffiti;wall",
    "home.jpg": "building;palace;sky;birds",
    "left01.jpg": "chessboard;person;computer;desktop computer;desk",
    "leuvenA.jpg": "street;house;brick;building;roof",
    "licenseplate_motion.jpg": "car;vehicle",
    "messi5.jpg": "soccer;football player;ball;stadium;soccer ball;sports equipment",
    "orange.jpg": "orange;fruit;food",
    "rubberwhale1.jpg": "toys;toy",
    "squirrel_cls.jpg": "squirrel;animal;tree;rodent;mammal",
    "stuff.jpg": "pencil;lighter;table",
}


def precision_table(tags: list[dict], max_per_photo: int) -> list[dict]:
    right = {name: set(words.split(";")) for name, words in RIGHT.items()}
    rows = []
    for record in tags:
        name = Path(record["path"]).name
        for tag in record["tags"][:max_per_photo]:
            rows.append((name, tag["label"], tag["score"], tag["label"] in right.get(name, set())))
    table = []
    for cutoff in CUTOFFS:
        written = [r for r in rows if r[2] >= cutoff]
        correct = sum(r[3] for r in written)
        table.append(
            {
                "cutoff": cutoff,
                "written": len(written),
                "right": correct,
                "precision": round(100 * correct / len(written)) if written else None,
                "photos_tagged": len({r[0] for r in written}),
                "photos": len(tags),
            }
        )
    return table


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tags", type=Path, help="sdltag tag --format jsonl output on photos-dev")
    parser.add_argument("--max-per-photo", type=int, default=3)
    args = parser.parse_args(argv)
    tags = [json.loads(line) for line in args.tags.read_text().splitlines() if line.strip()]
    for row in precision_table(tags, args.max_per_photo):
        print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
