"""`groundgan data demo`'s reserved drawings and its caption source, on a small fake unpacked openclipart-png (nothing
is downloaded): captions from file names only, held-out and training splits, every exclusion with its reason, and
the pixel matching behind them."""

import hashlib
import io
import json
import os
from pathlib import Path

import numpy as np
from PIL import Image

import pipeline.demo_data as dd
from modalities.image_match import PixelIndex


def drawing(seed: int, size=(120, 80)) -> Image.Image:
    """A distinct RGBA drawing: a few coloured blocks, drawn from seed, on transparency."""
    rng = np.random.default_rng(seed)
    a = np.zeros((size[1], size[0], 4), np.uint8)
    for _ in range(6):
        x0, y0 = int(rng.integers(0, size[0] - 20)), int(rng.integers(0, size[1] - 20))
        a[y0: y0 + int(rng.integers(10, 40)), x0: x0 + int(rng.integers(10, 40))] = (*rng.integers(0, 255, 3), 255)
    return Image.fromarray(a, "RGBA")


def png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


def flat_jpeg(im: Image.Image, path: Path) -> None:
    """What an evaluation set holds: the drawing on white as JPEG, longest side at most 256 px."""
    rgb = Image.alpha_composite(Image.new("RGBA", im.size, (255, 255, 255, 255)), im).convert("RGB")
    rgb.thumbnail((256, 256), Image.Resampling.LANCZOS)
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb.save(path, "JPEG", quality=90)


def test_reserved_drawings_are_those_whose_path_hashes_to_0_or_1():
    # digests worked out by hand: food/cake_01.png 0a3a..., food/plum_01.png 127c..., food/apple_01.png 3502...
    assert hashlib.sha256(b"food/cake_01.png").hexdigest().startswith("0a3a")
    assert dd.is_reserved("food/cake_01.png") and dd.is_reserved("food/plum_01.png")
    assert not dd.is_reserved("food/apple_01.png") and not dd.is_reserved("animals/birds/dove_symbol_01.png")


def test_the_demo_never_picks_a_reserved_drawing(tmp_path):
    art = tmp_path / "root" / dd.PNG_ROOT / "food"
    art.mkdir(parents=True)
    for i, name in enumerate(("apple", "cake", "plum", "pear", "bread")):
        (art / f"{name}_01.png").write_bytes(png(drawing(i)))
    counts = dd.write_images(tmp_path / "root", tmp_path / "out", per_category=10)
    rows = [json.loads(x) for x in (tmp_path / "out/labels.jsonl").read_text().splitlines()]
    assert counts["food"] == 3 and sorted(r["name_words"][0] for r in rows) == ["apple", "bread", "pear"]
    # the spread over all five is apple, cake, then bread, pear, plum as replacements: the reserved cake is
    # replaced and apple stays (spreading the three unreserved ones would pick apple and pear)
    dd.write_images(tmp_path / "root", tmp_path / "two", per_category=2)
    rows = [json.loads(x) for x in (tmp_path / "two/labels.jsonl").read_text().splitlines()]
    assert [r["name_words"][0] for r in rows] == ["apple", "bread"]


def test_caption_from_name():
    assert dd.caption_from_name("DoveSymbol_by_joe_01") == "dove symbol joe"
    assert dd.caption_from_name("flying_wasp_gerald_g._02") == "flying wasp gerald"
    assert dd.caption_from_name("01_02") == ""


def test_caption_source_splits_and_exclusions(tmp_path):
    root = tmp_path / "root"
    art = root / dd.PNG_ROOT
    files = {  # package path -> drawing seed
        "animals/birds/dove_symbol_01.png": 1,   # train
        "food/cake_01.png": 2,                   # reserved: held out, with its category
        "shapes/spiral_01.png": 3,               # reserved, folder not one of the ten: held out, no category
        "food/cake_copy_03.png": 2,              # a training copy of a held-out drawing
        "tools/hammer_01.png": 4,                # one of the demo's drawings
        "office/stapler_01.png": 5,              # in the evaluation set (as a 256 px JPEG of a 600 px drawing)
        "computer/01_02.png": 6,                 # no words in its name
        "people/runner_01.png": 7,               # train
    }
    for rel, seed in files.items():
        (art / rel).parent.mkdir(parents=True, exist_ok=True)
        (art / rel).write_bytes(png(drawing(seed, (600, 400) if seed == 5 else (120, 80))))
    (art / "food/broken_bread.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (art / "signs_and_symbols").mkdir()
    os.symlink("../animals/birds/dove_symbol_01.png", art / "signs_and_symbols/dove_link.png")
    demo = tmp_path / "demo_images"
    flat_jpeg(drawing(4), demo / "tools_0000.jpg")
    evaluation = tmp_path / "shared"
    flat_jpeg(drawing(5, (600, 400)), evaluation / "office_0003.jpg")

    rec = dd.write_captions(root, tmp_path / "captions", demo, [evaluation, tmp_path / "absent"])
    rows = [json.loads(x) for x in (tmp_path / "captions" / dd.CAPTIONS_MANIFEST).read_text().splitlines()]
    by_source = {r["source"]: r for r in rows}
    assert set(by_source) == {"animals/birds/dove_symbol_01.png", "food/cake_01.png", "shapes/spiral_01.png",
                              "people/runner_01.png"}
    assert by_source["food/cake_01.png"]["split"] == "heldout" and by_source["food/cake_01.png"]["category"] == "food"
    assert by_source["shapes/spiral_01.png"]["split"] == "heldout" and "category" not in by_source["shapes/spiral_01.png"]
    train = [r for r in rows if r["split"] == "train"]
    assert {r["caption"] for r in train} == {"dove symbol", "runner"} and all("category" not in r for r in train)
    for r in rows:  # captions come from file names only: no folder word ever enters one
        folders = set(r["source"].split("/")[:-1])
        assert r["caption"] == dd.caption_from_name(Path(r["source"]).stem) and not folders & set(r["caption"].split())
        assert Image.open(tmp_path / "captions" / r["image"]).format == "JPEG"
    assert rec["excluded"] == {
        "symlink to another drawing of the package": 1,
        "file name has no words": 1,
        "does not convert": 1,
        "same pixels as the demo's drawings": 1,
        f"same pixels as evaluation images in {evaluation}": 1,
        "training drawing with the pixels of a held-out one": 1,
    }
    assert rec["train"] == 2 and rec["heldout"] == 2 and rec["not_found"] == [str(tmp_path / "absent")]
    assert json.loads((tmp_path / "captions" / dd.EXCLUSIONS).read_text()) == rec


def test_pixel_index_matches_copies_not_neighbours():
    index = PixelIndex()
    for seed in range(20):
        index.add(f"d{seed}", drawing(seed, (900, 600)))  # large drawings, shrunk to 256 px as the demo's are
    copy = Image.alpha_composite(Image.new("RGBA", (900, 600), (255, 255, 255, 255)), drawing(7, (900, 600)))
    copy = copy.convert("RGB").resize((256, 171), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    copy.save(buf, "JPEG", quality=80)
    assert index.find(Image.open(buf)) == "d7"
    assert index.find(drawing(99, (900, 600))) is None
    assert index.find(drawing(7, (900, 600)).resize((900, 900))) is None  # another aspect ratio is another picture


def test_caption_from_stamp():
    assert dd.caption_from_stamp("A frog.\nfr.utf8=Une grenouille.\n") == "a frog"
    assert dd.caption_from_stamp("\n  An albino peahen (a female peafowl, or peacock).  \n") == \
        "an albino peahen (a female peafowl, or peacock)"
    assert dd.caption_from_stamp("UFO landing.") == "UFO landing"  # an acronym keeps its capitals
    assert dd.caption_from_stamp("") == ""


def test_stamps_leave_out_evaluation_demo_and_reserved_pixels(tmp_path):
    """Tux Paint's stamps as extra training pairs: captioned by their English description; every stamp with the
    pixels of an evaluation image, a demo drawing or a reserved openclipart drawing (matched from the package's own
    reserved files, whatever the caption source kept of them) is left out under that reason."""
    root = tmp_path / "root"
    art = root / dd.PNG_ROOT / "food"
    art.mkdir(parents=True)
    (art / "cake_01.png").write_bytes(png(drawing(2)))   # reserved
    (art / "apple_01.png").write_bytes(png(drawing(8)))  # not reserved: a stamp may share its pixels
    stamps = root / dd.STAMPS_ROOT
    for rel, seed, text in (("animals/birds/crow", 1, "A crow.\nfr.utf8=Un corbeau.\n"),
                            ("vehicles/ufo", 3, "UFO landing.\n"),
                            ("food/apple", 8, "An apple."),
                            ("food/cake", 2, "A cake."),                # a reserved openclipart drawing
                            ("hobbies/hammer", 4, "A hammer."),         # one of the demo's drawings
                            ("household/stapler", 5, "A stapler."),     # in the evaluation set
                            ("animals/birds/crow_mirror", 9, None)):    # no description: a mirrored copy
        (stamps / rel).parent.mkdir(parents=True, exist_ok=True)
        (stamps / f"{rel}.png").write_bytes(png(drawing(seed, (600, 400) if seed == 5 else (120, 80))))
        if text is not None:
            (stamps / f"{rel}.txt").write_text(text)
    (stamps / "food/broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (stamps / "food/broken.txt").write_text("Bread.")
    demo, evaluation = PixelIndex(), PixelIndex()
    flat_jpeg(drawing(4), tmp_path / "demo" / "tools_0000.jpg")
    flat_jpeg(drawing(5, (600, 400)), tmp_path / "shared" / "office_0003.jpg")
    demo.add_folder(tmp_path / "demo")
    evaluation.add_folder(tmp_path / "shared")
    reserved, unconverted = dd.reserved_index(root)
    assert reserved.names == ["food/cake_01.png"] and unconverted == 0
    rec = dd.write_stamps(root, tmp_path / "stamps", [("evaluation images", evaluation), ("the demo's drawings", demo),
                                                      ("reserved drawings", reserved)])
    rows = [json.loads(x) for x in (tmp_path / "stamps" / dd.CAPTIONS_MANIFEST).read_text().splitlines()]
    assert [(r["source"], r["caption"], r["split"]) for r in rows] == [
        ("animals/birds/crow.png", "a crow", "train"), ("food/apple.png", "an apple", "train"),
        ("vehicles/ufo.png", "UFO landing", "train")]
    assert rec["excluded"] == {"no English description (mirrored copies of another stamp)": 1, "does not convert": 1,
                               "same pixels as reserved drawings": 1, "same pixels as the demo's drawings": 1,
                               "same pixels as evaluation images": 1}
    assert rec["train"] == 3 and rec["heldout"] == 0
    assert json.loads((tmp_path / "stamps" / dd.EXCLUSIONS).read_text()) == rec
    for r in rows:
        im = Image.open(tmp_path / "stamps" / r["image"])
        assert im.format == "JPEG" and im.mode == "RGB" and max(im.size) <= dd.MAX_SIDE


def test_taxonomy_descriptions_read_the_training_folders_only(tmp_path):
    """The clip teacher's class descriptions from a caption source's folders: training pairs only (a folder seen
    only among held-out pairs never appears), parts after the class joined by spaces, underscores as spaces, first
    seen first, each once; classes outside the vocabulary and files directly in a class folder give nothing."""
    from modalities.image import taxonomy_descriptions

    rows = [{"image": "0.jpg", "caption": "a", "split": "train", "source": "recreation/games/cards/king_01.png"},
            {"image": "1.jpg", "caption": "b", "split": "train", "source": "recreation/music/CD_Player/cd.png"},
            {"image": "2.jpg", "caption": "c", "split": "train", "source": "recreation/games/cards/queen.png"},
            {"image": "3.jpg", "caption": "d", "split": "heldout", "source": "recreation/sports/ball.png",
             "category": "recreation"},
            {"image": "4.jpg", "caption": "e", "source": "animals/big_cats/lion.png"},  # no split: training
            {"image": "5.jpg", "caption": "f", "split": "train", "source": "animals/cat.png"},
            {"image": "6.jpg", "caption": "g", "split": "train", "source": "shapes/stars/star.png"},
            {"image": "7.jpg", "caption": "h", "split": "train"}]
    _write_source(tmp_path, rows)
    got = taxonomy_descriptions(tmp_path, ["animals", "recreation", "food"])
    assert got == {"animals": ["big cats"], "recreation": ["games cards", "music CD Player"]}
    assert list(got) == ["animals", "recreation"]  # the vocabulary's order


def _write_source(folder: Path, rows: list[dict]) -> None:
    """A caption source: its manifest and a file for every image it names."""
    (folder / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for r in rows:
        (folder / r["image"]).write_bytes(b"")


def test_taxonomy_descriptions_hold_out_what_the_fit_holds_out(tmp_path):
    """A manifest that marks no held-out pair: the fit holds pairs out by a hash of their names (read_pairs), and
    the descriptions leave out those pairs' folders too."""
    from modalities.clip_pairs import read_pairs
    from modalities.image import taxonomy_descriptions

    rows = [{"image": f"{i:03d}.jpg", "caption": "x", "source": f"animals/kind_{i:03d}/a.png"} for i in range(60)]
    _write_source(tmp_path, rows)
    held = {p.key for p in read_pairs(tmp_path) if p.split == "heldout"}
    assert held and len(held) < len(rows)
    got = taxonomy_descriptions(tmp_path, ["animals"])
    assert got == {"animals": [f"kind {r['image'][:3]}" for r in rows if r["image"] not in held]}


def test_the_demo_configs_descriptions_are_its_caption_sources_training_folders():
    """configs/demo.yaml's class descriptions are what taxonomy_descriptions reads from the demo's caption source
    (made by `groundgan data demo`; skipped where it has not been made), so the config states no hand-picked words."""
    import pytest

    from modalities.image import taxonomy_descriptions
    from pipeline.config import load_config

    root = Path(__file__).resolve().parent.parent
    captions = root / "data" / "demo" / "captions"
    if not (captions / "captions.jsonl").is_file():
        pytest.skip(f"no demo caption source at {captions} (`make demo` makes it)")
    teacher = load_config([str(root / "configs" / "demo.yaml")]).root.modalities["image"].teacher
    want = taxonomy_descriptions(captions, list(teacher.vocabulary))
    assert {c: list(v) for c, v in teacher.descriptions.items()} == want


def test_teacher_describe_prints_the_config_block(tmp_path):
    """`groundgan teacher describe` prints the descriptions as the YAML that sets them (it loads back to exactly
    what taxonomy_descriptions reads), names the classes it found nothing for, and is a one-line error where no
    training pair has a folder to read."""
    import yaml

    from conftest import cli

    rows = [{"image": "0.jpg", "caption": "a", "split": "train", "source": "recreation/games/chess/knight.png"},
            {"image": "1.jpg", "caption": "b", "split": "train", "source": "food/fruit/apple.png"},
            {"image": "2.jpg", "caption": "c", "split": "heldout", "source": "food/desserts/cake.png"}]
    _write_source(tmp_path, rows)
    r = cli("teacher", "describe", "--pairs", tmp_path, "--vocabulary", "food,recreation,tools", check=True)
    assert yaml.safe_load(r.stdout) == {"descriptions": {"food": ["fruit"], "recreation": ["games chess"]}}
    assert "# tools: none" in r.stdout and "2 texts" in r.stdout
    r = cli("teacher", "describe", "--pairs", tmp_path, "--vocabulary", "tools")
    assert r.returncode != 0 and "nothing to describe" in r.stderr and "Traceback" not in r.stderr
    r = cli("teacher", "fit-clip", "--pairs", tmp_path)
    assert r.returncode != 0 and "--out is required" in r.stderr
