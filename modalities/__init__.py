"""Modality adapters: one file per modality, each registered through its entry point (pyproject.toml)."""
