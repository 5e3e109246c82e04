"""The SDL training loop behind `sdltag train`: data -> model -> checkpoints -> model folder.

Read ``_train`` first: the epoch loop, one screen. Around it, top to bottom:

- ``train_epoch`` / ``train_step``: one optimizer step is augment -> forward -> SDL loss -> clipped
  update, Adam with plain L2 weight decay on weights only (the official recipe; ``optimizer="adamw"``
  for decoupled decay) at the learning rate of ``one_cycle`` (warm-up, then cosine decay), mixed
  precision on CUDA. A frozen backbone (``--freeze-backbone``), or one that trains its last K blocks
  only (``--train-blocks K``), reads features cached once per image (``_frozen_vectors``: the head, after
  those blocks); everything else runs the whole model on pixels (``_image_vectors``).
- ``validate``: ``@torch.no_grad`` GZSL/ZSL metrics after each epoch; the best epoch by GZSL F1@3 is kept.
- ``RunState``: what changes while training (weights, optimizer, RNG, counters, history). It saves
  itself as a checkpoint and restores itself from one. Checkpoints (``sdltag.nn.checkpoint`` format)
  live in a run folder beside the model folder, ``<out>.train/``: ``last.pt`` after every epoch (and
  on Ctrl-C, mid-epoch), ``best.pt`` for the best epoch. Resuming rebuilds the same batches (each
  epoch's order is drawn from the seed and the epoch number; the learning rate is a function of the
  step) and restores every RNG, so an interrupted and resumed run ends with the same weights as an
  uninterrupted one.
- ``setup``: settings (or the resumed run's), data, label vectors, images, model, optimizer.
- ``calibrate_and_export``: the best weights are calibrated on the validation set (Platt scaling,
  ECE reported) and exported as a model folder with a model card; ``checkpoint.pt`` (weights only)
  is written into the model folder so ``--init`` and ``sdltag export`` can reuse it.

Under torchrun every process runs the same loop on its share of each global batch
(``sdltag.nn.distributed``); rank 0 alone reports, writes checkpoints and exports.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import logging
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from sdltag.datasets import FORMATS, LabeledDataset, LabeledImage, read_labeled_dir
from sdltag.errors import SdltagError
from sdltag.modelfolder import EmbedderSpec, InputSpec, ModelFolder, check_output_folder
from sdltag.nn import distributed
from sdltag.nn.augment import AugmentConfig, augment_batch
from sdltag.nn.backbones import available_backbones, create_backbone, pretrained_source
from sdltag.nn.calibration import CalibrationReport, fit_calibration
from sdltag.nn.checkpoint import load_checkpoint, save_checkpoint
from sdltag.nn.data import ImageStore, cache_bytes, normalise
from sdltag.nn.features import FEATURES_DIR, CachedHead, FeatureCache, FeatureStore, trainable_blocks
from sdltag.nn.loss import sdl_loss
from sdltag.nn.model import ModelConfig, SDLModel, sdl_scores
from sdltag.scoring import l2_normalize

logger = logging.getLogger(__name__)

DEFAULT_IMAGE_SIZE = {"smallcnn": 96}  # others: 224
FALLBACK_IMAGE_SIZE = 224
# Mean/std recorded in the manifest; ImageNet statistics work for photos and drawings alike.
DEFAULT_MEAN = (0.485, 0.456, 0.406)
DEFAULT_STD = (0.229, 0.224, 0.225)
OPTIMIZERS = ("adam", "adamw")
LAYOUTS = ("auto", *FORMATS)
RUN_SUFFIX = ".train"
LAST, BEST = "last.pt", "best.pt"
MODEL_CHECKPOINT = "checkpoint.pt"
VAL_BATCH = 256


class Embedder(Protocol):
    """What training needs from a text embedder (``sdltag.embedding.get_text_embedder``)."""

    @property
    def spec(self) -> EmbedderSpec: ...

    def embed(self, texts: list[str]) -> np.ndarray: ...


@dataclass
class TrainConfig:
    """Everything that defines a training run (saved in every checkpoint; ``--resume`` reuses it)."""

    data: str
    out: str
    layout: str = "auto"  # the folder layout: auto or one of sdltag.datasets.FORMATS
    val: str | None = None
    val_split: float = 0.1
    unseen: str | None = None
    backbone: str = "smallcnn"
    width: int | None = None
    image_size: int | None = None
    rows: int = 7
    lam: float = 0.1
    sigma: bool = True
    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-4
    optimizer: str = "adam"
    warmup: float = 0.1
    grad_clip: float = 5.0
    seed: int = 0
    init: str | None = None
    embedder: str | None = None
    pretrained: bool = True  # start from the backbone's ImageNet weights where it has them
    freeze_backbone: bool = False  # train the head only, on cached features of the frozen backbone
    feature_views: int = 1  # with freeze_backbone: 1 plain + (n - 1) augmented feature vectors per image
    train_blocks: int = 0  # > 0: train the backbone's last K blocks (+ head conv, SDL head) on cached maps at block -K
    augment: dict[str, Any] = field(default_factory=lambda: AugmentConfig().to_dict())  # AugmentConfig.off(): none
    name: str = ""
    notes: str = ""
    exclude: list[str] = field(default_factory=list)  # --exclude globs (sdltag.excludes)
    machine_keywords: bool = False  # --machine-keywords: also learn XMP keywords programs wrote (datasets.xmp_labels)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        if "format" in data and "layout" not in data:  # the checkpoint of an earlier version
            data = {**data, "layout": data["format"]}
        return cls(**{k: v for k, v in data.items() if k in known})

    def validate(self) -> None:
        """Refuse impossible settings with a message naming the option."""
        checks = [
            (self.epochs >= 1, f"--epochs {self.epochs}: must be at least 1"),
            (self.batch_size >= 2, f"--batch-size {self.batch_size}: must be at least 2 (batch norm)"),
            (self.lr > 0, f"--lr {self.lr}: must be positive"),
            (self.weight_decay >= 0, f"--weight-decay {self.weight_decay}: must be >= 0"),
            (0 <= self.lam <= 1, f"--lambda {self.lam}: must be between 0 and 1"),
            (self.rows >= 1, f"--rows {self.rows}: must be at least 1"),
            (0 <= self.val_split < 1, f"--val-split {self.val_split}: must be in [0, 1)"),
            (0 <= self.warmup < 1, f"warmup {self.warmup}: must be in [0, 1)"),
            (self.optimizer in OPTIMIZERS, f"--optimizer {self.optimizer}: choose {' or '.join(OPTIMIZERS)}"),
            (self.layout in LAYOUTS, f"--layout {self.layout}: choose {', '.join(LAYOUTS[:-1])} or {LAYOUTS[-1]}"),
            (self.image_size is None or self.image_size >= 16, f"--image-size {self.image_size}: use at least 16"),
            (self.width is None or self.width >= 1, f"--width {self.width}: must be at least 1"),
            (self.feature_views >= 1, f"--feature-views {self.feature_views}: must be at least 1"),
            (self.train_blocks >= 0, f"--train-blocks {self.train_blocks}: must be 0 or more"),
            (
                not (self.train_blocks and self.freeze_backbone),
                f"--train-blocks {self.train_blocks} trains part of the backbone; leave out --freeze-backbone",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise SdltagError(message + ".")


@dataclass
class RuntimeOptions:
    """How to run (may change between a run and its resumption without changing the result)."""

    device: str = "auto"
    workers: int = 2
    threads: int | None = None
    cache_mb: int = 4096
    run_dir: Path | None = None  # default: <out>.train beside the model folder
    resume: bool = False
    channels_last: bool = True  # NHWC: oneDNN's fast convolution path on CPUs (bench_train: ~2.8x per step)
    keep_weights: bool = True  # write checkpoint.pt (torch weights, for --init) into the model folder
    compile: bool = False  # torch.compile the training forward/backward (~1 min compile)
    dist_backend: str = "auto"  # under torchrun: gloo (CPU) or nccl (GPU); auto picks by device
    dist_timeout: float = distributed.DEFAULT_TIMEOUT_S  # seconds any collective may wait for the other processes
    feature_cache: Path | None = None  # cached features (--freeze-backbone, --train-blocks); default: <run>/features


class TrainProgress(Protocol):
    """What ``train`` reports progress to: a ``TrainReporter`` or any object with its methods (the CLI's display)."""

    def start(self, total_steps: int, done_steps: int, steps_per_epoch: int) -> None: ...

    def step(self, step: int, epoch: int, loss: float, lr: float, images_per_s: float) -> None: ...

    def epoch_end(self, epoch: int, train_loss: float, metrics: dict[str, Any] | None, best: bool) -> None: ...

    def features(self, split: str, done: int, total: int) -> None: ...

    def finish(self) -> None: ...


class TrainReporter:
    """Progress hooks; the CLI draws a Rich display, tests may raise KeyboardInterrupt in ``step``."""

    def start(self, total_steps: int, done_steps: int, steps_per_epoch: int) -> None:
        """Called once before the first step (``done_steps`` > 0 after a resume)."""

    def step(self, step: int, epoch: int, loss: float, lr: float, images_per_s: float) -> None:
        """After each optimizer step; ``step`` counts from 1 over the whole run."""

    def epoch_end(self, epoch: int, train_loss: float, metrics: dict[str, Any] | None, best: bool) -> None:
        """After each epoch's validation (``metrics`` None without a validation set)."""

    def features(self, split: str, done: int, total: int) -> None:
        """Frozen-backbone features of ``split`` ("training"/"validation"): ``done`` of ``total`` images ready."""

    def finish(self) -> None:
        """Training is over (also on interruption)."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training; a resumable checkpoint was saved at ``checkpoint``."""

    def __init__(self, checkpoint: Path) -> None:
        super().__init__(str(checkpoint))
        self.checkpoint = checkpoint


@dataclass
class TrainResult:
    model_folder: ModelFolder | None  # None on the processes other than rank 0 of a torchrun launch
    run_dir: Path
    best_epoch: int
    metrics: dict[str, Any]
    calibration: CalibrationReport
    history: list[dict[str, Any]]

    def summary(self) -> str:
        """One line: where the model went, its best epoch, validation metrics and calibration error."""
        where = self.model_folder.path if self.model_folder is not None else self.run_dir
        text = f"wrote {where} (best epoch {self.best_epoch}"
        gzsl, zsl, cal = self.metrics.get("gzsl"), self.metrics.get("zsl"), self.calibration
        if gzsl:
            text += f"; validation GZSL F1@3 {gzsl['f1']['3']:.2f}, mAP {gzsl['map']:.2f}"
        if zsl:
            text += f"; ZSL F1@3 {zsl['f1']['3']:.2f}, mAP {zsl['map']:.2f}"
        if cal.ece_seen is not None:
            text += f"; calibration ECE seen {cal.ece_seen:.4f}"
            if cal.ece_unseen is not None:
                text += f", unseen {cal.ece_unseen:.4f}"
        return text + ")"


@dataclass
class PreparedData:
    """The run's splits, label space and targets."""

    train_items: list[LabeledImage]
    val_items: list[LabeledImage]
    seen_labels: list[str]
    unseen_labels: list[str]
    unseen_texts: list[str]
    train_dataset: LabeledDataset
    val_dataset: LabeledDataset | None
    fingerprint: str


# ---- the run: settings -> setup -> epochs -> calibrated model folder


def train(
    config: TrainConfig,
    options: RuntimeOptions | None = None,
    *,
    embedder: Embedder | None = None,
    reporter: TrainProgress | None = None,
) -> TrainResult:
    """Train an SDL model as ``config`` says and export it to ``config.out``; see the module docstring.

    Launched by torchrun (``WORLD_SIZE`` > 1), every process runs this: data-parallel training
    (``sdltag.nn.distributed``); rank 0 alone reports progress and writes checkpoints and the model
    folder, the others return a result without a model folder.
    """
    options = options or RuntimeOptions()
    reporter = reporter or TrainReporter()
    context = distributed.setup(options.device, options.dist_backend, options.dist_timeout)
    follower = context is not None and not context.is_main
    if follower:
        reporter = TrainReporter()  # rank 0 alone reports
    try:
        with _errors_only() if follower else contextlib.nullcontext():
            return _train(config, options, embedder, reporter, context or distributed.DistContext())
    except Exception as exc:
        if context is None or not distributed.is_collective_failure(exc):
            raise
        # A process failed outside the training steps (before the first, or while features were shared out).
        raise SdltagError(distributed.failure_message(context, exc, None), exit_code=distributed.FAILED_EXIT) from None
    finally:
        distributed.teardown(context)


def _train(
    config: TrainConfig,
    options: RuntimeOptions,
    embedder: Embedder | None,
    reporter: TrainProgress,
    ctx: distributed.DistContext,
) -> TrainResult:
    """The epoch loop: train, validate, checkpoint; Ctrl-C and a failed process leave a resumable ``last.pt``."""
    run, state = setup(config, options, embedder, reporter, ctx)
    last, best = run.run_dir / LAST, run.run_dir / BEST
    reporter.start(run.total_steps, state.step, run.steps_per_epoch)
    try:
        with _SigintFlag() as sigint, distributed.stop_on_sigterm(sigint if ctx.enabled else None):
            while state.epoch < run.config.epochs:
                train_epoch(run, state, reporter, sigint)
                metrics = validate(run, state.model)
                train_loss, is_best = state.end_epoch(metrics)
                state.save(last, ctx, full=True)
                if is_best:
                    state.save(best, ctx, full=False)
                reporter.epoch_end(state.epoch, train_loss, metrics, is_best)
                if distributed.any_true(ctx, sigint.raised) if ctx.enabled else sigint.raised:
                    raise KeyboardInterrupt
    except _HardStop:
        reporter.finish()
        raise
    except KeyboardInterrupt:
        state.save(last, ctx, full=True)  # raised between steps: the state is consistent
        reporter.finish()
        raise TrainingInterrupted(last) from None
    except Exception as exc:
        if not (ctx.enabled and distributed.is_collective_failure(exc)):
            raise
        # Another process died or stopped answering. A collective fails before the optimizer update, so
        # the weights and optimizer are those of the last complete step; rank 0 saves them with that
        # step's RNG state (the other processes' generators are re-seeded on resume).
        state.save(last, ctx, full=True, rng=state.step_rng or _rng_state(state.generator))
        reporter.finish()
        written = str(last) if ctx.is_main else None
        raise SdltagError(distributed.failure_message(ctx, exc, written), exit_code=distributed.FAILED_EXIT) from None
    reporter.finish()
    if ctx.enabled:
        distributed.revert_batchnorm(state.model)
    if not ctx.is_main:  # rank 0 calibrates and exports
        return TrainResult(
            None, run.run_dir, int(state.best["epoch"]), {}, CalibrationReport(None, None, 0, 0), state.history
        )
    return calibrate_and_export(run, state.model, state.history)


def train_epoch(run: RunSetup, state: RunState, reporter: TrainProgress, sigint: _SigintFlag) -> None:
    """The current epoch's steps (those left of it after a resume mid-epoch)."""
    state.model.train()
    if run.frozen:
        state.model.backbone.eval()  # frozen: batch-norm statistics stay the pretrained ones
        for module in _trained_blocks(state.model, run.config.train_blocks):
            module.train()  # --train-blocks: those blocks train, batch norm included
    batches = _epoch_batches(len(run.usable), run.batch_size, run.config.seed, state.epoch)
    batches = [run.usable[b].tolist() for b in batches]
    if run.ctx.enabled:  # this process's contiguous share of each global batch
        batches = [distributed.shard(b, run.ctx.rank, run.ctx.world_size) for b in batches]
    tick = time.perf_counter()
    for indices, inputs in run.train_store.iter_batches(batches[state.step_in_epoch :]):
        images, loss, lr = train_step(run, state, indices, inputs, sigint)
        state.step += 1
        state.step_in_epoch += 1
        state.step_rng = None  # the step is complete: the current state is consistent
        now = time.perf_counter()
        rate, tick = images / max(now - tick, 1e-9), now
        reporter.step(state.step, state.epoch, loss, lr, rate)
        if sigint.raised and not run.ctx.enabled:  # under torchrun the processes agree at the next step
            raise KeyboardInterrupt


def train_step(
    run: RunSetup, state: RunState, indices: torch.Tensor, inputs: torch.Tensor, sigint: _SigintFlag
) -> tuple[int, float, float]:
    """One optimizer step on a batch -> (images in the global batch, its loss, the learning rate).

    ``inputs`` are uint8 pixels (B, 3, H, W), or with a frozen backbone pooled features (B, V, C). A
    batch that undecodable images left with fewer than 2 images is skipped (loss NaN); it still counts
    as a step, so the schedule and the batches stay in step.
    """
    lr, beta1 = one_cycle(state.step, run.total_steps, run.config.lr, run.config.warmup)
    for group in state.optimizer.param_groups:
        group["lr"], group["betas"] = lr, (beta1, *group["betas"][1:])
    count, weight = len(indices), 1.0
    targets = run.train_targets[indices.to(run.device)]  # (B, Ls)
    if run.ctx.enabled:
        count, weight, indices, inputs, targets = _global_batch_share(run, state, indices, inputs, targets, sigint)
    if count < 2:
        return count, float("nan"), lr
    if run.frozen:
        vectors = _frozen_vectors(run, state, indices, inputs)
    else:
        vectors = _image_vectors(run, state, inputs)
    return count, _update(run, state, vectors, targets, weight), lr


def _frozen_vectors(run: RunSetup, state: RunState, indices: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """Cached features: the head (after the trained blocks) on one view per image drawn at random -> (B, M, d)."""
    device = run.device
    views = torch.randint(features.shape[1], (len(indices),), generator=state.generator, device=device)
    cached = features.to(device)[torch.arange(len(indices), device=device), views]  # (B, C) or maps (B, C, h, w)
    return run.head_model(cached)  # (B, M, d)


def _image_vectors(run: RunSetup, state: RunState, pixels: torch.Tensor) -> torch.Tensor:
    """The whole model on augmented, normalised pixels -> (B, M, d)."""
    size = (run.spec.height, run.spec.width)
    x = augment_batch(pixels.to(run.device, non_blocking=True), size, run.augment, state.generator)
    x = normalise(x, run.spec)  # (B, 3, H, W)
    if run.options.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.autocast(run.device.type, dtype=run.amp_dtype, enabled=run.device.type == "cuda"):
        return run.step_model(x)  # (B, M, d)


def _update(run: RunSetup, state: RunState, vectors: torch.Tensor, targets: torch.Tensor, weight: float) -> float:
    """SDL loss, backward, clipped optimizer update -> the (global) batch's loss."""
    config, ctx, optimizer, scaler = run.config, run.ctx, state.optimizer, state.scaler
    parts = sdl_loss(vectors.float(), run.seen_vectors, targets, lam=config.lam, use_sigma=config.sigma)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(parts.total * weight if ctx.enabled else parts.total).backward()
    loss = float(parts.total.detach())
    if ctx.enabled:  # the global batch's loss; the step's last collective, before the update
        loss = distributed.mean_loss(ctx, loss * weight)
    if config.grad_clip > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(state.model.parameters(), config.grad_clip)
    scaler.step(optimizer)
    scaler.update()
    state.loss_sum, state.loss_count = state.loss_sum + loss, state.loss_count + 1
    return loss


def _global_batch_share(
    run: RunSetup,
    state: RunState,
    indices: torch.Tensor,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    sigint: _SigintFlag,
) -> tuple[int, float, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Under torchrun: agree on the step with the other processes -> (global batch size, this share's loss
    weight, and the share: indices, inputs, targets, a weight-0 stand-in when undecodable images emptied it)."""
    ctx = run.ctx
    state.step_rng = _rng_state(state.generator)
    labelled = int((targets.sum(dim=1) > 0).sum())
    count, kept, stop = distributed.sync_step(ctx, len(indices), labelled, sigint.raised)
    if stop:  # every process stops before this step, so the saved state is consistent
        raise KeyboardInterrupt
    # DDP averages the gradients: weight each share by its labelled images so the average is the
    # gradient of the global batch's mean loss.
    weight = ctx.world_size * labelled / max(kept, 1)
    if len(indices) == 0 and count >= 2:  # a stand-in image keeps this process in the collectives
        inputs = torch.zeros((1, *inputs.shape[1:]), dtype=inputs.dtype)
        targets = torch.zeros_like(run.train_targets[:1])
        indices = torch.zeros(1, dtype=torch.long)
    return count, weight, indices, inputs, targets


def one_cycle(step: int, total_steps: int, peak_lr: float, warmup: float) -> tuple[float, float]:
    """Learning rate and Adam beta1 of optimizer step ``step`` (from 0) of ``total_steps``.

    Warm-up along half a cosine from peak/25 to the peak at step ``warmup * total_steps - 1`` (it may be
    fractional, or negative: no warm-up step), then down to peak/250,000 at the last step; beta1 moves
    0.95 -> 0.85 -> 0.95 against it. These are the values of torch's ``OneCycleLR`` with its defaults,
    which earlier versions used, so their runs resume unchanged.
    """
    low = peak_lr / 25.0
    peak_step = float(warmup * total_steps) - 1
    if abs(peak_step) < 1e-6 and total_steps > 1:  # a peak at step 0 would divide 0 by 0: half a step later
        peak_step = 1.5 / total_steps * total_steps - 1
    if step <= peak_step:
        pct = step / peak_step
        return _cosine(low, peak_lr, pct), _cosine(0.95, 0.85, pct)
    pct = (step - peak_step) / (total_steps - 1 - peak_step)
    return _cosine(peak_lr, low / 1e4, pct), _cosine(0.85, 0.95, pct)


def _cosine(start: float, end: float, pct: float) -> float:
    """From ``start`` (pct 0) to ``end`` (pct 1) along half a cosine."""
    return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1)


# ---- validation


def validate(run: RunSetup, model: SDLModel) -> dict[str, Any] | None:
    """GZSL (and with unseen labels ZSL) metrics on the validation images; None without a validation set."""
    if not run.data.val_items:
        return None
    from sdltag.metrics import zsl_gzsl_metrics

    scores, targets = validation_scores(
        model, run.val_store, run.val_targets, run.all_vectors, run.spec, run.device, run.options.channels_last
    )
    return _metrics_json(zsl_gzsl_metrics(scores, targets, run.unseen_mask))


@torch.no_grad()
def principal_vectors(
    model: SDLModel,
    store: ImageStore | FeatureStore,
    spec: InputSpec,
    device: torch.device,
    channels_last: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Run every decodable image of ``store`` without augmentation -> (indices, (N, M, d) float32).

    A ``FeatureStore`` holds cached features (view 0 is used): pooled ones, for the head alone, or the maps at
    the input of the backbone's last ``store.blocks`` blocks, for those blocks and the head.
    """
    model.eval()
    if isinstance(store, FeatureStore):
        indices = torch.nonzero(store.ok).flatten()
        cached_head = CachedHead(model.backbone, model.head, store.blocks)
        parts = [
            cached_head(store.features[indices[i : i + VAL_BATCH], 0].to(device)).float().cpu()
            for i in range(0, len(indices), VAL_BATCH)
        ]
        vectors = torch.cat(parts) if parts else torch.zeros(0, model.config.rows, model.config.dim)
        return indices.numpy(), vectors.numpy()
    batches = [list(range(i, min(i + VAL_BATCH, len(store.paths)))) for i in range(0, len(store.paths), VAL_BATCH)]
    out_idx, out_vec = [], []
    for indices, pixels in store.iter_batches(batches):
        if len(indices) == 0:
            continue
        x = normalise(pixels.to(device).float().div_(255.0), spec)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.float16, enabled=device.type == "cuda"):
            vectors = model(x)  # (B, M, d)
        out_idx.append(indices.numpy())
        out_vec.append(vectors.float().cpu().numpy())
    if not out_idx:
        return np.zeros(0, dtype=np.int64), np.zeros((0, model.config.rows, model.config.dim), dtype=np.float32)
    return np.concatenate(out_idx), np.concatenate(out_vec)


def validation_scores(
    model: SDLModel,
    store: ImageStore | FeatureStore,
    targets: np.ndarray,
    vectors: torch.Tensor,
    spec: InputSpec,
    device: torch.device,
    channels_last: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """(N, L) raw scores and the matching (N, L) targets of the decodable validation images."""
    indices, pv = principal_vectors(model, store, spec, device, channels_last)
    scores = sdl_scores(torch.from_numpy(pv), vectors.cpu()).numpy()  # (N, L)
    return scores, targets[indices]


def _metrics_json(results: dict[str, Any]) -> dict[str, Any]:
    return {name: value.to_json() for name, value in results.items()}


# ---- the run's parts: fixed (RunSetup) and changing (RunState, saved in checkpoints)


@dataclass
class RunSetup:
    """What stays fixed during a run, built once by ``setup``."""

    config: TrainConfig
    options: RuntimeOptions
    ctx: distributed.DistContext
    device: torch.device
    run_dir: Path
    data: PreparedData
    spec: InputSpec
    embedder: EmbedderSpec
    all_vectors: torch.Tensor  # (L, d) label vectors, seen then unseen, unit length, on the CPU
    train_store: ImageStore | FeatureStore  # pixels, or with a frozen backbone its pooled features
    val_store: ImageStore | FeatureStore
    usable: torch.Tensor  # (N_ok,) indices of the decodable training images
    # The training forward passes: the model and its head, DDP-wrapped under torchrun, compiled with
    # --compile. They share their parameters with the model; checkpoints and validation use the model.
    step_model: Callable[..., Any]
    head_model: Callable[..., Any]

    @property
    def frozen(self) -> bool:
        """Training reads cached features: the backbone is frozen, or all of it but its last blocks."""
        return self.config.freeze_backbone or self.config.train_blocks > 0

    @property
    def batch_size(self) -> int:
        return min(self.config.batch_size, len(self.usable))

    @functools.cached_property
    def steps_per_epoch(self) -> int:
        return len(_epoch_batches(len(self.usable), self.batch_size, self.config.seed, 0))

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.config.epochs

    @functools.cached_property
    def seen_vectors(self) -> torch.Tensor:
        return self.all_vectors[: len(self.data.seen_labels)].to(self.device)  # (Ls, d)

    @functools.cached_property
    def unseen_mask(self) -> np.ndarray:
        return np.array([False] * len(self.data.seen_labels) + [True] * len(self.data.unseen_labels))  # (L,)

    @functools.cached_property
    def train_targets(self) -> torch.Tensor:
        return torch.from_numpy(_targets(self.data.train_items, self.data.seen_labels)).to(self.device)  # (N, Ls)

    @functools.cached_property
    def val_targets(self) -> np.ndarray:
        return _targets(self.data.val_items, self.data.seen_labels + self.data.unseen_labels)  # (N_val, L)

    @functools.cached_property
    def augment(self) -> AugmentConfig:
        return AugmentConfig.from_dict(self.config.augment)

    @property
    def amp_dtype(self) -> torch.dtype:
        """CUDA autocast: bfloat16 on several GPUs, which needs no loss scaling; float16 with a scaler on one."""
        return torch.bfloat16 if self.ctx.enabled else torch.float16


@dataclass
class RunState:
    """What changes while training; saves itself as a checkpoint and restores itself from one."""

    model: SDLModel
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    generator: torch.Generator  # this process's augmentation draws
    header: dict[str, Any]  # the run's description, in every checkpoint: settings, input, labels and their vectors
    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps completed over the whole run
    step_in_epoch: int = 0
    loss_sum: float = 0.0  # the current epoch's running loss (saved, so a resumed epoch reports it whole)
    loss_count: int = 0
    best: dict[str, Any] = field(default_factory=lambda: {"f1": -1.0, "epoch": -1})
    history: list[dict[str, Any]] = field(default_factory=list)
    step_rng: dict[str, Any] | None = None  # under torchrun: the RNG state at the start of the step in progress

    def end_epoch(self, metrics: dict[str, Any] | None) -> tuple[float, bool]:
        """Record the finished epoch -> (its mean training loss, whether it is the best so far)."""
        is_best = metrics is None or metrics["gzsl"]["f1"]["3"] > self.best["f1"]
        train_loss = self.loss_sum / max(self.loss_count, 1)
        self.history.append({"epoch": self.epoch + 1, "train_loss": round(train_loss, 6), "metrics": metrics})
        if is_best:
            self.best = {"f1": metrics["gzsl"]["f1"]["3"] if metrics else 0.0, "epoch": self.epoch + 1}
        self.epoch, self.step_in_epoch = self.epoch + 1, 0
        self.loss_sum, self.loss_count = 0.0, 0
        return train_loss, is_best

    def save(self, path: Path, ctx: distributed.DistContext, *, full: bool, rng: dict[str, Any] | None = None) -> None:
        """Write a checkpoint (rank 0 alone writes): weights and counters; ``full`` adds what an exact resume
        needs (optimizer, loss scaler, every RNG; ``rng`` instead of the current RNG state)."""
        payload = {
            **self.header,
            "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "epoch": self.epoch,
            "step": self.step,
            "step_in_epoch": self.step_in_epoch,
            "best": self.best,
            "history": self.history,
            "epoch_loss": (self.loss_sum, self.loss_count),
            "world_size": ctx.world_size,
        }
        if full:
            if rng is None:
                rng = _rng_state(self.generator)
                if ctx.enabled:  # every process's augmentation generator, so the same world size resumes exactly
                    rng["ranks"] = distributed.gather_states(ctx, self.generator.get_state())
            payload.update(optimizer=self.optimizer.state_dict(), scaler=self.scaler.state_dict(), rng=rng)
        if ctx.is_main:
            save_checkpoint(path, payload)

    def restore(self, saved: dict[str, Any], ctx: distributed.DistContext, seed: int) -> None:
        """Continue from a full checkpoint (``last.pt``); its learning rate follows from its step."""
        self.model.load_state_dict(saved["model"], strict=True)
        self.optimizer.load_state_dict(saved["optimizer"])
        if saved.get("scaler"):  # a bf16 (several GPUs) run saved an empty scaler state
            self.scaler.load_state_dict(saved["scaler"])
        self.epoch, self.step, self.step_in_epoch = int(saved["epoch"]), int(saved["step"]), int(saved["step_in_epoch"])
        _restore_rng(self.generator, saved["rng"], ctx, seed, self.step)
        loss_sum, loss_count = saved.get("epoch_loss", (0.0, 0))
        self.loss_sum, self.loss_count = float(loss_sum), int(float(loss_count))
        self.best = dict(saved.get("best", self.best))
        self.history = list(saved.get("history", []))


# ---- setup: everything before the first step


def setup(
    config: TrainConfig,
    options: RuntimeOptions,
    embedder: Embedder | None,
    reporter: TrainProgress,
    ctx: distributed.DistContext,
) -> tuple[RunSetup, RunState]:
    """Settings (a resumed run's own), data, label vectors, images, model and optimizer; bad input refused first."""
    config, resumed, run_dir = _settings(config, options, ctx)
    if options.threads:
        torch.set_num_threads(options.threads)
    device = ctx.device if ctx.enabled else resolve_device(options.device)
    # Refuse an unknown backbone or missing/damaged pretrained weights before reading any image.
    pretrained = _pretrained_weights(config) if resumed is None and not config.init else None
    torch.manual_seed(config.seed)
    if embedder is None:
        from sdltag.embedding import get_text_embedder

        embedder = get_text_embedder(config.embedder)
    data = prepare_data(config)
    if resumed is not None and resumed.get("data_fingerprint") != data.fingerprint:
        raise SdltagError(
            f"{config.data}: the images or labels changed since the run started, so it cannot resume exactly. "
            "Restore the folder, or start a new run."
        )
    init = _load_init(config.init) if config.init else None
    model_config, spec = _architecture(config, embedder.spec, init, resumed)
    all_vectors = _label_vectors(embedder, data, model_config.dim)  # (L, d)
    train_images, val_images = _image_stores(config, options, data, spec)
    usable = _decodable(train_images, config)  # (N_ok,)
    model, weights_record = _build_model(config, model_config, init, resumed, pretrained)
    train_store: ImageStore | FeatureStore = train_images
    val_store: ImageStore | FeatureStore = val_images
    if config.freeze_backbone or config.train_blocks:
        if resumed is not None:  # the features are those of the run's backbone (its frozen part)
            model.load_state_dict(resumed["model"], strict=True)
        model.backbone.requires_grad_(False)
        for module in _trained_blocks(model, config.train_blocks):
            module.requires_grad_(True)
        train_store, val_store, usable = _feature_stores(
            config, model, spec, train_images, val_images, run_dir, device, options, reporter, ctx
        )
    model.to(device)
    if options.channels_last:
        model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # torch's stubs omit memory_format
    run = RunSetup(
        config,
        options,
        ctx,
        device,
        run_dir,
        data,
        spec,
        embedder.spec,
        all_vectors,
        train_store,
        val_store,
        usable,
        step_model=model,  # replaced below by the DDP-wrapped or compiled forward passes
        head_model=model.head,
    )
    state = _initial_state(run, model, _checkpoint_header(run, model_config, weights_record))
    if resumed is not None:
        state.restore(resumed, ctx, config.seed)
    run_dir.mkdir(parents=True, exist_ok=True)
    run.step_model, run.head_model = _training_forwards(model, ctx, run.frozen, options.compile, config.train_blocks)
    return run, state


def _settings(
    config: TrainConfig, options: RuntimeOptions, ctx: distributed.DistContext
) -> tuple[TrainConfig, dict[str, Any] | None, Path]:
    """-> (the run's settings, the checkpoint it resumes or None, the run folder); impossible settings refused."""
    check_output_folder(config.out)  # a folder that is not ours is refused now, not after every epoch
    run_dir = run_dir_for(config.out, options.run_dir)
    last = run_dir / LAST
    resumed: dict[str, Any] | None = None
    if options.resume:
        if not last.is_file():
            raise SdltagError(f"{last}: nothing to resume (no checkpoint). Start the run without --resume.")
        resumed = load_checkpoint(last)
        config = TrainConfig.from_dict(resumed["train_config"])
        logger.info(
            f"resuming {last} at epoch {resumed['epoch'] + 1}, step {resumed['step']} with the "
            "run's saved settings (training options given now are ignored)"
        )
    elif last.exists():
        raise SdltagError(
            f"{run_dir}: holds an earlier run's checkpoints. Pass --resume to continue it, or delete the folder "
            "(or choose another --out) to start afresh."
        )
    config.validate()
    resumed_world = int(resumed.get("world_size", 1)) if resumed is not None else None
    if ctx.enabled:
        distributed.check_batch(ctx, config.batch_size, resumed_world if resumed_world != ctx.world_size else None)
    if resumed_world is not None and resumed_world != ctx.world_size:
        logger.info(
            f"the run was started with {resumed_world} process(es) and goes on with {ctx.world_size}: the global "
            "batches, weights and optimizer state are the same; each process's share of the batches and the "
            "augmentation draws of the processes after the first are new"
        )
    return config, resumed, run_dir


def _pretrained_weights(config: TrainConfig) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """A fresh run's ImageNet start: (the backbone's verified weights, their provenance record), or None."""
    if config.backbone not in available_backbones():
        raise SdltagError(
            f"--backbone {config.backbone}: unknown backbone; choose one of: {', '.join(available_backbones())}."
        )
    source = pretrained_source(config.backbone)
    if config.pretrained and source is not None:
        if config.train_blocks:
            _check_train_blocks(create_backbone(config.backbone), config.backbone, config.train_blocks)
        return source.read_weights(config.backbone), source.weights_provenance(config.backbone)
    if config.freeze_backbone or config.train_blocks:
        reason = "has no pretrained weights" if source is None else "is not pretrained (--no-pretrained)"
        option = "--freeze-backbone" if config.freeze_backbone else f"--train-blocks {config.train_blocks}"
        raise SdltagError(
            f"{option}: {config.backbone} {reason}, and a frozen untrained backbone learns nothing. "
            "Use a pretrained backbone (--backbone efficientnet_lite0) or --init a trained model."
        )
    return None


def _architecture(
    config: TrainConfig,
    embedder: EmbedderSpec,
    init: dict[str, Any] | None,
    resumed: dict[str, Any] | None,
) -> tuple[ModelConfig, InputSpec]:
    """The model's architecture and input: the resumed run's, --init's (fine-tuning), or from the settings."""
    if init is not None:
        init_embedder = EmbedderSpec.from_json(init["embedder"])
        if init_embedder.id != embedder.id:
            raise SdltagError(
                f"{config.init}: trained with the embedder {init_embedder.id}, this run uses {embedder.id}. "
                f"Fine-tuning needs the same embedder: pass --embedder {init_embedder.name}."
            )
    if resumed is not None:
        return ModelConfig.from_dict(resumed["model_config"]), InputSpec.from_json(resumed["input"])
    if init is not None:
        model_config = ModelConfig.from_dict(init["model_config"])
        spec = InputSpec.from_json(init["input"])
        logger.info(
            f"fine-tuning {config.init}: {model_config.backbone}, M={model_config.rows}, "
            f"{spec.height}x{spec.width} (architecture and input size come from --init)"
        )
        return model_config, spec
    backbone_config = {"width": config.width} if config.width else {}
    model_config = ModelConfig(config.backbone, backbone_config, rows=config.rows, dim=embedder.dim)
    source = pretrained_source(config.backbone)
    if source is not None:  # the input the backbone's weights were trained on (size, resize rule, mean/std)
        spec = source.input_spec(config.backbone)
        if config.image_size:
            spec = dataclasses.replace(spec, height=config.image_size, width=config.image_size)
    else:
        size = config.image_size or DEFAULT_IMAGE_SIZE.get(config.backbone, FALLBACK_IMAGE_SIZE)
        spec = InputSpec(size, size, resize="squash", mean=DEFAULT_MEAN, std=DEFAULT_STD)
    return model_config, spec


def _label_vectors(embedder: Embedder, data: PreparedData, dim: int) -> torch.Tensor:
    """(L, d) unit-length vectors of the seen labels, then the unseen ones."""
    texts = data.seen_labels + data.unseen_texts
    vectors = l2_normalize(embedder.embed(texts))
    if vectors.shape != (len(texts), dim):
        raise SdltagError(
            f"the embedder returned vectors of shape {vectors.shape}, expected ({len(texts)}, {dim}). Check --embedder."
        )
    return torch.from_numpy(vectors)


def _image_stores(
    config: TrainConfig, options: RuntimeOptions, data: PreparedData, spec: InputSpec
) -> tuple[ImageStore, ImageStore]:
    """The training and validation images, decoded once into RAM when they fit --cache-mb."""
    budget = options.cache_mb * 2**20
    train_bytes = cache_bytes(len(data.train_items), spec)
    val_bytes = cache_bytes(len(data.val_items), spec)
    logger.info(
        f"{len(data.train_items)} training and {len(data.val_items)} validation images, "
        f"{len(data.seen_labels)} seen and {len(data.unseen_labels)} unseen labels, {spec.height}x{spec.width}"
    )
    if config.freeze_backbone or config.train_blocks:  # images are decoded once, by the feature pass, not kept
        budget = -1
    elif train_bytes <= budget:
        logger.info(f"decoding the images into RAM ({(train_bytes + val_bytes) / 2**20:.0f} MB) ...")
    else:
        logger.info(f"images need {train_bytes / 2**20:.0f} MB > --cache-mb {options.cache_mb}: decoding each epoch")
    train_images = ImageStore(
        [i.path for i in data.train_items],
        spec,
        cache=train_bytes <= budget,
        workers=options.workers,
    )
    val_images = ImageStore(
        [i.path for i in data.val_items],
        spec,
        cache=train_bytes + val_bytes <= budget,
        workers=options.workers,
    )
    return train_images, val_images


def _decodable(store: ImageStore, config: TrainConfig) -> torch.Tensor:
    """(N_ok,) indices of the training images that decoded (all of them until tried, when not cached)."""
    usable = torch.nonzero(store.ok).flatten()
    if len(usable) < 2:
        raise SdltagError(f"{config.data}: fewer than 2 training images could be decoded. Check the files.")
    return usable


def _build_model(
    config: TrainConfig,
    model_config: ModelConfig,
    init: dict[str, Any] | None,
    resumed: dict[str, Any] | None,
    pretrained: tuple[dict[str, Any], dict[str, Any]] | None,
) -> tuple[SDLModel, dict[str, Any] | None]:
    """The model with its starting weights (--init's, ImageNet's, or random from the seed) -> (model, the
    provenance record of its backbone's weights, or None)."""
    torch.manual_seed(config.seed)  # here, not earlier: building the image stores draws from the global RNG
    model = SDLModel(model_config)
    record: dict[str, Any] | None = None
    if init is not None and resumed is None:
        model.load_state_dict(init["model"], strict=True)
    if pretrained is not None:
        weights, record = pretrained
        pretrained_source(config.backbone).load_state_strict(model.backbone, weights, record["file"])
        logger.info(f"starting from the ImageNet weights of {config.backbone} ({record['source']})")
    if resumed is not None:
        record = resumed.get("provenance", {}).get("backbone_weights")
    elif init is not None:
        record = init.get("provenance", {}).get("backbone_weights")
    return model, record


def _checkpoint_header(
    run: RunSetup, model_config: ModelConfig, weights_record: dict[str, Any] | None
) -> dict[str, Any]:
    """The run's description, saved in every checkpoint: settings, architecture, input, labels and vectors."""
    header = {
        "model_config": model_config.to_dict(),
        "input": run.spec.to_json(),
        "embedder": run.embedder.to_json(),
        "seen_labels": run.data.seen_labels,
        "unseen_labels": run.data.unseen_labels,
        "label_vectors": run.all_vectors.clone(),
        "train_config": run.config.to_dict(),
        "data_fingerprint": run.data.fingerprint,
    }
    if weights_record:
        header["provenance"] = {"backbone_weights": weights_record}
    return header


def _initial_state(run: RunSetup, model: SDLModel, header: dict[str, Any]) -> RunState:
    """Step 0: the optimizer (weight decay on weights only), the loss scaler and this process's generator."""
    config, ctx, device = run.config, run.ctx, run.device
    optimizer_class = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
    optimizer = optimizer_class(_param_groups(model, config.weight_decay), lr=config.lr)
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and not ctx.enabled)
    generator = torch.Generator(device=device).manual_seed(distributed.rank_seed(config.seed, ctx.rank))
    return RunState(model, optimizer, scaler, generator, header)


def _training_forwards(
    model: SDLModel, ctx: distributed.DistContext, frozen: bool, compile: bool, train_blocks: int = 0
) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """The model's and the cached-feature forward passes (the head, after the last ``train_blocks`` blocks):
    DDP-wrapped under torchrun, compiled with --compile."""
    step_model: Callable[..., Any] = model
    cached_head = CachedHead(model.backbone, model.head, train_blocks)
    head_model: Callable[..., Any] = cached_head
    if ctx.enabled:  # gradients averaged over the processes; batch norm over the global batch
        distributed.convert_batchnorm(model)
        if frozen:
            head_model = distributed.wrap(cached_head, ctx)
        else:
            step_model = distributed.wrap(model, ctx)
    if compile:
        import torch._dynamo as dynamo

        dynamo.config.suppress_errors = True  # no C++ compiler etc.: run eagerly instead of failing
        step_model = torch.compile(step_model)
    return step_model, head_model


# ---- data


def run_dir_for(out: Path | str, run_dir: Path | None = None) -> Path:
    out = Path(out).expanduser().absolute()
    return Path(run_dir).expanduser().absolute() if run_dir else out.with_name(out.name + RUN_SUFFIX)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SdltagError("--device cuda: torch sees no CUDA GPU (a CPU-only torch build?). Use --device cpu or auto.")
    if device not in ("cpu", "cuda"):
        raise SdltagError(f"--device {device}: choose auto, cpu or cuda.")
    return torch.device(device)


def _read_unseen(path: str | None) -> tuple[list[str], list[str]]:
    """Labels (and the texts to embed) of an --unseen labels file."""
    if not path:
        return [], []
    from sdltag.labels import build_vocabulary

    entries = build_vocabulary([Path(path)], [])
    return [e.label for e in entries], [e.text for e in entries]


def prepare_data(config: TrainConfig) -> PreparedData:
    """Read the folders, split train/validation, hold out the unseen labels, fix the label order."""
    from sdltag.labels import label_key

    dataset = read_labeled_dir(
        config.data, config.layout, exclude=config.exclude, machine_keywords=config.machine_keywords
    )
    unseen, unseen_texts = _read_unseen(config.unseen)
    unseen_keys = {label_key(label) for label in unseen}
    val_dataset: LabeledDataset | None = None
    if config.val:
        val_dataset = read_labeled_dir(
            config.val, config.layout, exclude=config.exclude, machine_keywords=config.machine_keywords
        )
        train_items, val_items = list(dataset.items), list(val_dataset.items)
    else:
        order = np.random.default_rng(config.seed).permutation(len(dataset.items))
        n_val = round(config.val_split * len(order)) if len(order) > 1 else 0
        if config.val_split > 0:
            n_val = min(max(n_val, 1), len(order) - 1)
        val_set = set(order[:n_val].tolist())
        train_items = [item for i, item in enumerate(dataset.items) if i not in val_set]
        val_items = [item for i, item in enumerate(dataset.items) if i in val_set]
    # Hold the unseen labels out of the training annotations; drop images left without a label.
    held: list[LabeledImage] = []
    for item in train_items:
        kept = tuple(label for label in item.labels if label_key(label) not in unseen_keys)
        if kept:
            held.append(LabeledImage(item.path, kept))
    dropped = len(train_items) - len(held)
    if dropped:
        logger.warning(f"{dropped} training image(s) carry only --unseen labels; they are left out of training")
    seen_labels = sorted({label for item in held for label in item.labels}, key=lambda s: (label_key(s), s))
    if len(seen_labels) < 2:
        raise SdltagError(
            f"{config.data}: the training images carry {len(seen_labels)} seen label(s); the ranking loss needs "
            "at least 2. Add labelled images or shrink --unseen."
        )
    digest = hashlib.sha256()
    for item in held + [LabeledImage(Path("--val--"), ())] + val_items:
        digest.update(f"{item.path}\t{';'.join(item.labels)}\n".encode("utf-8", "surrogateescape"))  # any file name
    return PreparedData(
        train_items=held,
        val_items=val_items,
        seen_labels=seen_labels,
        unseen_labels=unseen,
        unseen_texts=unseen_texts,
        train_dataset=dataset,
        val_dataset=val_dataset,
        fingerprint=digest.hexdigest()[:16],
    )


def _targets(items: list[LabeledImage], labels: list[str]) -> np.ndarray:
    """(N, L) uint8 multi-hot matrix; labels outside ``labels`` are ignored."""
    from sdltag.labels import label_key

    column = {label_key(label): j for j, label in enumerate(labels)}
    matrix = np.zeros((len(items), len(labels)), dtype=np.uint8)
    for i, item in enumerate(items):
        for label in item.labels:
            j = column.get(label_key(label))
            if j is not None:
                matrix[i, j] = 1
    return matrix


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on weight matrices and conv kernels only, never on biases or BN (1-D) parameters."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _load_init(init: str) -> dict[str, Any]:
    """The checkpoint to fine-tune from: a .pt file, or a model folder holding checkpoint.pt."""
    path = Path(init).expanduser()
    if path.is_dir():
        candidate = path / MODEL_CHECKPOINT
        if not candidate.is_file():
            raise SdltagError(
                f"{path}: --init needs the torch weights, and this folder has no {MODEL_CHECKPOINT}. "
                f"Pass a model folder written by `sdltag train`, or its run folder's {BEST}."
            )
        path = candidate
    return load_checkpoint(path)


def _epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The batches of one epoch: a permutation drawn from (seed, epoch) alone, so a resume rebuilds it."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(n, generator=generator).tolist()
    if n <= batch_size:
        return [order]
    steps = n // batch_size  # drop the ragged tail: every step sees a full batch
    return [order[i * batch_size : (i + 1) * batch_size] for i in range(steps)]


# ---- frozen backbone: the head (and with --train-blocks the last blocks) trained on cached features


def _check_train_blocks(backbone: torch.nn.Module, name: str, blocks: int) -> None:
    available = trainable_blocks(backbone)
    if not available:
        raise SdltagError(f"--train-blocks {blocks}: the backbone {name} cannot be split into blocks.")
    if blocks > available:
        raise SdltagError(f"--train-blocks {blocks}: {name} has {available} blocks; choose 1 to {available}.")


def _trained_blocks(model: SDLModel, blocks: int) -> list[torch.nn.Module]:
    """--train-blocks: the backbone modules that train besides the SDL head (none without it)."""
    if not blocks:
        return []
    _check_train_blocks(model.backbone, model.config.backbone, blocks)
    return model.backbone.tail_modules(blocks)  # type: ignore[operator]  # a backbone with blocks (checked above)


def _feature_stores(
    config: TrainConfig,
    model: SDLModel,
    spec: InputSpec,
    train_images: ImageStore,
    val_images: ImageStore,
    run_dir: Path,
    device: torch.device,
    options: RuntimeOptions,
    reporter: TrainProgress,
    ctx: distributed.DistContext | None = None,
) -> tuple[FeatureStore, FeatureStore, torch.Tensor]:
    """--freeze-backbone: the pooled features of every image, read from the feature cache or computed
    (--train-blocks K: the feature maps at the input of block -K, and the pooled ones alongside).

    Under torchrun each process computes the features of its share of the images into the run folder
    (shared by all machines), waits for the others at a barrier, then every process reads the whole cache.
    """
    cache = FeatureCache(
        options.feature_cache or run_dir / FEATURES_DIR,
        config.backbone,
        model.backbone,
        spec,
        AugmentConfig.from_dict(config.augment),
        device,
        options.threads,
        config.train_blocks,
    )
    views = config.feature_views
    what = f"the input of its last {config.train_blocks} block(s)" if config.train_blocks else "feature vector(s)"
    logger.info(f"frozen backbone: computing {views} x {what} per image once (cached in {cache.folder})")
    try:
        if ctx is not None and ctx.enabled:
            for images, n_views in ((train_images, views), (val_images, 1)):
                share = [p for i, p in enumerate(images.paths) if i % ctx.world_size == ctx.rank]
                part = ImageStore(share, images.spec, cache=False, workers=images.workers)
                cache.store(part, n_views)
            distributed.barrier(ctx)
        train_store = cache.store(train_images, views, lambda done, total: reporter.features("training", done, total))
        val_store = cache.store(val_images, 1, lambda done, total: reporter.features("validation", done, total))
    except KeyboardInterrupt:
        raise SdltagError(
            f"interrupted while computing features; those done are kept in {cache.folder}. Run the same command "
            "again to continue from them.",
            exit_code=130,
        ) from None
    finally:
        cache.close()
    usable = torch.nonzero(train_store.ok).flatten()
    if len(usable) < 2:
        raise SdltagError(f"{config.data}: fewer than 2 training images could be decoded. Check the files.")
    if device.type == "cpu" and not options.threads:
        # The head's steps are small matrix products: one thread avoids synchronisation that costs more than
        # it saves (2.5x faster steps on a busy 2-core CPU, benchmarks/bench_pretrained.py).
        torch.set_num_threads(1)
    return train_store, val_store, usable


# ---- calibration and export


def calibrate_and_export(run: RunSetup, model: SDLModel, history: list[dict[str, Any]]) -> TrainResult:
    """Best weights -> calibration -> model folder with model card and checkpoint.pt."""
    from sdltag.nn.export import export_model
    from sdltag.nn.model_card import model_card, model_card_md

    best_state = load_checkpoint(run.run_dir / BEST)
    model.load_state_dict(best_state["model"], strict=True)
    best_epoch = int(best_state["best"]["epoch"])
    metrics, calibration, report, calibrated_on = _calibrate(run, model)
    model = model.cpu().float().eval()
    model.to(memory_format=torch.contiguous_format)  # type: ignore[call-overload]  # torch's stubs omit memory_format
    config, data = run.config, run.data
    card = model_card(config, data, run.spec, run.embedder, metrics, report, best_epoch, calibrated_on, history)
    folder = export_model(
        model,
        Path(config.out),
        input_spec=run.spec,
        embedder=run.embedder,
        seen_labels=data.seen_labels,
        unseen_labels=data.unseen_labels,
        label_vectors=run.all_vectors.numpy(),
        name=config.name,
        calibration=calibration,
        provenance={
            "trained_by": "sdltag train",
            "run_dir": str(run.run_dir),
            "best_epoch": best_epoch,
            **best_state.get("provenance", {}),
        },
        model_card=card,
        model_card_md=model_card_md(card, Path(config.out).name if not config.name else config.name),
    )
    weights = {k: v for k, v in best_state.items() if k not in ("format", "format_version")}
    weights["calibration"] = calibration
    weights["metrics"] = metrics
    if run.options.keep_weights:
        save_checkpoint(folder.path / MODEL_CHECKPOINT, weights)
    return TrainResult(folder, run.run_dir, best_epoch, metrics, report, history)


def _calibrate(run: RunSetup, model: SDLModel) -> tuple[dict[str, Any], dict[str, Any] | None, CalibrationReport, str]:
    """Platt scaling fitted on the validation images (the training images without a validation set)
    -> (validation metrics, the manifest's calibration, the calibration report, what it was fitted on)."""
    from sdltag.metrics import zsl_gzsl_metrics

    if run.data.val_items:
        store, targets, calibrated_on = run.val_store, run.val_targets, "validation images"
    else:
        all_labels = run.data.seen_labels + run.data.unseen_labels
        store, targets = run.train_store, _targets(run.data.train_items, all_labels)
        calibrated_on = "training images (no validation set: optimistic)"
    scores, targets = validation_scores(
        model, store, targets, run.all_vectors, run.spec, run.device, run.options.channels_last
    )
    metrics = _metrics_json(zsl_gzsl_metrics(scores, targets, run.unseen_mask)) if run.data.val_items else {}
    calibration, report = fit_calibration(scores, targets, run.unseen_mask)
    return metrics, calibration, report, calibrated_on


# ---- RNG state, Ctrl-C, logging


@contextlib.contextmanager
def _errors_only() -> Iterator[None]:
    """Under torchrun the processes after the first log errors only: rank 0 reports (same images, same lines)."""
    sdltag_logger = logging.getLogger("sdltag")
    level = sdltag_logger.level
    sdltag_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        sdltag_logger.setLevel(level)


def _rng_state(generator: torch.Generator) -> dict[str, Any]:
    state: dict[str, Any] = {"augment": generator.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(generator: torch.Generator, state: dict[str, Any]) -> None:
    generator.set_state(state["augment"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _restore_rng(
    generator: torch.Generator, state: dict[str, Any], ctx: distributed.DistContext, seed: int, step: int
) -> None:
    """A checkpoint's RNG state for this process: its own generator when the run had as many processes.

    Otherwise (another world size, or a checkpoint saved when a process failed) the processes after
    the first get a generator re-seeded from (seed, rank, step).
    """
    _set_rng_state(generator, state)
    if ctx.rank == 0:
        return
    ranks = state.get("ranks")
    if ranks is not None and len(ranks) == ctx.world_size:
        generator.set_state(ranks[ctx.rank])
    else:
        generator.manual_seed(distributed.rank_seed(seed, ctx.rank) + step)


class _HardStop(KeyboardInterrupt):
    """A second Ctrl-C: stop now and keep the last consistent checkpoint."""


class _SigintFlag:
    """Turns the first Ctrl-C into a flag checked between steps (so the saved state is consistent)."""

    def __init__(self) -> None:
        self.raised = False
        self._previous: Any = None

    def __enter__(self) -> _SigintFlag:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.raised:  # a second Ctrl-C stops at once, without saving a possibly half-updated state
            raise _HardStop
        self.raised = True

    def __exit__(self, *exc: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
