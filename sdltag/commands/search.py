"""``sdltag search``: rank indexed images by one label's score, without running the image model."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import typer

from sdltag.commands._common import cli_errors, complete_model_dir, info
from sdltag.errors import SdltagError

SEARCH_FORMATS = ("table", "csv", "json", "jsonl", "paths", "paths0", "html")
CHUNK = 4096  # index rows scored per matrix product


def rank_indexed(
    index, model, label_space, folders: list[Path], top: int, raw_scores: bool = False, threshold: float | None = None
):
    """The ``top`` indexed images under ``folders`` (all when empty) by the score of ``label_space``'s one label.

    Rows whose file has gone, and with ``threshold`` those scoring below it, are left out.
    Returns ``SearchHit`` records, best first.
    """
    from sdltag import matrixfile
    from sdltag.scoring import calibrate, sdl_scores
    from sdltag.writers import SearchHit

    # The model's matrix file (float16, memory-mapped, checked against the index): a large index in a few products
    hits = matrixfile.rank(index, model, label_space, folders, top, raw_scores=raw_scores, threshold=threshold)
    if hits is not None:
        return hits
    calibration = None if raw_scores else model.manifest.calibration
    paths: list[Path] = []
    scores: list[np.ndarray] = []
    matrices: list[np.ndarray] = []

    def score_chunk() -> None:
        stacked = np.stack(matrices)  # (N, M, d)
        raw = sdl_scores(stacked, label_space.vectors)  # (N, 1)
        scores.append(calibrate(raw, label_space.unseen_mask, calibration)[:, 0])
        matrices.clear()

    for row in index.under(folders, model.model_id):
        paths.append(row.path)
        matrices.append(row.vectors)
        if len(matrices) >= CHUNK:
            score_chunk()
    if matrices:
        score_chunk()
    if not paths:
        return []
    all_scores = np.concatenate(scores)
    order = np.lexsort((np.arange(all_scores.size), -all_scores))
    kind = "unseen" if bool(label_space.unseen_mask[0]) else "seen"
    hits = []
    for i in order:
        if threshold is not None and all_scores[i] < threshold:
            break  # best first: the rest score lower still
        if not paths[i].exists():
            continue
        hits.append(SearchHit(len(hits) + 1, paths[i], float(all_scores[i]), label_space.names[0], kind))
        if len(hits) >= top:
            break
    return hits


def query_label_space(model, query: str, embedder: str | None, cache_dir: Path | None):
    """The query as a one-label space: the model's own vector when it is one of its labels, else embedded."""
    from sdltag.labels import check_utf8_argument, label_key
    from sdltag.tagger import LabelSpace

    check_utf8_argument(query, "the search query")
    key = label_key(query)
    if not key:
        raise SdltagError("the search query is empty. Give a label, e.g. `sdltag search beach`.")
    own = LabelSpace.from_model(model)
    for i, name in enumerate(own.names):
        if label_key(name) == key:
            return LabelSpace([name], own.vectors[i : i + 1], own.unseen_mask[i : i + 1])
    from sdltag.commands.tag import resolve_label_space

    space = resolve_label_space(model, [], [query], no_seen=True, embedder=embedder, cache_dir=cache_dir)
    if len(space.names) != 1:
        raise SdltagError(f"the query {query!r} did not resolve to one label.")
    return space


@cli_errors
def search(
    query: str = typer.Argument(
        None, help="The label to search for, e.g. 'beach' or 'red car' (any text); none with --like."
    ),
    paths: list[Path] = typer.Argument(None, help="Folders or files to search under (default: the whole index)."),
    top: int = typer.Option(20, "--top", "-n", min=1, help="How many images to list, best first."),
    fmt: str = typer.Option(
        None,
        "--format",
        "-f",
        help="table, csv, json, jsonl, paths, paths0 (NUL-terminated, for xargs -0) or html (a contact sheet of "
        "the hits, thumbnails embedded) (default: table on a terminal, else jsonl).",
    ),
    model_dir: Path = typer.Option(
        None, "--model", "-m", help="Model folder (default: the bundled model).", autocompletion=complete_model_dir
    ),
    index_path: Path = typer.Option(None, "--index", help="Index file (default: in the user data folder)."),
    embedder: str = typer.Option(None, "--embedder", help="Text embedder for the query (default: the model's)."),
    cache_dir: Path = typer.Option(None, "--cache-dir", help="Label-vector cache folder (default: user cache)."),
    raw_scores: bool = typer.Option(False, "--raw-scores", help="Raw SDL scores instead of calibrated confidences."),
    threshold: float = typer.Option(
        None, "--threshold", "-t", help="List only images scoring at least this (then at most --top of them)."
    ),
    precision: str = typer.Option(
        "auto", "--precision", help="Whose vectors to rank: auto (what `sdltag tag` runs here), float or int8."
    ),
    like: Path = typer.Option(
        None,
        "--like",
        help="Rank by likeness to this image instead of a label: its principal vectors against every indexed "
        "image's (the model runs on this one image only, and not at all when it is indexed).",
    ),
) -> None:
    """Search indexed images by a label (tag-based retrieval); the image model never runs.

    Ranks every image `sdltag tag` indexed under PATH... with the same model by the
    query label's SDL score. With --like IMAGE instead of a label, ranks them by likeness
    to that image (the mean best-row cosine of the principal vectors, both ways), running
    the model on that one image only when the index does not hold it. Exit 1 when no
    indexed image matches the paths.
    """
    from sdltag.commands.tag import load_model
    from sdltag.index import ImageIndex
    from sdltag.paths import default_index_path

    if fmt is None:
        fmt = "table" if sys.stdout.isatty() else "jsonl"
    if fmt not in SEARCH_FORMATS:
        raise SdltagError(f"--format {fmt!r} is not one of {', '.join(SEARCH_FORMATS)}.")
    path = Path(index_path).expanduser() if index_path else default_index_path()
    if not path.is_file():
        raise SdltagError(f"{path}: no index yet. Run `sdltag tag FOLDER` first (or pass --index FILE).")
    from sdltag.runtime import resolve_precision

    # "cpu": no onnxruntime import just to ask for CUDA; rows of the other graph are the fallback below
    model, _ = resolve_precision(load_model(model_dir), precision, "cpu")
    folders = [Path(p) for p in (paths or [])]
    if like is not None:  # no label: QUERY, when given, is the first folder
        _search_like(path, model, Path(like), [Path(query), *folders] if query else folders, top, threshold, fmt)
        return
    if query is None:
        raise SdltagError("give a label to search for (e.g. `sdltag search beach`), or --like IMAGE.")
    label_space = query_label_space(model, query, embedder, cache_dir)
    with ImageIndex.open_readonly(path) as index:
        hits = rank_indexed(index, model, label_space, folders, top, raw_scores=raw_scores, threshold=threshold)
        if not hits and precision == "auto" and model.has_int8:
            # tagged with the other graph of the same model (e.g. --precision float, or on another CPU)
            other = _other_graph(model)
            if other is not None:
                hits = rank_indexed(index, other, label_space, folders, top, raw_scores=raw_scores, threshold=threshold)
    if not hits:
        where = ", ".join(str(p) for p in folders) or "the index"
        if threshold is not None:
            info(f"no image indexed with this model under {where} scores at least {threshold:g}")
        else:
            info(f"no images indexed with this model under {where}; run `sdltag tag` on them first")
        raise typer.Exit(1)
    _write_hits(hits, fmt, f"sdltag search {query}")


def _search_like(index_file: Path, model, image: Path, folders: list[Path], top: int, threshold, fmt: str) -> None:
    """``search --like IMAGE``: the indexed images most like ``image`` (``sdltag.similar``), best first."""
    from sdltag.index import ImageIndex
    from sdltag.similar import query_matrix, rank_like
    from sdltag.writers import SearchHit

    with ImageIndex.open_readonly(index_file) as index:
        if not index.count(model.model_id) and model.has_int8:
            # the library was tagged with this model's other graph: compare like with like
            other = _other_graph(model)
            if other is not None and index.count(other.model_id):
                model = other
        query, source = query_matrix(index, model, image)
        pairs = rank_like(index, model.model_id, query, folders, top, threshold=threshold, skip=image)
    info(f"--like {image}: its principal vectors from {source}")
    if not pairs:
        where = ", ".join(str(p) for p in folders) or "the index"
        if threshold is not None:
            info(f"no other image indexed with this model under {where} is at least {threshold:g} alike")
        else:
            info(f"no other images indexed with this model under {where}; run `sdltag tag` on them first")
        raise typer.Exit(1)
    name = image.name
    hits = [SearchHit(rank, hit, score, name, "like") for rank, (hit, score) in enumerate(pairs, start=1)]
    _write_hits(hits, fmt, f"sdltag search --like {name}")


def _other_graph(model):
    """The model's other graph (float <-> 8-bit), or None when it has none to offer."""
    try:
        return model.with_precision("float" if model.precision == "int8" else "int8")
    except SdltagError:
        return None


def _write_hits(hits, fmt: str, title: str) -> None:
    """The hits on stdout in ``fmt``; ``html`` is a contact sheet titled ``title``."""
    from sdltag.writers import stdout_stream, write_search_hits

    if fmt == "html":
        from sdltag.contact_sheet import write_search_sheet

        write_search_sheet(hits, stdout_stream(), title=title)
        return
    write_search_hits(hits, fmt, stdout_stream())


def register(app: typer.Typer) -> None:
    app.command("search")(search)
