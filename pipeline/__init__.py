"""groundgan's pipeline: everything that is not machine learning (CLI, config, run directories,
manifests, checkpoints, resume, shards, distributed set-up)."""

__version__ = "0.1.0"
