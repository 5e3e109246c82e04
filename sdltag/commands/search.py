"""``sdltag search``: rank indexed images by one label's score, without running the image model."""

from __future__ import annotations

from pathlib import Path

import typer

from sdltag.commands._common import cli_errors, complete_model_dir, info, merge_alias
from sdltag.writers import OutputFormat


# long: the Typer signature declares every option; the body is a few lines of wiring
@cli_errors
def search(
    query: str = typer.Argument(
        None, help="The label to search for, e.g. 'beach' or 'red car' (any text); none with --like."
    ),
    paths: list[Path] = typer.Argument(None, help="Folders or files to search under (default: the whole index)."),
    top: int = typer.Option(20, "--top-k", "-k", min=1, help="How many images to list, best first."),
    top_alias: int = typer.Option(None, "--top", "-n", min=1, hidden=True, help="Old spelling of --top-k."),
    fmt: OutputFormat = typer.Option(
        None,
        "--format",
        "-f",
        help="Output format: paths0 is NUL-terminated (for xargs -0), html a contact sheet of the hits, "
        "thumbnails embedded (default: table on a terminal, else jsonl).",
    ),
    model_dir: Path = typer.Option(
        None, "--model", "-m", help="Model folder (default: the bundled model).", autocompletion=complete_model_dir
    ),
    index_path: Path = typer.Option(None, "--index", help="Index file (default: in the user data folder)."),
    embedder: str = typer.Option(None, "--embedder", help="Text embedder for the query (default: the model's)."),
    cache_dir: Path = typer.Option(None, "--cache-dir", help="Label-vector cache folder (default: user cache)."),
    raw_scores: bool = typer.Option(False, "--raw-scores", help="Raw SDL scores instead of calibrated confidences."),
    threshold: float = typer.Option(
        None, "--threshold", "-t", help="List only images scoring at least this (then at most --top-k of them)."
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
    from sdltag.api import Tagger
    from sdltag.paths import default_index_path
    from sdltag.search import no_hits_message
    from sdltag.tagger import TagOptions
    from sdltag.writers import choose_format, write_hits

    fmt_name = choose_format(fmt)
    top = merge_alias(top, top_alias)
    # "cpu": no onnxruntime import just to ask for CUDA; rows of the other graph are the fallback
    tagger = Tagger(
        model_dir,
        embedder=embedder,
        cache_dir=cache_dir,
        index=index_path or default_index_path(),
        options=TagOptions(raw_scores=raw_scores),
        device="cpu",
        precision=precision,
    )
    folders = [Path(p) for p in (paths or [])]
    if like is not None and query:  # no label: QUERY, when given, is the first folder
        folders.insert(0, Path(query))
    hits = tagger.search(None if like else query, folders, top_k=top, threshold=threshold, like=like)
    if not hits:
        info(no_hits_message(folders, threshold, like=like is not None))
        raise typer.Exit(1)
    title = f"sdltag search --like {Path(like).name}" if like is not None else f"sdltag search {query}"
    write_hits(hits, fmt_name, title)


def register(app: typer.Typer) -> None:
    app.command("search")(search)
