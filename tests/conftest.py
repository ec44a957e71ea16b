import contextlib
import io
import os
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"

torch.set_num_threads(1)


def cli(*args, env=None, cwd=None, check=False, timeout=600, subprocess_=False):
    """Run the real CLI: in this process (pipeline.cli.main, its output captured; what a user sees but for the
    interpreter's start-up), or in a subprocess (python -m pipeline, with the tests folder importable for
    plugins) where the call needs one: an environment of its own (a fault to inject, torchrun's variables), another
    working directory, or `subprocess_=True`. Returns a CompletedProcess either way; an exception that escapes
    main is printed as its traceback to stderr with exit code 1, as the interpreter would."""
    if env is None and cwd is None and not subprocess_:
        r = _cli_in_process([str(a) for a in args])
        if check and r.returncode != 0:
            raise AssertionError(f"groundgan {' '.join(map(str, args))} exited {r.returncode}\n{r.stdout}\n{r.stderr}")
        return r
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


def _cli_in_process(argv: list[str]) -> subprocess.CompletedProcess:
    from pipeline.cli import main

    out, err = io.StringIO(), io.StringIO()
    threads, deterministic, cwd = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(), os.getcwd()
    os.chdir(ROOT)  # as the subprocess runs
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = main(argv)
            except SystemExit as e:  # argparse's usage errors
                rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            except Exception:
                traceback.print_exc()
                rc = 1
    finally:
        os.chdir(cwd)
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
    return subprocess.CompletedProcess(["groundgan", *argv], rc, out.getvalue(), err.getvalue())


def offline_demo_config(folder: Path) -> Path:
    """configs/demo.yaml with synthetic sources in place of its data folders and random weights in place of its
    fitted image teacher (they exist only after `make demo`), written into folder: what a test loads the demo's
    config and its overlays onto."""
    import yaml

    demo = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    demo["ingest"]["sources"] = [{"type": "synthetic", "modality": m, "count": 4, "name": m} for m in ("audio", "image")]
    teacher = demo["modalities"]["image"]["teacher"]
    assert teacher["kind"] == "clip" and teacher["checkpoint"] == "../data/demo/clip_teacher"
    teacher["checkpoint"] = "random"  # the fitted teacher, like the data, exists only after `make demo`
    path = folder / "demo.yaml"
    path.write_text(yaml.safe_dump(demo))
    return path


@pytest.fixture
def shared_data():
    if not SHARED_DATA.exists():
        pytest.skip(f"real data not found at {SHARED_DATA} (the shared/ folder beside the project)")
    return SHARED_DATA
