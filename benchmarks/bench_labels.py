"""Benchmark the label path: the exported ONNX encoder vs sentence-transformers, and cache lookups vs embedding.

Two ratios, each against a baseline measured in the same run:

1. 50 new labels embedded by a whole ``python`` process: the exported encoder
   (onnxruntime + tokenizers, no torch) vs sentence-transformers (torch). Aim: >= 3x faster.
2. 1,000 labels looked up in the cache vs embedding them with the exported encoder, in one
   process. Aim: the lookup takes <= 5% of the embedding time.

The encoder is exported first by ``sdltag labels export-embedder`` into a scratch
``SDLTAG_HOME`` (timed and reported, not part of a ratio).

Usage::

    .venv/bin/python benchmarks/bench_labels.py [--labels-json /path/to/emoji.json] [--repeats 3]

Labels come from the CLDR emoji tags of ``--labels-json`` (the emoji data set's
``emoji.json``, see /work/shared/datasets/emoji/README.md for how to rebuild it) when
given and present, else from tests/data/cldr_labels.txt expanded with templates.
Results are written to benchmarks/results/labels.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "labels.json"
DEFAULT_JSON = Path("/work/shared/datasets/emoji/emoji.json")

EMBED_PROCESS = """
import sys, json
from sdltag.embedding import get_text_embedder
labels = json.loads(open(sys.argv[2], encoding="utf-8").read())
embedder = get_text_embedder(None, sys.argv[1], backend=sys.argv[3])
vectors = embedder.embed(labels)
assert vectors.shape == (len(labels), embedder.spec.dim) and embedder.last_new == len(labels)
print(int("torch" in sys.modules))
"""


def load_labels(path: Path | None, count: int) -> list[str]:
    """``count`` distinct real labels (CLDR tags), deterministic."""
    labels: list[str] = []
    if path is not None and path.is_file():
        records = json.loads(path.read_text(encoding="utf-8"))
        labels = sorted({tag for record in records for tag in record["tags"]} | {r["name"] for r in records})
    else:
        base = [
            line
            for line in (ROOT / "tests" / "data" / "cldr_labels.txt").read_text(encoding="utf-8").splitlines()
            if line and not line.startswith("#")
        ]
        labels = base + [f"a photo of {b}" for b in base] + [f"{b} icon" for b in base] + [f"small {b}" for b in base]
    labels = list(dict.fromkeys(labels))
    if len(labels) < count:
        raise SystemExit(f"only {len(labels)} labels available, need {count}")
    step = len(labels) / count
    return [labels[int(i * step)] for i in range(count)]


def fresh_cache(parent: Path) -> Path:
    """An empty label cache."""
    return Path(tempfile.mkdtemp(dir=parent))


def time_process(cache: Path, labels_file: Path, backend: str) -> tuple[float, bool]:
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-c", EMBED_PROCESS, str(cache), str(labels_file), backend],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},  # SDLTAG_HOME: the scratch home holding the export
    )
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(result.stderr)
    return elapsed, result.stdout.strip() == "1"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--labels-json", type=Path, default=DEFAULT_JSON, help="emoji.json with CLDR tags")
    parser.add_argument("--repeats", type=int, default=3, help="whole-process runs per path (median reported)")
    args = parser.parse_args()
    labels = load_labels(args.labels_json, 1050)
    with tempfile.TemporaryDirectory(prefix="sdltag-bench-") as tmp:
        tmp_path = Path(tmp)
        os.environ["SDLTAG_HOME"] = str(tmp_path / "home")
        # The explicit export: load sentence-transformers, export to ONNX, verify (reported, not part of a ratio).
        start = time.perf_counter()
        export = [sys.executable, "-m", "sdltag", "labels", "export-embedder", "all-MiniLM-L6-v2"]
        subprocess.run(export, check=True, capture_output=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        export_s = time.perf_counter() - start

        fifty = tmp_path / "fifty.json"
        fifty.write_text(json.dumps(labels[:50]), encoding="utf-8")
        onnx_runs, st_runs, torch_in_onnx = [], [], []
        for _ in range(args.repeats):  # interleaved, so load changes hit both paths alike
            elapsed, used_torch = time_process(fresh_cache(tmp_path), fifty, "onnx")
            onnx_runs.append(elapsed)
            torch_in_onnx.append(used_torch)
            st_runs.append(time_process(fresh_cache(tmp_path), fifty, "sentence-transformers")[0])

        # 1,000 labels: embed them with the exported encoder, then look them all up again, in one process.
        sys.path.insert(0, str(ROOT))
        from sdltag.embedding import get_text_embedder

        thousand = labels[50:1050]
        embedder = get_text_embedder(None, fresh_cache(tmp_path), backend="onnx")
        embedder.embed(["session warm-up"])  # load the ONNX session outside the timing
        start = time.perf_counter()
        embedded = embedder.embed(thousand)
        embed_s = time.perf_counter() - start
        assert embedder.last_new == 1000
        lookups = []
        for _ in range(5):
            start = time.perf_counter()
            cached = embedder.embed(thousand)
            lookups.append(time.perf_counter() - start)
            assert embedder.last_new == 0
        assert (cached == embedded).all()

    onnx_s, st_s, lookup_s = statistics.median(onnx_runs), statistics.median(st_runs), statistics.median(lookups)
    results = {
        "machine": {
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "load_avg_1m": os.getloadavg()[0],
        },
        "labels_source": str(args.labels_json)
        if args.labels_json and args.labels_json.is_file()
        else "tests/data/cldr_labels.txt (expanded)",
        "export_process_s": round(export_s, 3),
        "new_50_process": {
            "onnx_fast_path_s": [round(v, 3) for v in onnx_runs],
            "sentence_transformers_s": [round(v, 3) for v in st_runs],
            "onnx_imported_torch": any(torch_in_onnx),
            "speedup_median": round(st_s / onnx_s, 2),
            "aim": ">= 3x",
        },
        "cached_1000": {
            "embed_onnx_s": round(embed_s, 4),
            "cached_lookup_s": [round(v, 4) for v in lookups],
            "lookup_fraction_of_embed": round(lookup_s / embed_s, 4),
            "aim": "<= 0.05",
        },
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(
        f"50 new labels, whole process: ONNX {onnx_s:.2f} s vs sentence-transformers {st_s:.2f} s "
        f"-> {st_s / onnx_s:.1f}x (aim >= 3x); torch imported by the ONNX path: {any(torch_in_onnx)}"
    )
    print(
        f"1,000 labels: embed {embed_s:.3f} s, cached lookup {lookup_s * 1000:.1f} ms "
        f"-> {100 * lookup_s / embed_s:.2f}% (aim <= 5%)"
    )
    print(f"export-embedder (load sentence-transformers + export + verify): {export_s:.1f} s")
    print(f"wrote {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
