"""The stages of the graph. Importing this package registers the built-in ones."""

from stages import ingest, pseudo_label, distill, adversarial, evaluate  # noqa: F401
