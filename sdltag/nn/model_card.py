"""The model card of a trained model: the manifest's ``model_card`` entry and ``MODEL_CARD.md``.

What data and labels the model was trained on, with which settings, how it scored on the validation
set (each epoch and the best one) and how its scores were calibrated.
"""

from __future__ import annotations

import datetime as _dt
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sdltag.modelfolder import EmbedderSpec, InputSpec
    from sdltag.nn.calibration import CalibrationReport
    from sdltag.nn.train import PreparedData, TrainConfig


def model_card(
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


def model_card_md(card: dict[str, Any], name: str) -> str:
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
