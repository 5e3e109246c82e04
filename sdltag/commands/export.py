"""``sdltag export``: turn a training checkpoint into a model folder."""

from __future__ import annotations

from pathlib import Path

import typer

from sdltag.commands._common import cli_errors, info


@cli_errors
def export(
    checkpoint: Path = typer.Argument(..., help="Training checkpoint (.pt) written by `sdltag train`."),
    out: Path = typer.Option(..., "--out", "-o", help="Model folder to write (replaced atomically if it is one)."),
    name: str = typer.Option("", "--name", help="Model name recorded in the manifest (default: the folder name)."),
) -> None:
    """Export a checkpoint to a model folder: model.onnx (dynamic batch, output (B, M, d)),
    manifest.json and the seen labels' embeddings."""
    from sdltag.nn.export import export_checkpoint

    folder = export_checkpoint(checkpoint, out, name=name)
    manifest = folder.manifest
    info(
        f"wrote {folder.path} ({manifest.backbone}, M={manifest.rows}, d={manifest.dim}, "
        f"{len(manifest.seen_labels)} seen labels)"
    )


def register(app: typer.Typer) -> None:
    app.command("export")(export)
