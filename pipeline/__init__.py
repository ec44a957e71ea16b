"""groundgan's pipeline: everything that is not machine learning (CLI, config, run directories,
manifests, checkpoints, resume, shards, distributed set-up)."""

__version__ = "0.1.0"


def __getattr__(name):
    """pipeline.load_student (pipeline/api.py), imported on first use: `import pipeline` stays light."""
    if name == "load_student":
        from pipeline.api import load_student

        return load_student
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
