"""Modality adapters. Importing this package registers the built-in ones."""

from modalities import base, text  # noqa: F401
