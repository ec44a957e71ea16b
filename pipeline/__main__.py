import os
import sys

# `python -m pipeline` puts the working directory first on sys.path, where a stray `stages.py`, `torch.py` or
# `yaml.py` would be imported in place of the project's or a dependency's module. Only the project's own root
# stays (running from a checkout); plugins named in a config are still found there (pipeline.registry).
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != os.getcwd() or os.getcwd() == _ROOT]

from pipeline.cli import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
