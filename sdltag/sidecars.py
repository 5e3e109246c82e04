"""Which tags go into sidecars (XMP keywords, caption files): a cut-off and a count.

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

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

DEFAULT_THRESHOLD = 0.5
DEFAULT_MAX = 5


class _Scored(Protocol):
    label: str
    score: float


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
