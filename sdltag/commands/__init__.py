"""CLI commands, one module per command group; each module has ``register(app)``.

Modules import heavy libraries (torch, sentence-transformers) inside the command
functions, never at module level, so ``sdltag --help`` and tagging stay light.
"""
