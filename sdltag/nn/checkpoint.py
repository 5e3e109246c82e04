"""Training checkpoints: one torch file holding everything to resume or export a model.

Saved with ``torch.save`` as a dict of tensors and plain Python values only, and
always read back with ``torch.load(..., weights_only=True)`` (no arbitrary pickle)::

    {
      "format": "sdltag-checkpoint", "format_version": 1,
      "model_config": ModelConfig.to_dict(),
      "model": state_dict,
      "input": InputSpec.to_json(),
      "embedder": EmbedderSpec.to_json(),
      "seen_labels": [...], "unseen_labels": [...],
      "label_vectors": (L, d) float32 tensor, rows = seen + unseen,
      ... optional: "optimizer", "scheduler", "epoch", "step", "rng", "train_config",
                    "calibration", "metrics", "model_card", "provenance"
    }
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from sdltag.errors import SdltagError

CHECKPOINT_FORMAT = "sdltag-checkpoint"
CHECKPOINT_VERSION = 1
REQUIRED = ("model_config", "model", "input", "embedder", "seen_labels", "label_vectors")


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Write a checkpoint atomically (temp file + rename)."""
    from sdltag.paths import atomic_write

    missing = [key for key in REQUIRED if key not in payload]
    if missing:
        raise ValueError(f"checkpoint payload lacks {missing}")
    data = {"format": CHECKPOINT_FORMAT, "format_version": CHECKPOINT_VERSION, **payload}
    with atomic_write(Path(path), "wb") as handle:
        torch.save(data, handle)


def load_checkpoint(path: Path | str) -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True``, refusing anything that is not one."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise SdltagError(f"{path}: checkpoint not found. Pass the .pt file written by `sdltag train`.")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a corrupt or unsafe file
        raise SdltagError(
            f"{path}: cannot read the checkpoint ({str(exc).splitlines()[0]}). "
            "It is corrupt, truncated, or not an sdltag checkpoint; for the official SDL weights "
            "use `sdltag import-official`."
        ) from None
    if not isinstance(data, dict) or data.get("format") != CHECKPOINT_FORMAT:
        raise SdltagError(
            f"{path}: not an sdltag checkpoint. Pass a file written by `sdltag train`; "
            "for the official SDL weights use `sdltag import-official`."
        )
    if int(data.get("format_version", 0)) > CHECKPOINT_VERSION:
        raise SdltagError(
            f"{path}: checkpoint format {data['format_version']} is newer than this sdltag. Upgrade sdltag."
        )
    missing = [key for key in REQUIRED if key not in data]
    if missing:
        raise SdltagError(f"{path}: checkpoint lacks {', '.join(missing)}. Re-save it with `sdltag train`.")
    return data
