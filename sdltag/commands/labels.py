"""``sdltag labels``: pre-embed labels into the cache, export a text embedder, list a model's labels,
inspect the cache."""

from __future__ import annotations

from pathlib import Path

import typer

from sdltag.commands._common import cli_errors, human_size, info

labels_app = typer.Typer(
    name="labels",
    help="Labels files, the label-vector cache, the exported text encoder and a model's labels.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

CACHE_DIR_HELP = "Label-vector cache folder (default: $SDLTAG_HOME/cache, else the user cache folder)."


@labels_app.command("embed")
@cli_errors
def embed(
    files: list[Path] = typer.Argument(
        None, metavar="FILE", help="Labels files: UTF-8, one label per line, `label: description`."
    ),
    label: list[str] = typer.Option(
        [], "--label", metavar="TEXT", help="A label to embed: `label` or `label: description` (repeatable)."
    ),
    embedder: str = typer.Option(
        None,
        "--embedder",
        metavar="NAME_OR_PATH",
        help="sentence-transformers model name or folder (default: the bundled all-MiniLM-L6-v2).",
    ),
    cache_dir: Path = typer.Option(None, "--cache-dir", metavar="DIR", help=CACHE_DIR_HELP),
) -> None:
    """Embed labels into the cache ahead of time, so tagging with them needs no text model.

    Reports how many labels were new (embedded now) and how many were already cached.
    """
    from sdltag.embedding import get_text_embedder
    from sdltag.labels import build_vocabulary

    entries = build_vocabulary(files or [], label)
    text_embedder = get_text_embedder(embedder, cache_dir)
    text_embedder.embed([entry.text for entry in entries])
    new = int(getattr(text_embedder, "last_new", 0))
    noun = "label" if len(entries) == 1 else "labels"
    info(f"{len(entries)} {noun}: {new} new, {len(entries) - new} already cached ({text_embedder.spec.id})")


@labels_app.command("export-embedder")
@cli_errors
def export_embedder(
    name: str = typer.Argument(
        ...,
        metavar="NAME_OR_PATH",
        help="sentence-transformers model: all-MiniLM-L6-v2 (bundled), a model folder, or a model in the "
        "local Hugging Face cache.",
    ),
    out: Path = typer.Option(
        None,
        "--out",
        metavar="DIR",
        help="Folder to export into (default: text-models in the user data folder, $SDLTAG_HOME/data when set). "
        "Tagging looks there and in this Python environment's share/sdltag/text-models.",
    ),
    force: bool = typer.Option(False, "--force", help="Export again over an earlier export of the same embedder."),
    cache_dir: Path = typer.Option(
        None, "--cache-dir", metavar="DIR", help="Cache folder, where the weights' hash is kept (as in `labels embed`)."
    ),
) -> None:
    """Export a text embedder to ONNX (graph + tokenizer), so new labels are embedded without torch.

    The export is checked against sentence-transformers (same token ids; vectors within 1e-5,
    the largest difference is reported). Any failure is one error line and exit code 1.
    Nothing is downloaded. `make venv` exports the default embedder.

    Example:

    \b
        sdltag labels export-embedder all-MiniLM-L6-v2
    """
    from sdltag.embedding.cache import LabelVectorCache
    from sdltag.embedding.locate import embedding_dim, locate_text_model, make_spec
    from sdltag.embedding.onnx_text import user_encoders_dir
    from sdltag.embedding.st import export_encoder

    files = locate_text_model(name)
    spec = make_spec(files, LabelVectorCache(cache_dir), embedding_dim(files.folder) or 0)
    result = export_encoder(files.folder, spec.id, out if out is not None else user_encoders_dir(), force=force)
    size = human_size(result.bytes)
    if result.max_abs_diff is None:
        info(f"{spec.id}: already exported in {result.folder} ({size}); --force exports it again")
        return
    info(
        f"exported {spec.id} to {result.folder} ({size}); max abs diff to sentence-transformers "
        f"{result.max_abs_diff:.1e}, min cosine {result.min_cosine:.7f} over {result.probes} probe texts"
    )


@labels_app.command("list")
@cli_errors
def list_labels(
    model: Path = typer.Option(
        None, "--model", "-m", metavar="MODEL_DIR", help="Model folder (default: the bundled model)."
    ),
    unseen: bool = typer.Option(True, "--unseen/--no-unseen", help="Also list the model's unseen labels."),
) -> None:
    """Print a model's labels, one per line: the seen labels, then the unseen ones marked
    with a tab and `unseen`. The output is a valid labels file."""
    from sdltag.modelfolder import load_model_folder

    folder = load_model_folder(model if model is not None else _default_model())
    for name in folder.manifest.seen_labels:
        typer.echo(name)
    if unseen:
        for name in folder.manifest.unseen_labels:
            typer.echo(f"{name}\t# unseen")
    manifest = folder.manifest
    info(
        f"{folder.path}: {len(manifest.seen_labels)} seen, {len(manifest.unseen_labels)} unseen labels "
        f"({manifest.embedder.id})"
    )


def _default_model() -> Path:
    from sdltag import modelfolder
    from sdltag.errors import SdltagError

    default = getattr(modelfolder, "default_model_dir", None)
    if default is None:
        raise SdltagError("no default model in this sdltag. Pass --model MODEL_DIR.")
    return default()


@labels_app.command("cache")
@cli_errors
def cache(
    clear: bool = typer.Option(False, "--clear", help="Delete every cached vector (exported text encoders stay)."),
    cache_dir: Path = typer.Option(None, "--cache-dir", metavar="DIR", help=CACHE_DIR_HELP),
) -> None:
    """Show the label cache's location, size on disk and entry count (per embedder); --clear empties it."""
    from sdltag.embedding import clear_embedder_memo
    from sdltag.embedding.cache import LabelVectorCache

    store = LabelVectorCache(cache_dir)
    if clear:
        removed = store.clear()
        clear_embedder_memo()
        info(f"cleared {store.directory} ({removed} label vectors removed)")
        return
    stats = store.stats()
    typer.echo(f"location: {store.directory}")
    typer.echo(f"size: {human_size(stats.bytes)}")
    typer.echo(f"entries: {stats.entries}")
    for embedder_id, count in sorted(stats.per_embedder.items()):
        typer.echo(f"  {embedder_id}: {count}")
    for folder in _exported_encoders():
        typer.echo(f"exported text encoder: {folder}")


def _exported_encoders() -> list[Path]:
    from sdltag.embedding.onnx_text import encoder_roots

    found: list[Path] = []
    for root in encoder_roots():
        if root.is_dir():
            found.extend(p for p in sorted(root.iterdir()) if p.is_dir() and not p.name.startswith("."))
    return found


def register(app: typer.Typer) -> None:
    app.add_typer(labels_app, name="labels")
