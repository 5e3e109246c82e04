"""The SDL training loop behind `sdltag train`: data -> model -> checkpoints -> model folder.

One readable loop (nanoGPT style): per-batch OneCycle schedule, Adam with plain L2 weight
decay on weights only (the official recipe; ``optimizer="adamw"`` for decoupled decay),
gradient clipping, mixed precision on CUDA, ``@torch.no_grad`` validation after each
epoch, the best epoch by GZSL F1@3 kept. Checkpoints (``sdltag.nn.checkpoint`` format
plus optimizer, scheduler, epoch, step and RNG state) live in a run folder beside the
model folder, ``<out>.train/``: ``last.pt`` after every epoch (and on Ctrl-C, mid-epoch),
``best.pt`` for the best epoch. Resuming rebuilds the same batches (each epoch's order
is drawn from the seed and the epoch number) and restores every RNG, so an interrupted
and resumed run ends with the same weights as an uninterrupted one.

At the end the best weights are calibrated on the validation set (Platt scaling, ECE
reported) and exported as a model folder with a model card; ``checkpoint.pt`` (weights
only) is written into the model folder so ``--init`` and ``sdltag export`` can reuse it.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from sdltag.datasets import LabeledDataset, LabeledImage, read_labeled_dir
from sdltag.errors import SdltagError
from sdltag.modelfolder import EmbedderSpec, InputSpec, ModelFolder, check_output_folder
from sdltag.nn import distributed
from sdltag.nn.augment import AugmentConfig, augment_batch
from sdltag.nn.backbones import available_backbones, pretrained_source
from sdltag.nn.calibration import CalibrationReport, fit_calibration
from sdltag.nn.checkpoint import load_checkpoint, save_checkpoint
from sdltag.nn.data import ImageStore, cache_bytes, normalise
from sdltag.nn.features import FEATURES_DIR, FeatureCache, FeatureStore
from sdltag.nn.loss import sdl_loss
from sdltag.nn.model import ModelConfig, SDLModel, sdl_scores
from sdltag.scoring import l2_normalize

DEFAULT_IMAGE_SIZE = {"smallcnn": 96}  # others: 224
FALLBACK_IMAGE_SIZE = 224
# Mean/std recorded in the manifest; ImageNet statistics work for photos and drawings alike.
DEFAULT_MEAN = (0.485, 0.456, 0.406)
DEFAULT_STD = (0.229, 0.224, 0.225)
OPTIMIZERS = ("adam", "adamw")
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
    format: str = "auto"
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
            (self.image_size is None or self.image_size >= 16, f"--image-size {self.image_size}: use at least 16"),
            (self.width is None or self.width >= 1, f"--width {self.width}: must be at least 1"),
            (self.feature_views >= 1, f"--feature-views {self.feature_views}: must be at least 1"),
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


class TrainProgress(Protocol):
    """What ``train`` reports progress to: a ``TrainReporter`` or any object with its methods (the CLI's display)."""

    def message(self, text: str) -> None: ...

    def warn(self, text: str) -> None: ...

    def start(self, total_steps: int, done_steps: int, steps_per_epoch: int) -> None: ...

    def step(self, step: int, epoch: int, loss: float, lr: float, images_per_s: float) -> None: ...

    def epoch_end(self, epoch: int, train_loss: float, metrics: dict[str, Any] | None, best: bool) -> None: ...

    def features(self, split: str, done: int, total: int) -> None: ...

    def finish(self) -> None: ...


class TrainReporter:
    """Progress hooks; the CLI draws a Rich display, tests may raise KeyboardInterrupt in ``step``."""

    def message(self, text: str) -> None:
        """An informational line."""

    def warn(self, text: str) -> None:
        """A problem with one input (an image, a label); training goes on."""

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


def _read_unseen(path: str | None, warn: Callable[[str], None]) -> tuple[list[str], list[str]]:
    """Labels (and the texts to embed) of an --unseen labels file."""
    if not path:
        return [], []
    from sdltag.labels import build_vocabulary

    entries = build_vocabulary([Path(path)], [], warn)
    return [e.label for e in entries], [e.text for e in entries]


def prepare_data(config: TrainConfig, warn: Callable[[str], None]) -> PreparedData:
    """Read the folders, split train/validation, hold out the unseen labels, fix the label order."""
    from sdltag.labels import label_key

    dataset = read_labeled_dir(
        config.data, config.format, exclude=config.exclude, machine_keywords=config.machine_keywords
    )
    unseen, unseen_texts = _read_unseen(config.unseen, warn)
    unseen_keys = {label_key(label) for label in unseen}
    val_dataset: LabeledDataset | None = None
    if config.val:
        val_dataset = read_labeled_dir(
            config.val, config.format, exclude=config.exclude, machine_keywords=config.machine_keywords
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
        warn(f"{dropped} training image(s) carry only --unseen labels; they are left out of training")
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


@torch.no_grad()
def principal_vectors(
    model: SDLModel,
    store: ImageStore | FeatureStore,
    spec: InputSpec,
    device: torch.device,
    channels_last: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Run every decodable image of ``store`` without augmentation -> (indices, (N, M, d) float32).

    A ``FeatureStore`` (frozen backbone) holds pooled features: only the head runs, on view 0.
    """
    model.eval()
    if isinstance(store, FeatureStore):
        indices = torch.nonzero(store.ok).flatten()
        pooled = store.features[indices, 0].to(device)  # (N, C)
        vectors = model.head(pooled[:, :, None, None]).float().cpu().numpy()
        return indices.numpy(), vectors
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
    if context is not None and not context.is_main:
        reporter = TrainReporter()  # rank 0 alone reports
    try:
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
    check_output_folder(config.out)  # a folder that is not ours is refused now, not after every epoch
    run_dir = run_dir_for(config.out, options.run_dir)
    resume_state: dict[str, Any] | None = None
    if options.resume:
        last = run_dir / LAST
        if not last.is_file():
            raise SdltagError(f"{last}: nothing to resume (no checkpoint). Start the run without --resume.")
        resume_state = load_checkpoint(last)
        config = TrainConfig.from_dict(resume_state["train_config"])
        reporter.message(
            f"resuming {last} at epoch {resume_state['epoch'] + 1}, step {resume_state['step']} with the "
            "run's saved settings (training options given now are ignored)"
        )
    elif (run_dir / LAST).exists():
        raise SdltagError(
            f"{run_dir}: holds an earlier run's checkpoints. Pass --resume to continue it, or delete the folder "
            "(or choose another --out) to start afresh."
        )
    config.validate()
    resumed_world = int(resume_state.get("world_size", 1)) if resume_state is not None else None
    if ctx.enabled:
        distributed.check_batch(ctx, config.batch_size, resumed_world if resumed_world != ctx.world_size else None)
    if resumed_world is not None and resumed_world != ctx.world_size:
        reporter.message(
            f"the run was started with {resumed_world} process(es) and goes on with {ctx.world_size}: the global "
            "batches, weights and optimizer state are the same; each process's share of the batches and the "
            "augmentation draws of the processes after the first are new"
        )
    if options.threads:
        torch.set_num_threads(options.threads)
    device = ctx.device if ctx.enabled else resolve_device(options.device)
    # Refuse an unknown backbone or missing/damaged pretrained weights before reading any image.
    pretrained_state: dict[str, Any] | None = None
    weights_record: dict[str, Any] | None = None
    if resume_state is None and not config.init:
        if config.backbone not in available_backbones():
            raise SdltagError(
                f"--backbone {config.backbone}: unknown backbone; choose one of: {', '.join(available_backbones())}."
            )
        source = pretrained_source(config.backbone)
        if config.pretrained and source is not None:
            pretrained_state = source.read_weights(config.backbone)
            weights_record = source.weights_provenance(config.backbone)
        elif config.freeze_backbone:
            reason = "has no pretrained weights" if source is None else "is not pretrained (--no-pretrained)"
            raise SdltagError(
                f"--freeze-backbone: {config.backbone} {reason}, and a frozen untrained backbone learns nothing. "
                "Use a pretrained backbone (--backbone efficientnet_lite0) or --init a trained model."
            )
    torch.manual_seed(config.seed)

    if embedder is None:
        from sdltag.embedding import get_text_embedder

        embedder = get_text_embedder(config.embedder)
    data = prepare_data(config, reporter.warn)
    if resume_state is not None and resume_state.get("data_fingerprint") != data.fingerprint:
        raise SdltagError(
            f"{config.data}: the images or labels changed since the run started, so it cannot resume exactly. "
            "Restore the folder, or start a new run."
        )

    # Architecture and input: from --init (fine-tuning) or fresh.
    init_state = _load_init(config.init) if config.init else None
    if init_state is not None:
        init_embedder = EmbedderSpec.from_json(init_state["embedder"])
        if init_embedder.id != embedder.spec.id:
            raise SdltagError(
                f"{config.init}: trained with the embedder {init_embedder.id}, this run uses {embedder.spec.id}. "
                f"Fine-tuning needs the same embedder: pass --embedder {init_embedder.name}."
            )
        model_config = ModelConfig.from_dict(init_state["model_config"])
        spec = InputSpec.from_json(init_state["input"])
        if resume_state is None:
            reporter.message(
                f"fine-tuning {config.init}: {model_config.backbone}, M={model_config.rows}, "
                f"{spec.height}x{spec.width} (architecture and input size come from --init)"
            )
    else:
        backbone_config = {"width": config.width} if config.width else {}
        model_config = ModelConfig(config.backbone, backbone_config, rows=config.rows, dim=embedder.spec.dim)
        source = pretrained_source(config.backbone)
        if source is not None:  # the input the backbone's weights were trained on (size, resize rule, mean/std)
            spec = source.input_spec(config.backbone)
            if config.image_size:
                spec = dataclasses.replace(spec, height=config.image_size, width=config.image_size)
        else:
            size = config.image_size or DEFAULT_IMAGE_SIZE.get(config.backbone, FALLBACK_IMAGE_SIZE)
            spec = InputSpec(size, size, resize="squash", mean=DEFAULT_MEAN, std=DEFAULT_STD)
    if resume_state is not None:
        model_config = ModelConfig.from_dict(resume_state["model_config"])
        spec = InputSpec.from_json(resume_state["input"])

    # Label vectors: seen labels, then unseen, unit length.
    texts = data.seen_labels + data.unseen_texts
    vectors_np = l2_normalize(embedder.embed(texts))
    if vectors_np.shape != (len(texts), model_config.dim):
        raise SdltagError(
            f"the embedder returned vectors of shape {vectors_np.shape}, expected ({len(texts)}, "
            f"{model_config.dim}). Check --embedder."
        )
    all_labels = data.seen_labels + data.unseen_labels
    unseen_mask = np.array([False] * len(data.seen_labels) + [True] * len(data.unseen_labels))
    all_vectors = torch.from_numpy(vectors_np)
    seen_vectors = all_vectors[: len(data.seen_labels)].to(device)

    # Images: decode once into RAM when they fit the budget.
    budget = options.cache_mb * 2**20
    train_bytes = cache_bytes(len(data.train_items), spec)
    val_bytes = cache_bytes(len(data.val_items), spec)
    reporter.message(
        f"{len(data.train_items)} training and {len(data.val_items)} validation images, "
        f"{len(data.seen_labels)} seen and {len(data.unseen_labels)} unseen labels, {spec.height}x{spec.width}"
    )
    frozen = config.freeze_backbone
    if frozen:  # images are decoded once, by the feature pass, and not kept
        budget = -1
    elif train_bytes <= budget:
        reporter.message(f"decoding the images into RAM ({(train_bytes + val_bytes) / 2**20:.0f} MB) ...")
    else:
        reporter.message(
            f"images need {train_bytes / 2**20:.0f} MB > --cache-mb {options.cache_mb}: decoding each epoch"
        )
    train_images = ImageStore(
        [i.path for i in data.train_items],
        spec,
        cache=train_bytes <= budget,
        workers=options.workers,
        warn=reporter.warn,
    )
    val_images = ImageStore(
        [i.path for i in data.val_items],
        spec,
        cache=train_bytes + val_bytes <= budget,
        workers=options.workers,
        warn=reporter.warn,
    )
    # the pixels; with a frozen backbone, replaced below by the backbone's features
    train_store: ImageStore | FeatureStore = train_images
    val_store: ImageStore | FeatureStore = val_images
    usable = torch.nonzero(train_images.ok).flatten()  # (N_ok,) indices of decodable training images
    if len(usable) < 2:
        raise SdltagError(f"{config.data}: fewer than 2 training images could be decoded. Check the files.")
    train_targets = torch.from_numpy(_targets(data.train_items, data.seen_labels)).to(device)  # (N, Ls)
    val_targets = _targets(data.val_items, all_labels)  # (N_val, L)

    torch.manual_seed(config.seed)  # here, not earlier: building the image stores draws from the global RNG
    model = SDLModel(model_config)
    if init_state is not None and resume_state is None:
        model.load_state_dict(init_state["model"], strict=True)
    if pretrained_state is not None:
        source = pretrained_source(config.backbone)
        assert weights_record is not None  # read with the weights
        source.load_state_strict(model.backbone, pretrained_state, weights_record["file"])
        reporter.message(f"starting from the ImageNet weights of {config.backbone} ({weights_record['source']})")
    if resume_state is not None:
        weights_record = resume_state.get("provenance", {}).get("backbone_weights")
    elif init_state is not None:
        weights_record = init_state.get("provenance", {}).get("backbone_weights")
    if frozen:
        if resume_state is not None:
            model.load_state_dict(resume_state["model"], strict=True)
        model.backbone.requires_grad_(False)
        train_store, val_store, usable = _feature_stores(
            config, model, spec, train_images, val_images, run_dir, device, options, reporter, ctx
        )
    model.to(device)
    if options.channels_last:
        model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # torch's stubs omit memory_format
    if config.optimizer == "adamw":
        optimizer: torch.optim.Optimizer = torch.optim.AdamW(_param_groups(model, config.weight_decay), lr=config.lr)
    else:
        optimizer = torch.optim.Adam(_param_groups(model, config.weight_decay), lr=config.lr)
    batch_size = min(config.batch_size, len(usable))
    steps_per_epoch = len(_epoch_batches(len(usable), batch_size, config.seed, 0))
    total_steps = steps_per_epoch * config.epochs
    # OneCycleLR divides by (warm-up steps - 1): exactly one warm-up step would divide by zero.
    warmup = 1.5 / total_steps if abs(config.warmup * total_steps - 1) < 1e-6 and total_steps > 1 else config.warmup
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=config.lr, total_steps=total_steps, pct_start=warmup
    )
    # Several GPUs: bf16 autocast, which needs no loss scaling (fp16 with a scaler on one GPU, as before).
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and not ctx.enabled)
    amp_dtype = torch.bfloat16 if ctx.enabled else torch.float16
    generator = torch.Generator(device=device).manual_seed(distributed.rank_seed(config.seed, ctx.rank))
    augment = AugmentConfig.from_dict(config.augment)

    epoch, step, step_in_epoch = 0, 0, 0
    loss_sum, loss_count = 0.0, 0  # the current epoch's running loss (saved, so a resumed epoch reports it whole)
    best: dict[str, Any] = {"f1": -1.0, "epoch": -1}
    history: list[dict[str, Any]] = []
    if resume_state is not None:
        model.load_state_dict(resume_state["model"], strict=True)
        optimizer.load_state_dict(resume_state["optimizer"])
        scheduler.load_state_dict(resume_state["scheduler"])
        if resume_state.get("scaler"):  # a bf16 (several GPUs) run saved an empty scaler state
            scaler.load_state_dict(resume_state["scaler"])
        epoch, step, step_in_epoch = (
            int(resume_state["epoch"]),
            int(resume_state["step"]),
            int(resume_state["step_in_epoch"]),
        )
        _restore_rng(generator, resume_state["rng"], ctx, config.seed, step)
        saved_sum, saved_count = resume_state.get("epoch_loss", (0.0, 0))
        loss_sum, loss_count = float(saved_sum), int(float(saved_count))
        best = dict(resume_state.get("best", best))
        history = list(resume_state.get("history", []))

    base_payload = {
        "model_config": model_config.to_dict(),
        "input": spec.to_json(),
        "embedder": embedder.spec.to_json(),
        "seen_labels": data.seen_labels,
        "unseen_labels": data.unseen_labels,
        "label_vectors": all_vectors.clone(),
        "train_config": config.to_dict(),
        "data_fingerprint": data.fingerprint,
    }
    if weights_record:
        base_payload["provenance"] = {"backbone_weights": weights_record}

    def save(path: Path, *, full: bool, rng: dict[str, Any] | None = None) -> None:
        payload = {
            **base_payload,
            "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "epoch": epoch,
            "step": step,
            "step_in_epoch": step_in_epoch,
            "best": best,
            "history": history,
            "epoch_loss": (loss_sum, loss_count),
            "world_size": ctx.world_size,
        }
        if full:
            if rng is None:
                rng = _rng_state(generator)
                if ctx.enabled:  # every process's augmentation generator, so the same world size resumes exactly
                    rng["ranks"] = distributed.gather_states(ctx, generator.get_state())
            payload.update(
                optimizer=optimizer.state_dict(),
                scheduler=scheduler.state_dict(),
                scaler=scaler.state_dict(),
                rng=rng,
            )
        if ctx.is_main:  # rank 0 alone writes
            save_checkpoint(path, payload)

    run_dir.mkdir(parents=True, exist_ok=True)
    input_size = (spec.height, spec.width)
    # The compiled module shares its parameters with ``model``; checkpoints and validation use ``model``.
    step_model: Callable[..., Any] = model
    head_model: Callable[..., Any] = model.head
    if ctx.enabled:  # gradients averaged over the processes; batch norm over the global batch
        distributed.convert_batchnorm(model)
        if frozen:
            head_model = distributed.wrap(model.head, ctx)
        else:
            step_model = distributed.wrap(model, ctx)
    if options.compile:
        import torch._dynamo as dynamo

        dynamo.config.suppress_errors = True  # no C++ compiler etc.: run eagerly instead of failing
        step_model = torch.compile(step_model)
    reporter.start(total_steps, step, steps_per_epoch)
    use_amp = device.type == "cuda"
    snapshot: dict[str, Any] | None = None  # under torchrun: the RNG state at the start of the step in progress
    try:
        with _SigintFlag() as sigint, distributed.stop_on_sigterm(sigint if ctx.enabled else None):
            while epoch < config.epochs:
                model.train()
                if frozen:
                    model.backbone.eval()  # frozen: batch-norm statistics stay the pretrained ones
                batches = _epoch_batches(len(usable), batch_size, config.seed, epoch)
                batches = [usable[b].tolist() for b in batches]
                if ctx.enabled:  # this process's contiguous share of each global batch
                    batches = [distributed.shard(b, ctx.rank, ctx.world_size) for b in batches]
                tick = time.perf_counter()
                for indices, pixels in train_store.iter_batches(batches[step_in_epoch:]):
                    count, weight = len(indices), 1.0
                    batch_targets = train_targets[indices.to(device)]
                    if ctx.enabled:
                        snapshot = _rng_state(generator)
                        labelled = int((batch_targets.sum(dim=1) > 0).sum())
                        count, kept, stop = distributed.sync_step(ctx, len(indices), labelled, sigint.raised)
                        if stop:  # every process stops before this step, so the saved state is consistent
                            raise KeyboardInterrupt
                        # DDP averages the gradients: weight each share by its labelled images so the
                        # average is the gradient of the global batch's mean loss.
                        weight = ctx.world_size * labelled / max(kept, 1)
                        if len(indices) == 0 and count >= 2:  # a share emptied by undecodable images: a
                            # stand-in image of weight 0 keeps this process in the collectives
                            pixels = torch.zeros((1, *pixels.shape[1:]), dtype=pixels.dtype)
                            batch_targets = torch.zeros_like(train_targets[:1])
                            indices = torch.zeros(1, dtype=torch.long)
                    if count >= 2 and frozen:  # pixels: pooled features (B, V, C); one view per image
                        views = torch.randint(pixels.shape[1], (len(indices),), generator=generator, device=device)
                        pooled = pixels.to(device)[torch.arange(len(indices), device=device), views]  # (B, C)
                        vectors = head_model(pooled[:, :, None, None])  # (B, M, d)
                    elif count >= 2:
                        x = augment_batch(pixels.to(device, non_blocking=True), input_size, augment, generator)
                        x = normalise(x, spec)  # (B, 3, H, W)
                        if options.channels_last:
                            x = x.contiguous(memory_format=torch.channels_last)
                        with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
                            vectors = step_model(x)  # (B, M, d)
                    if count >= 2:
                        parts = sdl_loss(
                            vectors.float(),
                            seen_vectors,
                            batch_targets,
                            lam=config.lam,
                            use_sigma=config.sigma,
                        )
                        optimizer.zero_grad(set_to_none=True)
                        scaler.scale(parts.total * weight if ctx.enabled else parts.total).backward()
                        loss_value = float(parts.total.detach())
                        if ctx.enabled:  # the global batch's loss; the step's last collective, before the update
                            loss_value = distributed.mean_loss(ctx, loss_value * weight)
                        if config.grad_clip > 0:
                            scaler.unscale_(optimizer)
                            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
                        scaler.step(optimizer)
                        scaler.update()
                        loss_sum, loss_count = loss_sum + loss_value, loss_count + 1
                    else:  # a batch emptied by undecodable images: keep the schedule in step
                        loss_value = float("nan")
                    scheduler.step()
                    step += 1
                    step_in_epoch += 1
                    snapshot = None  # the step is complete: the current state is consistent
                    now = time.perf_counter()
                    rate = count / max(now - tick, 1e-9)
                    tick = now
                    reporter.step(step, epoch, loss_value, float(scheduler.get_last_lr()[0]), rate)
                    if sigint.raised and not ctx.enabled:  # under torchrun the processes agree at the next step
                        raise KeyboardInterrupt
                metrics = None
                is_best = False
                if len(data.val_items):
                    scores, targets = validation_scores(
                        model, val_store, val_targets, all_vectors, spec, device, options.channels_last
                    )
                    from sdltag.metrics import zsl_gzsl_metrics

                    metrics = _metrics_json(zsl_gzsl_metrics(scores, targets, unseen_mask))
                    is_best = metrics["gzsl"]["f1"]["3"] > best["f1"]
                else:
                    is_best = True
                train_loss = loss_sum / max(loss_count, 1)
                history.append({"epoch": epoch + 1, "train_loss": round(train_loss, 6), "metrics": metrics})
                if is_best:
                    best = {"f1": metrics["gzsl"]["f1"]["3"] if metrics else 0.0, "epoch": epoch + 1}
                epoch, step_in_epoch = epoch + 1, 0
                loss_sum, loss_count = 0.0, 0
                save(run_dir / LAST, full=True)
                if is_best:
                    save(run_dir / BEST, full=False)
                reporter.epoch_end(epoch, train_loss, metrics, is_best)
                if distributed.any_true(ctx, sigint.raised) if ctx.enabled else sigint.raised:
                    raise KeyboardInterrupt
    except _HardStop:
        reporter.finish()
        raise
    except KeyboardInterrupt:
        save(run_dir / LAST, full=True)  # raised between steps: the state is consistent
        reporter.finish()
        raise TrainingInterrupted(run_dir / LAST) from None
    except Exception as exc:
        if not (ctx.enabled and distributed.is_collective_failure(exc)):
            raise
        # Another process died or stopped answering. A collective fails before the optimizer update, so
        # the weights and optimizer are those of the last complete step; rank 0 saves them with that
        # step's RNG state (the other processes' generators are re-seeded on resume).
        written = None
        if ctx.is_main:
            save(run_dir / LAST, full=True, rng=snapshot or _rng_state(generator))
            written = str(run_dir / LAST)
        reporter.finish()
        raise SdltagError(distributed.failure_message(ctx, exc, written), exit_code=distributed.FAILED_EXIT) from None
    reporter.finish()
    if ctx.enabled:
        distributed.revert_batchnorm(model)
    if not ctx.is_main:  # rank 0 calibrates and exports
        return TrainResult(None, run_dir, int(best["epoch"]), {}, CalibrationReport(None, None, 0, 0), history)
    return _finish(
        config,
        data,
        model,
        run_dir,
        spec,
        embedder.spec,
        all_vectors,
        unseen_mask,
        val_store,
        val_targets,
        train_store,
        device,
        options,
        history,
    )


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
    """--freeze-backbone: the pooled features of every image, read from the run folder's cache or computed.

    Under torchrun each process computes the features of its share of the images into the run folder
    (shared by all machines), waits for the others at a barrier, then every process reads the whole cache.
    """
    cache = FeatureCache(
        run_dir / FEATURES_DIR,
        config.backbone,
        model.backbone,
        spec,
        AugmentConfig.from_dict(config.augment),
        device,
        options.threads,
    )
    views = config.feature_views
    reporter.message(f"frozen backbone: computing {views} feature vector(s) per image once (cached in {cache.folder})")
    try:
        if ctx is not None and ctx.enabled:
            for images, n_views in ((train_images, views), (val_images, 1)):
                share = [p for i, p in enumerate(images.paths) if i % ctx.world_size == ctx.rank]
                part = ImageStore(share, images.spec, cache=False, workers=images.workers, warn=images.warn)
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


def _finish(
    config: TrainConfig,
    data: PreparedData,
    model: SDLModel,
    run_dir: Path,
    spec: InputSpec,
    embedder: EmbedderSpec,
    all_vectors: torch.Tensor,
    unseen_mask: np.ndarray,
    val_store: ImageStore | FeatureStore,
    val_targets: np.ndarray,
    train_store: ImageStore | FeatureStore,
    device: torch.device,
    options: RuntimeOptions,
    history: list[dict[str, Any]],
) -> TrainResult:
    """Best weights -> calibration -> model folder with model card and checkpoint.pt."""
    from sdltag.metrics import zsl_gzsl_metrics
    from sdltag.nn.export import export_model

    best_state = load_checkpoint(run_dir / BEST)
    model.load_state_dict(best_state["model"], strict=True)
    best_epoch = int(best_state["best"]["epoch"])
    all_labels = data.seen_labels + data.unseen_labels
    if len(data.val_items):
        scores, targets = validation_scores(
            model, val_store, val_targets, all_vectors, spec, device, options.channels_last
        )
        calibrated_on = "validation images"
    else:
        train_targets = _targets(data.train_items, all_labels)
        scores, targets = validation_scores(
            model, train_store, train_targets, all_vectors, spec, device, options.channels_last
        )
        calibrated_on = "training images (no validation set: optimistic)"
    metrics = _metrics_json(zsl_gzsl_metrics(scores, targets, unseen_mask)) if len(data.val_items) else {}
    calibration, report = fit_calibration(scores, targets, unseen_mask)
    model = model.cpu().float().eval()
    model.to(memory_format=torch.contiguous_format)  # type: ignore[call-overload]  # torch's stubs omit memory_format
    card = _model_card(config, data, spec, embedder, metrics, report, best_epoch, calibrated_on, history)
    folder = export_model(
        model,
        Path(config.out),
        input_spec=spec,
        embedder=embedder,
        seen_labels=data.seen_labels,
        unseen_labels=data.unseen_labels,
        label_vectors=all_vectors.numpy(),
        name=config.name,
        calibration=calibration,
        provenance={
            "trained_by": "sdltag train",
            "run_dir": str(run_dir),
            "best_epoch": best_epoch,
            **best_state.get("provenance", {}),
        },
        model_card=card,
        model_card_md=_model_card_md(card, Path(config.out).name if not config.name else config.name),
    )
    weights = {k: v for k, v in best_state.items() if k not in ("format", "format_version")}
    weights["calibration"] = calibration
    weights["metrics"] = metrics
    if options.keep_weights:
        save_checkpoint(folder.path / MODEL_CHECKPOINT, weights)
    return TrainResult(folder, run_dir, best_epoch, metrics, report, history)


def _model_card(
    config: TrainConfig,
    data: PreparedData,
    spec: InputSpec,
    embedder: EmbedderSpec,
    metrics: dict[str, Any],
    report: CalibrationReport,
    best_epoch: int,
    calibrated_on: str,
    history: list[dict[str, Any]],
) -> dict[str, Any]:
    """The manifest's ``model_card``: data, labels, settings, metrics."""
    counts = data.train_dataset.label_counts()
    return {
        "trained_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "data": {
            "train": str(config.data),
            "format": data.train_dataset.format,
            "validation": str(config.val) if config.val else f"{config.val_split:g} of the training folder",
            "train_images": len(data.train_items),
            "validation_images": len(data.val_items),
            "skipped": len(data.train_dataset.skipped) + (len(data.val_dataset.skipped) if data.val_dataset else 0),
            "fingerprint": data.fingerprint,
        },
        "labels": {
            "seen": len(data.seen_labels),
            "unseen": len(data.unseen_labels),
            "unseen_file": config.unseen,
            "most_common": [[label, n] for label, n in counts.most_common(10)],
        },
        "settings": {k: v for k, v in config.to_dict().items() if k not in ("data", "out", "val", "notes")},
        "input": spec.to_json(),
        "embedder": embedder.id,
        "best_epoch": best_epoch,
        "metrics": metrics,
        "metrics_note": "validation set; percentages; images with >= 1 label in the evaluated set; "
        "labels without a positive skipped from mAP",
        "calibration": {**report.to_json(), "fitted_on": calibrated_on},
        "history": history,
        "notes": config.notes,
    }


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _model_card_md(card: dict[str, Any], name: str) -> str:
    """MODEL_CARD.md from the card dict."""
    data, labels, settings = card["data"], card["labels"], card["settings"]
    lines = [
        f"# {name}",
        "",
        "An SDL (Semantic Diversity Learning, ICCV 2021) zero-shot multi-label image tagger trained with "
        "`sdltag train`.",
        "",
        "## Data",
        "",
        f"- training images: {data['train_images']} from `{data['train']}` ({data['format']} layout)",
        f"- validation images: {data['validation_images']} ({data['validation']})",
        f"- skipped files: {data['skipped']}",
        f"- labels: {labels['seen']} seen, {labels['unseen']} unseen (held out of training)",
        "",
        "## Settings",
        "",
        "| setting | value |",
        "| --- | --- |",
    ]
    lines += [f"| {key} | {_fmt(value)} |" for key, value in settings.items() if key != "augment"]
    lines += [
        f"| input | {card['input']['size'][0]}x{card['input']['size'][1]} ({card['input']['resize']}) |",
        f"| embedder | {card['embedder']} |",
        "",
    ]
    lines += ["## Metrics (validation, best epoch " + str(card["best_epoch"]) + ")", ""]
    if card["metrics"]:
        lines += [
            "| protocol | images | labels | mAP | P@3 | R@3 | F1@3 | P@5 | R@5 | F1@5 |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for proto, m in card["metrics"].items():
            lines.append(
                f"| {proto.upper()} | {m['images']} | {m['labels']} | {m['map']:.2f} | "
                + " | ".join(f"{m[key][k]:.2f}" for k in ("3", "5") for key in ("precision", "recall", "f1"))
                + " |"
            )
        lines += ["", card["metrics_note"] + ".", ""]
    else:
        lines += ["No validation set.", ""]
    cal = card["calibration"]
    lines += [
        "## Calibration",
        "",
        f"Platt scaling fitted on {cal['fitted_on']}; expected calibration error "
        f"(15 bins): seen {_fmt(cal['ece_seen'])}, unseen {_fmt(cal['ece_unseen'])}.",
        "",
    ]
    if card.get("notes"):
        lines += ["## Notes", "", card["notes"], ""]
    return "\n".join(lines)
