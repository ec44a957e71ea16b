"""The example modality plugin (examples/groundgan-vibration) for the tests' configs (`plugins: [toy_vibration]`),
without installing it: vibration series with a variance teacher. No edit to pipeline/ or stages/."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples" / "groundgan-vibration"))

from groundgan_vibration import VarianceTeacher, Vibration, VibrationConfig  # noqa: E402,F401
