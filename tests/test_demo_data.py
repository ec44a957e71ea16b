"""`groundgan data demo`: parsing and layout on small fake unpacked packages (nothing is downloaded)."""

import gzip
import io
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import pipeline.demo_data as dd
from pipeline.errors import UserError

TRANSCRIPTS = """; Core Asterisk Sounds in English

activated: Activated.
spy-iax2: IAX (note: does not say "2")
digits/1: one
ascending-2tone: [ascending tones]
no-such-file: This line has no WAV.
  broken line without a colon
"""


def png(size, mode="RGBA", colour=(200, 0, 0, 255)) -> bytes:
    im = Image.new(mode, size, (0, 0, 0, 0) if mode == "RGBA" else colour)
    if mode == "RGBA":
        im.paste(colour, (0, 0, size[0] // 2, size[1]))
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


def fake_tree(root: Path, drawings_per_folder: int = 3) -> None:
    """What `dpkg-deb -x` leaves for the three packages, in miniature."""
    sounds = root / "usr/share/asterisk/sounds/en_US_f_Allison"
    (sounds / "digits").mkdir(parents=True)
    for key in ("activated", "spy-iax2", "digits/1", "ascending-2tone", "not-in-transcripts"):
        (sounds / f"{key}.wav").write_bytes(b"RIFF" + key.encode())
    doc = root / "usr/share/doc/asterisk-core-sounds-en"
    doc.mkdir(parents=True)
    (doc / "core-sounds-en.txt.gz").write_bytes(gzip.compress(TRANSCRIPTS.encode()))
    (root / "usr/share/doc/asterisk-core-sounds-en-wav").mkdir(parents=True)
    (root / "usr/share/doc/asterisk-core-sounds-en-wav/copyright").write_text("CC-BY-SA-3.0")
    art = root / "usr/share/openclipart/png"
    for folder in ("animals/birds", "animals/mammals/dogs", "food", "science"):
        (art / folder).mkdir(parents=True)
        for i in range(drawings_per_folder):
            (art / folder / f"happy_dog_{folder.split('/')[-1]}_{i:02d}.png").write_bytes(png((600, 300)))
    (art / "food" / "broken_bread.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (art / "food" / "small_pear.png").write_bytes(png((40, 20), "RGB", (0, 128, 0)))
    stamps = root / "usr/share/tuxpaint/stamps/animals"
    stamps.mkdir(parents=True)
    (stamps / "owl.png").write_bytes(png((90, 60), "RGB", (40, 40, 200)))
    (stamps / "owl.txt").write_text("An owl.\nfr.utf8=Un hibou.\n")
    (stamps / "dog.png").write_bytes(png((600, 300)))  # the pixels of the demo's drawings
    (stamps / "dog.txt").write_text("A dog.")
    (root / "usr/share/doc/tuxpaint-stamps-default").mkdir(parents=True)
    (root / "usr/share/doc/tuxpaint-stamps-default/copyright").write_text("GPL-2")


def test_parse_transcripts():
    t = dd.parse_transcripts(TRANSCRIPTS)
    assert t["activated"] == "Activated."
    assert t["spy-iax2"] == 'IAX (note: does not say "2")'  # only the first colon splits
    assert t["digits/1"] == "one"
    assert t["ascending-2tone"] == "[ascending tones]"
    assert "broken line without a colon" not in " ".join(t) and len(t) == 5


def test_name_words():
    assert dd.name_words("flying_wasp_gerald_g._02") == ["flying", "wasp", "gerald"]
    assert dd.name_words("acquila_architetto_franc_01") == ["acquila", "architetto", "franc"]
    assert dd.name_words("01_02") == []


def test_spread_draws_from_the_whole_list_then_the_rest():
    items = list(range(10))
    s = dd._spread(items, 3)
    assert s[:3] == [0, 3, 7] and sorted(s) == items
    assert dd._spread(items[:2], 5) == [0, 1]


def test_speech_layout(tmp_path):
    fake_tree(tmp_path / "root")
    n = dd.write_speech(tmp_path / "root", tmp_path / "out")
    rows = [json.loads(x) for x in (tmp_path / "out/transcripts.jsonl").read_text().splitlines()]
    assert n == 4 == len(rows)  # no-such-file has no WAV; not-in-transcripts has no text
    assert {"audio": "digits__1.wav", "text": "one"} in rows
    assert (tmp_path / "out/digits__1.wav").read_bytes() == b"RIFFdigits/1"
    assert all((tmp_path / "out" / r["audio"]).is_file() for r in rows)
    assert (tmp_path / "out/COPYRIGHT").read_text() == "CC-BY-SA-3.0"


def test_image_layout(tmp_path):
    fake_tree(tmp_path / "root")
    counts = dd.write_images(tmp_path / "root", tmp_path / "out", per_category=4)
    assert counts["animals"] == 4 and counts["food"] == 4 and counts["plants"] == 0
    assert "science" not in counts  # not one of the ten categories
    rows = [json.loads(x) for x in (tmp_path / "out/labels.jsonl").read_text().splitlines()]
    assert [r["image"] for r in rows if r["category"] == "animals"] == [f"animals_{i:04d}.jpg" for i in range(4)]
    # the spread reaches both animal folders
    assert {r["path"] for r in rows if r["category"] == "animals"} == {"animals/birds", "animals/mammals/dogs"}
    # the broken drawing is skipped and replaced: food has 3 + 1 good files, all 4 used
    food = [r for r in rows if r["category"] == "food"]
    assert len(food) == 4 and all(r["path"] == "food" for r in food)
    assert rows[0]["name_words"][:2] == ["happy", "dog"]
    for r in rows:
        im = Image.open(tmp_path / "out" / r["image"])
        assert im.format == "JPEG" and im.mode == "RGB" and max(im.size) <= 256
    big = Image.open(tmp_path / "out/animals_0000.jpg")
    assert big.size == (256, 128)
    a = np.asarray(big).astype(int)
    assert a[64, 200].min() > 240  # the transparent half is white
    assert a[64, 30, 0] > 180 and a[64, 30, 1] < 60  # the red half stays red
    small = [r for r in food if "pear" in r["name_words"]]
    assert small and Image.open(tmp_path / "out" / small[0]["image"]).size == (40, 20)  # never upscaled


def test_prepare_demo_end_to_end_on_fake_packages(tmp_path, monkeypatch, capsys):
    calls = []

    def fake_fetch(names, workdir):
        calls.append(names)
        return [workdir / f"{n}_1.0_all.deb" for n in names]

    def fake_extract(deb, root):
        if not (root / "usr").exists():
            fake_tree(root)

    monkeypatch.setattr(dd, "fetch_packages", fake_fetch)
    monkeypatch.setattr(dd, "extract_package", fake_extract)
    out = tmp_path / "demo"
    s = dd.prepare_demo(out, images_per_category=2, stamps=True)
    assert s["speech"] == 4 and s["images"] == 4 and s["images_per_category"]["animals"] == 2
    assert (out / dd.MARKER).is_file() and (out / "speech/transcripts.jsonl").is_file()
    assert (out / "images/labels.jsonl").is_file()
    printed = capsys.readouterr().out
    assert "4 clips" in printed and "stamps: 1 training stamp-caption pairs" in printed
    assert calls == [dd.SPEECH_PACKAGES + dd.IMAGE_PACKAGES + dd.STAMP_PACKAGES]
    stamps = [json.loads(x) for x in (out / "stamps/captions.jsonl").read_text().splitlines()]
    assert stamps == [{"image": "00000.jpg", "caption": "an owl", "split": "train", "source": "animals/owl.png"}]
    marker = json.loads((out / "stamps" / dd.MARKER).read_text())
    assert marker["excluded"] == {"same pixels as the demo's drawings": 1}
    assert (out / "stamps/COPYRIGHT").read_text() == "GPL-2"
    # a second run finds the markers and does nothing
    assert dd.prepare_demo(out, images_per_category=2, stamps=True) == s
    assert len(calls) == 1 and "already complete" in capsys.readouterr().out
    # demo data made without stamps gets them added, from their packages alone, and keeps its marker
    shutil.rmtree(out / "stamps")
    assert dd.prepare_demo(out, images_per_category=2, stamps=True) == s
    assert calls[1] == dd.STAMP_PACKAGES + dd.IMAGE_PACKAGES and (out / "stamps" / dd.MARKER).is_file()
    assert "adding" in capsys.readouterr().out
    assert dd.prepare_demo(tmp_path / "plain", images_per_category=2, stamps=False)["images"] == 4
    assert calls[2] == dd.SPEECH_PACKAGES + dd.IMAGE_PACKAGES and not (tmp_path / "plain/stamps").exists()
    # the folders load as ingest folder sources
    from pipeline.config import load_config

    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps({"stages": ["ingest"], "ingest": {"sources": [
        {"dir": str(out / "images"), "manifest": "labels.jsonl", "modality": "image"}]},
        "plugins": ["modalities.image"]}))
    assert load_config([str(cfg)]).root.ingest.sources[0].type == "folder"


def test_missing_tools_explain_the_own_data_route(monkeypatch, tmp_path):
    monkeypatch.setattr(dd.shutil, "which", lambda tool: None)
    with pytest.raises(UserError) as e:
        dd.fetch_packages(("openclipart-png",), tmp_path)
    assert "apt-get" in str(e.value) and "ingest.sources" in str(e.value) and "manifest" in str(e.value)


def test_failed_download_updates_once_then_explains(monkeypatch, tmp_path):
    seen = []

    def fake_run(cmd, cwd=None, capture_output=None, text=None):
        assert isinstance(cmd, list)  # argument lists, never a shell string
        seen.append(cmd[:2])
        return subprocess.CompletedProcess(cmd, 100, "", "E: Unable to locate package openclipart-png")

    monkeypatch.setattr(dd.shutil, "which", lambda tool: f"/usr/bin/{tool}")
    monkeypatch.setattr(dd.subprocess, "run", fake_run)
    with pytest.raises(UserError) as e:
        dd.fetch_packages(("openclipart-png",), tmp_path)
    assert seen == [["apt-get", "download"], ["apt-get", "update"], ["apt-get", "download"]]
    assert "Unable to locate package" in str(e.value) and "ingest.sources" in str(e.value)


def test_download_that_succeeds_after_update(monkeypatch, tmp_path):
    tries = []

    def fake_run(cmd, cwd=None, capture_output=None, text=None):
        tries.append(cmd[1])
        if cmd[1] == "download" and tries.count("download") == 2:
            (Path(cwd) / "openclipart-png_1%3a0.18_all.deb").write_bytes(b"!<arch>")
            return subprocess.CompletedProcess(cmd, 0, "", "")
        return subprocess.CompletedProcess(cmd, 100 if cmd[1] == "download" else 0, "", "E: no lists")

    monkeypatch.setattr(dd.shutil, "which", lambda tool: f"/usr/bin/{tool}")
    monkeypatch.setattr(dd.subprocess, "run", fake_run)
    debs = dd.fetch_packages(("openclipart-png",), tmp_path)
    assert [d.name for d in debs] == ["openclipart-png_1%3a0.18_all.deb"] and tries == ["download", "update", "download"]
