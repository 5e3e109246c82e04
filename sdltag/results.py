"""What tagging and search give back: tags, per-image results, search hits, problems and a run's summary.

Plain records, shared by the pipeline (``tagger``), the library entry point (``api``) and the
output layer (``writers``, ``contact_sheet``), which import them from here.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Tag:
    """One label of one image: ``kind`` is ``seen`` (the model was trained on it) or ``unseen``."""

    label: str
    score: float
    kind: str


@dataclass
class TagResult:
    """The tags of one image, best first."""

    path: Path
    tags: list[Tag] = field(default_factory=list)
    thumbnail: bytes | None = field(default=None, repr=False)  # a small JPEG from the decode (HTML sheets)


@dataclass(frozen=True)
class SearchHit:
    """One image ranked by a query label's score (or, with ``kind`` ``like``, by likeness to an image)."""

    rank: int
    path: Path
    score: float
    label: str
    kind: str


@dataclass(frozen=True)
class Problem:
    """An input that could not be tagged and why (one stderr line)."""

    path: str
    reason: str


@dataclass
class TagSummary:
    """Counts for the run's summary line."""

    tagged: int = 0  # images the model ran on
    unchanged: int = 0  # reused from the index: same path, size and mtime
    by_hash: int = 0  # reused from the index: same content (renamed or copied file)
    failed: list[Problem] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)  # reason -> count (not errors: RAW twins, etc.)
    seconds: float = 0.0
    # sidecars and caption files: changed (or, in a dry run, to change) and failed; None when not asked for
    xmp_changed: int | None = None
    txt_changed: int | None = None
    sidecar_failures: int = 0
    dry_run: bool = False

    @property
    def reused(self) -> int:
        return self.unchanged + self.by_hash

    @property
    def done(self) -> int:
        return self.tagged + self.reused

    @property
    def failures(self) -> int:
        """Inputs that failed plus sidecars or caption files that could not be written."""
        return len(self.failed) + self.skipped["missing or unreadable inputs"] + self.sidecar_failures

    def line(self) -> str:
        rate = self.done / self.seconds if self.seconds > 0 else 0.0
        parts = [f"{self.tagged} tagged", f"{self.reused} reused from the index"]
        if self.reused:
            parts[-1] += f" ({self.unchanged} unchanged, {self.by_hash} by content hash)"
        skipped = sum(self.skipped.values()) + len(self.failed)
        if skipped:
            reasons = [f"{n} {why}" for why, n in sorted(self.skipped.items())]
            if self.failed:
                reasons.append(f"{len(self.failed)} failed")
            parts.append(f"{skipped} skipped ({', '.join(reasons)})")
        else:
            parts.append("0 skipped")
        took = f"{self.seconds:.1f}" if self.seconds >= 10 else f"{self.seconds:.2f}"
        return f"{', '.join(parts)}; {rate:.1f} images/s in {took} s" + self._sidecar_counts()

    def _sidecar_counts(self) -> str:
        done = "to update" if self.dry_run else "updated"
        text = ""
        if self.xmp_changed is not None:
            text += f"; {self.xmp_changed} sidecar{'s' if self.xmp_changed != 1 else ''} {done}"
        if self.txt_changed is not None:
            text += f"; {self.txt_changed} caption{'s' if self.txt_changed != 1 else ''} {done}"
        return text
