"""Emoji scenes: a multi-label zero-shot benchmark built from emoji artwork and CLDR tags.

Each scene pastes a few emoji (drawn from distinct sub-categories, so most scenes
show several semantically different things) at random scale, position and rotation
onto a varied background (plain, gradient, smooth noise or a texture). A scene's
labels are the union of its emoji's CLDR tags that are in the vocabulary (tags on at
least ``--vocab-min-count`` emoji). The output is a labeled directory in
``sdltag train``'s manifest format::

    OUT/images/000000.png ...
    OUT/labels.csv          path,labels   (labels ";"-separated)
    OUT/scenes.jsonl        per scene: style, emoji, boxes, angles, labels (for analysis)
    OUT/vocabulary.txt      the vocabulary the labels were drawn from
    OUT/generator.json      the options, so a directory says how it was made

With ``--unseen FILE --split train`` the unseen labels are removed from the
annotations (the NUS-WIDE zero-shot protocol); a test split keeps them. Scenes are
deterministic per ``(--seed, scene index)`` whatever ``--workers`` is.

Examples::

    python -m benchmarks.emoji_scenes --images DATA/twitter --images DATA/google \\
        --tags DATA/emoji.json --out /work/data/train --count 40000 --seed 1 \\
        --unseen benchmarks/unseen_labels.txt --split train
    python -m benchmarks.emoji_scenes --tags DATA/emoji.json \\
        --write-unseen benchmarks/unseen_labels.txt --unseen-share 0.1 --unseen-seed 0
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

BACKGROUNDS = ("plain", "gradient", "noise", "texture")
STYLE_MIX = ("scene", "emoji")
SPLITS = ("train", "test")


class GeneratorError(Exception):
    """A bad option or input file; the message names it and the fix."""


@dataclass(frozen=True)
class EmojiRecord:
    """One emoji of ``emoji.json``: its image file name (same in every style folder) and tags."""

    image: str
    tags: tuple[str, ...]
    category: str = ""
    subcategory: str = ""
    name: str = ""


@dataclass(frozen=True)
class SceneConfig:
    """How scenes look: canvas size, emoji count and scale, rotation, overlap, backgrounds."""

    size: int = 96
    min_emoji: int = 1
    max_emoji: int = 4
    scale_min: float = 0.30  # emoji side as a fraction of the canvas side
    scale_max: float = 0.60
    max_rotation: float = 30.0  # degrees, uniform in [-max, max]
    max_overlap: float = 0.25  # largest share of a smaller emoji's box another may cover
    backgrounds: tuple[str, ...] = BACKGROUNDS
    style_mix: str = "scene"  # "scene": one art style per scene; "emoji": each emoji its own
    distinct_subcategories: bool = True

    def validate(self) -> None:
        if self.size < 16:
            raise GeneratorError(f"--size {self.size} is too small; use at least 16 pixels.")
        if not 1 <= self.min_emoji <= self.max_emoji:
            raise GeneratorError(f"--min-emoji {self.min_emoji} / --max-emoji {self.max_emoji}: need 1 <= min <= max.")
        if not 0.05 <= self.scale_min <= self.scale_max <= 1.0:
            raise GeneratorError(
                f"--scale-min {self.scale_min} / --scale-max {self.scale_max}: need 0.05 <= min <= max <= 1."
            )
        if not 0.0 <= self.max_overlap <= 1.0:
            raise GeneratorError(f"--max-overlap {self.max_overlap}: need a share between 0 and 1.")
        unknown = [b for b in self.backgrounds if b not in BACKGROUNDS]
        if unknown or not self.backgrounds:
            raise GeneratorError(f"--backgrounds {','.join(self.backgrounds)}: choose from {','.join(BACKGROUNDS)}.")
        if self.style_mix not in STYLE_MIX:
            raise GeneratorError(f"--style-mix {self.style_mix}: choose one of {', '.join(STYLE_MIX)}.")


@dataclass
class PlacedEmoji:
    """One emoji pasted into a scene (box in pixels: left, top, right, bottom)."""

    image: str
    style: str
    box: tuple[int, int, int, int]
    angle: float
    tags: list[str]


@dataclass
class Scene:
    """A generated scene's record (as written to ``scenes.jsonl``)."""

    index: int
    path: str
    background: str
    emoji: list[PlacedEmoji] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------
# Tags, vocabulary, unseen labels


def load_records(tags_json: Path) -> list[EmojiRecord]:
    """Read ``emoji.json`` (a list of records with ``image`` and ``tags``)."""
    try:
        data = json.loads(Path(tags_json).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise GeneratorError(f"--tags {tags_json}: file not found. Pass the dataset's emoji.json.") from None
    except (OSError, ValueError) as exc:
        raise GeneratorError(
            f"--tags {tags_json}: cannot read it as JSON ({exc}). Pass the dataset's emoji.json."
        ) from None
    if not isinstance(data, list):
        raise GeneratorError(f"--tags {tags_json}: expected a JSON list of emoji records.")
    records = []
    for item in data:
        if not isinstance(item, dict) or "image" not in item or not isinstance(item.get("tags"), list):
            continue
        tags = tuple(sorted({str(t).strip().lower() for t in item["tags"] if str(t).strip()}))
        if tags:
            records.append(
                EmojiRecord(
                    image=str(item["image"]),
                    tags=tags,
                    category=str(item.get("category", "")),
                    subcategory=str(item.get("subcategory", "")),
                    name=str(item.get("name", "")),
                )
            )
    if not records:
        raise GeneratorError(f"--tags {tags_json}: no record with an `image` and a non-empty `tags` list.")
    return records


def build_vocabulary(records: Sequence[EmojiRecord], min_count: int) -> list[str]:
    """Tags carried by at least ``min_count`` emoji, sorted: the benchmark's label set."""
    counts = Counter(tag for record in records for tag in record.tags)
    return sorted(tag for tag, count in counts.items() if count >= min_count)


def pick_unseen(vocabulary: Sequence[str], share: float, seed: int) -> list[str]:
    """A seeded random ``share`` of the vocabulary (sorted) to hold out as unseen labels."""
    if not 0.0 < share < 1.0:
        raise GeneratorError(f"--unseen-share {share}: need a fraction strictly between 0 and 1, e.g. 0.1.")
    count = max(1, round(share * len(vocabulary)))
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(vocabulary), size=count, replace=False)
    return sorted(vocabulary[i] for i in chosen)


def read_label_file(path: Path) -> list[str]:
    """One label per line; blank lines and ``#`` comments ignored; lower-cased."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise GeneratorError(
            f"{path}: cannot read the label list ({exc.strerror}). Pass a text file, one label a line."
        ) from None
    labels = []
    for line in lines:
        text = line.split("#", 1)[0].strip().lower()
        if text:
            labels.append(text)
    return labels


# --------------------------------------------------------------------------------------
# Emoji images


def load_style(folder: Path, records: Sequence[EmojiRecord], warn: bool = True) -> dict[str, Image.Image]:
    """Load each record's image from ``folder`` as RGBA; missing or unreadable files are skipped with a line."""
    folder = Path(folder)
    if not folder.is_dir():
        raise GeneratorError(f"--images {folder}: not a folder. Pass a folder of emoji PNGs named as in emoji.json.")
    images: dict[str, Image.Image] = {}
    missing = 0
    for record in records:
        path = folder / record.image
        if not path.is_file():
            missing += 1
            continue
        try:
            with Image.open(path) as image:
                images[record.image] = image.convert("RGBA")
        except Exception as exc:  # Pillow raises several types for bad files
            if warn:
                print(f"emoji_scenes: skipping {path}: cannot decode it ({exc})", file=sys.stderr)
    if missing and warn:
        print(f"emoji_scenes: {folder}: {missing} emoji of emoji.json have no image here; skipped", file=sys.stderr)
    if not images:
        raise GeneratorError(f"--images {folder}: no readable emoji image named as in emoji.json.")
    return images


# --------------------------------------------------------------------------------------
# Backgrounds


def _random_colour(rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, 256, size=3).astype(np.float32)


def make_background(rng: np.random.Generator, size: int, kind: str) -> np.ndarray:
    """An RGB float32 (size, size, 3) background in [0, 255]."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1)
    if kind == "plain":
        image = np.broadcast_to(_random_colour(rng), (size, size, 3)).copy()
    elif kind == "gradient":
        a, b = _random_colour(rng), _random_colour(rng)
        if rng.random() < 0.7:  # linear, random direction
            theta = rng.uniform(0, 2 * math.pi)
            t = xx * math.cos(theta) + yy * math.sin(theta)
        else:  # radial from a random centre
            cx, cy = rng.uniform(0, 1, size=2)
            t = np.sqrt((xx - cx) ** 2 + (yy - cy) ** 2)
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
        image = a + (b - a) * t[..., None]
    elif kind == "noise":
        # Smooth value noise: a coarse random colour grid upsampled bicubically, plus fine grain.
        cells = int(rng.integers(2, 9))
        grid = rng.integers(0, 256, size=(cells, cells, 3)).astype(np.uint8)
        image = np.asarray(Image.fromarray(grid).resize((size, size), Image.BICUBIC), dtype=np.float32)
        image = image + rng.normal(0.0, rng.uniform(0, 12), size=image.shape).astype(np.float32)
    elif kind == "texture":
        a, b = _random_colour(rng), _random_colour(rng)
        pattern = rng.integers(0, 3)
        period = rng.uniform(4, 16) / size
        if pattern == 0:  # stripes at a random angle
            theta = rng.uniform(0, math.pi)
            t = (xx * math.cos(theta) + yy * math.sin(theta)) / period
            mask = (np.sin(2 * math.pi * t) > 0).astype(np.float32)
        elif pattern == 1:  # checkerboard
            mask = ((np.floor(xx / period) + np.floor(yy / period)) % 2).astype(np.float32)
        else:  # dots
            fx, fy = (xx / period) % 1.0 - 0.5, (yy / period) % 1.0 - 0.5
            mask = (fx**2 + fy**2 < rng.uniform(0.03, 0.15)).astype(np.float32)
        image = a + (b - a) * mask[..., None]
        image = image + rng.normal(0.0, rng.uniform(0, 8), size=image.shape).astype(np.float32)
    else:
        raise GeneratorError(f"unknown background {kind!r}; choose from {', '.join(BACKGROUNDS)}.")
    return np.clip(image, 0, 255).astype(np.float32)


# --------------------------------------------------------------------------------------
# Scenes


def _overlap_share(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    """Intersection area over the smaller box's area."""
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    if w <= 0 or h <= 0:
        return 0.0
    smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return (w * h) / max(smaller, 1)


def choose_emoji(
    rng: np.random.Generator, candidates: Sequence[EmojiRecord], count: int, distinct_subcategories: bool
) -> list[EmojiRecord]:
    """``count`` different emoji, from different sub-categories when possible (semantic diversity)."""
    chosen: list[EmojiRecord] = []
    used_images: set[str] = set()
    used_groups: set[str] = set()
    for _ in range(count * 20):
        if len(chosen) == count:
            break
        record = candidates[int(rng.integers(len(candidates)))]
        group = record.subcategory or record.category
        if record.image in used_images or (distinct_subcategories and group and group in used_groups):
            continue
        chosen.append(record)
        used_images.add(record.image)
        used_groups.add(group)
    return chosen


def render_scene(
    rng: np.random.Generator,
    styles: dict[str, dict[str, Image.Image]],
    candidates: Sequence[EmojiRecord],
    config: SceneConfig,
) -> tuple[Image.Image, str, list[PlacedEmoji]]:
    """Draw one scene: a background, then 1..N emoji pasted with alpha. Returns (RGB image, background, placed)."""
    size = config.size
    kind = config.backgrounds[int(rng.integers(len(config.backgrounds)))]
    canvas = Image.fromarray(make_background(rng, size, kind).astype(np.uint8), "RGB")
    style_names = sorted(styles)
    scene_style = style_names[int(rng.integers(len(style_names)))]
    count = int(rng.integers(config.min_emoji, config.max_emoji + 1))
    placed: list[PlacedEmoji] = []
    for record in choose_emoji(rng, candidates, count, config.distinct_subcategories):
        style = scene_style if config.style_mix == "scene" else style_names[int(rng.integers(len(style_names)))]
        source = styles[style].get(record.image)
        if source is None:  # this style lacks the emoji: use another style that has it
            others = [s for s in style_names if record.image in styles[s]]
            if not others:
                continue
            style = others[int(rng.integers(len(others)))]
            source = styles[style][record.image]
        side = max(8, round(rng.uniform(config.scale_min, config.scale_max) * size))
        angle = float(rng.uniform(-config.max_rotation, config.max_rotation))
        sprite = source.resize((side, side), Image.LANCZOS)
        if abs(angle) > 0.5:
            sprite = sprite.rotate(angle, resample=Image.BICUBIC, expand=True)
        # The drawn content's box (the artwork has transparent margins; rotation adds more).
        content = sprite.getchannel("A").getbbox() or (0, 0, sprite.width, sprite.height)
        width, height = content[2] - content[0], content[3] - content[1]
        box = None
        for _ in range(30):
            # Keep at least ~90% of the content's width and height on the canvas.
            left = int(rng.integers(-width // 10, max(size - width + width // 10, -width // 10) + 1))
            top = int(rng.integers(-height // 10, max(size - height + height // 10, -height // 10) + 1))
            trial = (left, top, left + width, top + height)
            if all(_overlap_share(trial, other.box) <= config.max_overlap for other in placed):
                box = trial
                break
        if box is None:
            continue
        canvas.paste(sprite, (box[0] - content[0], box[1] - content[1]), sprite)
        placed.append(
            PlacedEmoji(image=record.image, style=style, box=box, angle=round(angle, 2), tags=list(record.tags))
        )
    return canvas, kind, placed


# --------------------------------------------------------------------------------------
# Generation (optionally in worker processes)


@dataclass
class _Job:
    """Everything a worker needs; images are loaded once per worker (fork shares them)."""

    styles: dict[str, dict[str, Image.Image]]
    candidates: list[EmojiRecord]
    config: SceneConfig
    vocabulary: frozenset[str]
    drop: frozenset[str]
    seed: int
    image_dir: Path
    image_format: str


_JOB: _Job | None = None


def _scene_labels(placed: Sequence[PlacedEmoji], vocabulary: frozenset[str], drop: frozenset[str]) -> list[str]:
    return sorted({tag for emoji in placed for tag in emoji.tags if tag in vocabulary and tag not in drop})


def _make_one(index: int) -> Scene:
    """Render and save scene ``index``; resample (same seed stream) until it has a label."""
    job = _JOB
    assert job is not None
    rng = np.random.default_rng([job.seed, index])
    for _ in range(50):
        image, kind, placed = render_scene(rng, job.styles, job.candidates, job.config)
        labels = _scene_labels(placed, job.vocabulary, job.drop)
        if labels:
            break
    name = f"{index:06d}.{job.image_format}"
    path = job.image_dir / name
    if job.image_format == "jpg":
        image.save(path, quality=92)
    else:
        image.save(path, optimize=False, compress_level=1)
    return Scene(index=index, path=f"images/{name}", background=kind, emoji=placed, labels=labels)


def _init_worker(job: _Job) -> None:
    global _JOB
    _JOB = job


def generate(
    image_dirs: Sequence[Path],
    tags_json: Path,
    out: Path,
    count: int,
    seed: int,
    config: SceneConfig = SceneConfig(),
    *,
    vocab_min_count: int = 3,
    unseen: Sequence[str] = (),
    split: str = "test",
    image_format: str = "png",
    workers: int = 1,
    force: bool = False,
    options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``count`` scenes and their labels to ``out``; return a summary (also written to generator.json)."""
    config.validate()
    if count < 1:
        raise GeneratorError(f"--count {count}: need at least one scene.")
    if split not in SPLITS:
        raise GeneratorError(f"--split {split}: choose train (unseen labels removed) or test (kept).")
    if image_format not in ("png", "jpg"):
        raise GeneratorError(f"--format {image_format}: choose png or jpg.")
    if not image_dirs:
        raise GeneratorError("give at least one --images folder of emoji artwork.")
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not force:
        raise GeneratorError(f"--out {out}: folder exists and is not empty. Choose a new folder or pass --force.")
    records = load_records(tags_json)
    vocabulary = build_vocabulary(records, vocab_min_count)
    if not vocabulary:
        raise GeneratorError(f"--vocab-min-count {vocab_min_count}: no tag is on that many emoji; lower it.")
    vocab_set = frozenset(vocabulary)
    unseen_set = frozenset(unseen)
    outside = sorted(unseen_set - vocab_set)
    if outside:
        print(
            f"emoji_scenes: {len(outside)} unseen labels are not in the vocabulary and are ignored "
            f"(e.g. {', '.join(outside[:5])})",
            file=sys.stderr,
        )
    drop = unseen_set if split == "train" else frozenset()
    styles: dict[str, dict[str, Image.Image]] = {}
    for folder in image_dirs:
        key = Path(folder).name or str(folder)
        while key in styles:  # two folders with the same name
            key += "_"
        styles[key] = load_style(Path(folder), records)
    available = set().union(*(set(images) for images in styles.values()))
    candidates = [r for r in records if r.image in available and vocab_set.intersection(r.tags)]
    if not candidates:
        raise GeneratorError("no emoji has both an image and a tag in the vocabulary; check --images and --tags.")

    image_dir = out / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    job = _Job(styles, candidates, config, vocab_set, drop, seed, image_dir, image_format)
    started = time.perf_counter()
    scenes: list[Scene]
    if workers > 1:
        import multiprocessing

        context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else None)
        with context.Pool(workers, initializer=_init_worker, initargs=(job,)) as pool:
            scenes = list(pool.imap(_make_one, range(count), chunksize=64))
    else:
        _init_worker(job)
        scenes = [_make_one(i) for i in range(count)]
    elapsed = time.perf_counter() - started

    with _atomic_text(out / "labels.csv") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["path", "labels"])
        for scene in scenes:
            writer.writerow([scene.path, ";".join(scene.labels)])
    with _atomic_text(out / "scenes.jsonl") as handle:
        for scene in scenes:
            handle.write(json.dumps(asdict(scene), ensure_ascii=False) + "\n")
    with _atomic_text(out / "vocabulary.txt") as handle:
        handle.write("".join(label + "\n" for label in vocabulary))
    label_counts = Counter(label for scene in scenes for label in scene.labels)
    summary = {
        "generator": "benchmarks.emoji_scenes",
        "options": options or {},
        "config": asdict(config),
        "styles": {name: len(images) for name, images in styles.items()},
        "count": count,
        "seed": seed,
        "split": split,
        "vocabulary_size": len(vocabulary),
        "vocab_min_count": vocab_min_count,
        "unseen_given": len(unseen_set & vocab_set),
        "unseen_dropped": len(drop & vocab_set),
        "labels_used": len(label_counts),
        "mean_emoji_per_scene": round(sum(len(s.emoji) for s in scenes) / count, 3),
        "mean_labels_per_scene": round(sum(len(s.labels) for s in scenes) / count, 3),
        "multi_emoji_share": round(sum(len(s.emoji) >= 2 for s in scenes) / count, 3),
        "seconds": round(elapsed, 2),
        "scenes_per_second": round(count / max(elapsed, 1e-9), 1),
    }
    with _atomic_text(out / "generator.json") as handle:
        handle.write(json.dumps(summary, indent=2) + "\n")
    return summary


class _atomic_text:
    """Context manager writing a text file through a temp file + rename (no partial files)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def __enter__(self):
        fd, self.tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        self.handle = os.fdopen(fd, "w", encoding="utf-8", newline="")
        return self.handle

    def __exit__(self, exc_type, exc, tb) -> None:
        self.handle.close()
        if exc_type is None:
            os.chmod(self.tmp, 0o644)
            os.replace(self.tmp, self.path)
        else:
            os.unlink(self.tmp)


def iter_labels_csv(path: Path) -> Iterator[tuple[str, list[str]]]:
    """Read back ``labels.csv``: (relative path, labels) per row."""
    with open(path, newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            yield row["path"], [label for label in row["labels"].split(";") if label]


# --------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.emoji_scenes",
        description="Generate labeled emoji scenes (sdltag train's labels.csv format), or pick unseen labels.",
    )
    parser.add_argument(
        "--images",
        type=Path,
        action="append",
        default=[],
        help="Folder of emoji PNGs named as in emoji.json (one art style); repeat for several styles.",
    )
    parser.add_argument("--tags", type=Path, required=True, help="emoji.json: records with `image` and `tags`.")
    parser.add_argument("--out", type=Path, help="Output folder (images/, labels.csv, scenes.jsonl, ...).")
    parser.add_argument("--count", type=int, help="Number of scenes.")
    parser.add_argument("--seed", type=int, default=0, help="Seed; scene i depends only on (seed, i).")
    parser.add_argument("--size", type=int, default=96, help="Scene side in pixels (default 96).")
    parser.add_argument("--min-emoji", type=int, default=1, help="Fewest emoji per scene (default 1).")
    parser.add_argument("--max-emoji", type=int, default=4, help="Most emoji per scene (default 4).")
    parser.add_argument(
        "--scale-min", type=float, default=0.30, help="Smallest emoji side / scene side (default 0.30)."
    )
    parser.add_argument("--scale-max", type=float, default=0.60, help="Largest emoji side / scene side (default 0.60).")
    parser.add_argument("--max-rotation", type=float, default=30.0, help="Rotation range in degrees, +/- (default 30).")
    parser.add_argument(
        "--max-overlap",
        type=float,
        default=0.25,
        help="Largest share of a smaller emoji's box another may cover (default 0.25).",
    )
    parser.add_argument(
        "--backgrounds", default=",".join(BACKGROUNDS), help="Comma list of background kinds (default: all four)."
    )
    parser.add_argument(
        "--style-mix", choices=STYLE_MIX, default="scene", help="One art style per scene (default) or per emoji."
    )
    parser.add_argument(
        "--vocab-min-count",
        type=int,
        default=3,
        help="A tag is a label when it is on at least this many emoji (default 3).",
    )
    parser.add_argument(
        "--unseen",
        type=Path,
        help="Unseen labels, one a line: removed from a train split's labels, kept in a test split.",
    )
    parser.add_argument(
        "--split",
        choices=SPLITS,
        default="test",
        help="train: drop --unseen labels from annotations; test (default): keep them.",
    )
    parser.add_argument(
        "--format", dest="image_format", choices=("png", "jpg"), default="png", help="Image file format (default png)."
    )
    parser.add_argument(
        "--workers", type=int, default=1, help="Worker processes (default 1; output does not depend on it)."
    )
    parser.add_argument("--force", action="store_true", help="Write into a non-empty --out folder.")
    parser.add_argument(
        "--write-unseen",
        type=Path,
        help="Instead of scenes: pick unseen labels from the vocabulary and write them here.",
    )
    parser.add_argument(
        "--unseen-share",
        type=float,
        default=0.10,
        help="Share of the vocabulary to hold out with --write-unseen (default 0.10).",
    )
    parser.add_argument("--unseen-seed", type=int, default=0, help="Seed for --write-unseen (default 0).")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.write_unseen is not None:
            vocabulary = build_vocabulary(load_records(args.tags), args.vocab_min_count)
            unseen = pick_unseen(vocabulary, args.unseen_share, args.unseen_seed)
            args.write_unseen.parent.mkdir(parents=True, exist_ok=True)
            header = (
                f"# {len(unseen)} unseen labels of {len(vocabulary)} (tags on >= {args.vocab_min_count} emoji), "
                f"share {args.unseen_share}, seed {args.unseen_seed}; written by benchmarks.emoji_scenes\n"
            )
            with _atomic_text(args.write_unseen) as handle:
                handle.write(header + "".join(label + "\n" for label in unseen))
            print(f"wrote {len(unseen)} unseen labels of {len(vocabulary)} to {args.write_unseen}", file=sys.stderr)
            if args.out is None:
                return 0
        if args.out is None or args.count is None:
            raise GeneratorError("give --out and --count to generate scenes (or --write-unseen FILE alone).")
        config = SceneConfig(
            size=args.size,
            min_emoji=args.min_emoji,
            max_emoji=args.max_emoji,
            scale_min=args.scale_min,
            scale_max=args.scale_max,
            max_rotation=args.max_rotation,
            max_overlap=args.max_overlap,
            backgrounds=tuple(b.strip() for b in args.backgrounds.split(",") if b.strip()),
            style_mix=args.style_mix,
        )
        unseen = read_label_file(args.unseen) if args.unseen else []
        options = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
        options["images"] = [str(p) for p in args.images]
        summary = generate(
            args.images,
            args.tags,
            args.out,
            args.count,
            args.seed,
            config,
            vocab_min_count=args.vocab_min_count,
            unseen=unseen,
            split=args.split,
            image_format=args.image_format,
            workers=args.workers,
            force=args.force,
            options=options,
        )
    except GeneratorError as exc:
        print(f"emoji_scenes: error: {exc}", file=sys.stderr)
        return 2
    print(
        f"wrote {summary['count']} scenes to {args.out} in {summary['seconds']} s "
        f"({summary['scenes_per_second']}/s): {summary['mean_emoji_per_scene']} emoji and "
        f"{summary['mean_labels_per_scene']} labels per scene, {summary['labels_used']} labels used",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
