"""ingest and pseudo_label on text and a toy modality that lives in a test file (tests/toy_vibration.py)."""

import json
import tarfile
from pathlib import Path

import numpy as np
import yaml

from conftest import cli


def _write_cfg(tmp_path, sources, **extra):
    cfg = {"plugins": ["toy_vibration"], "stages": ["ingest", "pseudo_label"],
           "ingest": {"sources": sources, "samples_per_shard": 4}, **extra}
    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def _vib_folder(tmp_path):
    d = tmp_path / "vib"
    d.mkdir()
    rng = np.random.default_rng(0)
    lines = []
    for i in range(10):
        scale = 2.0 if i % 2 else 0.1
        (d / f"s{i}.vib").write_bytes(rng.normal(0, scale, 64).astype("<f4").tobytes())
        lines.append(json.dumps({"file": f"s{i}.vib", "state": "shaking" if scale > 1 else "steady"}))
    (d / "bad.vib").write_bytes(b"abc")  # not a float32 series
    (d / "nan.vib").write_bytes(np.array([1.0, np.nan], dtype="<f4").tobytes())
    lines += [json.dumps({"file": "bad.vib", "state": "x"}), json.dumps({"file": "nan.vib", "state": "x"}),
              "", "{not json", json.dumps({"file": "missing.vib"}), json.dumps({"file": "../../etc/passwd"})]
    (d / "m.jsonl").write_bytes(("\n".join(lines) + "\n").encode() + b"\xff\xfe\n")
    return d


def test_toy_modality_ingest_and_pseudo_label_with_rejects(tmp_path):
    d = _vib_folder(tmp_path)
    cfg = _write_cfg(tmp_path, [{"modality": "vibration", "dir": str(d), "manifest": "m.jsonl"}])
    r = cli("run", cfg, "--run-dir", tmp_path / "run", "ingest.max_reject_fraction=0.9", check=True)
    assert "ingest: finished" in r.stdout
    rejects = [json.loads(l) for l in (tmp_path / "run/ingest/rejects.jsonl").read_text().splitlines()]
    reasons = sorted(r["reason"].split(":")[0] for r in rejects)
    assert reasons == sorted(["NaN or infinite samples", "file '../../etc/passwd' is outside " + str(d),
                              "manifest line is empty", "manifest line is not JSON", "manifest line is not UTF-8",
                              "missing file", "not a float32 series"]), reasons
    m = json.loads((tmp_path / "run/ingest/manifest.json").read_text())
    assert m["counts"]["out"] == 10 and m["counts"]["rejected"] == 7
    # pseudo-labels: the toy teacher's text, the reference kept beside it, features as .npy
    labels = {}
    for shard in sorted((tmp_path / "run/pseudo_label/shards/vibration").glob("*.tar")):
        with tarfile.open(shard) as t:
            for mem in t.getmembers():
                if mem.name.endswith(".json"):
                    rec = json.loads(t.extractfile(mem).read())
                    labels[rec["key"]] = rec
                assert mem.mtime == 0 and mem.uid == 0
    assert len(labels) == 10
    for rec in labels.values():
        assert rec["text"] == f"the machine is {rec['reference']}"
        assert rec["teacher"]["name"] == "variance" and rec["split"] in ("train", "val", "test")


def test_too_many_rejects_is_a_user_error(tmp_path):
    d = _vib_folder(tmp_path)
    cfg = _write_cfg(tmp_path, [{"modality": "vibration", "dir": str(d), "manifest": "m.jsonl"}])
    r = cli("run", cfg, "--run-dir", tmp_path / "run", "ingest.max_reject_fraction=0.1")
    assert r.returncode == 2 and "more than max_reject_fraction" in r.stderr and "Traceback" not in r.stderr


def test_ingest_is_deterministic_and_resumes_byte_for_byte(tmp_path):
    src = [{"type": "synthetic", "modality": "vibration", "count": 14, "name": "vib"},
           {"type": "synthetic", "modality": "text", "count": 9, "name": "words"}]
    cfg = _write_cfg(tmp_path, src)
    cli("run", cfg, "--run-dir", tmp_path / "a", check=True)
    r = cli("run", cfg, "--run-dir", tmp_path / "b", env={"GROUNDGAN_FAULT": "shard_done:2"})
    assert r.returncode == -9
    st = json.loads(cli("status", tmp_path / "b", "--json", check=True).stdout)
    assert st["ingest"]["state"] == "partial" and st["ingest"]["detail"] == "shards 2 of 7"
    r = cli("run", cfg, "--run-dir", tmp_path / "b", check=True)
    assert "2 of 7 shards already done" in r.stdout
    for stage in ("ingest", "pseudo_label"):
        a = sorted((tmp_path / "a" / stage / "shards").rglob("*.tar"))
        b = sorted((tmp_path / "b" / stage / "shards").rglob("*.tar"))
        assert [p.name for p in a] == [p.name for p in b] and len(a) >= 4
        for x, y in zip(a, b):
            assert x.read_bytes() == y.read_bytes(), x.name


def test_shards_and_text_sources(tmp_path):
    # Shards made by a first run are the input of a second (users at scale point ingest at their shards).
    cfg = _write_cfg(tmp_path, [{"type": "synthetic", "modality": "vibration", "count": 6, "name": "vib"}])
    cli("run", cfg, "--run-dir", tmp_path / "a", "--until", "ingest", check=True)
    shard_dir = tmp_path / "a/ingest/shards/vibration"
    tdir = tmp_path / "texts"
    tdir.mkdir()
    (tdir / "t.jsonl").write_text(json.dumps({"text": "a real sentence."}) + "\n" + json.dumps({"text": "another one."}) + "\n")
    (tdir / "one.txt").write_text("a file of text\n")
    cfg2 = _write_cfg(tmp_path, [{"type": "shards", "urls": str(shard_dir / "vib-{000000..000001}.tar"), "name": "ext"},
                                 {"type": "text", "dir": str(tdir), "manifest": "t.jsonl", "name": "jl"},
                                 {"type": "text", "dir": str(tdir), "name": "txt"}])
    r = cli("run", cfg2, "--run-dir", tmp_path / "b", check=True)
    m = json.loads((tmp_path / "b/ingest/manifest.json").read_text())
    assert m["counts"]["out"] == 6 + 2 + 1, r.stdout
    r = cli("config", cfg2, "ingest.sources=[{type: shards, urls: 'pipe:cat x.tar', modality: text}]")
    assert r.returncode == 2 and "allow_pipe" in r.stderr


def _audio_shard(path: Path) -> None:
    """A webdataset shard as a user brings one: a clip with its transcript in a .txt, one with it in the .json,
    one whose .txt comes before its media, a drawing with a .cls, and a member nobody reads."""
    from modalities.audio import Audio, AudioConfig
    from modalities.image import Image as ImageModality, ImageConfig

    rng = np.random.default_rng(0)
    wav = [Audio(AudioConfig()).synthesize(i, rng)[0] for i in range(3)]
    img = ImageModality(ImageConfig()).synthesize(0, rng)[0]
    members = [("c1.wav", wav[0]), ("c1.txt", b"please hold the line\n"),
               ("c2.wav", wav[1]), ("c2.json", json.dumps({"text": "the number you have dialled"}).encode()),
               ("c3.txt", b"goodbye"), ("c3.wav", wav[2]),
               ("d1.png", img), ("d1.cls", b"animals"), ("d1.pyd", b"\x00binary")]
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, __import__("io").BytesIO(data))


def test_shard_references_in_txt_and_cls_members_and_ignored_members_reported(tmp_path):
    _audio_shard(tmp_path / "s-000.tar")
    cfg = _write_cfg(tmp_path, [{"type": "shards", "urls": str(tmp_path / "s-000.tar"), "name": "web"}],
                     stages=["ingest"])
    r = cli("run", cfg, "--run-dir", tmp_path / "run", check=True)
    assert "1 shard members no modality reads" in r.stdout
    refs = {}
    for t in sorted((tmp_path / "run/ingest/shards").rglob("*.tar")):
        with tarfile.open(t) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".json"):
                    rec = json.loads(tar.extractfile(m).read())
                    refs[rec["key"]] = (rec["modality"], rec["reference"])
    assert refs == {"web-c1": ("audio", "please hold the line"), "web-c2": ("audio", "the number you have dialled"),
                    "web-c3": ("audio", "goodbye"), "web-d1": ("image", "animals")}
    ignored = [json.loads(x) for x in (tmp_path / "run/ingest/ignored_members.jsonl").read_text().splitlines()]
    assert ignored == [{"shard": str(tmp_path / "s-000.tar"), "extension": "pyd", "members": 1}]
    assert json.loads((tmp_path / "run/ingest/manifest.json").read_text())["counts"]["ignored_members"] == 1


def _splits(run: Path) -> dict[str, str]:
    """key -> split of every sample ingest wrote."""
    out = {}
    for shard in sorted((run / "ingest/shards").rglob("*.tar")):
        with tarfile.open(shard) as t:
            for mem in t.getmembers():
                if mem.name.endswith(".json"):
                    rec = json.loads(t.extractfile(mem).read())
                    out[rec["key"]] = rec["split"]
    return out


def _distinct_vib_folder(tmp_path, n=24):
    d = tmp_path / "vib"
    d.mkdir()
    rng = np.random.default_rng(1)
    for i in range(n):
        (d / f"s{i:02d}.vib").write_bytes(rng.normal(0, 1.0, 32).astype("<f4").tobytes())
    return d


def test_renaming_a_source_keeps_every_samples_split(tmp_path):
    d = _distinct_vib_folder(tmp_path)
    split = {"train": 0.5, "val": 0.25, "test": 0.25}
    by_name = {}
    for name in ("mine", "mineshards"):
        cfg = _write_cfg(tmp_path, [{"modality": "vibration", "dir": str(d), "name": name}], stages=["ingest"])
        cli("run", cfg, "--run-dir", tmp_path / name, f"ingest.split={json.dumps(split)}", check=True)
        by_name[name] = {k.split("-", 1)[1]: s for k, s in _splits(tmp_path / name).items()}
    assert len(by_name["mine"]) == 24 and by_name["mine"] == by_name["mineshards"]
    assert len(set(by_name["mine"].values())) == 3  # all three splits are used: the test can tell them apart


def test_identical_bytes_are_one_sample_whatever_their_keys(tmp_path):
    d = _distinct_vib_folder(tmp_path, n=6)
    (d / "copy_of_s03.vib").write_bytes((d / "s03.vib").read_bytes())
    other = tmp_path / "other"
    other.mkdir()
    (other / "again.vib").write_bytes((d / "s05.vib").read_bytes())
    cfg = _write_cfg(tmp_path, [{"modality": "vibration", "dir": str(d), "name": "a"},
                                {"modality": "vibration", "dir": str(other), "name": "b"}], stages=["ingest"])
    cli("run", cfg, "--run-dir", tmp_path / "run", "ingest.max_reject_fraction=0.5", check=True)
    keys = _splits(tmp_path / "run")
    assert sorted(keys) == ["a-copy_of_s03", "a-s00", "a-s01", "a-s02", "a-s04", "a-s05"]
    rejects = {r["key"]: r["reason"] for r in map(json.loads, (tmp_path / "run/ingest/rejects.jsonl").read_text().splitlines())}
    # the first key in sorted order keeps the sample ("a-copy_of_s03" < "a-s03": the copy's name wins)
    assert rejects == {"a-s03": rejects["a-s03"], "b-again": rejects["b-again"]}, rejects
    assert rejects["b-again"].startswith("duplicate of a-s05") and rejects["a-s03"].startswith("duplicate of a-copy_of_s03")


def test_a_source_with_a_split_puts_every_input_there_and_leaves_the_others_where_they_were(tmp_path):
    """ingest.sources[i].split: every input of that source in one split (here the pool, for the phase alone); the
    other sources' inputs keep the split their bytes give them; a source without it hashes as before (the config
    hash leaves an unset added setting out, so runs made before it stay done)."""
    from pipeline.config import load_config
    from pipeline.registry import stage_registry

    d = _distinct_vib_folder(tmp_path, n=24)
    extra = tmp_path / "extra"
    extra.mkdir()
    rng = np.random.default_rng(7)
    for i in range(12):
        (extra / f"e{i:02d}.vib").write_bytes(rng.normal(0, 1.0, 32).astype("<f4").tobytes())
    split = "ingest.split={train: 0.5, val: 0.25, test: 0.25}"
    plain = _write_cfg(tmp_path, [{"modality": "vibration", "dir": str(d), "name": "v"}], stages=["ingest"])
    cli("run", plain, "--run-dir", tmp_path / "plain", split, check=True)
    before = _splits(tmp_path / "plain")
    h0 = stage_registry.get("ingest").config_hash(load_config([str(plain)], [split]))
    cfg = _write_cfg(tmp_path, [{"modality": "vibration", "dir": str(d), "name": "v", "split": None}], stages=["ingest"])
    assert stage_registry.get("ingest").config_hash(load_config([str(cfg)], [split])) == h0
    cfg = _write_cfg(tmp_path, [{"modality": "vibration", "dir": str(d), "name": "v"},
                                {"modality": "vibration", "dir": str(extra), "name": "x", "split": "pool"}],
                     stages=["ingest"])
    cli("run", cfg, "--run-dir", tmp_path / "run", split, check=True)
    got = _splits(tmp_path / "run")
    assert {k: v for k, v in got.items() if k.startswith("v-")} == before
    assert {k: v for k, v in got.items() if k.startswith("x-")} == {f"x-e{i:02d}": "pool" for i in range(12)}
    # the phase takes the pool by default when a source fills it, though ingest.split.pool is 0
    loaded = load_config([str(cfg)], [split, "stages=[ingest, pseudo_label, distill, adversarial]"])
    assert loaded.root.ingest.split.pool == 0 and loaded.root.adversarial.inputs == ["pool"]
    for bad, why in (({"split": "holdout"}, "must be one of train, pool, val, test"),
                     ({"split": "test", "split_key": "speaker"}, "give one")):
        cfg = _write_cfg(tmp_path, [{"modality": "vibration", "dir": str(d), "name": "v", **bad}], stages=["ingest"])
        r = cli("run", cfg, "--run-dir", tmp_path / "bad")
        assert r.returncode == 2 and why in r.stderr and "ingest.sources[0]" in r.stderr


def test_split_key_keeps_a_named_field_in_one_split(tmp_path):
    d = _distinct_vib_folder(tmp_path, n=24)
    lines = [json.dumps({"file": f"s{i:02d}.vib", "speaker": f"spk{i % 4}"}) for i in range(24)]
    (d / "m.jsonl").write_text("\n".join(lines + [json.dumps({"file": "nofield.vib"})]) + "\n")
    (d / "nofield.vib").write_bytes(np.ones(8, "<f4").tobytes())
    cfg = _write_cfg(tmp_path, [{"modality": "vibration", "dir": str(d), "manifest": "m.jsonl", "name": "v",
                                 "split_key": "speaker"}], stages=["ingest"])
    cli("run", cfg, "--run-dir", tmp_path / "run", "ingest.split={train: 0.5, val: 0.25, test: 0.25}", check=True)
    splits = _splits(tmp_path / "run")
    assert len(splits) == 24
    by_speaker = {}
    for i in range(24):
        by_speaker.setdefault(f"spk{i % 4}", set()).add(splits[f"v-s{i:02d}"])
    assert all(len(s) == 1 for s in by_speaker.values()), by_speaker
    rejects = [json.loads(l) for l in (tmp_path / "run/ingest/rejects.jsonl").read_text().splitlines()]
    assert [r["key"] for r in rejects] == ["v-nofield"] and "'speaker'" in rejects[0]["reason"]
