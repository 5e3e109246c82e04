"""sdltag: zero-shot multi-label image tagging with Semantic Diversity Learning (SDL)."""

__version__ = "0.2.0"
