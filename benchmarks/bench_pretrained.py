"""The pretrained EfficientNet-Lite0 backbone on a keyworded photo-like library, against training from scratch.

1. Speed: frozen-backbone feature extraction (decode + onnxruntime, images/s) and SDL head training
   (images/s), and what they mean for a library of 5,000 photos.
2. Quality per wall-clock: ``sdltag train DIR --backbone efficientnet_lite0 --freeze-backbone`` on
   2,000 composited Tux Paint scenes (``benchmarks/tuxpaint_scenes.py``: photographic cut-outs of
   Debian's ``tuxpaint-stamps-default``, GPL-2) against ``--backbone smallcnn`` from scratch given the
   same wall-clock time; both evaluated with ``sdltag eval`` on 400 held-out scenes (another seed).
   Keywords: each cut-out's name and its category folder's name; 15% of the names (seeded) are held
   out of training as unseen labels (ZSL).

    python -m benchmarks.bench_pretrained --work work/bench-pretrained \\
        --stamps work/bench-pretrained/tux/usr/share/tuxpaint/stamps

Writes ``benchmarks/results/pretrained.json``. Every command is run as a user would run it
(``.venv/bin/sdltag``), timed from start to exit.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SDLTAG = str(Path(sys.executable).with_name("sdltag"))
RESULTS = ROOT / "benchmarks" / "results" / "pretrained.json"


def _labels_folder(scenes: Path, out: Path) -> Path:
    """A ``labels.csv`` (path,labels) beside the scenes: names + leaf category of each cut-out."""
    from benchmarks.tuxpaint_scenes import read_scenes

    rows = ["path,labels"]
    for file, names, categories in read_scenes(scenes):
        keywords = []
        for word in names + [c.split("/")[-1] for c in categories]:
            if word and word not in keywords:
                keywords.append(word)
        rows.append(f'{file},"{";".join(keywords)}"')
    out.mkdir(parents=True, exist_ok=True)
    for path in scenes.glob("*.jpg"):
        target = out / path.name
        if not target.exists():
            os.link(path, target)
    (out / "labels.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return out


def _unseen(scenes: Path, share: float, seed: int, path: Path) -> list[str]:
    from benchmarks.tuxpaint_scenes import read_scenes

    names = sorted({n for _, ns, _ in read_scenes(scenes) for n in ns if n})
    chosen = sorted(random.Random(seed).sample(names, round(share * len(names))))
    path.write_text("\n".join(chosen) + "\n", encoding="utf-8")
    return chosen


def _run(args: list[str], log: Path) -> float:
    start = time.perf_counter()
    with open(log, "w", encoding="utf-8") as handle:
        subprocess.run(args, check=True, stdout=handle, stderr=subprocess.STDOUT)
    return time.perf_counter() - start


def _eval(model: Path, test: Path, log: Path) -> dict:
    start = time.perf_counter()
    out = subprocess.run(
        [SDLTAG, "eval", str(model), str(test), "--format", "json", "-q"], check=True, capture_output=True, text=True
    )
    log.write_text(out.stderr, encoding="utf-8")
    report = json.loads(out.stdout)
    return {
        "gzsl_map": report["gzsl"]["map"],
        "zsl_map": report.get("zsl", {}).get("map"),
        "gzsl_f1_3": report["gzsl"]["f1"]["3"],
        "zsl_f1_3": report.get("zsl", {}).get("f1", {}).get("3"),
        "eval_s": round(time.perf_counter() - start, 1),
    }


def speed(train_dir: Path, work: Path, count: int) -> dict:
    """Feature extraction and head training, in-process, images/s."""
    import torch

    from sdltag.datasets import read_labeled_dir
    from sdltag.nn.augment import AugmentConfig
    from sdltag.nn.backbones import efficientnet_lite as lite
    from sdltag.nn.data import ImageStore
    from sdltag.nn.features import FeatureCache
    from sdltag.nn.loss import sdl_loss
    from sdltag.nn.model import SDLHead

    items = read_labeled_dir(str(train_dir), "auto").items[:count]
    spec = lite.input_spec("efficientnet_lite0")
    net = lite.efficientnet_lite("efficientnet_lite0", pretrained=True).eval()
    folder = work / "speed-features"
    shutil.rmtree(folder, ignore_errors=True)
    cache = FeatureCache(folder, "efficientnet_lite0", net, spec, AugmentConfig(), torch.device("cpu"))
    store = ImageStore([i.path for i in items], spec, cache=False, workers=1)
    cache._run(torch.zeros(2, 3, spec.height, spec.width))  # export + session start, timed apart
    start = time.perf_counter()
    features = cache.store(store, 1)
    extract = len(items) / (time.perf_counter() - start)
    start = time.perf_counter()
    cache.store(store, 1)
    cached = len(items) / (time.perf_counter() - start)
    cache.close()

    torch.set_num_threads(1)  # what `sdltag train --freeze-backbone` does for the head on a CPU
    head = SDLHead(1280, 7, 384)
    optimizer = torch.optim.Adam(head.parameters(), lr=1e-3)
    labels = torch.nn.functional.normalize(torch.randn(500, 384), dim=1)
    targets = (torch.rand(len(items), 500) < 0.005).to(torch.uint8)
    targets[:, 0] = 1
    steps, batch = 100, 64
    start = time.perf_counter()
    for _ in range(steps):
        index = torch.randint(len(items), (batch,))
        vectors = head(features.features[index, 0][:, :, None, None])
        loss = sdl_loss(vectors, labels, targets[index], lam=0.1).total
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    head_rate = steps * batch / (time.perf_counter() - start)
    return {
        "load_average": os.getloadavg(),
        "images": len(items),
        "feature_extraction_images_per_s": round(extract, 2),
        "cached_feature_read_images_per_s": round(cached, 1),
        "head_training_images_per_s": round(head_rate, 1),
        "minutes_for_5000_photos_10_epochs": round((5000 / extract + 10 * 5000 / head_rate) / 60, 1),
    }


def _blocks_row(train_dir: Path, test_dir: Path, work: Path, common: list[str], blocks: int, epochs: int) -> dict:
    """``--train-blocks K`` from a fresh run folder (its own feature pass included in the time)."""
    model = work / "model-blocks"
    for path in (model, model.with_name(model.name + ".train")):
        shutil.rmtree(path, ignore_errors=True)
    cmd = [SDLTAG, "train", str(train_dir), "--out", str(model), "--backbone", "efficientnet_lite0"]
    cmd += ["--train-blocks", str(blocks), "--epochs", str(epochs), *common]
    seconds = _run(cmd, work / "blocks.log")
    row = {"command": " ".join(cmd[1:]), "train_s": round(seconds, 1), "load_after": os.getloadavg()}
    row.update(_eval(model, test_dir, work / "blocks-eval.log"))
    return {f"efficientnet_lite0 last {blocks} block(s) fine-tuned, {epochs} epoch(s)": row}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("work/bench-pretrained"))
    parser.add_argument("--stamps", type=Path, required=True, help="tuxpaint stamps folder")
    parser.add_argument("--train", type=int, default=2000)
    parser.add_argument("--test", type=int, default=400)
    parser.add_argument("--epochs", type=int, default=10, help="head epochs of the frozen run (the default)")
    parser.add_argument("--speed-images", type=int, default=200)
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--rows",
        default="frozen,scratch",
        help="comma list of frozen, blocks (--train-blocks), scratch; rows not run keep their figures in the results",
    )
    parser.add_argument("--blocks", type=int, default=1, help="K of the blocks row's --train-blocks K")
    parser.add_argument("--blocks-epochs", type=int, default=1, help="epochs of the blocks row")
    parser.add_argument(
        "--results", type=Path, default=None, help="result file (default: results/pretrained.json, -sN for seed N)"
    )
    args = parser.parse_args(argv)
    rows = set(args.rows.split(","))
    from benchmarks.tuxpaint_scenes import LICENCE, generate

    work = args.work.absolute()
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if not (work / "scenes-train").is_dir():
        generate(args.stamps, work / "scenes-train", args.train, 100 + args.seed)
    if not (work / "scenes-test").is_dir():
        generate(args.stamps, work / "scenes-test", args.test, 200 + args.seed)
    generation_s = time.perf_counter() - t0
    train_dir = _labels_folder(work / "scenes-train", work / "train")
    test_dir = _labels_folder(work / "scenes-test", work / "test")
    unseen = _unseen(work / "scenes-train", 0.15, args.seed, work / "unseen.txt")
    result: dict = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load_before": os.getloadavg()},
        "data": {
            "train_images": args.train,
            "test_images": args.test,
            "unseen_labels": len(unseen),
            "licence": LICENCE,
            "generation_s": round(generation_s, 1),
        },
    }
    if not args.skip_speed:
        result["speed"] = speed(train_dir, work, args.speed_images)
        print(json.dumps(result["speed"]), flush=True)

    out = args.results or (RESULTS if args.seed == 0 else RESULTS.with_name(f"pretrained-s{args.seed}.json"))
    previous = json.loads(out.read_text(encoding="utf-8")) if out.exists() else {}
    runs = dict(previous.get("runs", {}))
    common = ["--unseen", str(work / "unseen.txt"), "--seed", str(args.seed), "-q", "--no-keep-weights"]
    if "blocks" in rows:
        runs.update(_blocks_row(train_dir, test_dir, work, common, args.blocks, args.blocks_epochs))
        print(json.dumps(runs), flush=True)
    if not rows & {"frozen", "scratch"}:
        result["runs"] = runs
        for key in ("speed", "ratios"):
            if key in previous:
                result[key] = previous[key]
        result["machine"]["load_after"] = os.getloadavg()
        out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
        print(json.dumps(result, indent=1))
        return 0
    frozen = work / "model-frozen"
    for path in (frozen, frozen.with_name(frozen.name + ".train")):
        shutil.rmtree(path, ignore_errors=True)
    cmd = [SDLTAG, "train", str(train_dir), "--out", str(frozen), "--backbone", "efficientnet_lite0"]
    cmd += ["--freeze-backbone", "--epochs", str(args.epochs), *common]
    seconds = _run(cmd, work / "frozen.log")
    runs["efficientnet_lite0 frozen"] = {"command": " ".join(cmd[1:]), "train_s": round(seconds, 1)}
    runs["efficientnet_lite0 frozen"].update(_eval(frozen, test_dir, work / "frozen-eval.log"))
    print(json.dumps(runs), flush=True)

    # smallcnn from scratch in the same wall-clock: a short probe gives its epoch time.
    scratch = work / "model-scratch"
    probe = work / "model-probe"
    for path in (scratch, probe):
        shutil.rmtree(path, ignore_errors=True)
        shutil.rmtree(path.with_name(path.name + ".train"), ignore_errors=True)
    base = [SDLTAG, "train", str(train_dir), "--backbone", "smallcnn", *common]
    probe_s = _run([*base, "--out", str(probe), "--epochs", "1"], work / "probe.log")
    epochs = max(1, int(seconds / probe_s))
    cmd = [*base, "--out", str(scratch), "--epochs", str(epochs)]
    scratch_s = _run(cmd, work / "scratch.log")
    runs["smallcnn from scratch"] = {
        "command": " ".join(cmd[1:]),
        "train_s": round(scratch_s, 1),
        "probe_epoch_s": round(probe_s, 1),
    }
    runs["smallcnn from scratch"].update(_eval(scratch, test_dir, work / "scratch-eval.log"))
    a, b = runs["efficientnet_lite0 frozen"], runs["smallcnn from scratch"]
    result["runs"] = runs
    result["ratios"] = {
        "gzsl_map": round(a["gzsl_map"] / max(b["gzsl_map"], 1e-9), 2),
        "zsl_map": round(a["zsl_map"] / max(b["zsl_map"], 1e-9), 2) if a["zsl_map"] and b["zsl_map"] else None,
    }
    result["seed"] = args.seed
    result["machine"]["load_after"] = os.getloadavg()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
