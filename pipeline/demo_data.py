"""`groundgan data demo --out DIR`: a small real data set from Debian packages, in the folder + manifest layout
that ingest's folder sources read.

    DIR/speech/<name>.wav + transcripts.jsonl   {"audio", "text"}: Allison Smith's Asterisk prompts (8 kHz,
                                                CC-BY-SA-3.0), references from core-sounds-en.txt;
                                                digits/1.wav becomes digits__1.wav
    DIR/images/<category>_<nnnn>.jpg + labels.jsonl   {"image", "category", "path", "name_words"}: openclipart
                                                drawings (public domain), RGB JPEG on white, longest side at most
                                                256 px, `category` the top folder, `path` the finer one; never a
                                                reserved drawing (below)
    DIR/captions/<nnnnn>.jpg + captions.jsonl   {"image", "caption", "split", "source"[, "category"]}: every other
                                                drawing of the package, captioned from its file name only (folder
                                                names never enter a caption): the image-caption source of
                                                `groundgan teacher fit-clip`; split `heldout` for the reserved
                                                drawings (those carry `category` where their top folder is one of
                                                the ten), `train` for the rest; exclusions.json says what was left
                                                out and why
    DIR/stamps/<nnnnn>.jpg + captions.jsonl     {"image", "caption", "split": "train", "source"}: Tux Paint's stamps
                                                (tuxpaint-stamps-default, GPL-2: COPYRIGHT), each
                                                captioned by its English description: extra training pairs for
                                                fit-clip (--extra-pairs), never a stamp with the pixels of an
                                                evaluation image, a demo drawing or a reserved openclipart drawing
                                                (exclusions.json); DIR/stamps/.complete its own marker
    DIR/.complete                               written last: a run that finds it does nothing (but add stamps/)

Reserved drawings: those whose package-relative path (e.g. `animals/birds/dove_symbol_01.png`, relative to
usr/share/openclipart/png) has a sha256 hex digest starting with 0 or 1, about an eighth. They are kept for
evaluation: no demo drawing is one, and the caption source holds them only as held-out pairs.

The packages are fetched with `apt-get download` (no root needed, nothing is installed) and unpacked with
`dpkg-deb -x` in a temporary folder that is removed afterwards.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import re
import shutil
import subprocess
import tempfile
import time
import warnings
from pathlib import Path

from pipeline.errors import UserError
from pipeline.files import atomic_write_bytes, atomic_write_json, atomic_write_text

SPEECH_PACKAGES = ("asterisk-core-sounds-en-wav", "asterisk-core-sounds-en")  # the WAVs; the transcripts
IMAGE_PACKAGES = ("openclipart-png",)
CATEGORIES = ("animals", "food", "transportation", "plants", "buildings", "tools", "electronics", "people", "office",
              "recreation")
MARKER = ".complete"
MAX_SIDE = 256
MAX_SOURCE_PIXELS = 25_000_000  # a few drawings are 10,000+ px wide: skipped, the next one takes their place
PNG_ROOT = "usr/share/openclipart/png"
# evaluation drawings beside the project (shared/data/README.md): the caption source never holds their pixels
SHARED_DRAWINGS = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "images" / "openclipart"
RESERVED_PREFIXES = ("0", "1")  # sha256 hex digits of the package-relative path: drawings kept for evaluation

_OWN_DATA = """Without them, point configs/demo.yaml's ingest.sources at your own folders, each a `dir` holding the media
and a JSONL `manifest` that names each file and its reference, e.g.
  ingest:
    sources:
      - {dir: my/speech, manifest: transcripts.jsonl, modality: audio}   # lines {"audio": "a.wav", "text": "..."}
      - {dir: my/images, manifest: labels.jsonl, modality: image}        # lines {"image": "b.jpg", "category": "..."}"""


# ------------------------------------------------------------------------------------------ packages
def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)


def _tail(r: subprocess.CompletedProcess) -> str:
    lines = [x for x in (r.stderr or r.stdout or "").strip().splitlines() if x.strip()]
    return lines[-1] if lines else f"exit code {r.returncode}"


def fetch_packages(names: tuple[str, ...], workdir: Path) -> list[Path]:
    """`apt-get download` the packages into workdir; on failure `apt-get update` once and retry.
    Returns the .deb files. Raises UserError when the tools are missing or the download fails."""
    for tool in ("apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise UserError(f"`groundgan data demo` needs {tool} (Debian or Ubuntu) to fetch its packages, and it is "
                            f"not installed here.\n{_OWN_DATA}")
    r = _run(["apt-get", "download", *names], workdir)
    if r.returncode != 0:
        # A fresh container often has no package lists yet.
        u = _run(["apt-get", "update"], workdir)
        r = _run(["apt-get", "download", *names], workdir)
        if r.returncode != 0:
            why = _tail(r) + ("" if u.returncode == 0 else f"; apt-get update also failed: {_tail(u)}")
            raise UserError(f"could not download {', '.join(names)} with apt-get ({why}).\n{_OWN_DATA}")
    debs = []
    for name in names:
        found = sorted(workdir.glob(f"{name}_*.deb"))
        if not found:
            raise UserError(f"apt-get download left no {name}_*.deb in {workdir}.\n{_OWN_DATA}")
        debs.append(found[-1])
    return debs


def extract_package(deb: Path, root: Path) -> None:
    """Unpack a .deb's files under root (dpkg-deb -x: no install, no root needed)."""
    r = _run(["dpkg-deb", "-x", str(deb), str(root)], root.parent)
    if r.returncode != 0:
        raise UserError(f"dpkg-deb could not unpack {deb.name}: {_tail(r)}.\n{_OWN_DATA}")


# -------------------------------------------------------------------------------------------- speech
def parse_transcripts(text: str) -> dict[str, str]:
    """core-sounds-en.txt -> {sound key: transcript}. Lines are `key: text` (the key may hold a folder,
    `digits/1: one`; the text may hold colons); `;` starts a comment."""
    out = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(";") or ":" not in line:
            continue
        key, _, said = line.partition(":")
        key, said = key.strip(), " ".join(said.split())
        if key and said and not any(c.isspace() for c in key):
            out[key] = said
    return out


def _read_maybe_gz(path: Path) -> str:
    data = path.read_bytes()
    if path.suffix == ".gz":
        data = gzip.decompress(data)
    return data.decode("utf-8", errors="replace")


def _sounds_dir(root: Path) -> Path:
    """The folder of English prompts: the one under usr/share/asterisk/sounds with the most WAVs."""
    base = root / "usr/share/asterisk/sounds"
    candidates = [d for d in base.rglob("*") if d.is_dir()] if base.is_dir() else []
    best = max(candidates, key=lambda d: len(list(d.glob("*.wav"))), default=None)
    if best is None or not any(best.glob("*.wav")):
        raise UserError(f"no Asterisk WAV files found under {base} in the unpacked packages")
    return best


def write_speech(root: Path, out: Path) -> int:
    """Unpacked asterisk packages under root -> out/<key with / as __>.wav + out/transcripts.jsonl.
    Returns the number of clips (those with both a WAV and a transcript)."""
    found = sorted(root.rglob("core-sounds-en.txt*"))
    if not found:
        raise UserError(f"core-sounds-en.txt not found in the unpacked {SPEECH_PACKAGES[1]} package")
    transcripts = parse_transcripts(_read_maybe_gz(found[0]))
    sounds = _sounds_dir(root)
    rows = []
    for key in sorted(transcripts):
        wav = sounds / f"{key}.wav"
        if not wav.is_file():
            continue
        name = key.replace("/", "__") + ".wav"
        atomic_write_bytes(out / name, wav.read_bytes())
        rows.append({"audio": name, "text": transcripts[key]})
    if not rows:
        raise UserError(f"no WAV in {sounds} matches a line of {found[0].name}")
    _copy_copyright(root, SPEECH_PACKAGES[0], out)
    atomic_write_text(out / "transcripts.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    return len(rows)


# -------------------------------------------------------------------------------------------- images
def name_words(stem: str) -> list[str]:
    """Words of an artist's file name: letters only, 3 or more ("flying_wasp_gerald_g._02" -> flying wasp gerald)."""
    return [w for w in re.split(r"[^A-Za-z]+", stem) if len(w) >= 3]


def is_reserved(rel_path: str) -> bool:
    """A drawing kept for evaluation: its package-relative path (`animals/birds/dove_symbol_01.png`) has a sha256
    hex digest starting with one of RESERVED_PREFIXES. No teacher trains on it and no demo drawing is one."""
    return hashlib.sha256(rel_path.encode("utf-8")).hexdigest().startswith(RESERVED_PREFIXES)


def _spread(items: list, k: int) -> list:
    """All of items, the k evenly spaced over the sorted list first (so every sub-folder is drawn from), then
    the rest as replacements for files that do not decode."""
    if len(items) <= k:
        return list(items)
    picks = sorted({round(i * len(items) / k) for i in range(k)})
    chosen = set(picks)
    return [items[i] for i in picks] + [x for i, x in enumerate(items) if i not in chosen]


def _to_jpeg(data: bytes) -> bytes:
    return _jpeg(_flatten(data))


def _flatten(data: bytes):
    """PNG bytes -> an RGB PIL image on white, longest side at most MAX_SIDE (downscaled only, aspect kept).
    Raises ValueError (too large) or PIL's errors (damaged)."""
    from PIL import Image

    from modalities.image import to_rgb

    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        im = Image.open(io.BytesIO(data))
    if im.width * im.height > MAX_SOURCE_PIXELS:
        raise ValueError(f"{im.width}x{im.height} is too large to convert quickly")
    with im:
        im.load()
        rgb = to_rgb(im)
    rgb.thumbnail((MAX_SIDE, MAX_SIDE), Image.Resampling.LANCZOS)  # downscale only, aspect kept
    return rgb


def _jpeg(rgb) -> bytes:
    buf = io.BytesIO()
    rgb.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def write_images(root: Path, out: Path, per_category: int) -> dict[str, int]:
    """Unpacked openclipart-png under root -> out/<category>_<nnnn>.jpg + out/labels.jsonl, at most
    per_category drawings from each of CATEGORIES, none of them reserved (is_reserved). Returns {category: count}."""
    png_root = root / PNG_ROOT
    if not png_root.is_dir():
        raise UserError(f"{png_root.relative_to(root)} not found in the unpacked {IMAGE_PACKAGES[0]} package")
    rows, counts = [], {}
    for category in CATEGORIES:
        files = sorted(p for p in (png_root / category).rglob("*.png") if p.is_file()) if (png_root / category).is_dir() else []
        n = 0
        # reserved drawings leave the spread after it is drawn, so every other pick stays what it was and a
        # reserved one is replaced as a damaged one is
        for png in (p for p in _spread(files, per_category) if not is_reserved(p.relative_to(png_root).as_posix())):
            if n >= per_category:
                break
            try:
                jpg = _to_jpeg(png.read_bytes())
            except Exception:  # a damaged drawing is skipped; the next one in the spread takes its place
                continue
            name = f"{category}_{n:04d}.jpg"
            atomic_write_bytes(out / name, jpg)
            rows.append({"image": name, "category": category, "path": png.parent.relative_to(png_root).as_posix(),
                         "name_words": name_words(png.stem)})
            n += 1
        counts[category] = n
    if not rows:
        raise UserError(f"no drawing of the categories {', '.join(CATEGORIES)} under {png_root}")
    _copy_copyright(root, IMAGE_PACKAGES[0], out)
    atomic_write_text(out / "labels.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    return counts


# ------------------------------------------------------------------------------------------ captions
CAPTIONS_MANIFEST = "captions.jsonl"
EXCLUSIONS = "exclusions.json"


def caption_from_name(stem: str) -> str:
    """An artist's file name -> a caption: its words (name_words, camelCase split), lower case
    ("DoveSymbol_by_joe_01" -> "dove symbol joe"). The folder never enters it."""
    return " ".join(w.lower() for w in name_words(re.sub(r"([a-z])([A-Z])", r"\1 \2", stem)))


def write_captions(root: Path, out: Path, demo_images: Path | None, exclude_dirs: list[Path]) -> dict:
    """Unpacked openclipart-png under root -> out/<nnnnn>.jpg + out/captions.jsonl + out/exclusions.json: every
    drawing captioned from its file name (caption_from_name), JPEG on white as the demo's drawings are.

    Left out, each counted under its reason in exclusions.json: symlinks to another drawing of the package (the
    target is read once), file names without words, drawings that do not convert, every drawing with the pixels
    of an image in demo_images (the demo's drawings, every split) or in one of exclude_dirs (matched after the
    same flattening and downscaling, modalities.image_match), and training drawings with the pixels of a
    held-out one. Reserved drawings (is_reserved) are the `heldout` split; the rest `train`.
    Returns the exclusions.json record."""
    from collections import Counter

    from modalities.image_match import PixelIndex

    png_root = root / PNG_ROOT
    if not png_root.is_dir():
        raise UserError(f"{PNG_ROOT} not found in the unpacked {IMAGE_PACKAGES[0]} package")
    indexes: list[tuple[str, PixelIndex]] = []
    matched_against, missing = {}, []
    for label, folder in ([("the demo's drawings", demo_images)] if demo_images else []) + \
            [(f"evaluation images in {d}", d) for d in exclude_dirs]:
        if not Path(folder).is_dir():
            missing.append(str(folder))
            continue
        index = PixelIndex()
        matched_against[str(folder)] = index.add_folder(Path(folder))
        indexes.append((label, index))
    excluded: Counter = Counter()
    kept = []  # (rel, caption, jpeg bytes, fingerprint, reserved)
    real_root = png_root.resolve()
    for png in sorted(png_root.rglob("*.png")):
        rel = png.relative_to(png_root).as_posix()
        if png.is_symlink() and png.resolve().is_file() and real_root in png.resolve().parents:
            excluded["symlink to another drawing of the package"] += 1
            continue
        if not png.is_file():
            continue
        caption = caption_from_name(png.stem)
        if not caption:
            excluded["file name has no words"] += 1
            continue
        got = _convert_unseen(png, indexes, excluded)
        if got is None:
            continue
        rgb, fp = got
        kept.append((rel, caption, _jpeg(rgb), fp, is_reserved(rel)))
    heldout = PixelIndex()
    for rel, _, _, fp, reserved in kept:
        if reserved:
            heldout.add_fingerprint(rel, fp)
    rows = []
    for rel, caption, jpg, fp, reserved in kept:
        if not reserved and heldout.find(fp=fp) is not None:
            excluded["training drawing with the pixels of a held-out one"] += 1
            continue
        name = f"{len(rows):05d}.jpg"
        atomic_write_bytes(out / name, jpg)
        row = {"image": name, "caption": caption, "split": "heldout" if reserved else "train", "source": rel}
        top = rel.split("/", 1)[0]
        if reserved and top in CATEGORIES:
            row["category"] = top  # for choosing prompts on held-out pairs; never part of a caption
        rows.append(row)
    if not rows:
        raise UserError(f"no drawing with a caption under {png_root}")
    record = {"train": sum(r["split"] == "train" for r in rows), "heldout": sum(r["split"] == "heldout" for r in rows),
              "heldout_rule": "sha256 hex digest of the package-relative path starts with "
                              + " or ".join(RESERVED_PREFIXES),
              "excluded": dict(sorted(excluded.items())), "matched_against": matched_against,
              "not_found": missing}
    _copy_copyright(root, IMAGE_PACKAGES[0], out)
    atomic_write_text(out / CAPTIONS_MANIFEST, "".join(json.dumps(r) + "\n" for r in rows))
    atomic_write_json(out / EXCLUSIONS, record)
    return record


# -------------------------------------------------------------------------------------------- stamps
STAMP_PACKAGES = ("tuxpaint-stamps-default",)
STAMPS_ROOT = "usr/share/tuxpaint/stamps"
STAMPS = "stamps"  # DIR/stamps: the extra caption source


def caption_from_stamp(text: str) -> str:
    """A Tux Paint stamp's description file -> its English caption: the first line, without the closing full
    stop, the first letter lower case unless the second is upper case too ("A frog." -> "a frog")."""
    line = next((x.strip() for x in text.splitlines() if x.strip()), "")
    line = " ".join(line.rstrip(".").split())
    if len(line) > 1 and not line[1].isupper():
        line = line[0].lower() + line[1:]
    return line


def reserved_index(root: Path) -> tuple["PixelIndex", int]:
    """Unpacked openclipart-png under root -> (a PixelIndex of every reserved drawing (is_reserved) that converts,
    how many reserved files did not convert)."""
    from modalities.image_match import PixelIndex, fingerprint

    png_root = root / PNG_ROOT
    if not png_root.is_dir():
        raise UserError(f"{PNG_ROOT} not found in the unpacked {IMAGE_PACKAGES[0]} package")
    index, failed = PixelIndex(), 0
    for png in sorted(png_root.rglob("*.png")):
        rel = png.relative_to(png_root).as_posix()
        if not png.is_file() or not is_reserved(rel):
            continue
        try:
            index.add_fingerprint(rel, fingerprint(_flatten(png.read_bytes())))
        except Exception:  # damaged or too large: the caption source has no pair of it either
            failed += 1
    return index, failed


def _convert_unseen(png: Path, indexes: list, excluded) -> tuple | None:
    """(the drawing flattened onto white, its pixel fingerprint), or None with the reason counted in `excluded`:
    it does not convert (damaged, or too large to convert quickly) or has the pixels of an image in one of
    `indexes` ((label, PixelIndex) pairs)."""
    from modalities.image_match import fingerprint

    try:
        rgb = _flatten(png.read_bytes())
    except Exception:
        excluded["does not convert"] += 1
        return None
    fp = fingerprint(rgb)
    hit = next((label for label, index in indexes if index.find(fp=fp) is not None), None)
    if hit:
        excluded[f"same pixels as {hit}"] += 1
        return None
    return rgb, fp


def write_stamps(root: Path, out: Path, indexes: list) -> dict:
    """Unpacked tuxpaint-stamps-default under root -> out/<nnnnn>.jpg + out/captions.jsonl + out/exclusions.json:
    every PNG stamp with an English description (its .txt beside it), captioned by its first line
    (caption_from_stamp), JPEG on white at most MAX_SIDE px as the caption source's drawings are; split `train`
    (a source of extra training pairs: the held-out pairs stay the openclipart caption source's).

    indexes: [(label, PixelIndex)] of images no teacher may train on (evaluation drawings, the demo's drawings,
    openclipart's reserved drawings); a stamp with the pixels of one of them is left out under that label.
    Returns the exclusions.json record."""
    from collections import Counter

    stamps = root / STAMPS_ROOT
    if not stamps.is_dir():
        raise UserError(f"{STAMPS_ROOT} not found in the unpacked {STAMP_PACKAGES[0]} package")
    excluded: Counter = Counter()
    rows = []
    for png in sorted(stamps.rglob("*.png")):
        if not png.is_file():
            continue
        txt = png.with_suffix(".txt")
        caption = caption_from_stamp(txt.read_text(encoding="utf-8", errors="replace")) if txt.is_file() else ""
        if not caption:
            excluded["no English description (mirrored copies of another stamp)"] += 1
            continue
        got = _convert_unseen(png, indexes, excluded)
        if got is None:
            continue
        rgb, fp = got
        name = f"{len(rows):05d}.jpg"
        atomic_write_bytes(out / name, _jpeg(rgb))
        rows.append({"image": name, "caption": caption, "split": "train",
                     "source": png.relative_to(stamps).as_posix()})
    if not rows:
        raise UserError(f"no stamp with an English description under {stamps}")
    record = {"train": len(rows), "heldout": 0, "excluded": dict(sorted(excluded.items())),
              "matched_against": {label: len(index) for label, index in indexes}}
    _copy_copyright(root, STAMP_PACKAGES[0], out)
    atomic_write_text(out / CAPTIONS_MANIFEST, "".join(json.dumps(r) + "\n" for r in rows))
    atomic_write_json(out / EXCLUSIONS, record)
    return record


def _copy_copyright(root: Path, package: str, out: Path) -> None:
    src = root / "usr/share/doc" / package / "copyright"
    if src.is_file():
        atomic_write_bytes(out / "COPYRIGHT", src.read_bytes())


# ---------------------------------------------------------------------------------------------- entry
def _stamps_from(root: Path, demo: Path, exclude_images, debs: list[Path]) -> dict:
    """demo/stamps from the unpacked tuxpaint-stamps-default and openclipart-png under root, leaving out every stamp
    with the pixels of an evaluation image (exclude_images), of a demo drawing, or of a reserved openclipart
    drawing; its marker written last. Returns the marker's summary."""
    from modalities.image_match import PixelIndex

    t0 = time.monotonic()
    indexes, missing = [], []
    for label, folder in [(f"evaluation images in {d}", Path(d)) for d in exclude_images] + \
            [("the demo's drawings", demo / "images")]:
        if not folder.is_dir():
            missing.append(str(folder))
            continue
        index = PixelIndex()
        index.add_folder(folder)
        indexes.append((label, index))
    reserved, unconverted = reserved_index(root)
    indexes.append((f"{IMAGE_PACKAGES[0]}'s reserved drawings", reserved))
    record = write_stamps(root, demo / STAMPS, indexes)
    summary = {**record, "reserved_not_converted": unconverted, "not_found": missing,
               "packages": [d.name for d in debs], "seconds": round(time.monotonic() - t0, 1)}
    atomic_write_json(demo / STAMPS / MARKER, summary)
    return summary


def _stamps_line(demo: Path, summary: dict) -> str:
    return (f"  {demo / STAMPS}: {summary['train']} training stamp-caption pairs + captions.jsonl (Tux Paint's "
            "English descriptions); left out: " + "; ".join(f"{n} {why}" for why, n in summary["excluded"].items())
            + "".join(f"\n  warning: no evaluation images at {d}, so none were matched there"
                      for d in summary["not_found"]))


def prepare_stamps(demo: Path, exclude_images: list[Path] | tuple = (SHARED_DRAWINGS,)) -> dict:
    """demo/stamps (the extra caption source) beside complete demo data, fetching its packages; idempotent (its
    marker). Returns the marker's summary."""
    marker = Path(demo) / STAMPS / MARKER
    if marker.is_file():
        return json.loads(marker.read_text())
    with tempfile.TemporaryDirectory(prefix="groundgan-stamps-") as tmp:
        tmp = Path(tmp)
        debs = fetch_packages(STAMP_PACKAGES + IMAGE_PACKAGES, tmp)
        root = tmp / "root"
        root.mkdir()
        for deb in debs:
            extract_package(deb, root)
        summary = _stamps_from(root, Path(demo), exclude_images, debs)
    print(_stamps_line(Path(demo), summary))
    return summary


def prepare_demo(out: Path, images_per_category: int = 50, exclude_images: list[Path] | tuple = (SHARED_DRAWINGS,),
                 stamps: bool = False) -> dict:
    """Fetch, unpack and lay out the demo data under out (see the module docstring); the caption source leaves
    out every image in exclude_images (folders of evaluation images) and the demo's own drawings; with stamps,
    also out/stamps (Tux Paint's stamps: extra training pairs). Idempotent: a complete folder (its marker present)
    is left as it is (stamps are added to one without them). Returns the summary that the marker holds."""
    out = Path(out)
    marker = out / MARKER
    if marker.is_file():
        summary = json.loads(marker.read_text())
        print(f"demo data already complete in {out} ({summary['speech']} speech clips, {summary['images']} images); "
              f"delete {marker} to rebuild it")
        if "captions" not in summary:
            print(f"  it predates the caption source ({out / 'captions'}) and the reserved drawings: delete {marker} "
                  "to rebuild it (its drawings change)")
        elif stamps and not (out / STAMPS / MARKER).is_file():
            print(f"demo data: adding {out / STAMPS}")
            prepare_stamps(out, exclude_images)
        return summary
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="groundgan-demo-") as tmp:
        tmp = Path(tmp)
        debs = fetch_packages(SPEECH_PACKAGES + IMAGE_PACKAGES + (STAMP_PACKAGES if stamps else ()), tmp)
        root = tmp / "root"
        root.mkdir()
        for deb in debs:
            extract_package(deb, root)
        n_speech = write_speech(root, out / "speech")
        per_category = write_images(root, out / "images", images_per_category)
        captions = write_captions(root, out / "captions", out / "images", [Path(d) for d in exclude_images])
        stamped = _stamps_from(root, out, exclude_images, [d for d in debs if d.name.startswith(
            STAMP_PACKAGES + IMAGE_PACKAGES)]) if stamps else None
    summary = {"speech": n_speech, "images": sum(per_category.values()), "images_per_category": per_category,
               "captions": {k: captions[k] for k in ("train", "heldout", "excluded")},
               "packages": [d.name for d in debs], "seconds": round(time.monotonic() - t0, 1)}
    atomic_write_json(marker, summary)
    print(f"demo data in {out} ({summary['seconds']} s):\n"
          f"  {out / 'speech'}: {n_speech} clips + transcripts.jsonl (CC-BY-SA-3.0, Allison Smith / Digium)\n"
          f"  {out / 'images'}: {summary['images']} drawings + labels.jsonl (public domain, openclipart): "
          + ", ".join(f"{c} {k}" for c, k in per_category.items()) + "\n"
          f"  {out / 'captions'}: {captions['train']} training and {captions['heldout']} held-out drawing-caption pairs "
          f"+ captions.jsonl (captions from file names); left out: "
          + "; ".join(f"{n} {why}" for why, n in captions["excluded"].items())
          + "".join(f"\n  warning: no evaluation images at {d}, so none were matched there" for d in captions["not_found"])
          + ("\n" + _stamps_line(out, stamped) if stamped else ""))
    return summary
