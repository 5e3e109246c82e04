"""Photo-like training scenes from the photographic cut-outs of Debian's ``tuxpaint-stamps-default``.

The package (GPL-2, (c) 2002-2022 Bill Kendrick and the Tux Paint contributors) ships about 550
photographs of single objects with transparent backgrounds (animals, food, plants, vehicles,
household things...), each in a category folder and with a name. A scene is one to three cut-outs
pasted onto a background (solid colour, sky-like gradient, blurred colour noise, or a blurred
enlargement of another cut-out), with random size, position, mirror and brightness. The images
are never committed; the recipe regenerates them from the package::

    apt-get download tuxpaint-stamps-default && dpkg-deb -x tuxpaint-stamps-default_*.deb /tmp/tux
    python -m benchmarks.tuxpaint_scenes --stamps /tmp/tux/usr/share/tuxpaint/stamps --out WORK/scenes --count 4000

Left out: ``symbols`` (flags, signs, letters, money) and every ``cartoon`` folder (drawings, not
photographs). ``labels.csv`` lists each scene's file and its cut-outs' names and categories.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter, ImageOps

PACKAGE = "tuxpaint-stamps-default"
STAMPS_IN_PACKAGE = Path("usr/share/tuxpaint/stamps")
SKIPPED_FOLDERS = {"symbols", "cartoon"}
LICENCE = (
    "Tux Paint stamps (Debian package tuxpaint-stamps-default), GPL-2, (c) 2002-2022 Bill Kendrick "
    "and the Tux Paint contributors"
)
SIZE = 288  # scene side; the model's resize takes it to 224


@dataclass(frozen=True)
class Stamp:
    path: Path
    name: str  # file stem, words separated by spaces ("granny smith apple")
    category: str  # folder below stamps/ ("animals/mammals")


def _clean_name(stem: str) -> str:
    words = stem.replace("-", " ").replace("_", " ").split()
    return " ".join(w for w in words if not w.isdigit()).lower()


def find_stamps(root: Path) -> list[Stamp]:
    """Every photographic stamp below ``root`` (``.../tuxpaint/stamps``), sorted by path."""
    stamps = []
    for path in sorted(root.rglob("*.png")):
        parts = path.relative_to(root).parts
        if SKIPPED_FOLDERS & set(parts[:-1]):
            continue
        stamps.append(Stamp(path, _clean_name(path.stem), "/".join(parts[:-1])))
    return stamps


def fetch_stamps(work: Path) -> Path:
    """Download and extract the Debian package into ``work`` (once); returns its stamps folder."""
    stamps = work / "tuxpaint" / STAMPS_IN_PACKAGE
    if stamps.is_dir():
        return stamps
    with tempfile.TemporaryDirectory(prefix="tuxpaint-") as tmp:
        subprocess.run(["apt-get", "download", PACKAGE], cwd=tmp, check=True)
        debs = sorted(Path(tmp).glob(f"{PACKAGE}_*.deb"))
        if not debs:
            raise SystemExit(f"apt-get download {PACKAGE} gave no .deb; pass --stamps DIR instead")
        extracted = Path(tmp) / "x"
        subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(extracted)], check=True)
        (work / "tuxpaint").mkdir(parents=True, exist_ok=True)
        shutil.move(str(extracted / "usr"), str(work / "tuxpaint" / "usr"))
    return stamps


def _load_rgba(path: Path, cache: dict[Path, Image.Image]) -> Image.Image:
    if path not in cache:
        image = Image.open(path)
        image.load()
        image = image.convert("RGBA")
        box = image.getchannel("A").getbbox()
        cache[path] = image.crop(box) if box else image
    return cache[path]


def _background(rng: random.Random, stamps: list[Stamp], cache: dict[Path, Image.Image]) -> Image.Image:
    kind = rng.random()
    if kind < 0.25:  # solid colour, often light (product-photo style)
        grey = rng.random() < 0.5
        colour = tuple([rng.randint(180, 255)] * 3) if grey else tuple(rng.randint(0, 255) for _ in range(3))
        return Image.new("RGB", (SIZE, SIZE), colour)
    if kind < 0.5:  # vertical gradient (sky, ground)
        top = np.array([rng.randint(0, 255) for _ in range(3)], dtype=np.float32)
        bottom = np.array([rng.randint(0, 255) for _ in range(3)], dtype=np.float32)
        t = np.linspace(0.0, 1.0, SIZE, dtype=np.float32)[:, None, None]
        pixels = np.broadcast_to(top * (1 - t) + bottom * t, (SIZE, SIZE, 3))
        return Image.fromarray(pixels.astype(np.uint8))
    if kind < 0.75:  # blurred colour noise
        small = np.random.default_rng(rng.randrange(2**32)).integers(0, 256, (8, 8, 3), dtype=np.uint8)
        return Image.fromarray(small).resize((SIZE, SIZE), Image.Resampling.BICUBIC).filter(ImageFilter.GaussianBlur(6))
    # a blurred enlargement of another cut-out's centre: photographic texture
    other = _load_rgba(rng.choice(stamps).path, cache)
    w, h = other.size
    crop = other.crop((w // 4, h // 4, max(w // 4 + 1, 3 * w // 4), max(h // 4 + 1, 3 * h // 4)))
    flat = Image.new("RGB", crop.size, tuple(rng.randint(0, 255) for _ in range(3)))
    flat.paste(crop, mask=crop.getchannel("A"))
    return flat.resize((SIZE, SIZE), Image.Resampling.BILINEAR).filter(ImageFilter.GaussianBlur(rng.uniform(2, 8)))


def make_scene(
    rng: random.Random, stamps: list[Stamp], cache: dict[Path, Image.Image]
) -> tuple[Image.Image, list[Stamp]]:
    canvas = _background(rng, stamps, cache)
    count = rng.choices((1, 2, 3), weights=(0.5, 0.3, 0.2))[0]
    chosen = rng.sample(stamps, min(count, len(stamps)))
    low, high = (0.45, 0.95) if count == 1 else (0.3, 0.6)
    for stamp in chosen:
        image = _load_rgba(stamp.path, cache)
        if rng.random() < 0.5:
            image = ImageOps.mirror(image)
        side = rng.uniform(low, high) * SIZE
        scale = side / max(image.size)
        image = image.resize(
            (max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.Resampling.LANCZOS
        )
        x = rng.randint(min(0, SIZE - image.width), max(0, SIZE - image.width))
        y = rng.randint(min(0, SIZE - image.height), max(0, SIZE - image.height))
        canvas.paste(image.convert("RGB"), (x, y), mask=image.getchannel("A"))
    factor = rng.uniform(0.75, 1.2)
    pixels = np.clip(np.asarray(canvas, dtype=np.float32) * factor, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels), chosen


def generate(stamps_root: Path, out: Path, count: int, seed: int) -> Path:
    """Write ``count`` scenes (JPEG) and ``labels.csv`` to ``out`` unless it is already complete."""
    summary_path = out / "generator.json"
    settings = {"count": count, "seed": seed, "size": SIZE, "licence": LICENCE}
    if summary_path.is_file() and json.loads(summary_path.read_text()).get("settings") == settings:
        return out
    stamps = find_stamps(stamps_root)
    if not stamps:
        raise SystemExit(f"no stamps below {stamps_root}")
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    cache: dict[Path, Image.Image] = {}
    with open(out / "labels.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file", "names", "categories"])
        for number in range(count):
            scene, chosen = make_scene(rng, stamps, cache)
            name = f"scene-{number:05d}.jpg"
            scene.save(out / name, quality=90)
            writer.writerow([name, ";".join(s.name for s in chosen), ";".join(s.category for s in chosen)])
    summary_path.write_text(json.dumps({"settings": settings, "stamps": len(stamps)}, indent=1))
    return out


def read_scenes(folder: Path) -> list[tuple[str, list[str], list[str]]]:
    with open(folder / "labels.csv", encoding="utf-8") as handle:
        return [(r["file"], r["names"].split(";"), r["categories"].split(";")) for r in csv.DictReader(handle)]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Generate photo-like scenes from Tux Paint's photographic stamps.")
    parser.add_argument("--stamps", type=Path, help="the stamps folder (default: download and extract the package)")
    parser.add_argument("--work", type=Path, default=Path("work-photo"), help="where the package is extracted")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--count", type=int, default=4000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    stamps = args.stamps or fetch_stamps(args.work)
    generate(stamps, args.out, args.count, args.seed)
    print(f"{args.out}: {args.count} scenes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
