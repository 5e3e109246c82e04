"""The HTML contact sheet at library size: a 20,000-photo sheet's size, generation time and time to first paint.

    python benchmarks/bench_contact_sheet.py [--photos 20000] [--workdir DIR] [--repeats 3]

Thumbnails are made as `sdltag tag --format html` makes them: from the decode done for the
bundled model (``open_image`` with its 96 px target) of generated 12 MP camera-like JPEGs
(``bench_tag.make_photos``), so their sizes are real; the 20,000 results cycle through
them, each with 10 tags from a 300-label vocabulary (a quarter zero-shot). Measured:

- generation: ``ContactSheetWriter`` fed 20,000 results, then closed (page + thumbnail folder);
- size: the page and the thumbnail folder;
- time to first paint in headless Chromium, from the trace Chromium writes (minus the sheet
  frame's ``navigationStart``): ``firstContentfulPaint`` (the header), the page's own
  ``sdltag-grid`` mark (data parsed, first 120 cards built) and the last
  largest-contentful-paint candidate (thumbnails painted); the median of ``--repeats`` runs;
- the baselines, measured in the same run: the same 20,000 photos with every thumbnail
  embedded (the single-file form, which the sheet switches away from past 8 MB), and a
  1,000-photo sheet (embedded: below the limit);
- the cost of a thumbnail on the tagging path: ``thumbnail_jpeg`` per photo against the
  draft decode it reuses.

Results: ``results/contact_sheet.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.bench_tag import make_photos  # noqa: E402
from sdltag.contact_sheet import ContactSheetWriter, thumbnail_jpeg, thumbs_folder_for  # noqa: E402
from sdltag.images import open_image  # noqa: E402
from sdltag.writers import Tag, TagResult  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "contact_sheet.json"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]
MODEL_TARGET = (96, 96)  # the bundled model's input (models/emoji)


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    raise SystemExit("needs Chromium (Debian: apt-get install chromium)")


def real_thumbnails(workdir: Path, count: int) -> tuple[list[bytes], dict]:
    """Thumbnails of camera-like photos from the tagging decode, and what they cost on top of it."""
    photos = make_photos(workdir / "camera-photos", count)
    thumbs, decode_ms, thumb_ms = [], [], []
    for path in photos:
        start = time.perf_counter()
        image = open_image(path, target=MODEL_TARGET)
        middle = time.perf_counter()
        thumbs.append(thumbnail_jpeg(image))
        end = time.perf_counter()
        decode_ms.append((middle - start) * 1000)
        thumb_ms.append((end - middle) * 1000)
    decoded = open_image(photos[0], target=MODEL_TARGET).size
    return thumbs, {
        "photo": "12 MP camera-like JPEG (bench_tag.make_photos)",
        "decoded_for_the_model": list(decoded),
        "thumbnail_bytes_mean": round(float(np.mean([len(t) for t in thumbs]))),
        "decode_ms_median": round(statistics.median(decode_ms), 2),
        "thumbnail_ms_median": round(statistics.median(thumb_ms), 3),
        "thumbnail_share_of_decode": round(statistics.median(thumb_ms) / statistics.median(decode_ms), 4),
    }


def results(count: int, thumbs: list[bytes], seed: int = 0) -> list[TagResult]:
    rng = np.random.default_rng(seed)
    vocabulary = [(f"label {i:03d}", "unseen" if i % 4 == 0 else "seen") for i in range(300)]
    out = []
    for i in range(count):
        picked = rng.choice(len(vocabulary), 10, replace=False)
        scores = np.sort(rng.uniform(0.05, 0.99, 10))[::-1]
        tags = [Tag(vocabulary[j][0], float(s), vocabulary[j][1]) for j, s in zip(picked, scores, strict=True)]
        path = Path(f"/photos/{2015 + i // 2000}/{i // 100:03d}/DSC_{i:05d}.jpg")
        out.append(TagResult(path, tags, thumbnail=thumbs[i % len(thumbs)]))
    return out


def write_sheet(output: Path, items: list[TagResult], embed_max_bytes: int | None = None) -> tuple[float, float]:
    """(wall, CPU) seconds to feed and close the writer (the page written to ``output``, thumbnails beside it).

    CPU time counts every thread of this process (the thumbnail writes run on a pool); on a busy
    shared machine it is the steadier of the two.
    """
    options = {} if embed_max_bytes is None else {"embed_max_bytes": embed_max_bytes}
    start, cpu = time.perf_counter(), time.process_time()
    with open(output, "w", encoding="utf-8") as stream:
        sheet = ContactSheetWriter(stream, output, title="bench", **options)
        for result in items:
            sheet.write(result)
        sheet.close()
    return time.perf_counter() - start, time.process_time() - cpu


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir()) if folder.is_dir() else 0


def paint_times(page: Path, repeats: int) -> dict:
    """Median ms from navigation to first contentful paint, to the first page of the grid (the page's
    ``sdltag-grid`` mark: data parsed, 120 cards built) and to the last largest-contentful-paint candidate
    (the thumbnails painted), from Chromium's trace."""
    first_paint, grid, largest = [], [], []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as scratch:
            trace = Path(scratch) / "trace.json"
            subprocess.run(
                [
                    chromium(),
                    *CHROMIUM_FLAGS,
                    f"--user-data-dir={scratch}/profile",
                    "--trace-startup=blink.user_timing,loading",
                    "--trace-startup-format=json",
                    f"--trace-startup-file={trace}",
                    "--trace-startup-duration=30",
                    "--window-size=1280,800",
                    f"--screenshot={scratch}/shot.png",
                    page.as_uri(),
                ],
                capture_output=True,
                timeout=300,
                check=True,
            )
            events = json.loads(trace.read_text(encoding="utf-8"))
            events = events["traceEvents"] if isinstance(events, dict) else events
        paints = [e for e in events if e.get("name") == "firstContentfulPaint"]
        frame = paints[-1]["args"]["frame"]
        starts = [
            e["ts"]
            for e in events
            if e.get("name") == "navigationStart"
            and e.get("args", {}).get("frame") == frame
            and e["ts"] <= paints[-1]["ts"]
        ]
        start = max(starts)
        marks = [e["ts"] for e in events if e.get("name") == "sdltag-grid"]
        candidates = [
            e["ts"]
            for e in events
            if e.get("name") == "largestContentfulPaint::Candidate" and e.get("args", {}).get("frame") == frame
        ]
        first_paint.append((paints[-1]["ts"] - start) / 1000)
        grid.append((min(marks) - start) / 1000 if marks else float("nan"))
        largest.append((max(candidates) - start) / 1000 if candidates else float("nan"))
    return {
        "first_contentful_paint_ms": round(statistics.median(first_paint), 1),
        "grid_ready_ms": round(statistics.median(grid), 1),
        "largest_contentful_paint_ms": round(statistics.median(largest), 1),
        "runs_first_paint_ms": [round(v, 1) for v in first_paint],
        "runs_grid_ready_ms": [round(v, 1) for v in grid],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos", type=int, default=20_000)
    parser.add_argument("--distinct", type=int, default=24, help="camera-like photos to make thumbnails of")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-sheet-"))
    workdir.mkdir(parents=True, exist_ok=True)

    thumbs, thumb_cost = real_thumbnails(workdir, args.distinct)
    items = results(args.photos, thumbs)
    report: dict = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "load_average_at_start": [round(v, 1) for v in os.getloadavg()],
        "chromium": subprocess.run([chromium(), "--version"], capture_output=True, text=True).stdout.strip(),
        "photos": args.photos,
        "tags_per_photo": 10,
        "thumbnails": thumb_cost,
        "sheets": {},
    }

    def measure(name: str, output: Path, subset: list[TagResult], embed_max_bytes: int | None = None) -> None:
        seconds, cpu = write_sheet(output, subset, embed_max_bytes)
        folder = thumbs_folder_for(output)
        row = {
            "photos": len(subset),
            "generation_s": round(seconds, 2),
            "generation_cpu_s": round(cpu, 2),
            "page_mb": round(output.stat().st_size / 1e6, 2),
            "thumbnail_folder_mb": round(folder_bytes(folder) / 1e6, 2),
            "thumbnails_embedded": not folder.is_dir(),
        }
        row.update(paint_times(output, args.repeats))
        report["sheets"][name] = row
        print(name, json.dumps(row), flush=True)

    measure("library: thumbnails in a folder (the default past 8 MB)", workdir / "sheet.html", items)
    measure(
        "baseline: the same sheet with every thumbnail embedded",
        workdir / "embedded.html",
        items,
        embed_max_bytes=1 << 40,
    )
    measure("baseline: 1,000 photos, embedded (under the limit)", workdir / "small.html", items[:1000])
    report["load_average_at_end"] = [round(v, 1) for v in os.getloadavg()]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
