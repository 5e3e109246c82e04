"""sdltag: zero-shot multi-label image tagging with Semantic Diversity Learning (SDL).

The library entry point is ``sdltag.Tagger`` (``sdltag/api.py``), imported on first use so
that ``import sdltag`` (and the command line's start-up) stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.2.0"
__all__ = ["LabelSet", "SearchHit", "SidecarOptions", "Tag", "TagOptions", "TagResult", "TagRun", "Tagger"]

# name -> the module that defines it
_LAZY = {
    "Tagger": "sdltag.api",
    "TagRun": "sdltag.api",
    "SidecarOptions": "sdltag.api",
    "TagOptions": "sdltag.tagger",
    "LabelSet": "sdltag.label_space",
    "Tag": "sdltag.results",
    "TagResult": "sdltag.results",
    "SearchHit": "sdltag.results",
}

if TYPE_CHECKING:
    from sdltag.api import SidecarOptions, Tagger, TagRun
    from sdltag.label_space import LabelSet
    from sdltag.results import SearchHit, Tag, TagResult
    from sdltag.tagger import TagOptions


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'sdltag' has no attribute {name!r}")
