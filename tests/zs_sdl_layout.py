"""Helpers for the official-model tests: the ZS_SDL layout facts, its weight rule and golden output.

The facts are vendored under ``tests/data/zs_sdl`` (with the official release's MIT licence),
so these tests run in every clone; a missing file is a failure, not a skip.
"""

from __future__ import annotations

import json
import math
import zlib
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pytest

FIXTURES = Path(__file__).resolve().parent / "data" / "zs_sdl"
LAYOUT_FILE = FIXTURES / "tresnet_m_nus_layout.json"
CLASSES = FIXTURES / "nus_wide_classes.pickle"
UNSEEN = FIXTURES / "nus_wide_unseen_classes.pickle"
WORDVECS = FIXTURES / "nus_wide_wordvec_array.pickle"


def require_fixtures() -> Path:
    """The fixtures folder; fails the calling test when a vendored file is missing."""
    needed = [LAYOUT_FILE, CLASSES, UNSEEN, WORDVECS]
    missing = [p.name for p in needed if not p.is_file()]
    if missing:
        pytest.fail(f"official ZS_SDL fixtures not found at {FIXTURES} (missing {', '.join(missing)})")
    return FIXTURES


@lru_cache(maxsize=1)
def _layout() -> dict[str, Any]:
    return json.loads(LAYOUT_FILE.read_text(encoding="utf-8"))


def load_layout() -> dict[str, Any]:
    require_fixtures()
    return _layout()


def layout_shapes() -> dict[str, tuple[int, ...]]:
    """Official key -> shape, in the file's order."""
    return {key: tuple(shape) for key, shape, _dtype in load_layout()["keys"]}


def rule_tensor(key: str, shape: tuple[int, ...]) -> np.ndarray:
    """The layout file's deterministic weight rule for one tensor, computed in float64, returned float32."""
    n = int(np.prod(shape)) if shape else 1
    base = np.sin(np.arange(n, dtype=np.float64) * 1.618 + (zlib.crc32(key.encode("utf-8")) % 1000)).reshape(shape)
    if key == "embedding.weight":
        value = 0.02 * base
    elif len(shape) >= 2:
        value = base * math.sqrt(2.0 / int(np.prod(shape[1:])))
    elif key.endswith(".weight"):
        value = 1.0 + 0.1 * base
    elif key.endswith(".running_var"):
        value = 1.0 + 0.1 * np.abs(base)
    else:  # .bias, .running_mean
        value = 0.05 * base
    return value.astype(np.float32)


def rule_state_dict() -> dict[str, Any]:
    """The whole official state dict under the weight rule, as torch tensors (official key names)."""
    import torch

    return {key: torch.from_numpy(rule_tensor(key, shape)) for key, shape in layout_shapes().items()}


def save_official_checkpoint(path: Path) -> Path:
    """The rule's weights saved as the official release saves them: {"model", "num_classes", "idx_to_class"}."""
    import torch

    from sdltag.safepickle import safe_load

    classes = safe_load(CLASSES)
    torch.save({"model": rule_state_dict(), "num_classes": len(classes), "idx_to_class": classes}, path)
    return path


def golden_input() -> np.ndarray:
    """(1, 3, 224, 224) float32: x[0, c, y, x] = 0.5 + 0.5 * sin(0.031 x + 0.017 y + c)."""
    c = np.arange(3, dtype=np.float64)[:, None, None]
    y = np.arange(224, dtype=np.float64)[None, :, None]
    x = np.arange(224, dtype=np.float64)[None, None, :]
    return (0.5 + 0.5 * np.sin(0.031 * x + 0.017 * y + c)).astype(np.float32)[None]


def golden_principal_vectors() -> np.ndarray:
    """The official flat output (1, 2100) as the (M, d) = (7, 300) matrix: row m is out[m::7]."""
    flat = np.asarray(load_layout()["output"], dtype=np.float32)  # (2100,)
    return flat.reshape(300, 7).T  # (d, M) -> (M, d)
