"""``sdltag import-official``: turn the paper's released checkpoint into a model folder."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from sdltag.commands._common import cli_errors, info


@cli_errors
def import_official(
    checkpoint: Path = typer.Argument(
        ..., help="The official checkpoint NUS_mtresnet_224.pth (TResNet-M, NUS-WIDE) from Alibaba-MIIL/ZS_SDL."
    ),
    wordvecs: Path = typer.Option(
        ..., "--wordvecs", help="Word-vector pickle of the official release (nus_wide_wordvec_array.pickle)."
    ),
    classes: Path = typer.Option(
        ..., "--classes", help="Class-name pickle of the official release (nus_wide_classes.pickle)."
    ),
    unseen: Optional[Path] = typer.Option(
        None,
        "--unseen",
        help="Unseen-class pickle (nus_wide_unseen_classes.pickle): marks those 81 labels as zero-shot. "
        "Without it every label is recorded as seen.",
    ),
    out: Path = typer.Option(..., "--out", "-o", help="Model folder to write (replaced atomically if it is one)."),
    name: str = typer.Option(
        "", "--name", help="Model name recorded in the manifest (default: zs-sdl-nus-wide-tresnet-m)."
    ),
    word_vectors: Optional[Path] = typer.Option(
        None,
        "--word-vectors",
        help="Word-vector text file (.vec or GloVe .txt) to take --add-labels' vectors from; it must hold the "
        "official vectors (checked on the table's labels).",
    ),
    add_labels: Optional[Path] = typer.Option(
        None, "--add-labels", help="Labels file of extra labels to add as unseen labels (needs --word-vectors)."
    ),
) -> None:
    """Import the official SDL model (TResNet-M trained on NUS-WIDE, ICCV 2021) as a model folder.

    The checkpoint is read with torch.load(weights_only=True) and the pickles with a
    restricted unpickler (numpy arrays and builtin containers only). Every weight's
    name and shape is checked before anything is written. The folder then tags with
    the 1,006 NUS-WIDE labels: `sdltag tag PHOTOS --model MODEL_DIR`. Labels outside
    that table can be added with --add-labels and --word-vectors, from a word-vector
    file shown to hold the same vectors.
    """
    from sdltag.nn.official import import_official as run_import

    info(f"importing {checkpoint} (exporting its 34M parameters to ONNX takes a while)")
    folder = run_import(
        checkpoint, wordvecs, classes, out, unseen=unseen, name=name, word_vectors=word_vectors, add_labels=add_labels
    )
    manifest = folder.manifest
    extension = manifest.provenance.get("extension")
    if extension:
        known = extension["already_in_table"]
        info(
            f"added {extension['added_labels']} labels from {word_vectors}"
            + (f"; already in the table: {', '.join(known[:10])}" if known else "")
        )
    info(
        f"wrote {folder.path} ({manifest.backbone}, M={manifest.rows}, d={manifest.dim}, "
        f"{len(manifest.seen_labels)} seen + {len(manifest.unseen_labels)} unseen labels, "
        f"embedder {manifest.embedder.id})"
    )


def register(app: typer.Typer) -> None:
    app.command("import-official")(import_official)
