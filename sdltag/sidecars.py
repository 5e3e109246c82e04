"""Sidecar files: what they are called, and which tags go into them (a cut-off and a count).

Naming, one place for tagging (which writes sidecars) and training (which reads labels from
them): XMP sidecars are ``IMG.jpg.xmp`` (``ext``: darktable, digiKam) or ``IMG.xmp``
(``adobe``: Lightroom); caption files are ``IMG.jpg.txt`` or ``IMG.txt``.

The output of ``sdltag tag`` lists the top-k tags at any score, for a person or a script to
look at. Sidecars are different: photo tools show their keywords as facts, so only tags a
photographer would keep should go there. The policy:

- ``--sidecar-threshold`` / ``--sidecar-max`` when given;
- otherwise the model's own advice (``manifest.sidecar``: ``threshold`` on the calibrated
  confidence and ``max_keywords``, chosen on validation photos by whoever trained it);
- otherwise, for a calibrated model, ``DEFAULT_THRESHOLD`` and ``DEFAULT_MAX``; for a model
  without calibration (raw scores have no common scale) only ``DEFAULT_MAX``.

With ``--raw-scores`` the tags carry raw scores, which a calibrated cut-off does not apply to:
only an explicit ``--sidecar-threshold`` is used then (on the raw scores).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from sdltag.errors import SdltagError

DEFAULT_THRESHOLD = 0.5
DEFAULT_MAX = 5
NAMINGS = ("ext", "adobe")  # --xmp-naming


# -- names --------------------------------------------------------------------------------------


def sidecar_path(image_path: Path, naming: str = "ext") -> Path:
    """The XMP sidecar to write: ``IMG.jpg.xmp`` (naming ``ext``: darktable, digiKam) or ``IMG.xmp`` (``adobe``)."""
    if naming == "adobe":
        return image_path.with_suffix(".xmp")
    if naming != "ext":
        raise SdltagError(f"--xmp-naming {naming!r} is not one of {', '.join(NAMINGS)}.")
    return image_path.with_name(image_path.name + ".xmp")


def xmp_candidates(image_path: Path) -> tuple[Path, ...]:
    """The XMP sidecars an image may have, in the order they are looked for: both namings, ``IMG.XMP`` too."""
    return (sidecar_path(image_path, "ext"), sidecar_path(image_path, "adobe"), image_path.with_suffix(".XMP"))


def caption_candidates(image_path: Path) -> tuple[Path, Path]:
    """The caption files an image may have: ``IMG.jpg.txt``, then ``IMG.txt``."""
    return image_path.with_name(image_path.name + ".txt"), image_path.with_suffix(".txt")


def caption_path(image_path: Path) -> Path:
    """The caption file to write: ``IMG.jpg.txt`` when it exists, else ``IMG.txt``."""
    long_form, short_form = caption_candidates(image_path)
    return long_form if os.path.lexists(long_form) else short_form


def existing_file(candidates: Iterable[Path]) -> Path | None:
    """The first of ``candidates`` that is a file (a sidecar to read), or None."""
    return next((path for path in candidates if path.is_file()), None)


# -- which tags ---------------------------------------------------------------------------------


class _Scored(Protocol):
    @property
    def label(self) -> str: ...

    @property
    def score(self) -> float: ...


@dataclass(frozen=True)
class SidecarPolicy:
    """Keep tags scoring at least ``threshold`` (None: any score), at most ``max_keywords``, best first."""

    threshold: float | None
    max_keywords: int
    source: str  # where the numbers came from, for the run's info line

    def keywords(self, tags: Sequence[_Scored]) -> list[str]:
        kept = [t for t in tags if self.threshold is None or t.score >= self.threshold]
        kept.sort(key=lambda t: -t.score)
        return [t.label for t in kept[: self.max_keywords]]

    def describe(self) -> str:
        cut = "any score" if self.threshold is None else f"score >= {self.threshold:g}"
        return f"sidecars get at most {self.max_keywords} keywords at {cut} ({self.source})"


def sidecar_policy(
    advice: dict[str, Any] | None,
    *,
    calibrated: bool,
    raw_scores: bool,
    threshold: float | None = None,
    max_keywords: int | None = None,
) -> SidecarPolicy:
    """The policy for one run: explicit options over the model's advice over the defaults."""
    if advice:
        source = "the model's advice"
        cut: float | None = float(advice["threshold"])
        count = int(advice["max_keywords"])
    elif calibrated:
        source = "sdltag's default for calibrated models"
        cut, count = DEFAULT_THRESHOLD, DEFAULT_MAX
    else:
        source = "the model has no calibration, so no default cut-off"
        cut, count = None, DEFAULT_MAX
    if raw_scores and threshold is None:
        cut = None
        source = "--raw-scores: the calibrated cut-off does not apply; pass --sidecar-threshold for one"
    if threshold is not None:
        cut, source = threshold, "--sidecar-threshold"
    if max_keywords is not None:
        count = max_keywords
        if threshold is None:
            source += "; --sidecar-max"
    return SidecarPolicy(cut, count, source)
