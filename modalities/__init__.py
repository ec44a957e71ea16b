"""Modality adapters. Importing this package registers the built-in ones."""

from modalities import audio, base, image, text  # noqa: F401
