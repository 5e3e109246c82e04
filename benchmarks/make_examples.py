"""Write ``examples/images/``: a dozen themed emoji scenes for ``make demo``.

Each scene combines two or three emoji around one theme (animals of the savanna,
winter sports, ...) so that the out-of-vocabulary labels of ``examples/extra.txt``
(wildlife, winter, ...) have something to find. The scenes are new: seed 9001 (the
models' scenes use seeds 1-3), 128 px, and each emoji drawn in a randomly chosen art
style (Twemoji or Noto) within the same scene, a mix the training scenes never show.
The emoji themselves are in the default model's training data (in other scenes):
what is new is the composition and the labels.

    python -m benchmarks.make_examples --data ../shared/datasets/emoji --out examples/images
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from benchmarks.emoji_scenes import SceneConfig, load_records, load_style, render_scene

SEED = 9001
# Emoji names as in emoji.json's `name` field.
THEMES: list[tuple[str, ...]] = [
    ("lion", "giraffe", "zebra"),
    ("bus", "automobile", "airplane"),
    ("cooking", "hot beverage", "croissant"),
    ("snowman", "skier", "snowflake"),
    ("beach with umbrella", "palm tree", "sun with face"),
    ("guitar", "microphone", "violin"),
    ("rocket", "crescent moon", "star"),
    ("sunflower", "honeybee", "tulip"),
    ("dog face", "cat face"),
    ("laptop", "briefcase", "desktop computer"),
    ("birthday cake", "balloon", "party popper"),
    ("tropical drink", "cocktail glass", "mirror ball"),
]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data", type=Path, required=True, help="The emoji data folder (twitter/, google/, emoji.json)."
    )
    parser.add_argument("--out", type=Path, default=Path("examples/images"), help="Folder to write the scenes to.")
    parser.add_argument("--size", type=int, default=128, help="Scene side in pixels (default 128).")
    args = parser.parse_args(argv)
    records = load_records(args.data / "emoji.json")
    by_name = {record.name: record for record in records}
    missing = [name for theme in THEMES for name in theme if name not in by_name]
    if missing:
        print(f"make_examples: not in emoji.json: {', '.join(missing)}", file=sys.stderr)
        return 2
    styles = {style: load_style(args.data / style, records) for style in ("twitter", "google")}
    args.out.mkdir(parents=True, exist_ok=True)
    for i, theme in enumerate(THEMES, start=1):
        candidates = [by_name[name] for name in theme]
        config = SceneConfig(
            size=args.size,
            min_emoji=len(theme),
            max_emoji=len(theme),
            scale_min=0.32,
            scale_max=0.48,
            style_mix="emoji",
            distinct_subcategories=False,
        )
        rng = np.random.default_rng([SEED, i])
        for _ in range(50):  # redraw until every emoji of the theme fits
            image, _, placed = render_scene(rng, styles, candidates, config)
            if len(placed) == len(theme):
                break
        path = args.out / f"scene-{i:02d}.jpg"
        image.save(path, quality=90)
        print(f"{path}: {', '.join(f'{e.image} ({e.style})' for e in placed)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
