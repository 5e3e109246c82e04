"""``sdltag quantize``: an 8-bit copy of a model folder, for faster tagging on CPUs."""

from __future__ import annotations

from pathlib import Path

import typer

from sdltag.commands._common import cli_errors, info
from sdltag.errors import SdltagError


@cli_errors
def quantize(
    model_dir: Path = typer.Argument(..., help="Model folder to quantise (float, as exported)."),
    images: Path = typer.Argument(..., help="Folder of calibration images, ideally photos like those you tag."),
    out: Path = typer.Option(
        None, "--out", "-o", help="Model folder to write the 8-bit copy to (replaced atomically if it is one)."
    ),
    attach: bool = typer.Option(
        False, "--attach", help="Add the 8-bit graph to MODEL_DIR itself (model.int8.onnx) instead of a copy."
    ),
    count: int = typer.Option(256, "--count", min=2, help="Calibration images (a seeded sample of the folder)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the calibration sample."),
    name: str = typer.Option("", "--name", help="Model name recorded in the manifest (default: the folder name)."),
) -> None:
    """Quantise a model to 8 bits (int8 weights, uint8 activations), calibrated on IMAGES.

    Faster inference on CPUs, at a small cost in fidelity, which is measured on held-out
    images, printed, and recorded in the manifest. With --attach the 8-bit graph goes into
    MODEL_DIR beside the float one, and `sdltag tag` uses it on CPUs with VNNI or Arm
    dot-product instructions (--precision picks); with --out it is a separate model folder.
    Either way its index entries are its own.
    """
    from sdltag.modelfolder import load_model_folder
    from sdltag.quantize import quantize_model_folder

    if (out is None) == (not attach):
        raise SdltagError(
            "give --out FOLDER (a separate 8-bit model folder) or --attach (add the 8-bit graph to MODEL_DIR), "
            "not both or neither."
        )
    model = load_model_folder(model_dir)
    if out is not None and out.expanduser().resolve() == model.path.resolve():
        raise SdltagError(
            f"--out {out}: that is the model being quantised. Use --attach to add the 8-bit graph to it, "
            "or write the copy to another folder."
        )
    folder, fid = quantize_model_folder(model, images, out, count=count, seed=seed, name=name)
    where = "held-out" if fid.held_out else "calibration (too few images to hold some out)"
    if attach:
        folder = folder.with_precision("int8")
    info(
        f"wrote {folder.onnx_path}: {folder.onnx_path.stat().st_size / 1e6:.1f} MB of ONNX (float: "
        f"{model.onnx_path.stat().st_size / 1e6:.1f} MB); on {fid.images} {where} images, score correlation "
        f"{fid.score_correlation:.4f} and top-10 overlap {fid.top10_overlap:.3f} with the float model"
    )


def register(app: typer.Typer) -> None:
    app.command("quantize")(quantize)
