"""The layout's rules, read from the source: pipeline/ (its CLI, the composition root, aside) imports no stage or
modality, and no function of the adversarial stage runs past ~80 lines."""

import ast
from pathlib import Path

from conftest import ROOT

# pipeline/ modules that may import stages or modalities: the CLI's commands and the Python API (composition roots)
COMPOSITION_ROOT = {"cli.py", "demo_data.py", "api.py"}


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
    return out


def test_pipeline_imports_no_stage_or_modality():
    bad = {p.name: sorted(m for m in _imports(p) if m.split(".")[0] in ("stages", "modalities"))
           for p in sorted((ROOT / "pipeline").glob("*.py")) if p.name not in COMPOSITION_ROOT}
    assert {k: v for k, v in bad.items() if v} == {}


def test_no_function_of_the_adversarial_stage_runs_past_80_lines():
    long = []
    for p in sorted((ROOT / "stages" / "adversarial").glob("*.py")):
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 80:
                long.append(f"{p.name}:{node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert long == []
