"""`sdltag tag` speed and memory against baselines measured in the same run.

Targets (issue 4), on a folder of generated photo-like 12 MP JPEGs, bundled model, 2 cores:

1. throughput >= 0.85x a bare loop that only ``draft()``-decodes the same files on all cores
   (the bundled model as ``sdltag tag`` runs it by default: its 8-bit graph on CPUs with
   VNNI or Arm dot product; its other graph is measured too, with ``--precision``);
2. >= 6x a naive pipeline of the same model (full decode, bicubic resize, eager torch
   forward at batch 1; the torch model has the manifest's architecture, random weights:
   the same compute, since the model folder ships ONNX only);
3. re-tagging the indexed folder with 100 new labels >= 30x faster than the first run
   (measured on the base folder, on the 10x folder and on a library-sized folder of
   ``--large`` photos: the re-tag has a fixed cost, so the ratio grows with the folder);
4. peak memory (max RSS) of a 10x-larger run within 100 MB of the base run;
5. ``sdltag tag one.jpg`` (labels cached) within 4x of ``python -c "import onnxruntime, PIL, numpy"``.

Every sdltag run is a fresh process (the installed CLI's code path, run through a small
wrapper that reports its peak RSS, VmHWM: ru_maxrss would count the forked parent's pages
on Linux). The text encoder is exported (as ``make venv`` does, once per venv) before the
re-tag is timed. Writes benchmarks/results/tag.json.

    .venv/bin/python benchmarks/bench_tag.py [--count 200] [--model DIR] [--naive-count 20]

Without --model it uses the bundled model, or (if none is installed) a stand-in smallcnn
built here, recorded as ``stand_in_model`` in the results.
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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results" / "tag.json"
WIDTH, HEIGHT = 4000, 3000  # 12 MP
NOISE_SIGMA = 4  # grain of the generated photos (8-bit levels)
PHOTOS = "camera-photos"  # the folder they go in (a kept --workdir reuses it)
WRAPPER = (
    "import resource, sys\n"
    "from sdltag.cli import app\n"
    "sys.argv = ['sdltag'] + sys.argv[1:]\n"
    "code = 0\n"
    "try:\n    app()\nexcept SystemExit as exc:\n    code = exc.code or 0\n"
    "hwm = [l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM:')]\n"
    "print('MAXRSS_KB', hwm[0] if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)\n"
    "sys.exit(code)\n"
)


def _make_photo(path: Path, seed: int) -> None:
    """One photo-like 12 MP JPEG: smooth colour gradients, a few shapes, sensor-like noise over the whole frame."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    small_h, small_w = HEIGHT // 8, WIDTH // 8
    ys, xs = np.mgrid[0:small_h, 0:small_w].astype(np.float32)
    base = np.empty((small_h, small_w, 3), np.float32)
    for c in range(3):
        a, b, d = rng.uniform(-1, 1, 3)
        base[..., c] = 128 + 90 * np.sin(a * xs / 60 + b * ys / 45 + d * 3)
    image = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8)).resize((WIDTH, HEIGHT), Image.Resampling.BILINEAR)
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x, y = int(rng.integers(0, WIDTH - 800)), int(rng.integers(0, HEIGHT - 800))
        size = int(rng.integers(100, 800))
        draw.ellipse((x, y, x + size, y + size), fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
    pixels = np.asarray(image, dtype=np.int16).copy()
    pixels += rng.normal(0, NOISE_SIGMA, size=(HEIGHT, WIDTH, 1)).astype(np.int16)  # luminance grain, every pixel
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=88)


def make_photos(folder: Path, count: int, seed: int = 0, workers: int = 2) -> list[Path]:
    """``count`` photo-like 12 MP JPEGs (in ``workers`` processes); a kept folder of them is reused.

    Sensor-like grain over the whole frame makes them about 1.8 MB each, whose draft decode
    costs about 21 ms of one core here: what the project measured for real 12 MP camera
    JPEGs (about 25 ms). Smooth synthetic pictures (0.95 MB, 12 ms) would understate the decode
    work and so overstate the share of everything else.
    """
    from concurrent.futures import ProcessPoolExecutor

    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"DSC_{i:05d}.jpg" for i in range(count)]
    todo = [(path, seed * 100_003 + i) for i, path in enumerate(paths) if not path.is_file()]
    if todo:
        with ProcessPoolExecutor(max(1, workers)) as pool:
            list(pool.map(_make_photo, *zip(*todo, strict=True)))
    return paths


def draft_decode_baseline(paths: list[Path], target: tuple[int, int], threads: int) -> float:
    """Images/s of a bare loop that only draft-decodes each file to RGB, on ``threads`` threads."""
    from PIL import Image

    def decode(path: Path) -> tuple[int, int]:
        with Image.open(path) as image:
            image.draft("RGB", (target[1], target[0]))
            image.load()
            return image.convert("RGB").size

    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(decode, paths))
    return len(paths) / (time.perf_counter() - start)


def inference_baseline(model_dir: Path, threads: int, batch: int = 32, seconds: float = 8.0) -> float:
    """Images/s of the model's graph alone (onnxruntime on ``threads`` threads, batches of random input).

    The graph ``sdltag tag`` runs by default (``--precision auto``). With the decode-only rate this
    gives the CPU limit of decode plus inference: both use all cores, so their CPU times per image
    add, and no pipeline can beat ``1 / (1/decode + 1/infer)``.
    """
    import numpy as np
    import onnxruntime as ort

    from sdltag.modelfolder import load_model_folder
    from sdltag.runtime import resolve_precision

    model, _graph = resolve_precision(load_model_folder(model_dir), "auto", "cpu")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(model.onnx_path), options, providers=["CPUExecutionProvider"])
    spec = model.manifest.input
    name = session.get_inputs()[0].name
    x = np.random.default_rng(0).normal(size=(batch, 3, spec.height, spec.width)).astype(np.float32)
    session.run(None, {name: x})  # warm-up
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        session.run(None, {name: x})
        done += batch
    return done / (time.perf_counter() - start)


def naive_pipeline(paths: list[Path], model_dir: Path) -> float:
    """Images/s of full decode + bicubic resize + eager torch forward at batch 1 + scoring."""
    import torch
    from PIL import Image

    from sdltag.modelfolder import load_model_folder
    from sdltag.nn.model import ModelConfig, SDLModel

    folder = load_model_folder(model_dir)
    manifest = folder.manifest
    config = ModelConfig(
        backbone=manifest.backbone,
        backbone_config=manifest.backbone_config,
        rows=manifest.rows,
        dim=manifest.dim,
        head_layout=manifest.head_layout,
    )
    model = SDLModel(config).eval()
    spec = manifest.input
    mean = torch.tensor(spec.mean).view(3, 1, 1)
    std = torch.tensor(spec.std).view(3, 1, 1)
    labels = torch.from_numpy(folder.label_vectors)
    start = time.perf_counter()
    with torch.no_grad():
        for path in paths:
            image = Image.open(path).convert("RGB").resize((spec.width, spec.height), Image.Resampling.BICUBIC)
            x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
            x = (x - mean) / std
            vectors = model(x[None])  # (1, M, d)
            (vectors @ labels.T).amax(dim=1)
    return len(paths) / (time.perf_counter() - start)


def run_sdltag(args: list[str], env: dict) -> dict:
    """Run the CLI in a fresh process; wall time, exit code, max RSS and the summary line."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", WRAPPER, *args], capture_output=True, env=env, text=True)
    wall = time.perf_counter() - start
    maxrss = None
    summary = model_line = ""
    for line in proc.stderr.splitlines():
        if line.startswith("MAXRSS_KB"):
            maxrss = int(line.split()[1]) / 1024
        elif "tagged," in line:
            summary = line
        elif " on onnxruntime " in line:
            model_line = line.strip()
    if proc.returncode not in (0,):
        raise SystemExit(f"sdltag {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    record = {"seconds": round(wall, 3), "max_rss_mb": round(maxrss or 0, 1), "summary": summary.strip()}
    return {**record, "model_line": model_line} if model_line else record


def build_stand_in_model(out_dir: Path, cache_dir: Path) -> Path:
    """When no bundled model is installed: a smallcnn (width 32, 96 px, M=7) in the bundled text model's space,
    random weights (speed does not depend on them)."""
    import torch

    from sdltag.embedding import get_text_embedder
    from sdltag.modelfolder import InputSpec
    from sdltag.nn.export import export_model
    from sdltag.nn.model import ModelConfig, SDLModel

    torch.manual_seed(0)
    embedder = get_text_embedder(None, cache_dir)
    labels = ["person", "dog", "cat", "car", "tree", "beach", "mountain", "food", "building", "flower", "sky", "boat"]
    model = SDLModel(ModelConfig(backbone="smallcnn", backbone_config={"width": 32}, rows=7, dim=embedder.spec.dim))
    export_model(
        model,
        out_dir,
        input_spec=InputSpec(96, 96, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
        embedder=embedder.spec,
        seen_labels=labels,
        unseen_labels=[],
        label_vectors=embedder.embed(labels),
    )
    return out_dir


def _summary_rate(summary: str) -> float | None:
    """The images/s figure of sdltag's summary line."""
    import re

    match = re.search(r"([0-9.]+) images/s", summary)
    return float(match.group(1)) if match else None


def python_import_baseline(env: dict, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import onnxruntime, PIL, numpy"], check=True, env=env)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=200, help="photos in the base folder (>= 200 for the target)")
    parser.add_argument("--scale", type=int, default=10, help="the memory run tags count x scale images")
    parser.add_argument(
        "--large", type=int, default=10000, help="photos (hard links) in a library-sized re-tag run; 0 skips it"
    )
    parser.add_argument("--repeats", type=int, default=3, help="decode-loop / first-run pairs (median reported)")
    parser.add_argument("--naive-count", type=int, default=20, help="photos timed through the naive pipeline")
    parser.add_argument("--model", type=Path, default=None, help="model folder (default: the bundled model)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="cores to use")
    parser.add_argument("--workdir", type=Path, default=None, help="where to generate photos (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the generated photos")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results file")
    args = parser.parse_args()

    from sdltag.errors import SdltagError
    from sdltag.modelfolder import default_model_dir, load_model_folder

    work = Path(args.workdir or tempfile.mkdtemp(prefix="sdltag-bench-"))
    if work.is_dir():  # a kept --workdir: keep only the photos (indexes, caches and outputs start empty)
        for entry in work.iterdir():
            if entry.name != PHOTOS:
                shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
    home = work / "home"
    stand_in = False
    if args.model is not None:
        model_dir = args.model
    else:
        try:
            model_dir = default_model_dir()
        except SdltagError:
            model_dir, stand_in = build_stand_in_model(work / "stand-in-model", home / "cache"), True
    model = load_model_folder(model_dir)
    spec = model.manifest.input
    env = {**os.environ, "SDLTAG_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    results: dict = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "model": {
            "path": str(model_dir),
            "backbone": model.manifest.backbone,
            "input": [spec.height, spec.width],
            "rows": model.manifest.rows,
            "dim": model.manifest.dim,
        },
        "count": args.count,
        "scale": args.scale,
        "stand_in_model": stand_in,
    }
    try:
        t0 = time.perf_counter()
        photos = make_photos(work / PHOTOS, args.count, workers=args.threads)
        results["photos"] = {
            "count": len(photos),
            "size": [WIDTH, HEIGHT],
            "mean_megabytes": round(sum(p.stat().st_size for p in photos) / len(photos) / 1e6, 2),
            "jpeg_quality": 88,
            "noise_sigma": NOISE_SIGMA,
        }
        results["generate_seconds"] = round(time.perf_counter() - t0, 1)
        common = [
            "--model",
            str(model_dir),
            "--threads",
            str(args.threads),
            "--format",
            "jsonl",
            "--output",
            str(work / "out.jsonl"),
        ]

        # Interleaved pairs (decode-only loop, then a first run with a fresh index): this machine's
        # speed drifts with its neighbours' load, so each pair is measured back to back and the
        # median pair's ratio is the result.
        def median_pair(tag_args: list[str], index_name) -> tuple[list[float], float, float, float, dict]:
            """All pairs' ratios, then the median pair's decode rate, tag-loop rate, whole-process rate, run."""
            pairs = []
            for repeat in range(args.repeats):
                decode_rate = draft_decode_baseline(photos, (spec.height, spec.width), args.threads)
                index = work / index_name(repeat)
                run = run_sdltag(["tag", str(work / PHOTOS), *tag_args, "--index", str(index)], env)
                whole_rate = args.count / run["seconds"]
                loop_rate = _summary_rate(run["summary"]) or whole_rate
                pairs.append((loop_rate / decode_rate, decode_rate, loop_rate, whole_rate, run))
            _, decode_rate, loop_rate, whole_rate, run = sorted(pairs, key=lambda pair: pair[0])[len(pairs) // 2]
            return [round(pair[0], 3) for pair in pairs], decode_rate, loop_rate, whole_rate, run

        infer_before = inference_baseline(model_dir, args.threads)
        ratios, decode_rate, pipeline_rate, tag_rate, first = median_pair(
            common, lambda repeat: "index.db" if repeat == 0 else f"index-repeat{repeat}.db"
        )
        infer_rate = (infer_before + inference_baseline(model_dir, args.threads)) / 2
        limit_rate = 1.0 / (1.0 / decode_rate + 1.0 / infer_rate)
        results["throughput"] = {
            "draft_decode_images_per_s": round(decode_rate, 2),
            "draft_decode_ms_per_photo_per_core": round(1000 * args.threads / decode_rate, 1),
            "graph": first.get("model_line", ""),
            "sdltag_first_run": first,
            "sdltag_images_per_s": round(pipeline_rate, 2),
            "ratio": round(pipeline_rate / decode_rate, 3),
            "ratios_of_all_pairs": ratios,
            "sdltag_whole_process_images_per_s": round(tag_rate, 2),
            "whole_process_ratio": round(tag_rate / decode_rate, 3),
            "target": ">= 0.85 (ratio)",
            "inference_images_per_s": round(infer_rate, 2),
            "decode_plus_inference_limit_images_per_s": round(limit_rate, 2),
            "ratio_to_decode_plus_inference_limit": round(pipeline_rate / limit_rate, 3),
            "note": "ratio: the tag loop's own rate (its summary line: decode, hash, infer, index, write) against "
            "the decode-only loop measured just before it; the median of --repeats such pairs; "
            "whole_process_ratio also counts start-up and model load",
        }

        # The bundled model's other graph: auto runs the 8-bit one on CPUs with VNNI or Arm dot
        # product, so the float graph is measured too (and the other way round elsewhere).
        other = "float" if "8-bit graph" in first.get("model_line", "") else "int8"
        if other == "float" or model.has_int8:
            other_ratios, other_decode, other_rate, _, other_run = median_pair(
                [*common, "--precision", other], lambda repeat: f"{other}-{repeat}.db"
            )
            results["throughput"][f"{other}_graph"] = {
                "sdltag_images_per_s": round(other_rate, 2),
                "ratio": round(other_rate / other_decode, 3),
                "draft_decode_images_per_s": round(other_decode, 2),
                "ratios_of_all_pairs": other_ratios,
                "run": other_run,
                "note": f"the same pairs with --precision {other}",
            }

        naive_rate = naive_pipeline(photos[: args.naive_count], model_dir)
        results["naive"] = {
            "naive_images_per_s": round(naive_rate, 3),
            "naive_images": args.naive_count,
            "ratio": round(tag_rate / naive_rate, 2),
            "target": ">= 6",
        }

        # The text encoder as `make venv` exports it (once per venv; "already exported" after that), and a
        # warm-up tag run, so the re-tag times the labels only.
        encoders = Path(sys.prefix) / "share" / "sdltag" / "text-models"
        run_sdltag(["labels", "export-embedder", "all-MiniLM-L6-v2", "--out", str(encoders)], env)
        run_sdltag(
            [
                "tag",
                str(photos[0]),
                "--model",
                str(model_dir),
                "--no-index",
                "--quiet",
                "--label",
                "warm-up label",
                "--output",
                str(work / "warm.jsonl"),
            ],
            env,
        )
        labels_file = work / "new_labels.txt"
        labels_file.write_text(
            "".join(
                f"new label {i} {w}\n"
                for i, w in enumerate(
                    ["harbour", "autumn leaves", "street market", "mountain lake", "snowy forest"] * 20
                )
            ),
            encoding="utf-8",
        )
        retag = run_sdltag(
            ["tag", str(work / PHOTOS), *common, "--index", str(work / "index.db"), "--labels", str(labels_file)], env
        )
        # The re-tag's cost is a fixed start-up (Python, onnxruntime, the text model, embedding the
        # 100 labels: about a second) plus a per-image cost that is a fraction of a millisecond, so
        # its ratio grows with the library. Measure it at the base size and at the memory run's size
        # (which is indexed for that purpose), and report the tag loop's own ratio too.
        first_rate, retag_rate = _summary_rate(first["summary"]), _summary_rate(retag["summary"])
        results["retag_100_new_labels"] = {
            f"{args.count}_images": {
                "first_run_seconds": first["seconds"],
                "retag_seconds": retag["seconds"],
                "ratio": round(first["seconds"] / retag["seconds"], 2),
                "run": retag,
            },
            "tag_loop_ratio": round(retag_rate / first_rate, 1) if first_rate and retag_rate else None,
            "target": ">= 30",
            "note": "whole processes, including start-up and embedding the 100 new labels "
            "(text encoder exported beforehand, once per venv); tag_loop_ratio compares the two runs' "
            "own tagging loops (their summary lines): decode+infer+index vs index lookups+scoring",
        }

        base_mem = run_sdltag(["tag", str(work / PHOTOS), *common, "--index", str(work / "base-mem.db")], env)
        big = work / "big"
        big.mkdir()
        for copy in range(args.scale):
            for photo in photos:
                os.link(photo, big / f"{copy:02d}_{photo.name}")
        big_index = ["--index", str(work / "big.db")]
        big_mem = run_sdltag(["tag", str(big), *common, *big_index], env)
        results["memory"] = {
            f"{args.count}_images": base_mem,
            f"{args.count * args.scale}_images": big_mem,
            "difference_mb": round(big_mem["max_rss_mb"] - base_mem["max_rss_mb"], 1),
            "target": "<= 100",
        }

        def retag_record(folder: Path, index_args: list[str], first_run: dict, word: str) -> dict:
            """Re-tag ``folder`` with another 100 labels, new to the cache too; its ratio to ``first_run``."""
            labels = work / f"new_labels_{word}.txt"
            labels.write_text(labels_file.read_text(encoding="utf-8").replace("new label", word), "utf-8")
            retag = run_sdltag(["tag", str(folder), *common, *index_args, "--labels", str(labels)], env)
            return {
                "first_run_seconds": first_run["seconds"],
                "retag_seconds": retag["seconds"],
                "ratio": round(first_run["seconds"] / retag["seconds"], 2),
                "run": retag,
            }

        results["retag_100_new_labels"][f"{args.count * args.scale}_images"] = retag_record(
            big, big_index, big_mem, "other label"
        )
        if args.large:
            # A library-sized folder: the re-tag's fixed cost (start-up, embedding the labels)
            # weighs less the more photos there are; the first run here is timed in full.
            large = work / "large"
            large.mkdir()
            for n in range(args.large):
                photo = photos[n % len(photos)]
                os.link(photo, large / f"{n // len(photos):03d}_{photo.name}")
            large_index = ["--index", str(work / "large.db")]
            large_first = run_sdltag(["tag", str(large), *common, *large_index], env)
            record = retag_record(large, large_index, large_first, "third")
            results["retag_100_new_labels"][f"{args.large}_images"] = {**record, "first_run": large_first}

        one = photos[0]
        run_sdltag(["tag", str(one), "--model", str(model_dir), "--no-index", "--quiet"], env)  # warm caches
        singles = [
            run_sdltag(["tag", str(one), "--model", str(model_dir), "--no-index", "--quiet"], env)["seconds"]
            for _ in range(5)
        ]
        imports = python_import_baseline(env, 5)
        results["single_image"] = {
            "sdltag_seconds": round(statistics.median(singles), 3),
            "import_baseline_seconds": round(imports, 3),
            "ratio": round(statistics.median(singles) / imports, 2),
            "target": "<= 4",
        }
        results["targets_met"] = {
            "throughput": results["throughput"]["ratio"] >= 0.85,
            "throughput_float_graph": results["throughput"].get("float_graph", {}).get("ratio", 0) >= 0.85,
            "naive": results["naive"]["ratio"] >= 6,
            # judged on the largest folder measured (a library's size): the re-tag has a fixed
            # cost (start-up, embedding the new labels) that small folders cannot amortise
            "retag": max(
                (int(size.split("_")[0]), entry["ratio"])
                for size, entry in results["retag_100_new_labels"].items()
                if size.endswith("_images")
            )[1]
            >= 30,
            "retag_by_folder_size": {
                size: entry["ratio"] >= 30
                for size, entry in results["retag_100_new_labels"].items()
                if size.endswith("_images")
            },
            "memory": results["memory"]["difference_mb"] <= 100,
            "single_image": results["single_image"]["ratio"] <= 4,
        }
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
