"""The emoji-scenes benchmark with the ImageNet-pretrained EfficientNet-Lite0: SDL against M=1.

The protocol of ``benchmarks/README.md`` (main, in-domain: ``zsl-test`` for the reported figures,
``val-1k`` for epoch selection and calibration, the 100 unseen labels of ``unseen_labels.txt``),
with ``sdltag train --backbone efficientnet_lite0`` instead of ``smallcnn`` from scratch, in two
ways:

- ``frozen``: ``--freeze-backbone``, only the SDL head trains on the pooled features;
- ``blocks``: ``--train-blocks K``, the last K blocks of the backbone, its head convolution and the
  SDL head train, on the cached feature maps at the input of block -K.

Every run shares one feature cache (``--feature-cache WORK/features``), filled once by the
``features`` step: a single pass over the images stores both the feature maps at the input of
block -K and the pooled vectors, so neither mode recomputes the frozen part. The test split is
scored from the same cache with the trained weights (head, and for ``blocks`` the trained blocks)
through ``sdltag.metrics`` exactly as ``sdltag eval`` scores it; ``check`` compares that with
``sdltag eval`` on the exported ONNX model for some test scenes.

    python -m benchmarks.bench_emoji_pretrained features --work WORK
    python -m benchmarks.bench_emoji_pretrained run --work WORK --mode frozen --variant sdl --seed 0
    python -m benchmarks.bench_emoji_pretrained check --work WORK --name frozen-sdl-s0 --count 500
    python -m benchmarks.bench_emoji_pretrained table --results benchmarks/results

WORK/data holds the splits generated with the commands of ``benchmarks/README.md``
(``train-16k``, ``val-1k``, ``zsl-test``); ``--train-count N`` trains on the first N scenes of
``train-16k`` (scene i is the same whatever the split's size, so this is the documented prefix).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
UNSEEN = ROOT / "benchmarks" / "unseen_labels.txt"
BACKBONE = "efficientnet_lite0"
VARIANTS = {"sdl": ["--rows", "7", "--sigma"], "m1": ["--rows", "1"]}
LAMBDA = 0.1
SPLITS = ("zsl-test", "val-1k")  # computed first: the test must be whole; a training prefix is usable


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def _environment() -> dict[str, Any]:
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    return {
        "commit": commit,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "loadavg": list(os.getloadavg()),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def _spec(size: int):  # noqa: ANN202 - InputSpec
    from sdltag.nn.backbones import efficientnet_lite as lite

    spec = lite.input_spec(BACKBONE)
    return dataclasses.replace(spec, height=size, width=size)


def train_dir(work: Path, count: int) -> Path:
    """The first ``count`` scenes of train-16k as a labelled folder (labels.csv, the images linked)."""
    source = work / "data" / "train-16k"
    if count >= 16000:
        return source
    folder = work / "data" / f"train-{count}"
    labels = folder / "labels.csv"
    if not labels.exists():
        folder.mkdir(parents=True, exist_ok=True)
        if not (folder / "images").exists():
            (folder / "images").symlink_to(source / "images", target_is_directory=True)
        lines = (source / "labels.csv").read_text(encoding="utf-8").splitlines()
        tmp = labels.with_suffix(".tmp")
        tmp.write_text("\n".join(lines[: count + 1]) + "\n", encoding="utf-8")
        os.replace(tmp, labels)
    return folder


def _paths(folder: Path) -> list[Path]:
    from sdltag.datasets import read_labeled_dir

    return [item.path for item in read_labeled_dir(folder, "auto").items]


def _cache(work: Path, size: int, blocks: int, threads: int):  # noqa: ANN202 - FeatureCache
    import torch

    from sdltag.nn.augment import AugmentConfig
    from sdltag.nn.backbones import efficientnet_lite as lite
    from sdltag.nn.features import FeatureCache

    net = lite.efficientnet_lite(BACKBONE, pretrained=True).eval()
    return FeatureCache(
        work / "features", BACKBONE, net, _spec(size), AugmentConfig(), torch.device("cpu"), threads, blocks
    )


class _Progress:
    """A log line a minute."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.last = 0.0

    def __call__(self, done: int, total: int) -> None:
        if time.perf_counter() - self.last > 60 or done == total:
            self.last = time.perf_counter()
            _log(f"{self.name}: {done}/{total} images")


def cmd_features(args: argparse.Namespace) -> None:
    """One pass over test, validation and training scenes: maps at block -K and pooled vectors, cached."""
    from sdltag.nn.data import ImageStore

    work = Path(args.work)
    cache = _cache(work, args.image_size, args.blocks, args.threads)
    folders = [work / "data" / s for s in SPLITS] + [train_dir(work, args.train_count)]
    record: dict[str, Any] = {"command": shlex.join(sys.argv), "environment": _environment(), "splits": {}}
    for folder in folders:
        paths = _paths(folder)
        start = time.perf_counter()
        progress = _Progress(folder.name)

        store = ImageStore(paths, cache.spec, cache=False, workers=args.workers)
        features = cache.store(store, 1, progress)
        seconds = time.perf_counter() - start
        record["splits"][folder.name] = {
            "images": len(paths),
            "ok": int(features.ok.sum()),
            "seconds": round(seconds, 1),
            "shape": list(features.features.shape[1:]),
        }
        _log(f"{folder.name}: {len(paths)} images in {seconds:.0f} s")
    cache.close()
    record["environment_end"] = _environment()
    out = work / "features.json"
    out.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")


def run_name(mode: str, variant: str, seed: int, tag: str = "") -> str:
    return f"emoji-pretrained-{mode}-{variant}{tag}-s{seed}"


def train_command(args: argparse.Namespace, name: str, resume: bool) -> list[str]:
    work = Path(args.work)
    mode_args = ["--freeze-backbone"] if args.mode == "frozen" else ["--train-blocks", str(args.blocks)]
    command = [
        sys.executable,
        "-m",
        "sdltag",
        "train",
        str(train_dir(work, args.train_count)),
        "--val",
        str(work / "data" / "val-1k"),
        "--unseen",
        str(UNSEEN),
        "--backbone",
        BACKBONE,
        "--image-size",
        str(args.image_size),
        *mode_args,
        "--feature-cache",
        str(work / "features"),
        *VARIANTS[args.variant],
        "--lambda",
        str(LAMBDA),
        "--epochs",
        str(args.epochs),
        "--lr",
        str(args.lr),
        "--seed",
        str(args.seed),
        "--no-flip",
        "--threads",
        str(args.train_threads),
        "--workers",
        "0",
        "--run-dir",
        str(work / "runs" / name),
        "--out",
        str(work / "models" / name),
        "-q",
    ]
    return [*command, "--resume"] if resume else command


def evaluate_cached(work: Path, model_dir: Path, size: int, blocks: int) -> dict[str, Any]:
    """``sdltag eval``'s metrics on zsl-test, the principal vectors computed from the cached features."""
    import torch

    from sdltag.datasets import read_labeled_dir
    from sdltag.evaluation import KS
    from sdltag.label_space import resolve_labels
    from sdltag.labels import label_key
    from sdltag.metrics import zsl_gzsl_metrics
    from sdltag.modelfolder import load_model_folder
    from sdltag.nn.checkpoint import load_checkpoint
    from sdltag.nn.data import ImageStore
    from sdltag.nn.features import CachedHead
    from sdltag.nn.model import ModelConfig, SDLModel
    from sdltag.scoring import sdl_scores

    folder = load_model_folder(model_dir)
    state = load_checkpoint(model_dir / "checkpoint.pt")
    model = SDLModel(ModelConfig.from_dict(state["model_config"]))
    model.load_state_dict(state["model"])
    model.eval()
    dataset = read_labeled_dir(work / "data" / "zsl-test", "auto")
    cache = _cache(work, size, blocks, 2)
    store = cache.store(ImageStore([i.path for i in dataset.items], cache.spec, cache=False, workers=0), 1)
    cache.close()
    head = CachedHead(model.backbone, model.head, blocks)
    with torch.no_grad():
        vectors = torch.cat([head(store.features[i : i + 256, 0]) for i in range(0, len(dataset.items), 256)])
    labels = resolve_labels(folder, [], include_seen=True)
    column = {label_key(name): j for j, name in enumerate(labels.names)}
    targets = np.zeros((len(dataset.items), len(labels.names)), dtype=bool)
    for i, item in enumerate(dataset.items):
        for label in item.labels:
            if label_key(label) in column:
                targets[i, column[label_key(label)]] = True
    ok = store.ok.numpy()
    scores = sdl_scores(vectors.numpy(), labels.vectors)
    results = zsl_gzsl_metrics(scores[ok], targets[ok], labels.unseen_mask, KS, "skip")
    return {
        "images": {"listed": len(ok), "evaluated": int(ok.sum())},
        "labels": {"seen": int((~labels.unseen_mask).sum()), "unseen": int(labels.unseen_mask.sum())},
        **{name: value.to_json() for name, value in results.items()},
        "map_rule": "skip",
    }


def cmd_run(args: argparse.Namespace) -> None:
    """Train one row's seed (resumable), then score zsl-test from the cache; results/<name>.json."""
    work = Path(args.work)
    name = run_name(args.mode, args.variant, args.seed, args.tag)
    out = Path(args.results) / f"{name}.json"
    if out.exists():
        _log(f"{name}: done already ({out})")
        return
    model_dir = work / "models" / name
    blocks = args.blocks if args.mode == "blocks" else 0
    timing_file = work / "runs" / f"{name}.timing.json"
    if not (model_dir / "manifest.json").exists():
        resume = (work / "runs" / name / "last.pt").exists()
        command = train_command(args, name, resume)
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        start_env = _environment()
        start = time.perf_counter()
        _log(f"{name}: {shlex.join(command)}")
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        if done.returncode != 0:
            sys.exit(f"{name}: training failed ({done.returncode}): {done.stderr[-2000:]}")
        timing = {
            "train_command": shlex.join(command),
            "train_seconds": round(seconds, 1),
            "resumed": resume,
            "environment_start": start_env,
            "environment_end": _environment(),
            "train_output": (done.stdout + done.stderr)[-3000:],
        }
        timing_file.write_text(json.dumps(timing, indent=1) + "\n", encoding="utf-8")
    timing = json.loads(timing_file.read_text(encoding="utf-8")) if timing_file.exists() else {}
    start = time.perf_counter()
    metrics = evaluate_cached(work, model_dir, args.image_size, blocks)
    record = {
        "row": name,
        "mode": args.mode,
        "variant": args.variant,
        "seed": args.seed,
        "lam": LAMBDA,
        "epochs": args.epochs,
        "lr": args.lr,
        "blocks": blocks,
        "image_size": args.image_size,
        "train_scenes": args.train_count,
        "protocol": "main",
        "test": "zsl-test",
        "command": shlex.join(sys.argv),
        **timing,
        "eval_seconds": round(time.perf_counter() - start, 1),
        "metrics": metrics,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    _log(f"{name}: ZSL mAP {metrics['zsl']['map']:.2f}, GZSL mAP {metrics['gzsl']['map']:.2f}")


def cmd_check(args: argparse.Namespace) -> None:
    """``sdltag eval`` (the exported ONNX graph, images decoded as tagging does) against the cached-feature
    scoring, on the first ``--count`` test scenes."""
    import shutil

    work = Path(args.work)
    model_dir = work / "models" / args.name
    record = json.loads((Path(args.results) / f"{args.name}.json").read_text(encoding="utf-8"))
    subset = work / "data" / f"zsl-test-{args.count}"
    if not (subset / "labels.csv").exists():
        subset.mkdir(parents=True, exist_ok=True)
        if not (subset / "images").exists():
            (subset / "images").symlink_to(work / "data" / "zsl-test" / "images", target_is_directory=True)
        lines = (work / "data" / "zsl-test" / "labels.csv").read_text(encoding="utf-8").splitlines()
        (subset / "labels.csv").write_text("\n".join(lines[: args.count + 1]) + "\n", encoding="utf-8")
    command = [sys.executable, "-m", "sdltag", "eval", str(model_dir), str(subset), "--format", "json"]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=True)
    onnx_seconds = time.perf_counter() - start
    onnx = json.loads(done.stdout)
    # the same subset scored from the cache
    tmp = work / "data" / ".check"
    if tmp.exists():
        shutil.rmtree(tmp)
    (tmp / "data").mkdir(parents=True)
    (tmp / "data" / "zsl-test").symlink_to(subset, target_is_directory=True)
    (tmp / "features").symlink_to(work / "features", target_is_directory=True)
    cached = evaluate_cached(tmp, model_dir, record["image_size"], record["blocks"])
    shutil.rmtree(tmp)
    rows = {}
    for group in ("zsl", "gzsl", "seen"):
        rows[group] = {
            "map": [onnx[group]["map"], cached[group]["map"]],
            "f1@3": [onnx[group]["f1"]["3"], cached[group]["f1"]["3"]],
        }
    check = {
        "model": args.name,
        "scenes": args.count,
        "eval_command": shlex.join(command),
        "onnx_vs_cached": rows,
        "eval_seconds": round(onnx_seconds, 1),
        "environment": _environment(),
    }
    out = Path(args.results) / f"check-{args.name}-{args.count}.json"
    out.write_text(json.dumps(check, indent=1) + "\n", encoding="utf-8")
    print(json.dumps(rows, indent=1))


COLUMNS = (("zsl", "map"), ("zsl", "3"), ("gzsl", "map"), ("gzsl", "3"), ("seen", "map"))
HEADER = "| row | training | seeds | ZSL mAP | ZSL F1@3 | GZSL mAP | GZSL F1@3 | seen-only mAP |"
SCRATCH = {  # the from-scratch rows of RESULTS.md (smallcnn, all-train): result files and their budget
    ("sdl", 3): "zsl-sdl-lam0.1-s{seed}.json",
    ("m1", 3): "zsl-m1-lam0.1-s{seed}.json",
    ("sdl", 10): "zsl-sdl-lam0.1-e10-s{seed}.json",
    ("m1", 10): "zsl-m1-lam0.1-e10-s{seed}.json",
}
NAMES = {"sdl": "SDL (M=7, sigma, lambda 0.1)", "m1": "M=1"}


def _value(metrics: dict[str, Any], group: str, what: str) -> float:
    block = metrics[group]
    return float(block["map"]) if what == "map" else float(block["f1"][what])


def _cells(runs: list[dict[str, Any]]) -> tuple[list[str], list[float]]:
    import statistics

    cells, means = [], []
    for group, what in COLUMNS:
        values = [_value(r["metrics"], group, what) for r in runs]
        mean = statistics.fmean(values)
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        cells.append(f"{mean:.2f} +/- {std:.2f}" if len(values) > 1 else f"{mean:.2f}")
        means.append(mean)
    return cells, means


def cmd_table(args: argparse.Namespace) -> None:
    """The markdown table of RESULTS.md: pretrained rows (seeds pooled), the from-scratch rows, SDL / M=1."""
    results = Path(args.results)
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for path in sorted(results.glob("emoji-pretrained-*.json")):
        record = json.loads(path.read_text(encoding="utf-8"))
        groups.setdefault((record["mode"], record["variant"], record["epochs"]), []).append(record)
    scratch_dir = ROOT / "benchmarks" / "results"
    rows, means = [HEADER, "| --- " * 8 + "|"], {}
    for (variant, epochs), pattern in SCRATCH.items():
        runs = []
        for seed in range(3):
            path = scratch_dir / pattern.format(seed=seed)
            if path.exists():
                runs.append({"seed": seed, **json.loads(path.read_text(encoding="utf-8"))})
        if runs:
            cells, means[("scratch", epochs, variant)] = _cells(runs)
            seeds = ",".join(str(r["seed"]) for r in runs)
            budget = f"smallcnn from scratch, 96 px, all-train, {epochs} epochs"
            rows.append(f"| {NAMES[variant]} | {budget} | {seeds} | " + " | ".join(cells) + " |")
    for mode, epochs in sorted({(m, e) for m, _, e in groups}, key=lambda k: (k[0] != "frozen", k[1])):
        for variant in VARIANTS:
            runs = sorted(groups.get((mode, variant, epochs), []), key=lambda r: r["seed"])
            if not runs:
                continue
            first = runs[0]
            cells, means[(mode, epochs, variant)] = _cells(runs)
            what = "frozen (head only)" if mode == "frozen" else f"last {first['blocks']} block(s) + head conv + head"
            size, scenes = first["image_size"], first["train_scenes"]
            budget = f"Lite0 {what}, {size} px, first {scenes} scenes, {first['epochs']} epochs"
            seeds = ",".join(str(r["seed"]) for r in runs)
            rows.append(f"| {NAMES[variant]} | {budget} | {seeds} | " + " | ".join(cells) + " |")
    rows.append("")
    for key in sorted({(m, e) for m, e, _ in means}, key=str):
        sdl, m1 = means.get((*key, "sdl")), means.get((*key, "m1"))
        if sdl and m1:
            label = f"{key[0]}, {key[1]} epochs"
            ratios = ", ".join(
                f"{group.upper() if group != 'seen' else 'seen'} {'mAP' if what == 'map' else 'F1@3'} {a / b:.2f}x"
                for (group, what), a, b in zip(COLUMNS, sdl, m1, strict=True)
            )
            rows.append(f"- SDL / M=1, {label}: {ratios}")
    print("\n".join(rows))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--work", required=True, help="work folder: data/, features/, runs/, models/")
    common.add_argument("--image-size", type=int, default=128, help="input side (the scenes are 96 px)")
    common.add_argument("--blocks", type=int, default=1, help="K of --train-blocks (and of the cached maps)")
    common.add_argument("--train-count", type=int, default=8000, help="first N scenes of train-16k")
    common.add_argument("--threads", type=int, default=2)
    common.add_argument("--workers", type=int, default=1)
    common.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "emoji-pretrained"))
    sub.add_parser("features", parents=[common], help="fill the shared feature cache")
    run = sub.add_parser("run", parents=[common], help="train and test one row's seed")
    run.add_argument("--mode", choices=("frozen", "blocks"), required=True)
    run.add_argument("--variant", choices=tuple(VARIANTS), required=True)
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--epochs", type=int, default=5)
    run.add_argument("--lr", type=float, default=1e-3)
    run.add_argument("--train-threads", type=int, default=1)
    run.add_argument("--tag", default="", help="appended to the row's name (another budget of the same row)")
    check = sub.add_parser("check", parents=[common], help="sdltag eval (ONNX) vs the cached scoring")
    check.add_argument("--name", required=True)
    check.add_argument("--count", type=int, default=500)
    sub.add_parser("table", parents=[common], help="the RESULTS.md table from the result files")
    args = parser.parse_args(argv)
    {"features": cmd_features, "run": cmd_run, "check": cmd_check, "table": cmd_table}[args.command](args)


if __name__ == "__main__":
    main()
