"""``sdltag quantize``: an 8-bit copy of a model folder, for faster tagging on CPUs."""

from __future__ import annotations

from pathlib import Path

import typer

from sdltag.commands._common import cli_errors, info, warn
from sdltag.errors import SdltagError


@cli_errors
def quantize(
    model_dir: Path = typer.Argument(..., help="Model folder to quantise (float, as exported)."),
    images: Path = typer.Argument(..., help="Folder of calibration images, ideally photos like those you tag."),
    out: Path = typer.Option(..., "--out", "-o", help="Model folder to write (replaced atomically if it is one)."),
    count: int = typer.Option(256, "--count", min=2, help="Calibration images (a seeded sample of the folder)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the calibration sample."),
    name: str = typer.Option("", "--name", help="Model name recorded in the manifest (default: the folder name)."),
) -> None:
    """Write an 8-bit copy of a model (int8 weights, uint8 activations) calibrated on IMAGES.

    Faster inference on CPUs (most with VNNI), at a small cost in fidelity, which is
    measured on held-out images, printed, and recorded in the manifest. Tag with it
    through --model OUT; its index entries are its own.
    """
    from sdltag.modelfolder import load_model_folder
    from sdltag.quantize import quantize_model_folder

    model = load_model_folder(model_dir)
    if out.expanduser().resolve() == model.path.resolve():
        raise SdltagError(f"--out {out}: that is the model being quantised. Write the 8-bit copy to another folder.")
    folder, fid = quantize_model_folder(model, images, out, count=count, seed=seed, name=name, warn=warn)
    where = "held-out" if fid.held_out else "calibration (too few images to hold some out)"
    info(
        f"wrote {folder.path}: {folder.onnx_path.stat().st_size / 1e6:.1f} MB of ONNX (float: "
        f"{model.onnx_path.stat().st_size / 1e6:.1f} MB); on {fid.images} {where} images, score correlation "
        f"{fid.score_correlation:.4f} and top-10 overlap {fid.top10_overlap:.3f} with the float model"
    )


def register(app: typer.Typer) -> None:
    app.command("quantize")(quantize)
