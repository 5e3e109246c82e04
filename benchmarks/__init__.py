"""sdltag's benchmarks and model recipes (not part of the installed package)."""
