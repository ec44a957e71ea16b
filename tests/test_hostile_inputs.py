"""Issue #25's hostile inputs, each generated here and small: long names, nested JSON, links out of a folder,
path aliases, duplicate keys, oversized tar members, non-string references, shards that cannot be read, and
empty sources. Unit tests on pipeline.shards first, then one ingest -> pseudo_label run (configs/tiny.yaml's
random teachers) over a folder and a shard holding all of them."""

import gzip
import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import yaml

from conftest import ROOT, cli
from pipeline.shards import iter_shard, reject_record, write_shard
from pipeline.sharded import rejected_count

TINY = ROOT / "configs" / "tiny.yaml"


def _wav(seconds=0.3, sr=16000, freq=300.0) -> bytes:
    buf = io.BytesIO()
    t = np.arange(int(sr * seconds)) / sr
    sf.write(buf, (0.2 * np.sin(2 * np.pi * freq * t)).astype(np.float32), sr, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def _tar(path: Path, members: list[tuple[str, bytes]], fmt=tarfile.PAX_FORMAT, mode="w") -> None:
    with tarfile.open(path, mode, format=fmt) as t:
        for name, data in members:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            t.addfile(ti, io.BytesIO(data))


def _read(url, **kw):
    errors = []
    got = list(iter_shard(str(url), on_error=lambda k, r, lost=1: errors.append(reject_record(k, r, lost)), **kw))
    return got, errors


# ------------------------------------------------------------------------------------------ shards
def _ustar_reference(path: Path, samples) -> None:
    """write_shard as it was before PAX headers: USTAR only (a name over its limit raised ValueError)."""
    with open(path, "wb") as raw, tarfile.open(fileobj=raw, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for s in samples:
            for ext, data in s.items():
                if ext == "__key__":
                    continue
                ti = tarfile.TarInfo(f"{s['__key__']}.{ext}")
                ti.size, ti.mtime, ti.mode, ti.uid, ti.gid, ti.uname, ti.gname = len(data), 0, 0o444, 0, 0, "", ""
                tar.addfile(ti, io.BytesIO(data))


def test_shards_that_worked_before_are_byte_identical(tmp_path):
    samples = [{"__key__": f"src-{'k' * 60}{i}", "wav": _wav(0.05), "json": b'{"a": 1}', "topk_logprobs.npy": b"x" * 7}
               for i in range(3)] + [{"__key__": "dir/" + "d" * 120 + "/short", "json": b"{}"}]  # USTAR's prefix split
    write_shard(tmp_path / "new.tar", samples)
    _ustar_reference(tmp_path / "old.tar", samples)
    assert (tmp_path / "new.tar").read_bytes() == (tmp_path / "old.tar").read_bytes()


def test_any_legal_name_length_round_trips(tmp_path):
    long_keys = ["src-" + "a" * 103, "src-" + "b" * 80, "x" * 300, "d/" + "e" * 250]
    samples = [{"__key__": k, "wav": _wav(0.05), "json": b"{}", "topk_logprobs.npy": b"123"} for k in long_keys]
    with pytest.raises(ValueError):  # what crashed ingest and pseudo_label before
        _ustar_reference(tmp_path / "old.tar", samples)
    assert write_shard(tmp_path / "s.tar", samples) == 4
    got, errors = _read(tmp_path / "s.tar")
    assert errors == [] and [k for k, _ in got] == long_keys
    assert all(set(m) == {"wav", "json", "topk_logprobs.npy"} for _, m in got)


def test_duplicate_keys_in_a_shard_are_refused_not_merged(tmp_path):
    _tar(tmp_path / "d.tar", [("a.wav", _wav()), ("a.json", b"{}"), ("b.wav", _wav()), ("a.txt", b"late"),
                              ("c.wav", _wav()), ("c.wav", _wav(0.1)), ("e.wav", _wav())])
    got, errors = _read(tmp_path / "d.tar")
    assert [k for k, _ in got] == ["a", "b", "e"]
    reasons = {e["key"].rsplit(":", 1)[1]: e["reason"] for e in errors}
    assert reasons["a"].startswith("duplicate key 'a'") and reasons["c"].startswith("duplicate member c.wav")
    assert rejected_count(errors) == 2


def test_oversized_member_is_refused_from_its_header_unread(tmp_path):
    big = 64 << 20  # 64 MB of zeros, a few dozen KB gzipped
    with tarfile.open(tmp_path / "bomb.tar.gz", "w:gz", format=tarfile.USTAR_FORMAT) as t:
        for name, size in [("ok.wav", None), ("ok.json", None), ("bomb.wav", big), ("bomb.json", None), ("after.wav", None)]:
            ti = tarfile.TarInfo(name)
            data = _wav() if name.endswith("wav") else b"{}"
            ti.size = size or len(data)
            t.addfile(ti, io.BytesIO(data) if size is None else _Zeros(size))
    assert (tmp_path / "bomb.tar.gz").stat().st_size < 1 << 20
    got, errors = _read(tmp_path / "bomb.tar.gz", max_member_bytes=1 << 20)
    assert [k for k, _ in got] == ["ok", "after"]
    assert len(errors) == 1 and errors[0]["reason"].startswith(f"member bomb.wav declares {big} bytes, more than")
    # the shard's own limit: reading stops, and the samples it leaves are counted from their headers
    got, errors = _read(tmp_path / "bomb.tar.gz", max_member_bytes=big, max_shard_bytes=1 << 20)
    assert [k for k, _ in got] == ["ok"]
    assert rejected_count(errors) == 2, errors  # bomb, and after (refused unread)


class _Zeros(io.RawIOBase):
    def __init__(self, n):
        self.left = n

    def readinto(self, b):
        n = min(len(b), self.left)
        b[:n] = bytes(n)
        self.left -= n
        return n

    def readable(self):
        return True


def test_a_cut_shard_counts_the_samples_it_lost(tmp_path):
    members = [m for i in range(40) for m in ((f"s{i:02d}.wav", _wav(0.05)), (f"s{i:02d}.json", b"{}"))]
    _tar(tmp_path / "s.tar", members, fmt=tarfile.USTAR_FORMAT)
    raw = bytearray((tmp_path / "s.tar").read_bytes())
    at = raw.find(b"s10.wav\x00")
    raw[at + 148: at + 156] = b"9999999\x00"  # a broken header: samples 10..39 cannot be read
    (tmp_path / "s.tar").write_bytes(bytes(raw))
    got, errors = _read(tmp_path / "s.tar")
    assert len(got) == 10 and len(errors) == 1 and errors[0]["lost"] == 30
    assert errors[0]["reason"].endswith("30 sample(s) after it lost") and rejected_count(errors) == 30


# -------------------------------------------------------------------------------- one hostile run
def _cfg(tmp_path: Path, sources, stages=("ingest", "pseudo_label"), **extra) -> Path:
    cfg = yaml.safe_load(TINY.read_text())
    cfg["stages"] = list(stages)
    cfg["ingest"]["sources"] = sources
    cfg["ingest"]["max_reject_fraction"] = 0.95
    cfg["pseudo_label"]["max_reject_fraction"] = 0.95
    for k, v in extra.items():
        cfg[k] = v
    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


@pytest.fixture(scope="module")
def hostile_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hostile")
    outside = tmp / "outside"
    outside.mkdir()
    (outside / "secret.wav").write_bytes(_wav(freq=999))
    (outside / "secret.txt").write_text("text from outside the folder\n")
    # audio folder with a manifest
    man = tmp / "man"
    man.mkdir()
    long_name = "L" * 107 + ".wav"
    mid_name = "M" * 80 + ".wav"
    # every file its own sound: identical bytes would be one sample (kept once, the rest "duplicate of")
    for i, name in enumerate(("g07.wav", long_name, mid_name, "num.wav")):
        (man / name).write_bytes(_wav(freq=440 + 10 * i))
    lines = [{"audio": "g07.wav", "text": "one"}, {"audio": "nope/../g07.wav", "text": "one again"},
             {"audio": long_name}, {"audio": mid_name}, {"audio": "num.wav", "text": 123}]
    (man / "m.jsonl").write_bytes(b"\n".join([json.dumps(x).encode() for x in lines] + [b"[" * 3000]) + b"\n")
    # audio folder without a manifest: links, in and out
    scan = tmp / "scan"
    (scan / "sub").mkdir(parents=True)
    (scan / "real.wav").write_bytes(_wav(freq=480))
    (scan / "sub" / ("N" * 110 + ".wav")).write_bytes(_wav(freq=500))
    os.symlink(outside / "secret.wav", scan / "link_out.wav")
    os.symlink(scan / "real.wav", scan / "alias.wav")
    # text folder without a manifest
    texts = tmp / "texts"
    texts.mkdir()
    (texts / "ok.txt").write_text("a sentence\n")
    os.symlink("/etc/os-release", texts / "x.txt")
    # a shard with duplicate keys, nested json and a name over 100 characters
    _tar(tmp / "ext-000000.tar", [("dirA/same.wav", _wav(freq=410)), ("dirA/same.json", b'{"text": "a"}'),
                                  ("dirB/same.wav", _wav(freq=400)), ("dirB/same.json", b'{"text": "b"}'),
                                  ("deep.wav", _wav(freq=490)), ("deep.json", b"[" * 3000),
                                  ("z" * 300 + ".wav", _wav(freq=600))])
    cfg = _cfg(tmp, [{"dir": str(man), "modality": "audio", "manifest": "m.jsonl", "name": "man"},
                     {"dir": str(scan), "modality": "audio", "name": "scan"},
                     {"type": "text", "dir": str(texts), "name": "texts"},
                     {"type": "shards", "urls": str(tmp / "ext-000000.tar"), "modality": "audio", "name": "ext"}])
    r = cli("run", cfg, "--run-dir", tmp / "run")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stdout + r.stderr
    rejects = [json.loads(x) for x in (tmp / "run/ingest/rejects.jsonl").read_text().splitlines()]
    labelled = {}
    for shard in sorted((tmp / "run/pseudo_label/shards").rglob("*.tar")):
        for key, members in iter_shard(str(shard)):
            labelled[key] = json.loads(members["json"])
    return tmp, rejects, labelled


def _reason(rejects, needle):
    hits = [r["reason"] for r in rejects if needle in json.dumps(r)]
    assert len(hits) == 1, (needle, rejects)
    return hits[0]


def test_long_file_names_are_ingested_and_labelled(hostile_run):
    _, _, labelled = hostile_run
    for key in ("man-" + "L" * 107, "man-" + "M" * 80, "scan-sub_" + "N" * 110, "ext-" + "z" * 300):
        assert key in labelled and labelled[key]["text"] is not None, sorted(labelled)


def test_nested_json_is_one_reject(hostile_run):
    _, rejects, _ = hostile_run
    assert _reason(rejects, "m.jsonl:6") == "manifest line is not JSON: nested too deeply"
    assert _reason(rejects, "ext-000000.tar:deep") == "sample json is nested too deeply"


def test_links_out_of_a_scanned_folder_are_refused(hostile_run):
    tmp, rejects, labelled = hostile_run
    assert _reason(rejects, "link_out.wav").startswith("file 'link_out.wav' is a link to outside")
    assert _reason(rejects, "x.txt").startswith("file 'x.txt' is a link to outside")
    assert not any("secret" in json.dumps(rec) or "outside the folder" in json.dumps(rec) for rec in labelled.values())
    for shard in (tmp / "run/ingest/shards").rglob("*.tar"):
        assert b"text from outside" not in shard.read_bytes() and _wav(freq=999)[44:] not in shard.read_bytes()


def test_path_aliases_get_one_key(hostile_run):
    _, rejects, labelled = hostile_run
    assert "man-g07" in labelled and labelled["man-g07"]["reference"] == "one"  # the first line's
    assert _reason(rejects, "nope/../g07.wav").startswith("duplicate key")
    assert "scan-real" in labelled and "scan-alias" not in labelled  # alias.wav -> real.wav
    assert _reason(rejects, "alias.wav").startswith("duplicate key")


def test_duplicate_keys_from_a_shard_are_rejects(hostile_run):
    _, rejects, labelled = hostile_run
    assert "ext-same" in labelled and labelled["ext-same"]["reference"] == "a"
    assert _reason(rejects, "ext-000000.tar:dirB/same").startswith("duplicate key ext-same")


def test_non_string_reference_is_refused(hostile_run):
    _, rejects, labelled = hostile_run
    assert _reason(rejects, "m.jsonl:5") == "manifest line's 'text' is not a string (int)"
    assert "man-num" not in labelled


def test_every_input_is_labelled_or_rejected(hostile_run):
    tmp, rejects, labelled = hostile_run
    m = json.loads((tmp / "run/ingest/manifest.json").read_text())
    assert m["counts"]["rejected"] == len(rejects) == 8, rejects
    assert m["counts"]["out"] == len(labelled) == 8, sorted(labelled)


# ----------------------------------------------------------------------------- sources that fail
def test_zero_usable_inputs_is_a_user_error(tmp_path):
    (tmp_path / "empty").mkdir()
    r = cli("run", _cfg(tmp_path, [{"dir": str(tmp_path / "empty"), "modality": "audio"}]), "--run-dir", tmp_path / "r",
            "--until", "ingest")
    assert r.returncode == 2 and "ingest: no usable input (0 rejected)" in r.stderr and "Traceback" not in r.stderr, r.stderr


@pytest.mark.parametrize("url", ["gs://bucket/shard-{000..001}.tar", "http://127.0.0.1:9/x.tar", "hf://x/y.tar"])
def test_urls_that_start_a_program_need_allow_pipe(tmp_path, url):
    r = cli("config", _cfg(tmp_path, [{"type": "shards", "urls": url, "modality": "audio"}]))
    assert r.returncode == 2 and "allow_pipe" in r.stderr and "Traceback" not in r.stderr, r.stderr


@pytest.mark.parametrize("url,needle", [("pipe:exit 3", "the shard could not be read"),
                                        ("http://127.0.0.1:9/x.tar", "the shard could not be read")])
def test_a_shard_that_cannot_be_fetched_is_one_line(tmp_path, url, needle):
    r = cli("run", _cfg(tmp_path, [{"type": "shards", "urls": url, "modality": "audio", "allow_pipe": True}]),
            "--run-dir", tmp_path / "r", "--until", "ingest")
    assert r.returncode == 2 and "Traceback" not in r.stderr and "1 of 1 inputs rejected" in r.stderr, r.stderr
    rejects = [json.loads(x) for x in (tmp_path / "r/ingest/rejects.jsonl").read_text().splitlines()]
    assert any(x["reason"].startswith(needle) for x in rejects), rejects


def test_oversized_file_in_a_folder_is_refused_unread(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    (d / "ok.wav").write_bytes(_wav())
    (d / "big.wav").write_bytes(_wav(seconds=40.0))  # 1.3 MB
    cfg = _cfg(tmp_path, [{"dir": str(d), "modality": "audio"}])
    r = cli("run", cfg, "--run-dir", tmp_path / "r", "--until", "ingest", "ingest.max_member_mb=1")
    assert r.returncode == 0, r.stderr
    rejects = [json.loads(x) for x in (tmp_path / "r/ingest/rejects.jsonl").read_text().splitlines()]
    assert [x["reason"] for x in rejects] == [
        f"file is {(d / 'big.wav').stat().st_size} bytes, more than ingest.max_member_mb=1 MB (unread)"]


def test_labels_edited_inside_a_pseudo_label_shard_make_it_stale(hostile_run, tmp_path):
    """The manifest holds every product's sha256: a label edited in place (same size) is caught by `status`,
    and `--from distill` refuses to start on it."""
    import shutil

    tmp, _, _ = hostile_run
    run = tmp_path / "run"
    shutil.copytree(tmp / "run", run)
    shard = sorted((run / "pseudo_label/shards").rglob("*.tar"))[0]
    raw = bytearray(shard.read_bytes())
    at = raw.find(b'"teacher_text": "') + len(b'"teacher_text": "')
    raw[at] = ord("X") if raw[at] != ord("X") else ord("Y")
    shard.write_bytes(bytes(raw))
    r = cli("status", run)
    rel = shard.relative_to(run / "pseudo_label").as_posix()
    assert f"pseudo_label   stale    output {rel} does not match its sha256" in r.stdout, r.stdout
    r = cli("run", tmp / "cfg.yaml", "--run-dir", run, "--from", "distill", "stages=[ingest,pseudo_label,distill]")
    assert r.returncode == 2 and "upstream stage pseudo_label is stale" in r.stderr and "Traceback" not in r.stderr, r.stderr
