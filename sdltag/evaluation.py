"""`sdltag eval`: the paper's ZSL/GZSL metrics of a model folder on a labeled folder.

It runs the exported ONNX model through the same code as ``sdltag tag``: images are
decoded by ``sdltag.images.load_image`` (the model's ``InputSpec``), run by
``sdltag.runtime.ImageModel`` and scored by ``sdltag.scoring.sdl_scores``. The evaluated
labels are the model's seen and unseen labels plus any ``--unseen`` labels file (new
labels are embedded with the model's embedder via ``sdltag.label_space``). Metrics
follow ``sdltag.metrics``. No torch.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from sdltag.datasets import read_labeled_dir
from sdltag.errors import SdltagError
from sdltag.metrics import RankingMetrics, zsl_gzsl_metrics
from sdltag.modelfolder import ModelFolder

if TYPE_CHECKING:
    from sdltag.datasets import LabeledImage
    from sdltag.label_space import LabelSet

logger = logging.getLogger(__name__)
KS = (3, 5)


@dataclass
class EvalReport:
    """What `sdltag eval` prints: counts, ZSL/GZSL metrics (percentages) and calibration error."""

    model: str
    data: str
    data_format: str
    images_listed: int  # labelled images found in the folder
    images_failed: int  # could not be decoded
    seen_labels: int
    unseen_labels: int
    ignored_labels: list[str]  # labels of the folder the model does not rank (not seen, not unseen)
    results: dict[str, RankingMetrics]
    empty_rule: str
    ece: dict[str, float | None] = field(default_factory=dict)
    # What `sdltag eval --report` draws (not in to_json): the evaluated images, the ranked labels,
    # their raw (N, L) scores and ground truth, and the model's calibration.
    paths: list[Path] = field(default_factory=list, repr=False)
    label_names: list[str] = field(default_factory=list, repr=False)
    unseen_mask: np.ndarray | None = field(default=None, repr=False)
    scores: np.ndarray | None = field(default=None, repr=False)
    targets: np.ndarray | None = field(default=None, repr=False)
    calibration: dict | None = field(default=None, repr=False)

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "data": self.data,
            "data_format": self.data_format,
            "images": {
                "listed": self.images_listed,
                "failed": self.images_failed,
                "evaluated": self.images_listed - self.images_failed,
            },
            "labels": {
                "seen": self.seen_labels,
                "unseen": self.unseen_labels,
                "ignored": len(self.ignored_labels),
                "ignored_examples": self.ignored_labels[:20],
            },
            **{name: metrics.to_json() for name, metrics in self.results.items()},
            "map_rule": self.empty_rule,
            "calibration_ece": self.ece,
        }


def _decode_all(paths: list[Path], model: ModelFolder, threads: int) -> tuple[np.ndarray, np.ndarray]:
    """Decode every image as tagging does; (ok mask, (N, 3, H, W) float32 of the decodable ones).

    An image that cannot be decoded is one warning naming it, and is left out."""
    from sdltag.images import load_image

    spec = model.manifest.input

    def one(path: Path) -> np.ndarray | str:
        try:
            return load_image(path, spec)
        except SdltagError as exc:
            return str(exc)

    ok = np.zeros(len(paths), dtype=bool)
    images = []
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        for i, result in enumerate(pool.map(one, paths)):
            if isinstance(result, str):
                logger.warning(f"{result}; skipped" if str(paths[i]) in result else f"{paths[i]}: {result}; skipped")
                continue
            ok[i] = True
            images.append(result)
    stacked = np.stack(images) if images else np.zeros((0, 3, spec.height, spec.width), dtype=np.float32)
    return ok, stacked


def evaluate(
    model: ModelFolder,
    data_dir: Path | str,
    *,
    unseen_file: Path | None = None,
    data_format: str = "auto",
    batch_size: int = 32,
    device: str = "auto",
    threads: int | None = None,
    embedder: str | None = None,
    cache_dir: Path | None = None,
    empty: str = "skip",
    progress: Callable[[int, int], None] | None = None,
    exclude: Sequence[str] = (),
) -> EvalReport:
    """Score every labelled image of ``data_dir`` with ``model`` and compute ZSL and GZSL metrics.

    Images that cannot be decoded are left out with a warning (``logging``, logger ``sdltag``);
    ``progress(done, total)`` is called after each chunk of images."""
    if batch_size < 1:
        raise SdltagError(f"--batch-size {batch_size}: must be at least 1.")
    dataset = read_labeled_dir(data_dir, data_format, exclude=exclude)
    label_set = _evaluated_labels(model, unseen_file, embedder, cache_dir)
    targets, ignored = _ground_truth(dataset.items, label_set.names)  # (N, L)
    paths = [item.path for item in dataset.items]
    scores, ok = _score_all(model, paths, label_set.vectors, batch_size, device, threads, progress)  # (N, L)
    if not ok.any():
        raise SdltagError(f"{data_dir}: none of the {len(paths)} labelled images could be decoded. Check the files.")
    scores, targets = scores[ok], targets[ok]
    calibration = model.manifest.calibration
    return EvalReport(
        model=str(model.path),
        data=str(dataset.root),
        data_format=dataset.format,
        images_listed=len(paths),
        images_failed=int((~ok).sum()),
        seen_labels=int((~label_set.unseen_mask).sum()),
        unseen_labels=int(label_set.unseen_mask.sum()),
        ignored_labels=ignored,
        results=zsl_gzsl_metrics(scores, targets, label_set.unseen_mask, KS, empty),
        empty_rule=empty,
        ece=_calibration_error(scores, targets, label_set.unseen_mask, calibration),
        paths=[path for path, kept in zip(paths, ok, strict=True) if kept],
        label_names=list(label_set.names),
        unseen_mask=np.asarray(label_set.unseen_mask, dtype=bool),
        scores=scores,
        targets=targets,
        calibration=calibration or None,
    )


def _evaluated_labels(
    model: ModelFolder, unseen_file: Path | None, embedder: str | None, cache_dir: Path | None
) -> LabelSet:
    """The model's seen and unseen labels plus those of ``unseen_file`` (which may not name a seen label)."""
    from sdltag.label_space import resolve_labels
    from sdltag.labels import build_vocabulary, label_key

    entries = build_vocabulary([unseen_file], []) if unseen_file else []
    label_set = resolve_labels(model, entries, include_seen=True, embedder=embedder, cache_dir=cache_dir)
    seen_keys = {label_key(n) for n in model.manifest.seen_labels}
    clash = [e.label for e in entries if label_key(e.label) in seen_keys]
    if clash:
        raise SdltagError(
            f"{unseen_file}: {', '.join(clash[:5])} are seen labels of the model (trained on), so they cannot be "
            "evaluated as unseen. Remove them from the --unseen file."
        )
    return label_set


def _ground_truth(items: Sequence[LabeledImage], names: Sequence[str]) -> tuple[np.ndarray, list[str]]:
    """(N, L) bool targets over the ranked labels, and the folder's labels that are not among them."""
    from sdltag.labels import label_key

    column = {label_key(name): j for j, name in enumerate(names)}
    targets = np.zeros((len(items), len(names)), dtype=bool)  # (N, L)
    ignored: dict[str, None] = {}
    for i, item in enumerate(items):
        for label in item.labels:
            j = column.get(label_key(label))
            if j is None:
                ignored.setdefault(label, None)
            else:
                targets[i, j] = True
    return targets, list(ignored)


def _score_all(
    model: ModelFolder,
    paths: list[Path],
    label_vectors: np.ndarray,
    batch_size: int,
    device: str,
    threads: int | None,
    progress: Callable[[int, int], None] | None,
) -> tuple[np.ndarray, np.ndarray]:
    """Raw SDL scores (N, L) of every image, and the mask of the images that could be decoded."""
    from sdltag.runtime import ImageModel
    from sdltag.scoring import sdl_scores

    runner = ImageModel(model, device=device, threads=threads)
    scores = np.zeros((len(paths), len(label_vectors)), dtype=np.float32)  # (N, L)
    ok = np.zeros(len(paths), dtype=bool)
    chunk = max(batch_size, 256)  # decode a chunk in threads, then infer it in batches
    for start in range(0, len(paths), chunk):
        part = paths[start : start + chunk]
        part_ok, images = _decode_all(part, model, threads or 2)
        rows = start + np.flatnonzero(part_ok)
        for b in range(0, len(images), batch_size):
            vectors = runner.run(images[b : b + batch_size])  # (B, M, d)
            scores[rows[b : b + batch_size]] = sdl_scores(vectors, label_vectors)
        ok[start : start + len(part)] = part_ok
        if progress is not None:
            progress(min(start + chunk, len(paths)), len(paths))
    return scores, ok


def _calibration_error(
    scores: np.ndarray, targets: np.ndarray, unseen_mask: np.ndarray, calibration: dict | None
) -> dict[str, float | None]:
    """ECE of the calibrated confidences, seen and unseen labels apart (empty for an uncalibrated model)."""
    from sdltag.nn.calibration import expected_calibration_error
    from sdltag.scoring import calibrate

    if not calibration:
        return {}
    confidences = calibrate(scores, unseen_mask, calibration)
    return {
        group: round(expected_calibration_error(confidences[:, mask], targets[:, mask]), 5) if mask.any() else None
        for group, mask in (("seen", ~unseen_mask), ("unseen", unseen_mask))
    }


def format_table(report: EvalReport) -> str:
    """The report as an aligned text table."""
    lines = [
        f"model:  {report.model}",
        f"data:   {report.data} ({report.data_format} layout; {report.images_listed - report.images_failed} images "
        f"evaluated, {report.images_failed} could not be decoded)",
        f"labels: {report.seen_labels} seen, {report.unseen_labels} unseen"
        + (
            f"; {len(report.ignored_labels)} label(s) of the folder unknown to the model, ignored"
            if report.ignored_labels
            else ""
        ),
        "",
    ]
    header = ["protocol", "images", "labels", "mAP", "P@3", "R@3", "F1@3", "P@5", "R@5", "F1@5"]
    rows = [header]
    for name in ("zsl", "gzsl", "seen"):
        if name not in report.results:
            continue
        m = report.results[name]
        rows.append(
            [name.upper(), str(m.images), str(m.labels), f"{m.map:.2f}"]
            + [f"{getattr(m, key)[k]:.2f}" for k in KS for key in ("precision", "recall", "f1")]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for row in rows:
        lines.append(
            "  ".join(
                cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths, strict=True))
            )
        )
    if "zsl" not in report.results:
        lines.append("(no unseen labels: ZSL needs --unseen FILE or a model with unseen labels)")
    rule = (
        "labels without a positive image are skipped from the mean"
        if report.empty_rule == "skip"
        else "labels without a positive image count as 0 (the official SDL code's rule)"
    )
    lines += [
        "",
        f"Percentages. Images kept when they have a label in the ranked set; P/R/F1 are micro; mAP averages "
        f"per-label AP; {rule}.",
    ]
    if report.ece:
        parts = [f"{group} {value:.4f}" for group, value in report.ece.items() if value is not None]
        lines.append("Calibration error (ECE, 15 bins): " + ", ".join(parts) + ".")
    return "\n".join(lines)
