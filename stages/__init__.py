"""The stages of the graph: one module (or package) per stage, each registered through its entry point
(pyproject.toml), and the models and evaluation they share (stages/models, stages/evaluation)."""
