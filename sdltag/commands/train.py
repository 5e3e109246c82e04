"""``sdltag train``: train an SDL model on a labeled folder and export it as a model folder."""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Any

import typer

from sdltag.commands._common import LAYOUTS, cli_errors, error, info, merge_alias
from sdltag.errors import SdltagError
from sdltag.progress import ProgressBar

LOG_EVERY_S = 60.0  # when stderr is not a terminal (a log file), one progress line this often


class TrainDisplay:
    """Training progress on stderr: a bar with loss, lr, images/s and time left, one line per epoch.

    When stderr is not a terminal (redirected to a log), the bar becomes a plain progress
    line every ``LOG_EVERY_S`` seconds, so long epochs still show signs of life. Messages and
    warnings come through the ``sdltag`` logger (the CLI prints them above the bar).
    """

    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet
        self.terminal = sys.stderr.isatty()
        self.bar: ProgressBar | None = None
        self.features_bar: ProgressBar | None = None
        self.features_split: str | None = None  # the split the features bar shows
        self.rate = 0.0
        self.loss = float("nan")
        self.started = self.last_log = time.perf_counter()
        self.total = self.first_step = 0

    def _line(self, text: str) -> None:
        if self.bar is not None:
            self.bar.print(text)
        else:
            print(text, file=sys.stderr, flush=True)

    def start(self, total_steps: int, done_steps: int, steps_per_epoch: int) -> None:
        self.total, self.first_step = total_steps, done_steps
        self.started = self.last_log = time.perf_counter()
        self.bar = ProgressBar(
            "epoch {task.fields[epoch]}",
            total=total_steps,
            completed=done_steps,
            fields="loss {task.fields[loss]}  lr {task.fields[lr]}  {task.fields[rate]} img/s",
            eta_label="ETA",
            transient=False,
            quiet=self.quiet,
            epoch=1 + done_steps // max(steps_per_epoch, 1),
            loss="-",
            lr="-",
            rate="-",
        ).start()

    def step(self, step: int, epoch: int, loss: float, lr: float, images_per_s: float) -> None:
        if math.isfinite(loss):
            self.loss = loss if not math.isfinite(self.loss) else 0.9 * self.loss + 0.1 * loss
        self.rate = images_per_s if self.rate == 0 else 0.9 * self.rate + 0.1 * images_per_s
        if self.bar is not None and self.bar.shown:
            loss_text, rate_text = f"{self.loss:.4f}", f"{self.rate:.0f}"
            self.bar.update(completed=step, epoch=epoch + 1, loss=loss_text, lr=f"{lr:.2e}", rate=rate_text)
        elif not self.quiet and time.perf_counter() - self.last_log >= LOG_EVERY_S:
            self.last_log = now = time.perf_counter()
            per_step = (now - self.started) / max(step - self.first_step, 1)
            eta = int(per_step * (self.total - step))
            self._line(
                f"sdltag: step {step}/{self.total} (epoch {epoch + 1})  loss {self.loss:.4f}  lr {lr:.2e}  "
                f"{self.rate:.0f} img/s  ETA {eta // 3600}:{eta // 60 % 60:02d}:{eta % 60:02d}"
            )

    def epoch_end(self, epoch: int, train_loss: float, metrics: dict[str, Any] | None, best: bool) -> None:
        if self.quiet:
            return
        text = f"epoch {epoch}: train loss {train_loss:.4f}"
        if metrics:
            gzsl = metrics["gzsl"]
            text += f"  GZSL F1@3 {gzsl['f1']['3']:.2f} mAP {gzsl['map']:.2f}"
            if "zsl" in metrics:
                text += f"  ZSL F1@3 {metrics['zsl']['f1']['3']:.2f} mAP {metrics['zsl']['map']:.2f}"
        if best:
            text += "  (best so far)"
        self._line(f"sdltag: {text}")

    def features(self, split: str, done: int, total: int) -> None:
        """The frozen-backbone feature pass (phase 1 of 2): its own bar, or a log line a minute."""
        if self.quiet:
            return
        if not self.terminal:
            if done >= total or time.perf_counter() - self.last_log >= LOG_EVERY_S:
                self.last_log = time.perf_counter()
                self._line(f"sdltag: features ({split}): {done}/{total} images")
            return
        if self.features_bar is None or self.features_split != split:
            self._end_features()
            self.features_split = split
            self.features_bar = ProgressBar(
                f"features ({split})", total=total, completed=done, eta_label="images  ETA", transient=False
            ).start()
        self.features_bar.update(completed=done, total=total)
        if done >= total:
            self._end_features()

    def _end_features(self) -> None:
        if self.features_bar is not None:
            self.features_bar.stop()
            self.features_bar = None

    def finish(self) -> None:
        self._end_features()
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


# long: the Typer signature declares every option; the body builds the settings and calls the library
@cli_errors
def train(
    data_dir: Path = typer.Argument(
        ..., help="Labeled image folder (labels.csv/jsonl, IMG.txt or XMP sidecars, or one sub-folder per label)."
    ),
    out: Path = typer.Option(..., "--out", "-o", help="Model folder to write at the end (replaced atomically)."),
    layout: str = typer.Option("auto", "--layout", help=f"Folder layout: {', '.join(LAYOUTS)}."),
    layout_alias: str | None = typer.Option(None, "--format", hidden=True, help="Old spelling of --layout."),
    exclude: list[str] = typer.Option(
        [],
        "--exclude",
        help="Leave out image files matching this glob (repeatable), e.g. '*/exports/*' or '*.thumb.jpg'.",
    ),
    machine_keywords: bool = typer.Option(
        False,
        "--machine-keywords",
        help="XMP layout: also learn keywords programs wrote (sdltag's own, darktable|..., digiKam's internal "
        "tags); by default only people's keywords are labels.",
    ),
    val: Path | None = typer.Option(None, "--val", help="Separate labeled folder for validation (else --val-split)."),
    val_split: float = typer.Option(0.1, "--val-split", help="Share of DATA_DIR held out for validation (no --val)."),
    unseen: Path | None = typer.Option(
        None,
        "--unseen",
        help="Labels file of labels held out of training and used "
        "only for zero-shot validation; they join the model as unseen labels.",
    ),
    backbone: str = typer.Option(
        "smallcnn",
        "--backbone",
        help="Image backbone: smallcnn (from scratch), efficientnet_lite0 (ImageNet-pretrained), resnet50, ...",
    ),
    width: int | None = typer.Option(
        None, "--width", help="Backbone width (channels of the first stage); default: the backbone's own."
    ),
    image_size: int | None = typer.Option(
        None, "--image-size", help="Input side in pixels (default 96 for smallcnn, 224 otherwise)."
    ),
    rows: int = typer.Option(7, "--rows", help="M, the number of principal vectors per image."),
    lam: float = typer.Option(0.1, "--lambda", help="Weight of the row-variance regulariser (0..1)."),
    sigma: bool = typer.Option(
        True, "--sigma/--no-sigma", help="Semantic-diversity weighting (1 + sigma) of the ranking loss."
    ),
    epochs: int = typer.Option(10, "--epochs", help="Passes over the training images."),
    batch_size: int = typer.Option(64, "--batch-size", help="Images per optimizer step."),
    lr: float = typer.Option(1e-3, "--lr", help="Peak learning rate of the one-cycle schedule."),
    weight_decay: float = typer.Option(1e-4, "--weight-decay", help="L2 penalty on weights (not biases or norms)."),
    optimizer: str = typer.Option(
        "adam", "--optimizer", help="adam (plain L2, the official recipe) or adamw (decoupled decay)."
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of the split, the initial weights, batch order and augmentation."),
    pretrained: bool = typer.Option(
        True,
        "--pretrained/--no-pretrained",
        help="Start from the backbone's ImageNet weights where it has them (efficientnet_lite0); "
        "--no-pretrained trains from random weights.",
    ),
    freeze_backbone: bool = typer.Option(
        False,
        "--freeze-backbone",
        help="Keep the pretrained backbone fixed and train only the SDL head on its features, computed once per "
        "image and cached in the run folder: minutes on a laptop CPU.",
    ),
    feature_views: int = typer.Option(
        1,
        "--feature-views",
        help="With --freeze-backbone: feature vectors per training image (the image, plus augmented views).",
    ),
    train_blocks: int = typer.Option(
        0,
        "--train-blocks",
        help="Fine-tune the pretrained backbone's last K blocks (and its head convolution) with the SDL head; the "
        "frozen part runs once per image, cached like --freeze-backbone: a CPU-sized fine-tune.",
    ),
    feature_cache: Path | None = typer.Option(
        None,
        "--feature-cache",
        help="Folder of cached backbone features (--freeze-backbone, --train-blocks); runs on the same images "
        "can share one (default: the run folder's features/).",
    ),
    init: Path | None = typer.Option(
        None,
        "--init",
        help="Fine-tune from a model folder written by `sdltag train` (or a .pt checkpoint); same embedder required.",
    ),
    embedder: str | None = typer.Option(
        None, "--embedder", help="Text embedder name or folder (default: the bundled all-MiniLM-L6-v2)."
    ),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda (mixed precision on CUDA)."),
    workers: int = typer.Option(2, "--workers", help="Processes decoding images (0: decode in the main process)."),
    threads: int | None = typer.Option(None, "--threads", help="torch CPU threads (default: torch's choice)."),
    cache_mb: int = typer.Option(4096, "--cache-mb", help="Keep decoded images in RAM when they fit in this many MB."),
    run_dir: Path | None = typer.Option(
        None, "--run-dir", help="Folder for checkpoints (default: OUT.train beside the model folder)."
    ),
    resume: bool = typer.Option(
        False, "--resume", help="Continue the interrupted run in the run folder exactly, with its saved settings."
    ),
    channels_last: bool = typer.Option(
        True,
        "--channels-last/--no-channels-last",
        help="channels-last memory layout (the default: about 2.8x faster training steps on a 2-core CPU, "
        "see benchmarks/bench_train.py).",
    ),
    compile: bool = typer.Option(
        False,
        "--compile/--no-compile",
        help="torch.compile the training step (a minute of compiling; no faster than the default channels-last "
        "layout on a 2-core CPU, may help on a GPU).",
    ),
    dist_backend: str = typer.Option(
        "auto",
        "--dist-backend",
        help="Under torchrun: gloo (CPUs) or nccl (GPUs); auto picks by --device.",
    ),
    dist_timeout: float = typer.Option(
        300.0,
        "--dist-timeout",
        help="Under torchrun: seconds to wait for the other processes (joining, and each exchange) before "
        "failing with a resumable checkpoint.",
    ),
    augment: bool = typer.Option(
        True, "--augment/--no-augment", help="Random resized crop, flip, colour jitter and cutout while training."
    ),
    flip: bool = typer.Option(
        True,
        "--flip/--no-flip",
        help="Random horizontal flips while training; turn off when labels name a side or direction "
        "(left, right, arrows) or images hold text.",
    ),
    keep_weights: bool = typer.Option(
        True,
        "--keep-weights/--no-keep-weights",
        help="Also write checkpoint.pt (torch weights, needed by --init) into the model folder.",
    ),
    name: str = typer.Option("", "--name", help="Model name recorded in the manifest (default: the folder name)."),
    notes: str = typer.Option("", "--notes", help="Free text for the model card (data source, licence, ...)."),
    quiet: bool = typer.Option(
        False, "--quiet", "-q", help="No progress bar or per-epoch lines: warnings, errors and the final summary only."
    ),
) -> None:
    """Train an SDL model on a labeled folder, validate it each epoch, calibrate it and export it.

    Labels come from labels.csv (path,labels with ';' between labels) or labels.jsonl, from IMG.txt /
    IMG.jpg.txt sidecars, from XMP dc:subject keywords, or from one sub-folder per label. Checkpoints
    go to OUT.train/ (last.pt every epoch and on Ctrl-C, best.pt by GZSL F1@3); --resume continues
    exactly. The model folder gets Platt calibration fitted on the validation images and a model card.
    Launched as `torchrun --nproc_per_node N -m sdltag train ...` it trains data-parallel on N processes
    (several machines: torchrun's --nnodes and rendezvous options); --batch-size stays the global batch.
    """
    from sdltag.log import set_quiet
    from sdltag.nn.augment import AugmentConfig
    from sdltag.nn.train import RuntimeOptions, TrainConfig, TrainingInterrupted
    from sdltag.nn.train import train as run_training

    set_quiet(quiet)  # -q: no progress or informational lines (warnings, errors and the summary stay)
    if workers < 0:
        raise SdltagError(f"--workers {workers}: must be 0 or more.")
    config = TrainConfig(
        data=str(data_dir.expanduser().absolute()),
        out=str(out.expanduser().absolute()),
        layout=merge_alias(layout, layout_alias),
        val=str(val.expanduser().absolute()) if val else None,
        val_split=val_split,
        unseen=str(unseen.expanduser().absolute()) if unseen else None,
        backbone=backbone,
        width=width,
        image_size=image_size,
        rows=rows,
        lam=lam,
        sigma=sigma,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        weight_decay=weight_decay,
        optimizer=optimizer,
        seed=seed,
        init=str(init.expanduser().absolute()) if init else None,
        embedder=embedder,
        pretrained=pretrained,
        freeze_backbone=freeze_backbone,
        feature_views=feature_views,
        train_blocks=train_blocks,
        name=name,
        notes=notes,
        exclude=list(exclude),
        machine_keywords=machine_keywords,
        augment=((AugmentConfig() if flip else AugmentConfig(flip=0.0)) if augment else AugmentConfig.off()).to_dict(),
    )
    options = RuntimeOptions(
        device=device,
        workers=workers,
        threads=threads,
        cache_mb=cache_mb,
        run_dir=run_dir,
        resume=resume,
        channels_last=channels_last,
        keep_weights=keep_weights,
        compile=compile,
        dist_backend=dist_backend,
        dist_timeout=dist_timeout,
        feature_cache=feature_cache.expanduser().absolute() if feature_cache else None,
    )
    display = TrainDisplay(quiet=quiet)
    try:
        result = run_training(config, options, reporter=display)
    except TrainingInterrupted as exc:
        error(f"interrupted; a resumable checkpoint is in {exc.checkpoint}. Run the same command with --resume.")
        raise typer.Exit(130) from None
    finally:
        display.finish()
    if result.model_folder is not None:  # None on a torchrun process other than rank 0: rank 0 wrote the model
        info(result.summary())


def register(app: typer.Typer) -> None:
    app.command("train")(train)
