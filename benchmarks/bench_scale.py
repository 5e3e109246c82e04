"""The index at scale: synthetic indexes of 10,000, 100,000 and 1,000,000 photos, built through the real index API.

For each size (random principal vectors of a model's shape, by default the emoji model's 7 x 384, the
SDL shape; the default photo model has 1 x 384, a seventh of the work; no images):

- build: ``ImageIndex.put`` for every photo (resumable: a killed build goes on from its last commit),
  then the model's matrix file (``sdltag.matrixfile.sync``), each timed;
- disk: the index (SQLite, float32 rows) and the matrix file (8-bit rows and residuals);
- search: ``sdltag search beach -k 20`` as a whole process (warm file cache: one untimed run first),
  wall time (median of 3) and peak memory (VmHWM);
- re-tag: every photo scored against 100 new labels from the index alone (the image model never runs),
  the 10 best of each written as CSV to a file, as a whole process: wall time and peak memory;
- exactness: every float32 row read back from SQLite and scored exactly: search's top 20 against the
  exact top 20, and the re-tag's 10 best labels of every photo against the exact ones (set and order).

The photos search shows are created (empty files) so that search finds them; the others never
exist, and search never looks at them. Results are merged into benchmarks/results/scale.json
(one entry per size, so sizes can be measured in separate runs); the work files are deleted after
each size unless --keep.

    .venv/bin/python benchmarks/bench_scale.py [--sizes 10000 100000 1000000] [--work DIR] [--keep] [--model DIR]
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
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.bench_tag import WRAPPER  # noqa: E402  (the sdltag CLI as a child that reports its peak RSS)

RESULTS = ROOT / "benchmarks" / "results" / "scale.json"
QUERY = "beach"
CHUNK = 1000  # photos generated per step (one seed each, so a resumed build makes the same ones)
SHOWN = 64  # the best photos for the query are created as files (search checks only those it shows)
MODEL = ROOT / "models" / "emoji"  # 7 x 384 (--model)


def _model():
    from sdltag.modelfolder import load_model_folder

    return load_model_folder(MODEL).with_precision("float")


def _own_query(model):
    """The model's label ``QUERY`` alone, as a ``LabelSet``."""
    from sdltag.label_space import LabelSet

    q = list(model.all_labels).index(QUERY)
    unseen = q >= len(model.manifest.seen_labels)
    return LabelSet([QUERY], np.asarray(model.label_vectors[q : q + 1], dtype=np.float32), np.array([unseen]))


def _photo(work: Path, i: int) -> Path:
    return work / "photos" / f"{i // 1000:04d}" / f"{i:07d}.jpg"


def _vectors(chunk: int, rows: int, dim: int) -> np.ndarray:
    rng = np.random.default_rng(1000 + chunk)
    return (rng.standard_normal((CHUNK, rows, dim), dtype=np.float32) * (3 / np.sqrt(dim))).astype(np.float32)


def build(work: Path, size: int) -> dict:
    """The index of ``size`` photos (resumed where a killed build stopped); returns its timings."""
    from sdltag.index import ImageIndex

    model = _model()
    rows, dim = model.manifest.rows, model.manifest.dim
    progress = work / "build.json"
    done = json.loads(progress.read_text()) if progress.is_file() else {"seconds": 0.0}
    with ImageIndex.open(work / "index.db", commit_every=5000) as index:
        have = index.count(model.model_id)
        start_chunk = have // CHUNK  # a partial chunk is written again (INSERT OR REPLACE: same rows)
        started = time.perf_counter()
        for chunk in range(start_chunk, size // CHUNK):
            vectors = _vectors(chunk, rows, dim)
            for j in range(CHUNK):
                i = chunk * CHUNK + j
                index.put(_photo(work, i), 1, 1, f"synthetic:{i}", model.model_id, vectors[j])
            if chunk % 50 == 49:
                index.commit()
                done["seconds"] += time.perf_counter() - started
                started = time.perf_counter()
                progress.write_text(json.dumps(done))
                print(f"  built {(chunk + 1) * CHUNK} of {size}", file=sys.stderr, flush=True)
        index.commit()
        done["seconds"] += time.perf_counter() - started
        progress.write_text(json.dumps(done))
    return done


def prepare(work: Path) -> dict:
    """The matrix file (timed) and the files of the photos a search for QUERY shows."""
    from sdltag import matrixfile
    from sdltag.index import ImageIndex

    model = _model()
    query = _own_query(model)
    with ImageIndex.open(work / "index.db") as index:
        current = matrixfile.MatrixFile.open(matrixfile.matrix_path(index.path, model.model_id), model.model_id)
        built = current is None or len(current) != index.count(model.model_id)
        started = time.perf_counter()
        assert matrixfile.sync(index, model.model_id)
        seconds = time.perf_counter() - started
        view = matrixfile.load(index, model.model_id, update=False)
        scores = view.scores(query.vectors)[:, 0]
        best = view.rowids[np.argsort(-scores)[: 4 * SHOWN]]
        found = matrixfile.rows_by_id(index, model.model_id, best, view.state)
    for path, _ in found.values():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
    return {"matrix_build_s": round(seconds, 2)} if built else {}  # a kept file: its build was measured before


def _children_cpu() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _run(argv: list[str]) -> tuple[float, int, str, float]:
    """(wall s, peak RSS kB, stdout, CPU s: user + system, all threads) of one process."""
    cpu = _children_cpu()
    started = time.perf_counter()
    # one BLAS thread, as the sdltag CLI sets it (sdltag._platform): the re-tag child is not started by the CLI
    env = {**os.environ, "OPENBLAS_NUM_THREADS": os.environ.get("OPENBLAS_NUM_THREADS", "1")}
    done = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, env=env)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv[:4])}... failed ({done.returncode}): {done.stderr[-2000:]}")
    rss = [int(line.split()[1]) for line in done.stderr.splitlines() if line.startswith("MAXRSS_KB")]
    return wall, (rss[-1] if rss else 0), done.stdout, _children_cpu() - cpu


def measure_search(work: Path) -> dict:
    argv = [sys.executable, "-c", WRAPPER, "search", QUERY, "--index", str(work / "index.db")]
    argv += ["--model", str(MODEL), "--precision", "float", "--top-k", "20", "--format", "jsonl"]
    _run(argv)  # warm the file cache
    load = os.getloadavg()[0]
    runs = [_run(argv) for _ in range(3)]
    hits = [json.loads(line) for line in runs[-1][2].splitlines()]
    assert len(hits) == 20, runs[-1][2]
    return {
        "search_wall_s": round(statistics.median(r[0] for r in runs), 3),
        "search_wall_s_runs": [round(r[0], 3) for r in runs],
        "search_cpu_s": round(statistics.median(r[3] for r in runs), 3),
        "search_peak_rss_mb": round(max(r[1] for r in runs) / 1024, 1),
        "search_load_average": round(load, 1),
    }


def retag_child(index_path: Path, out: Path, labels: int) -> None:
    """The re-tag as its own process: every indexed photo against ``labels`` new labels, from the index alone."""
    import resource

    from sdltag import matrixfile
    from sdltag.index import ImageIndex
    from sdltag.label_space import LabelSet
    from sdltag.scoring import l2_normalize

    model = _model()
    rng = np.random.default_rng(7)
    space = LabelSet(
        [f"new label {i}" for i in range(labels)],
        l2_normalize(rng.standard_normal((labels, model.manifest.dim))),
        np.ones(labels, dtype=bool),
    )
    with ImageIndex.open_readonly(index_path) as index, open(out, "w", encoding="utf-8", newline="") as stream:
        written = matrixfile.retag(index, model, space, stream, top_k=10, raw_scores=True)
    print("WRITTEN", written)
    hwm = [line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM:")]
    print("MAXRSS_KB", hwm[0] if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)


def measure_retag(work: Path, labels: int) -> dict:
    out = work / "retag.csv"
    argv = [sys.executable, str(Path(__file__).resolve()), "--retag-child", str(work / "index.db"), str(out)]
    load = os.getloadavg()[0]
    wall, rss, stdout, cpu = _run([*argv, "--labels", str(labels), "--model", str(MODEL)])
    written = int(stdout.split()[-1])
    return {
        "retag_labels": labels,
        "retag_images": written,
        "retag_wall_s": round(wall, 2),
        "retag_cpu_s": round(cpu, 2),
        "retag_peak_rss_mb": round(rss / 1024, 1),
        "retag_output_mb": round(out.stat().st_size / 2**20, 1),
        "retag_load_average": round(load, 1),
    }


def _exact_scan(index, model_id: str, weights: np.ndarray, q: np.ndarray, k: int):
    """Every float32 row from SQLite in rowid order, scored exactly: (rowids, query scores, the ``k`` best of
    ``weights`` per photo as (labels, scores), best first, ties by label)."""
    from sdltag import matrixfile

    ids, query, labels, scores, after = [], [], [], [], -(2**63)
    while True:
        rows = index._do(lambda conn, a=after: matrixfile._rows_after(conn, model_id, a, 8192), list)
        if not rows:
            break
        rowids, vectors = matrixfile._decode_rows(rows)
        flat = vectors.reshape(-1, vectors.shape[-1])
        raw = (flat @ weights).reshape(len(rowids), vectors.shape[1], -1).max(axis=1)
        best, values = matrixfile._best(raw, k)
        ids.append(rowids), labels.append(best.astype(np.int16)), scores.append(values)
        query.append((flat @ q).reshape(len(rowids), -1).max(axis=1))
        after = int(rowids[-1])
    return np.concatenate(ids), np.concatenate(query), np.concatenate(labels), np.concatenate(scores)


def agreement(work: Path) -> dict:
    """Against exact float32 scores of every row in SQLite: search's top 20 and the re-tag's 10 best labels
    (``matrixfile.top_labels``, what the re-tag writes) of every photo; and the 8-bit rows alone (without
    the residuals), for comparison, on 2,000 photos."""
    from sdltag import matrixfile
    from sdltag.index import ImageIndex
    from sdltag.label_space import LabelSet
    from sdltag.scoring import l2_normalize

    model = _model()
    labels = l2_normalize(np.random.default_rng(7).standard_normal((100, model.manifest.dim)))  # the re-tag's
    weights = np.ascontiguousarray(labels.T, dtype=np.float32)
    one = _own_query(model)
    space = LabelSet([f"new label {i}" for i in range(100)], labels, np.ones(100, dtype=bool))
    with ImageIndex.open_readonly(work / "index.db") as index:
        started = time.perf_counter()
        ids, query, exact_labels, exact_scores = _exact_scan(
            index, model.model_id, weights, np.ascontiguousarray(one.vectors.T), 10
        )
        scan_s = time.perf_counter() - started
        ranked = matrixfile.top_labels(index, model, space, top_k=10, raw_scores=True)
        found = list(ranked)
        view = matrixfile.load(index, model.model_id, update=False)
        picked = np.sort(np.random.default_rng(1).choice(len(view), size=min(2000, len(view)), replace=False))
        coarse = np.concatenate([view.block_scores(int(i), int(i) + 1, weights) for i in picked])
        hits = matrixfile.rank(index, model, one, [], 20, raw_scores=True, threshold=None)
        paths = matrixfile.rows_by_id(index, model.model_id, ids[np.argsort(-query, kind="stable")[:20]], view.state)
    got_ids = np.concatenate([b.rowids for b in found])
    got_labels = np.concatenate([b.labels for b in found])
    got_scores = np.concatenate([b.scores for b in found])
    assert np.array_equal(got_ids, ids)
    same_set = np.sort(got_labels, axis=1) == np.sort(exact_labels, axis=1)
    coarse_best = np.argsort(-coarse, axis=1, kind="stable")[:, :10]
    return {
        "exact_scan_s": round(scan_s, 1),
        "search_top20_same_as_exact": len({p for p, _ in paths.values()} & {h.path for h in hits}) / 20,
        "retag_top10_set_same_as_exact": round(float(same_set.all(axis=1).mean()), 6),
        "retag_top10_order_same_as_exact": round(float((got_labels == exact_labels).all(axis=1).mean()), 6),
        "retag_rescored_from_sqlite": round(float(np.concatenate([b.exact for b in found]).mean()), 4),
        "retag_max_abs_score_error": float(np.abs(np.sort(got_scores, 1) - np.sort(exact_scores, 1)).max()),
        "retag_8bit_only_top10_set_same_as_exact": round(
            float(np.mean([set(a) == set(b) for a, b in zip(coarse_best, exact_labels[picked], strict=True)])), 4
        ),
    }


def disk(work: Path) -> dict:
    from sdltag import matrixfile
    from sdltag.index import file_size_on_disk

    matrix = matrixfile.matrix_path(work / "index.db", _model().model_id)
    return {
        "index_mb": round(file_size_on_disk(work / "index.db") / 2**20, 1),
        "matrix_file_mb": round(matrix.stat().st_blocks * 512 / 2**20, 1),  # allocated (the spare room is sparse)
    }


def main() -> None:
    global MODEL
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--work", type=Path, default=ROOT / "work" / "bench-scale")
    parser.add_argument("--keep", action="store_true", help="keep the work files (default: deleted after each size)")
    parser.add_argument("--labels", type=int, default=100)
    parser.add_argument("--model", type=Path, default=MODEL, help="the model whose shape the rows have")
    parser.add_argument("--retag-child", nargs=2, type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    MODEL = args.model.resolve()
    if args.retag_child:
        retag_child(*args.retag_child, args.labels)
        return
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    for size in args.sizes:
        work = args.work / f"n{size}"
        work.mkdir(parents=True, exist_ok=True)
        print(f"{size} photos in {work}", file=sys.stderr, flush=True)
        model = _model()
        entry = {"photos": size, "matrix_build_s": results.get(str(size), {}).get("matrix_build_s")}
        entry["model"] = f"{MODEL.name} ({model.manifest.rows} x {model.manifest.dim})"
        entry["build_s"] = round(build(work, size)["seconds"], 1)
        entry.update(prepare(work))
        entry.update(disk(work))
        entry.update(agreement(work))
        entry.update(measure_search(work))
        entry.update(measure_retag(work, args.labels))
        entry.update(
            {
                "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}",
                "note": "wall times on a machine shared with other work (see the load average); CPU s: user + system",
                "measured": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
        )
        print(json.dumps(entry), flush=True)
        results[str(size)] = entry
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(dict(sorted(results.items(), key=lambda kv: int(kv[0]))), indent=2) + "\n")
        if not args.keep:
            shutil.rmtree(work)


if __name__ == "__main__":
    main()
