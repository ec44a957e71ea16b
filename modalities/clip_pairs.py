"""Image-caption pairs for fitting a CLIP-style teacher: a folder with a JSONL manifest, or webdataset shards.

    folder   DIR/<image> + DIR/captions.jsonl (or --manifest NAME): one {"image", "caption"[, "split"][, "category"]}
             per line; split `heldout` marks a held-out pair (never trained on), `train` (or no split) a training one;
             `category` (held-out pairs only) is used to score zero-shot classification, never as a caption
    shards   DIR/*.tar or one FILE.tar: webdataset members <key>.jpg|jpeg|png|webp + <key>.txt (the caption)

Where no pair is marked held out, a fixed fraction is, chosen by a hash of the image's name (the same pairs
whatever the order or the number of pairs around them).
"""

from __future__ import annotations

import hashlib
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from pipeline.errors import UserError

DEFAULT_MANIFEST = "captions.jsonl"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
SPLITS = ("train", "heldout")


@dataclass
class Pair:
    key: str  # the image's name in its source (file name, or shard:key)
    read: Callable[[], bytes]  # the image file's bytes
    caption: str
    split: str  # train | heldout
    category: Optional[str] = None  # held-out pairs only: a class for zero-shot scoring


def read_pairs(source: Path, manifest: str = DEFAULT_MANIFEST, heldout_fraction: float = 0.1) -> list[Pair]:
    """A folder + JSONL manifest, a folder of .tar shards, or one .tar shard -> its pairs, in source order.
    Raises UserError for a missing source, a malformed manifest line, or a pair without image or caption."""
    source = Path(source)
    if source.is_file() and source.suffix == ".tar":
        pairs = _read_shards([source])
    elif source.is_dir() and (source / manifest).is_file():
        pairs = _read_folder(source, source / manifest)
    elif source.is_dir() and sorted(source.glob("*.tar")):
        pairs = _read_shards(sorted(source.glob("*.tar")))
    elif source.exists():
        raise UserError(f"caption source {source}: expected {manifest} in it (lines {{\"image\", \"caption\"}}), "
                        "or webdataset .tar shards (<key>.jpg + <key>.txt)")
    else:
        raise UserError(f"caption source {source}: not found")
    if not pairs:
        raise UserError(f"caption source {source}: no image-caption pairs")
    if not any(p.split == "heldout" for p in pairs):
        for p in pairs:
            if _unit_hash(p.key) < heldout_fraction:
                p.split = "heldout"
    return pairs


def _unit_hash(key: str) -> float:
    return int(hashlib.sha256(key.encode("utf-8")).hexdigest()[:12], 16) / 16 ** 12


def _read_folder(folder: Path, manifest: Path) -> list[Pair]:
    pairs = []
    for n, line in enumerate(manifest.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{manifest}:{n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{where}: not JSON ({e.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("image"), str) or not isinstance(row.get("caption"), str):
            raise UserError(f"{where}: expected {{\"image\": <file>, \"caption\": <text>}}")
        split = row.get("split", "train")
        if split not in SPLITS:
            raise UserError(f"{where}: split must be one of {', '.join(SPLITS)}, got {split!r}")
        path = folder / row["image"]
        if not path.is_file():
            raise UserError(f"{where}: image not found: {path}")
        if not row["caption"].strip():
            raise UserError(f"{where}: empty caption")
        pairs.append(Pair(row["image"], path.read_bytes, row["caption"].strip(), split,
                          row.get("category") if split == "heldout" else None))
    return pairs


def _read_shards(shards: list[Path]) -> list[Pair]:
    pairs = []
    for shard in shards:
        images: dict[str, bytes] = {}
        captions: dict[str, str] = {}
        try:
            with tarfile.open(shard) as tar:
                for m in tar:
                    if not m.isfile():
                        continue
                    key, dot, ext = m.name.rpartition(".")
                    if not dot:
                        continue
                    if "." + ext.lower() in IMAGE_EXTENSIONS:
                        images[key] = tar.extractfile(m).read()
                    elif ext.lower() == "txt":
                        captions[key] = tar.extractfile(m).read().decode("utf-8", errors="replace").strip()
        except tarfile.TarError as e:
            raise UserError(f"caption shard {shard}: not a readable tar file ({e})") from None
        for key in sorted(images):
            if captions.get(key):
                data = images[key]
                pairs.append(Pair(f"{shard.name}:{key}", lambda data=data: data, captions[key], "train"))
    return pairs
