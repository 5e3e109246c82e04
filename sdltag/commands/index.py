"""``sdltag index``: see and manage the index (stats, prune, clear, move); safe beside a running `sdltag tag`.

Every change is one SQLite transaction (or one per 500 rows for ``move``) taken with the
same busy handling as a tag run: a concurrent run's lock is waited for, never broken.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import typer

from sdltag.commands._common import cli_errors, human_size, info, warn
from sdltag.errors import SdltagError

index_app = typer.Typer(
    name="index",
    help="See and manage the index of principal-vector matrices (stats, prune, clear, move).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

INDEX_HELP = "Index file (default: in the user data folder)."


def _index_file(index_path: Path | None) -> Path:
    from sdltag.paths import default_index_path

    path = Path(index_path).expanduser() if index_path else default_index_path()
    if not path.is_file():
        raise SdltagError(f"{path}: no index there. Run `sdltag tag FOLDER` first, or pass --index FILE.")
    return path


def _open(index_path: Path | None):
    """The index opened for writing; refused (exit 1) when it cannot be written now."""
    from sdltag.index import ImageIndex

    index = ImageIndex.open(_index_file(index_path))
    if not index.writable:
        index.close()
        raise SdltagError(f"{index.path}: the index cannot be changed now (see above); nothing was done.", 1)
    return index


def _check_written(index) -> None:
    """A write that the index refused (a lock held past the timeout, a full disk) ends in exit 1."""
    if not index.writable:
        raise SdltagError(f"{index.path}: the change was not stored (see above).", 1)


def _echo_path(path: Path) -> None:
    """One path per line on stdout, its bytes exactly as the file system has them."""
    sys.stdout.flush()
    out = getattr(sys.stdout, "buffer", None)
    if out is None:
        typer.echo(os.fsdecode(path))
        return
    out.write(os.fsencode(path) + b"\n")
    out.flush()


def _when(seconds: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seconds))


def _known_models(model_dirs: list[Path]) -> dict[str, str]:
    """model_id -> a readable name, for the bundled model and each ``--model`` (both graphs)."""
    from sdltag.modelfolder import default_model_dir, load_model_folder

    names: dict[str, str] = {}
    candidates: list[Path] = list(model_dirs)
    try:
        candidates.append(default_model_dir())
    except Exception:  # noqa: BLE001 - no bundled model only means no name to show
        pass
    for folder in candidates:
        try:
            model = load_model_folder(folder)
        except Exception:  # noqa: BLE001 - a model that does not load only means no name to show
            continue
        name = model.manifest.name or model.path.name
        names.setdefault(model.model_id, name)
        if model.manifest.onnx_int8:
            names.setdefault(str(model.manifest.onnx_int8["sha256"]), f"{name} (int8)")
    return names


@index_app.command("stats")
@cli_errors
def stats(
    index_path: Path = typer.Option(None, "--index", help=INDEX_HELP),
    model_dirs: list[Path] = typer.Option(
        [], "--model", "-m", help="Model folder to name in the listing (repeatable; the bundled one is named)."
    ),
    as_json: bool = typer.Option(False, "--json", help="One JSON object instead of the table."),
) -> None:
    """Photos per model, the file's size on disk, and the oldest and newest entries."""
    from sdltag.index import ImageIndex, file_size_on_disk

    path = _index_file(index_path)
    with ImageIndex.open_readonly(path) as index:
        per_model = index.stats()
        photos = index.distinct_paths()
        schema = index.schema_version
    size = file_size_on_disk(path)
    names = _known_models(model_dirs)
    if as_json:
        payload = {
            "index": str(path),
            "bytes": size,
            "schema_version": schema,
            "photos": photos,
            "models": [
                {
                    "model_id": s.model_id,
                    "name": names.get(s.model_id),
                    "photos": s.photos,
                    "vector_bytes": s.vector_bytes,
                    "oldest": s.oldest,
                    "newest": s.newest,
                }
                for s in per_model
            ],
        }
        typer.echo(json.dumps(payload, ensure_ascii=False))
        return
    typer.echo(f"index: {path}")
    typer.echo(f"size: {human_size(size)} (schema version {schema})")
    typer.echo(f"photos: {photos}")
    for s in per_model:
        name = names.get(s.model_id)
        typer.echo(f"model {s.model_id[:16]}{f' ({name})' if name else ''}:")
        typer.echo(f"  photos: {s.photos}, vectors: {human_size(s.vector_bytes)}")
        typer.echo(f"  oldest: {_when(s.oldest)}, newest: {_when(s.newest)}")


@index_app.command("prune")
@cli_errors
def prune(
    folders: list[Path] = typer.Argument(None, help="Prune only under these folders (default: the whole index)."),
    index_path: Path = typer.Option(None, "--index", help=INDEX_HELP),
    dry_run: bool = typer.Option(False, "--dry-run", help="List the rows that would go; change nothing."),
) -> None:
    """Remove the rows of files that are gone (the system says "no such file"; nothing else counts).

    A file that cannot be checked (an unmounted drive answers "no such file" too: mount it
    first; a folder without permission, an I/O error) keeps its row. Prints each pruned path.
    """
    from sdltag.index import ImageIndex

    scope = [Path(f) for f in folders] if folders else None
    if dry_run:
        with ImageIndex.open_readonly(_index_file(index_path)) as index:
            gone, _, unsure = index.prune(scope, dry_run=True)
    else:
        with _open(index_path) as index:
            gone, removed, unsure = index.prune(scope)
            _check_written(index)
    for path in gone:
        _echo_path(path)
    files = f"{len(gone)} file{'s' if len(gone) != 1 else ''} gone"
    if dry_run:
        info(f"--dry-run: {files}; their rows would be removed")
    else:
        info(f"{files}; removed {removed} row{'s' if removed != 1 else ''}")
    if unsure:
        warn(f"{unsure} file{'s' if unsure != 1 else ''} could not be checked (permission, I/O error); kept")


@index_app.command("clear")
@cli_errors
def clear(
    model: str = typer.Option(
        ..., "--model", "-m", help="Model folder (both its graphs), or a model id from `sdltag index stats` (16+ hex)."
    ),
    index_path: Path = typer.Option(None, "--index", help=INDEX_HELP),
    dry_run: bool = typer.Option(False, "--dry-run", help="Say how many rows would go; change nothing."),
) -> None:
    """Remove every row of one model (its photos are embedded again by the next `sdltag tag`)."""
    from sdltag.index import ImageIndex

    path = _index_file(index_path)
    with ImageIndex.open_readonly(path) as index:
        present = {s.model_id: s.photos for s in index.stats()}
    ids = _model_ids(model, present)
    count = sum(present.get(m, 0) for m in ids)
    if dry_run:
        info(f"--dry-run: {count} row{'s' if count != 1 else ''} would be removed")
        return
    with _open(index_path) as index:
        removed = index.clear_model(ids)
        _check_written(index)
    info(f"removed {removed} row{'s' if removed != 1 else ''} of model {', '.join(m[:16] for m in ids)}")


def _model_ids(model: str, present: dict[str, int]) -> list[str]:
    folder = Path(model).expanduser()
    if folder.is_dir():
        from sdltag.modelfolder import load_model_folder

        loaded = load_model_folder(folder)
        ids = [loaded.model_id]
        if loaded.manifest.onnx_int8:
            ids.append(str(loaded.manifest.onnx_int8["sha256"]))
        return ids
    key = model.strip().lower()
    if len(key) < 16 or any(c not in "0123456789abcdef" for c in key):
        raise SdltagError(
            f"--model {model!r} is neither a model folder nor a model id. Pass a model folder, or at least the "
            "16 hex digits `sdltag index stats` shows."
        )
    matches = [m for m in present if m.lower().startswith(key)]
    if not matches:
        raise SdltagError(f"--model {model!r}: no rows of such a model in the index. See `sdltag index stats`.")
    if len(matches) > 1:
        raise SdltagError(f"--model {model!r} matches {len(matches)} models. Give more digits.")
    return matches


@index_app.command("move")
@cli_errors
def move(
    old: Path = typer.Argument(..., help="Where the library was (a folder or a file), e.g. /media/old-disk/Photos."),
    new: Path = typer.Argument(..., help="Where it is now, e.g. /media/photos-2024/Photos."),
    index_path: Path = typer.Option(None, "--index", help=INDEX_HELP),
    always_hash: bool = typer.Option(
        False,
        "--hash",
        help="Verify every file by its content hash (default: size and mtime, the hash when they differ).",
    ),
    dry_run: bool = typer.Option(False, "--dry-run", help="Say what would move; change nothing."),
) -> None:
    """Re-point the rows under OLD to NEW after a library moved, so nothing is embedded again.

    Each file at its new place is verified first: the same size and modification time, or the
    same content hash (a copy that did not keep the times). A row whose new file is missing or
    different keeps its old path (one line each, exit 1).
    """
    from sdltag.index import ImageIndex

    if os.path.abspath(old) == os.path.abspath(new):
        raise SdltagError(f"{old}: OLD and NEW are the same place; nothing to move.")
    path = _index_file(index_path)
    opener = (lambda: ImageIndex.open_readonly(path)) if dry_run else (lambda: _open(index_path))
    with opener() as index:
        plan = index.plan_move(Path(old), Path(new), always_hash=always_hash)
        moved = len(plan.moves) if dry_run else index.move(plan)
        if not dry_run:
            _check_written(index)
    for old_path, new_path, why in plan.unverified[:20]:
        warn(f"{old_path}: kept its row, {new_path} is not the same file ({why})")
    if len(plan.unverified) > 20:
        warn(f"... and {len(plan.unverified) - 20} more rows kept")
    rows = f"{moved} row{'s' if moved != 1 else ''}"
    verified = f" ({plan.by_hash} verified by content hash)" if plan.by_hash else ""
    info(f"{'--dry-run: would move' if dry_run else 'moved'} {rows} to {new}{verified}")
    if not plan.moves and not plan.unverified:
        info(f"no rows under {old}; see `sdltag index stats`")
    if plan.unverified:
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.add_typer(index_app, name="index")
