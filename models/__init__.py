"""Bundled sdltag models, installed as the ``sdltag_models`` package (model folders only)."""
