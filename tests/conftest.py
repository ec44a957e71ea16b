import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"

torch.set_num_threads(1)


def cli(*args, env=None, cwd=None, check=False, timeout=600):
    """Run the real CLI in a subprocess (python -m pipeline), with the tests folder importable for plugins."""
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join([str(ROOT / "tests"), str(ROOT), e.get("PYTHONPATH", "")])
    e.setdefault("OMP_NUM_THREADS", "1")
    e["PYTHONUNBUFFERED"] = "1"
    if env:
        e.update(env)
    r = subprocess.run([sys.executable, "-m", "pipeline", *map(str, args)], capture_output=True, text=True,
                       env=e, cwd=cwd or ROOT, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"groundgan {' '.join(map(str, args))} exited {r.returncode}\n{r.stdout}\n{r.stderr}")
    return r


def offline_demo_config(folder: Path) -> Path:
    """configs/demo.yaml with synthetic sources in place of its data folders (they exist only after `make demo`),
    written into folder: what a test loads the demo's config and its overlays onto."""
    import yaml

    demo = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    demo["ingest"]["sources"] = [{"type": "synthetic", "modality": m, "count": 4, "name": m} for m in ("audio", "image")]
    path = folder / "demo.yaml"
    path.write_text(yaml.safe_dump(demo))
    return path


@pytest.fixture
def shared_data():
    if not SHARED_DATA.exists():
        pytest.skip(f"real data not found at {SHARED_DATA} (the shared/ folder beside the project)")
    return SHARED_DATA
