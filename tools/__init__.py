"""Command-line tools; run them from the repository root as modules: python -m tools.NAME ..."""
