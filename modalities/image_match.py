"""Is this drawing one of those? Pixel fingerprints that survive JPEG re-encoding and downscaling, so a teacher's
training pairs can leave out every image that appears in an evaluation set, whatever its file name or format.

A fingerprint is the image flattened onto white (modalities.image.to_rgb), shrunk to at most THUMB_SIDE px on its
longest side as the demo's drawings are (LANCZOS), then squashed to SIDE x SIDE RGB: [SIDE * SIDE * 3] float32 in
0..255, with the aspect ratio kept beside it. Two images match when their aspect ratios agree within ASPECT_TOL and
the root-mean-square difference of their fingerprints is at most RMS_TOL grey levels.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image as PILImage

SIDE = 24
THUMB_SIDE = 256  # pipeline/demo_data.py's MAX_SIDE: the demo's and shared/data's drawings are this size
RMS_TOL = 8.0  # grey levels: a drawing against its JPEG copy at 256 px is within 5 (98%); distinct line drawings are further
ASPECT_TOL = 0.03


def fingerprint(im: PILImage.Image) -> tuple[np.ndarray, float]:
    """An RGB (or any-mode) PIL image -> (fingerprint [SIDE*SIDE*3] float32, aspect ratio width / height)."""
    from modalities.image import to_rgb

    rgb = to_rgb(im)
    if max(rgb.size) > THUMB_SIDE:
        rgb = rgb.copy()
        rgb.thumbnail((THUMB_SIDE, THUMB_SIDE), PILImage.Resampling.LANCZOS)
    small = rgb.resize((SIDE, SIDE), PILImage.Resampling.BOX)
    return np.asarray(small, dtype=np.float32).reshape(-1), rgb.width / rgb.height


class PixelIndex:
    """Fingerprints of a set of images, each with a name; `find` returns the name of a matching one (or None)."""

    def __init__(self):
        self.names: list[str] = []
        self._prints: list[np.ndarray] = []
        self._aspects: list[float] = []
        self._matrix: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.names)

    def add(self, name: str, im: PILImage.Image) -> None:
        self.add_fingerprint(name, fingerprint(im))

    def add_fingerprint(self, name: str, fp: tuple[np.ndarray, float]) -> None:
        """Index a (fingerprint, aspect) pair that `fingerprint` made."""
        fp, aspect = fp
        self.names.append(name)
        self._prints.append(fp)
        self._aspects.append(aspect)
        self._matrix = None

    def add_folder(self, folder: Path, prefix: str = "") -> int:
        """Every decodable image file under folder (recursively). Returns how many were added."""
        n = 0
        for p in sorted(folder.rglob("*")):
            if p.suffix.lower() not in (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif") or not p.is_file():
                continue
            try:
                with PILImage.open(p) as im:
                    im.load()
                    self.add(prefix + p.relative_to(folder).as_posix(), im)
                n += 1
            except (OSError, ValueError, SyntaxError):
                continue
        return n

    def find(self, im: PILImage.Image | None = None, fp: tuple[np.ndarray, float] | None = None) -> str | None:
        """The name of an indexed image with the same pixels as im (or as a fingerprint from `fingerprint`)."""
        if not self.names:
            return None
        if self._matrix is None:
            self._matrix = np.stack(self._prints)
            self._arr_aspects = np.asarray(self._aspects)
        vec, aspect = fp if fp is not None else fingerprint(im)
        near = np.abs(np.log(self._arr_aspects / aspect)) <= ASPECT_TOL
        if not near.any():
            return None
        idx = np.flatnonzero(near)
        rms = np.sqrt(((self._matrix[idx] - vec) ** 2).mean(1))
        best = int(rms.argmin())
        return self.names[idx[best]] if rms[best] <= RMS_TOL else None
